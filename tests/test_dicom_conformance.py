"""The DICOM the project writes passes dciodvfy (Debian's dicom3tools) with no errors: the CT
series of the phantoms, the DICOM SEG of ``mmcrf infer --dicom-seg`` and the ultrasound
frames and cine loops of the echo phantoms. Run by ``make test-dicom``."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import write_cta_phantom
from pipeline.data.phantoms.echo import write_echo_cine

pytestmark = pytest.mark.dciodvfy


def _errors(path) -> list[str]:
    """dciodvfy's error lines for one file (its warnings are advice, not violations)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy is missing: make test-dicom installs Debian's dicom3tools"
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def test_the_phantom_ct_series_and_its_dicom_seg_are_valid(tmp_path):
    case = write_cta_phantom(tmp_path / "in", "patient", rng=4, shape=(40, 36, 16))
    series = sorted((case["image"].parent / "dicom").glob("*.dcm"))
    assert len(series) == 16
    for path in series[:: 5]:
        assert _errors(path) == [], path.name
    model = "bundles/cta_pericardium_crf/models/phantom_model_axial.pt"
    assert main(["infer", "--model", model, "--input", str(case["image"].parent / "dicom"),
                 "--output", str(tmp_path / "out"), "--dicom-seg", "--no-progress"]) == 0
    (seg,) = (tmp_path / "out").glob("*_seg.dcm")
    assert _errors(seg) == []


def test_the_echo_phantoms_ultrasound_files_are_valid(tmp_path):
    rng = np.random.default_rng(0)
    cine = rng.integers(0, 256, (6, 48, 40)).astype(np.uint8)
    for name, frames in (("cine.dcm", cine), ("frame.dcm", cine[0])):
        path = write_echo_cine(frames, tmp_path / name, spacing=(0.3, 0.3), frame_time_ms=33.0)
        assert _errors(path) == [], name
    with pytest.raises(ValueError, match="ultrasound DICOM holds 8-bit samples"):
        write_echo_cine(cine.astype(np.uint16), tmp_path / "cine16.dcm")


def test_the_rt_structure_set_is_valid(tmp_path):
    case = write_cta_phantom(tmp_path / "in", "patient", rng=5, shape=(40, 36, 16))
    model = "bundles/cta_pericardium_crf/models/phantom_model_axial.pt"
    assert main(["infer", "--model", model, "--input", str(case["image"].parent / "dicom"),
                 "--output", str(tmp_path / "out"), "--rtstruct", "--no-progress"]) == 0
    (rtstruct,) = (tmp_path / "out").glob("*_rtstruct.dcm")
    assert _errors(rtstruct) == []
