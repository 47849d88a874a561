"""Axial/coronal/sagittal slicing: exact restacking, world affines, and no flipped axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import (
    VIEWS,
    SliceViewsd,
    cta_volume_transforms,
    restack_slices,
    slice_affine,
    slice_datalist,
    slice_volume,
    write_cta_phantom,
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    paths = write_cta_phantom(tmp_path_factory.mktemp("views"), rng=11)
    return {"image": str(paths["image"]), "label": str(paths["label"])}


@pytest.fixture(scope="module")
def slices(case):
    return slice_datalist([case])


@pytest.mark.parametrize("view", VIEWS)
def test_restacking_gives_back_the_volume_exactly(rng, view):
    volume = rng.random((2, 7, 5, 4))
    cut = slice_volume(volume, view)
    assert cut.shape[0] == volume.shape[1 + {"axial": 2, "coronal": 1, "sagittal": 0}[view]]
    np.testing.assert_array_equal(restack_slices(cut, view), volume)


@pytest.mark.parametrize("view", VIEWS)
def test_slice_affine_maps_pixels_to_the_voxels_world_position(rng, view):
    affine = np.array([[0.8, 0, 0, -20], [0, 0.7, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1.0]])
    volume = rng.random((1, 6, 5, 4))
    cut = slice_volume(volume, view)
    for index in range(len(cut)):
        a2d = slice_affine(affine, volume.shape[1:], view, index)
        for row, col in [(0, 0), (cut.shape[2] - 1, 1), (1, cut.shape[3] - 1)]:
            world = a2d @ [row, col, 0, 1]
            voxel = np.linalg.solve(affine, world)[:3]
            ijk = tuple(round(v) for v in voxel)
            np.testing.assert_allclose(voxel, ijk, atol=1e-9)
            assert volume[(0, *ijk)] == cut[index, 0, row, col]


def test_cta_volumes_are_oriented_to_ras_and_sliced_per_view(case, slices):
    volume = cta_volume_transforms()(dict(case))
    assert tuple(volume["image"].shape) == (1, 64, 56, 40)
    assert np.all(np.diag(volume["image"].affine.numpy())[:3] > 0)  # the LPS file became RAS
    assert 0.0 <= float(volume["image"].min()) and float(volume["image"].max()) <= 1.0
    counts = {v: sum(s["view"] == v for s in slices) for v in VIEWS}
    assert counts == {"axial": 40, "coronal": 56, "sagittal": 64}
    for view in VIEWS:
        stack = np.stack([s["label"].numpy() for s in slices if s["view"] == view])
        np.testing.assert_array_equal(restack_slices(stack, view), volume["label"].numpy())
        empty = [s["label_empty"] for s in slices if s["view"] == view]
        assert empty == [not stack[i].any() for i in range(len(stack))]
        assert any(empty) and not all(empty)  # the heart does not fill the whole volume
    sample = slices[0]
    assert sample["source"] == case["image"]
    assert sample["image"].shape[0] == 1 and sample["label"].shape[0] == 1


def _centroid(slices, view):
    stack = np.stack([s["label"].numpy()[0] for s in slices if s["view"] == view])
    rows, cols = np.nonzero(stack.sum(axis=0))
    return rows.mean() / stack.shape[1], cols.mean() / stack.shape[2]


def test_left_right_and_anterior_posterior_are_not_flipped(slices):
    # the phantom's heart sits on the patient's LEFT, ANTERIOR, and BELOW the middle
    row, col = _centroid(slices, "axial")
    assert row < 0.5  # anterior at the top
    assert col > 0.5  # patient's left on the image's right (radiological convention)
    row, col = _centroid(slices, "coronal")
    assert row > 0.5  # below the middle: superior is at the top
    assert col > 0.5
    row, col = _centroid(slices, "sagittal")
    assert row > 0.5
    assert col < 0.5  # anterior on the left


def test_affine_of_a_2d_sample_points_at_the_heart(case, slices):
    heart = [s for s in slices if s["view"] == "axial" and not s["label_empty"]]
    sample = heart[len(heart) // 2]
    rows, cols = np.nonzero(sample["label"].numpy()[0])
    world = sample["affine"] @ [rows.mean(), cols.mean(), 0, 1]
    assert world[0] < 0 < world[1]  # RAS: x < 0 is patient left, y > 0 anterior


def test_slicing_refuses_non_ras_or_mismatched_volumes(case):
    volume = cta_volume_transforms()(dict(case))
    lps = volume["image"].clone()
    lps.affine = lps.affine @ torch.diag(torch.tensor([-1.0, 1, 1, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="orient it to RAS first"):
        SliceViewsd(("image",))({"image": lps})
    with pytest.raises(ValueError, match="align them first"):
        SliceViewsd()({"image": volume["image"], "label": volume["label"][:, :-1]})
    with pytest.raises(ValueError, match="view must be one of"):
        SliceViewsd(views=("oblique",))
    with pytest.raises(ValueError, match="hu_window must be"):
        cta_volume_transforms(hu_window=(100, -100))


def test_isotropic_resampling_changes_counts_per_view(case):
    samples = slice_datalist([case], views=("axial",), spacing=1.5)
    volume = cta_volume_transforms(spacing=1.5)(dict(case))
    assert len(samples) == volume["image"].shape[3]
    np.testing.assert_allclose(np.abs(np.diag(volume["image"].affine.numpy())[:3]), 1.5)
