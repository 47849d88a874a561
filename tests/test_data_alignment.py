"""Label alignment through two affines: shifted, flipped and finer grids, and loud failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipeline.data import AlignLabel, align_label_to_image, cta_phantom


def _mt(array, affine):
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine, dtype=torch.float64))


@pytest.fixture(scope="module")
def phantom():
    return cta_phantom(shape=(32, 28, 20), rng=5)


def test_label_on_larger_shifted_grid_lands_exactly(phantom):
    # like ../shared/data/ct_heart: the mask lives on a bigger grid with another origin
    pad = (7, 4, 5)
    big = np.zeros(tuple(n + 2 * p for n, p in zip(phantom.label.shape, pad, strict=True)),
                   np.uint8)
    big[pad[0]:pad[0] + 32, pad[1]:pad[1] + 28, pad[2]:pad[2] + 20] = phantom.label
    big_affine = phantom.affine.copy()
    big_affine[:3, 3] -= phantom.affine[:3, :3] @ np.array(pad)
    aligned = AlignLabel()(_mt(big, big_affine), _mt(phantom.image, phantom.affine))
    np.testing.assert_array_equal(aligned.numpy(), phantom.label)
    np.testing.assert_allclose(aligned.affine.numpy(), phantom.affine)


def test_label_with_flipped_axis_is_unflipped(phantom):
    # same grid stored with the y axis reversed (LAS vs LPS, as the shared DICOM seg)
    flipped_affine = phantom.affine.copy()
    flipped_affine[:3, 1] *= -1
    flipped_affine[:3, 3] = phantom.affine[:3, :3] @ [0, 27, 0] + phantom.affine[:3, 3]
    flipped = phantom.label[:, ::-1, :].copy()
    aligned = align_label_to_image(_mt(flipped, flipped_affine), _mt(phantom.image,
                                                                     phantom.affine))
    np.testing.assert_array_equal(aligned.numpy(), phantom.label)


def test_label_on_twice_finer_grid_is_resampled_by_nearest_neighbour(phantom):
    fine = phantom.label.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_affine = phantom.affine.copy()
    fine_affine[:3, :3] /= 2
    # fine voxel centres sit at −¼ and +¼ of a coarse voxel: shift so coarse centres hit fine ones
    fine_affine[:3, 3] -= phantom.affine[:3, :3] @ np.full(3, 0.25)
    aligned = align_label_to_image(_mt(fine, fine_affine), _mt(phantom.image, phantom.affine))
    np.testing.assert_array_equal(aligned.numpy(), phantom.label)


def test_channel_first_label_keeps_its_channel(phantom):
    aligned = AlignLabel()(_mt(phantom.label[None], phantom.affine),
                           _mt(phantom.image[None], phantom.affine))
    assert aligned.shape == (1, 32, 28, 20)


def test_disjoint_or_cut_labels_are_errors(phantom):
    far = phantom.affine.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(ValueError, match="does not overlap its image"):
        align_label_to_image(_mt(phantom.label, far), _mt(phantom.image, phantom.affine))
    shifted = phantom.affine.copy()
    shifted[:3, 3] += phantom.affine[:3, :3] @ np.array([12.0, 0, 0])
    with pytest.raises(ValueError, match=r"\d+ of \d+ foreground voxels fall outside"):
        align_label_to_image(_mt(phantom.label, shifted), _mt(phantom.image, phantom.affine))
    cut = align_label_to_image(_mt(phantom.label, shifted), _mt(phantom.image, phantom.affine),
                               allow_crop=True)
    assert 0 < cut.numpy().sum() < phantom.label.sum()


def test_non_binary_labels_need_a_value(phantom):
    multi = phantom.label * 3 + (phantom.image > 500)
    with pytest.raises(ValueError, match="label is not binary"):
        AlignLabel()(_mt(multi, phantom.affine), _mt(phantom.image, phantom.affine))
    picked = AlignLabel(label_value=3)(_mt(multi, phantom.affine), _mt(phantom.image,
                                                                       phantom.affine))
    np.testing.assert_array_equal(picked.numpy(), (multi == 3).astype(np.uint8))


def _scipy_resample(array, mapping, shape, order):
    """The interpolating resample, the oracle for reorientations that move voxels whole."""
    from scipy import ndimage

    return ndimage.affine_transform(array, mapping[:3, :3], offset=mapping[:3, 3],
                                    output_shape=shape, order=order, mode="constant", cval=0)


@pytest.mark.parametrize("order", [0, 1])
def test_reorientations_move_voxels_exactly_as_interpolation_would(order):
    # signed axis permutations with whole-voxel shifts, some reaching outside the source:
    # the voxels are moved without interpolating, to the values scipy interpolates
    import itertools

    from pipeline.data.alignment import resample_to_grid

    rng = np.random.default_rng(3)
    array = rng.random((5, 7, 4)).astype(np.float32)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            mapping = np.eye(4)
            mapping[:3, :3] = 0.0
            for j, i in enumerate(perm):
                mapping[i, j] = signs[j]
            mapping[:3, 3] = rng.integers(-3, 9, 3)
            shape = tuple(int(array.shape[i]) + int(rng.integers(-1, 3)) for i in perm)
            dst_affine = np.diag([0.8, 0.8, 2.0, 1.0]) @ mapping  # src_affine⁻¹·dst = mapping
            got = resample_to_grid(array, np.diag([0.8, 0.8, 2.0, 1.0]), dst_affine, shape,
                                   order=order)
            expected = _scipy_resample(array, mapping, shape, order)
            assert got.shape == shape and got.dtype == array.dtype
            np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"{perm} {signs}")
    far = np.eye(4)
    far[:3, 3] = 50  # nothing lands inside: all zero, as interpolation gives
    assert not resample_to_grid(array, np.eye(4), far, (3, 3, 3)).any()
    rotated = np.eye(4)
    rotated[:2, :2] = [[0.6, -0.8], [0.8, 0.6]]  # not a reorientation: interpolated
    np.testing.assert_allclose(resample_to_grid(array, np.eye(4), rotated, (5, 7, 4), order=1),
                               _scipy_resample(array, rotated, (5, 7, 4), 1), atol=1e-6)


def test_a_reoriented_volume_comes_back_whole():
    # the affines of real scans (LPS, oblique origin, fractional spacing) make the voxel
    # mapping integer only up to round-off; interpolation then dropped whole border planes
    # (sampled a hair outside the grid), moving voxels keeps every one
    from pipeline.data.alignment import resample_to_grid

    lps = np.diag([-0.7, -0.7, 2.5, 1.0])
    lps[:3, 3] = [179.65, 201.35, -312.7]
    ras = lps.copy()
    ras[:2, :2] *= -1  # the same grid with x and y reversed, as Orientation("RAS") makes it
    ras[:2, 3] = lps[:2, 3] + lps[:2, :2].diagonal() * (np.array([40, 36]) - 1)
    mapping = np.linalg.solve(ras, lps)
    assert not np.array_equal(mapping, np.rint(mapping))  # round-off, as in practice
    volume = np.random.default_rng(0).random((40, 36, 12)).astype(np.float32) + 1.0
    there = resample_to_grid(volume, lps, ras, volume.shape, order=1)
    np.testing.assert_array_equal(there, volume[::-1, ::-1])
    np.testing.assert_array_equal(resample_to_grid(there, ras, lps, volume.shape, order=0),
                                  volume)
