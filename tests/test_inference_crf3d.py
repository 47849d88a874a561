"""Batch inference with ``--crf-3d``: one 6-connected graph cut over the volume replaces the
slice-by-slice CRF; masks stay on the input's grid and are the exact 3-D MAP labelling."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import ScaleIntensityRange

from pipeline.cli import main
from pipeline.crf import volume_energy, volume_map_labelling
from pipeline.data import read_volume, write_cta_phantom
from pipeline.inference import TrainedModel, VolumePredictor
from tests._tiny_models import tiny_cta_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (40, 36, 24)
NOISY = (("noisy3", 3), ("noisy4", 4))  # case name, phantom seed


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny CNN + piecewise CRF trained on axial slices of phantom volumes (32×32)."""
    return tiny_cta_model(tmp_path_factory.mktemp("train"), SHAPE)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Two phantoms with 6× the training noise (150 HU), stored LPS like most CT."""
    root = tmp_path_factory.mktemp("noisy")
    for case, seed in NOISY:
        write_cta_phantom(root, case, dicom=False, rng=seed, shape=SHAPE, noise=150.0)
    return root


def _jaccard(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return np.sum(a & b) / np.sum(a | b)


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_crf_3d_mask_is_the_volume_map_on_the_input_grid(model, noisy, tmp_path):
    common = ["infer", "--input", str(noisy), "--model", str(model), "--exclude", "label",
              "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "3d"), "--crf-3d", "--probabilities",
                 "--cnn"]) == 0
    assert main([*common, "--output", str(tmp_path / "2d")]) == 0
    rows = json.loads((tmp_path / "3d" / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(float(r["crf_seconds"]) > 0 for r in rows)
    vm = TrainedModel.from_checkpoint(model)
    assert vm.weights is not None and vm.weights.w2 + vm.weights.w3 > 0
    scores = {"cnn": [], "2d": [], "3d": []}
    for case, _ in NOISY:
        image = noisy / case / "image.nii.gz"
        label, label_affine = _load(noisy / case / "label.nii.gz")
        mask3, affine3 = _load(tmp_path / "3d" / case / "image_mask.nii.gz")
        mask2, affine2 = _load(tmp_path / "2d" / case / "image_mask.nii.gz")
        cnn, _ = _load(tmp_path / "3d" / case / "image_cnn_mask.nii.gz")
        prob, _ = _load(tmp_path / "3d" / case / "image_prob.nii.gz")
        # on the input's own grid
        assert mask3.shape == SHAPE and mask2.shape == SHAPE
        np.testing.assert_allclose(affine3, nib.load(image).affine, atol=1e-5)
        np.testing.assert_allclose(affine3, label_affine, atol=1e-5)
        np.testing.assert_allclose(affine2, affine3, atol=1e-5)
        # exactly the 3-D MAP labelling of the fused probabilities: the working grid is the
        # input's flipped to RAS, which changes neither the energy nor its minimiser
        volume = read_volume(image)
        windowed = np.asarray(ScaleIntensityRange(*vm.hu_window, 0.0, 1.0, clip=True)(
            volume[None]))[0]
        spacing = np.linalg.norm(np.asarray(volume.affine)[:3, :3], axis=0)
        assert spacing[2] > 2 * spacing[0]  # anisotropic: the spacing factors matter
        expected = volume_map_labelling(prob, windowed, vm.weights, spacing=spacing,
                                        beta=vm.beta)
        np.testing.assert_array_equal(mask3, expected)

        def e(y, windowed=windowed, prob=prob, spacing=spacing):
            return volume_energy(y, prob, windowed, vm.weights, spacing=spacing, beta=vm.beta)

        assert e(mask3) < e(mask2) and e(mask3) < e(cnn)
        assert np.count_nonzero(mask3 != mask2) > 0  # slices are coupled
        for key, mask in (("cnn", cnn), ("2d", mask2), ("3d", mask3)):
            scores[key].append(_jaccard(mask, label))
    # the noise is too strong for the tiny network (Jaccard ~0.5): the coupled cut must be
    # at least as good as the per-slice CRF, up to a small tolerance, on both cases
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    assert means["3d"] >= means["2d"] - 0.01, scores
    assert min(np.subtract(scores["3d"], scores["2d"])) > -0.02, scores
    assert means["3d"] > 0.35, scores


def test_bundle_infer_and_predictor_take_crf_3d(model, noisy, tmp_path):
    from pipeline.bundle import infer

    rows = infer(input_dir=str(noisy), output_dir=str(tmp_path / "b"), model_file=str(model),
                 exclude=["label"], crf_3d=True)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    predictor = VolumePredictor(model, ["axial"], crf_3d=True)
    for case, _ in NOISY:
        result = predictor.predict(read_volume(noisy / case / "image.nii.gz"))
        assert set(result.seconds) == {"cnn", "crf", "crf_3d"}
        assert result.seconds["crf_3d"] == result.seconds["crf"] > 0
        mask, _ = _load(tmp_path / "b" / case / "image_mask.nii.gz")
        np.testing.assert_array_equal(mask, result.mask)
    plain = VolumePredictor(model, ["axial"]).predict(
        read_volume(noisy / NOISY[0][0] / "image.nii.gz"))
    assert "crf_3d" not in plain.seconds
