"""Batch inference: masks on the input's own grid (LPS, RAS, DICOM), every view, fusion,
robustness to bad cases, and resumable re-runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pipeline.data import write_cta_phantom, write_nifti
from pipeline.inference import VolumePredictor, find_cases, run_batch
from tests._tiny_models import colour_checkpoint

SHAPE = (40, 36, 24)


@pytest.fixture(scope="module")
def model(cta_model_three_views):
    """A tiny CNN + piecewise CRF trained on all three views of phantom volumes (32×32)."""
    return cta_model_three_views


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_cta_phantom(tmp_path_factory.mktemp("case"), "patient", rng=77, shape=SHAPE)


def _dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def _ras_copy(path: Path, out: Path) -> Path:
    """The same image stored with RAS axes (x and y reversed, affine adjusted)."""
    img = nib.load(path)
    data = np.asarray(img.dataobj)[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    return write_nifti(data, img.affine @ flip, out)


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_masks_sit_on_the_input_grid_for_lps_and_ras_inputs(model, case, tmp_path, view):
    label = np.asarray(nib.load(case["label"]).dataobj).astype(bool)
    ras = _ras_copy(case["image"], tmp_path / "in" / "ras.nii.gz")
    shutil.copy(case["image"], tmp_path / "in" / "lps.nii.gz")
    predictor = VolumePredictor(model, [view])
    rows = run_batch(find_cases(tmp_path / "in"), tmp_path / "out", predictor, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    out_lps = nib.load(tmp_path / "out" / "lps_mask.nii.gz")
    out_ras = nib.load(tmp_path / "out" / "ras_mask.nii.gz")
    assert out_lps.shape == SHAPE and out_ras.shape == SHAPE
    np.testing.assert_allclose(out_lps.affine, nib.load(case["image"]).affine, atol=1e-5)
    np.testing.assert_allclose(out_ras.affine, nib.load(ras).affine, atol=1e-5)
    lps_mask = np.asarray(out_lps.dataobj).astype(bool)
    ras_mask = np.asarray(out_ras.dataobj).astype(bool)
    np.testing.assert_array_equal(ras_mask[::-1, ::-1, :], lps_mask)
    assert _dice(lps_mask, label) > 0.6  # lands on the heart, not on a mirrored position
    assert _dice(lps_mask[::-1], label) < _dice(lps_mask, label) - 0.2


def test_dicom_series_mask_is_aligned_with_the_series(model, case, tmp_path):
    predictor = VolumePredictor(model, ["axial"])
    (tmp_path / "in").mkdir()
    shutil.copytree(case["dicom"], tmp_path / "in" / "series")
    shutil.copy(case["image"], tmp_path / "in" / "same.nii.gz")
    rows = run_batch(find_cases(tmp_path / "in"), tmp_path / "out", predictor, progress=False)
    assert {r["case"]: r["status"] for r in rows} == {"series": "ok", "same": "ok"}
    dicom_mask = nib.load(tmp_path / "out" / "series_mask.nii.gz")
    nifti_mask = nib.load(tmp_path / "out" / "same_mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(dicom_mask.dataobj), np.asarray(nifti_mask.dataobj))
    np.testing.assert_allclose(dicom_mask.affine, nifti_mask.affine, atol=1e-4)
    assert float(rows[0]["foreground_ml"]) > 0


def test_fusing_three_views_beats_the_worst_single_view(model, case):
    from pipeline.data import read_volume

    volume = read_volume(case["image"])
    label = np.asarray(nib.load(case["label"]).dataobj).astype(bool)
    single = {v: _dice(VolumePredictor(model, [v]).predict(volume).mask.astype(bool), label)
              for v in ("axial", "coronal", "sagittal")}
    fused = VolumePredictor(model, ["axial", "coronal", "sagittal"]).predict(volume)
    assert fused.mask.shape == SHAPE and fused.probability.shape == SHAPE
    assert _dice(fused.mask.astype(bool), label) > min(single.values())


def test_graph_cut_workers_give_the_in_process_masks(model, case):
    from pipeline.data import read_volume

    volume = read_volume(case["image"])
    serial = VolumePredictor(model, ["coronal"]).predict(volume)
    with VolumePredictor(model, ["coronal"], workers=2) as pooled:
        again = pooled.predict(volume)
    assert serial.crf is not None and serial.crf.any()
    np.testing.assert_array_equal(again.crf, serial.crf)


def _mmcrf(*args):
    exe = Path(sys.executable).parent / "mmcrf"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_batch_survives_bad_cases_avoids_collisions_and_resumes(model, case, tmp_path):
    src = tmp_path / "in"
    for folder in ("a", "b"):  # two files called image.nii.gz
        (src / folder).mkdir(parents=True)
        shutil.copy(case["image"], src / folder / "image.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"not a nifti")
    (src / "single").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), src / "single" / "ct.dcm")
    out = tmp_path / "out"
    proc = _mmcrf("infer", "--input", str(src), "--output", str(out), "--model", str(model),
                  "--cnn", "--probabilities", "--no-progress")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = {line.split(",")[0]: line for line in
               (out / "summary.csv").read_text().splitlines()[1:]}
    assert set(summary) == {"a/image", "b/image", "broken", "single"}
    assert ",ok," in summary["a/image"] and ",ok," in summary["b/image"]
    assert "broken.nii.gz: unreadable volume" in summary["broken"]
    assert "a 3-D volume is needed" in summary["single"]
    for folder in ("a", "b"):
        for suffix in ("_mask", "_cnn_mask", "_prob"):
            assert (out / folder / f"image{suffix}.nii.gz").is_file()
    assert not list(out.rglob("*.tmp"))
    assert "FAILED broken" in proc.stderr
    # interrupted run: one mask missing, a stale temporary file left behind
    (out / "b" / "image_mask.nii.gz").unlink()
    (out / "b" / ".image_mask.nii.gz.999.tmp").write_bytes(b"half")
    shutil.rmtree(src / "single")
    (src / "broken.nii.gz").unlink()
    proc = _mmcrf("infer", "--input", str(src), "--output", str(out), "--model", str(model),
                  "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "1 done, 1 skipped" in proc.stdout
    assert (out / "b" / "image_mask.nii.gz").is_file()


def test_unusable_inputs_and_outputs_are_reported(model, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _mmcrf("infer", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                  "--model", str(model))
    assert proc.returncode == 2
    assert "no NIfTI files or DICOM series found" in proc.stderr
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    with pytest.raises(ValueError, match="output folder is not writable"):
        run_batch([], tmp_path / "blocker" / "out", VolumePredictor(model), progress=False)
    with pytest.raises(ValueError, match="no model given for view"):
        VolumePredictor({"axial": model}, ["axial", "coronal"])


def test_a_manifest_lists_the_cases(model, case, tmp_path):
    import json

    root = tmp_path / "data"
    (root / "p1").mkdir(parents=True)
    shutil.copy(case["image"], root / "p1" / "ct.nii.gz")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"training": [{"image": "p1/ct.nii.gz"}],
                                    "test": [{"image": "p2/missing.nii.gz"}]}))
    cases = find_cases(manifest, root=root)
    assert [c.name for c in cases] == ["p1/ct", "p2/missing"]
    assert [c.name for c in find_cases(manifest, root=root, splits=["training"])] == ["p1/ct"]
    rows = run_batch(cases, tmp_path / "out", VolumePredictor(model), progress=False)
    status = {r["case"]: r["status"] for r in rows}
    assert status == {"p1/ct": "ok", "p2/missing": "failed"}
    assert "missing.nii.gz: no such file" in next(r["error"] for r in rows if r["case"] ==
                                                    "p2/missing")
    with pytest.raises(ValueError, match="lists no image"):
        find_cases(manifest, root=root, splits=["validation"])


def test_a_colour_model_is_refused_for_ct_volumes(model, tmp_path):
    rgb = colour_checkpoint(model, tmp_path / "rgb.pt", in_channels=3)
    with pytest.raises(ValueError, match=r"rgb\.pt: the model takes 3 input channels; CT volumes"):
        VolumePredictor(rgb, ["axial"])
    with pytest.raises(ValueError, match="3 input channels"):
        VolumePredictor({"axial": model, "coronal": rgb}, ["axial", "coronal"])
    # a network spec that leaves in_channels out gets FCN-8s's default of 3: the built
    # network decides, whatever the run's config says
    unstated = colour_checkpoint(model, tmp_path / "unstated.pt")
    with pytest.raises(ValueError, match="3 input channels"):
        VolumePredictor(unstated, ["axial"])
