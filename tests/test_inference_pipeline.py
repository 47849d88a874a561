"""The inference pipeline: graph cuts in the workers while the network goes on (within a
volume, batch by batch, and across a batch's cases), bit-identical to the serial run on the
CPU; and mixed precision."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import read_volume, write_cta_phantom
from pipeline.inference import VolumePredictor, find_cases, run_batch
from pipeline.inference.batch import SUMMARY_COLUMNS, run_cases

SHAPE = (40, 36, 24)


def _write_cases(folder: Path, names, shape=SHAPE) -> Path:
    """One phantom CT per name, as ``<folder>/<name>.nii.gz`` (no labels beside them)."""
    for k, name in enumerate(names):
        made = write_cta_phantom(folder / ".made", name, rng=90 + k, shape=shape, dicom=False)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(made["image"], folder / f"{name}.nii.gz")
    shutil.rmtree(folder / ".made")
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _write_cases(tmp_path_factory.mktemp("cases"), ("a", "b", "c"))


def test_one_view_is_cut_batch_by_batch_while_the_network_runs(cta_model_three_views, cases):
    volume = read_volume(cases / "a.nii.gz")
    serial = VolumePredictor(cta_model_three_views, ["axial"], batch_size=5).predict(volume)
    with VolumePredictor(cta_model_three_views, ["axial"], batch_size=5, workers=2) as cpu:
        assert not cpu.pipelined  # on the CPU the cuts follow the network by default
    with VolumePredictor(cta_model_three_views, ["axial"], batch_size=5, workers=2,
                         pipeline=True) as pooled:
        assert pooled.pipelined
        pending = pooled.start(volume)
        assert pending.cut_batches == 5  # 24 slices in batches of 5: each sent on its own
        again = pending.result()
    assert serial.crf is not None and serial.crf.any()
    np.testing.assert_array_equal(again.crf, serial.crf)
    np.testing.assert_array_equal(again.probability, serial.probability)


def test_fused_views_are_cut_in_the_workers_with_the_serial_masks(cta_model_three_views,
                                                                  cases):
    volume = read_volume(cases / "b.nii.gz")
    views = ["coronal", "axial", "sagittal"]
    serial = VolumePredictor(cta_model_three_views, views).predict(volume)
    with VolumePredictor(cta_model_three_views, views, workers=2, pipeline=True) as pooled:
        pending = pooled.start(volume)
        assert pending.cut_batches == 1  # the fused volume's slices, all at once
        again = pending.result()
    np.testing.assert_array_equal(again.crf, serial.crf)
    with VolumePredictor(cta_model_three_views, ["axial"], workers=2, crf_3d=True,
                         pipeline=True) as cut3d:
        assert not cut3d.pipelined  # the 3-D cut runs in this process


def test_batch_pipeline_writes_the_serial_masks_and_keeps_bad_cases_apart(
        cta_model_three_views, cases, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(cases, src)
    (src / "broken.nii.gz").write_bytes(b"not a nifti")
    found = find_cases(src)
    serial = run_batch(found, tmp_path / "serial", VolumePredictor(cta_model_three_views),
                       progress=False)
    with VolumePredictor(cta_model_three_views, workers=2, pipeline=True) as pooled:
        piped = run_batch(found, tmp_path / "piped", pooled, progress=False)
    assert [r["case"] for r in piped] == [r["case"] for r in serial]
    assert [r["status"] for r in piped] == [r["status"] for r in serial]
    assert sorted(r["status"] for r in piped) == ["failed", "ok", "ok", "ok"]
    for row in piped:
        if row["status"] == "ok":
            mine = Path(row["output"])
            theirs = tmp_path / "serial" / mine.relative_to(tmp_path / "piped")
            np.testing.assert_array_equal(np.asarray(nib.load(mine).dataobj),
                                          np.asarray(nib.load(theirs).dataobj))
            assert float(row["seconds"]) >= float(row["cnn_seconds"])


def test_the_next_case_starts_before_the_previous_one_finishes(tmp_path):
    src = _write_cases(tmp_path / "in", ("a", "b", "c", "d"), shape=(16, 16, 16))
    events: list[str] = []

    def run_case(case, out):
        name = case.name
        events.append(f"start {name}")
        if name == "b":
            raise ValueError("b cannot be read")

        def finish():
            events.append(f"finish {name}")
            if name == "c":
                raise RuntimeError("c's cuts failed")
            return {"output": str(out / name)}

        return finish

    rows = run_cases(find_cases(src), tmp_path / "out", run_case, progress=False)
    assert events == ["start a", "start b", "finish a", "start c", "start d", "finish c",
                      "finish d"]
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok"]
    assert rows[1]["error"] == "b cannot be read" and rows[2]["error"] == "c's cuts failed"
    assert set(rows[0]) == set(SUMMARY_COLUMNS)


def test_mixed_precision_stays_close_to_full_precision(cta_model_three_views, cases, tmp_path):
    volume = read_volume(cases / "c.nii.gz")
    full = VolumePredictor(cta_model_three_views, ["axial"]).predict(volume)
    half = VolumePredictor(cta_model_three_views, ["axial"], amp=True).predict(volume)
    assert half.probability.dtype == np.float32
    gap = np.abs(half.probability - full.probability)
    assert 0 < gap.max() < 0.05  # bfloat16 on the CPU: rounded, but the same network
    assert np.mean(half.mask != full.mask) < 0.01
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(cases / "c.nii.gz", src)
    code = main(["infer", "--model", str(cta_model_three_views), "--input", str(src),
                 "--output", str(tmp_path / "out"), "--amp", "--workers", "2",
                 "--no-progress"])
    assert code == 0
    written = np.asarray(nib.load(tmp_path / "out" / "c_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(written, half.mask)
