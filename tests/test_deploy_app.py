"""The MONAI Deploy application (pipeline.deploy.app) for real: Holoscan runs DICOM loading,
CT series selection, the CTA bundle through MONAI Deploy's MonaiBundleInferenceOperator and
the SDK's DICOM SEG writer; the SEG's mask is ``mmcrf infer``'s voxel for voxel and it
references the input instances. Run by ``make test-deploy`` (needs the ``deploy`` extra)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.data import write_cta_phantom

pytestmark = pytest.mark.deploy


def test_the_deploy_app_writes_mmcrf_infers_mask_as_dicom_seg(tmp_path):
    import highdicom as hd
    import nibabel as nib

    from pipeline.deploy.app import run_app

    case = write_cta_phantom(tmp_path / "study", "patient", rng=3, shape=(64, 60, 32))
    series = case["image"].parent / "dicom"
    (seg_path,) = run_app(series, tmp_path / "out")
    seg = hd.seg.segread(seg_path)
    files = sorted(series.glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [h.SOPInstanceUID for h in headers]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               segment_numbers=[1],
                                               ignore_spatial_locations=True)[..., 0]
    assert seg.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert main(["infer", "--model", "bundles/cta_pericardium_crf", "--input", str(series),
                 "--output", str(tmp_path / "mmcrf"), "--no-progress"]) == 0
    (mask_path,) = (tmp_path / "mmcrf").glob("*_mask.nii.gz")
    mask = np.asarray(nib.load(mask_path).dataobj)
    # the SEG's frames are the series' slices (rows × columns); the mask is X × Y × Z
    np.testing.assert_array_equal(pixels.transpose(2, 1, 0), mask)
    assert mask.sum() > 0


def _under_small_stack(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a shell whose soft stack size limit is 8 MB (Linux's default)."""
    return subprocess.run(["bash", "-c", 'ulimit -S -s 8192 && exec "$0" -c "$1"',
                           sys.executable, code], capture_output=True, text=True, timeout=300,
                          check=True)


def test_importing_monai_with_the_deploy_extra_does_not_warn_about_the_stack():
    import holoscan  # noqa: F401  (the extra is installed, so monai's import reaches it)

    run = _under_small_stack("import pipeline, monai")
    assert "stack size" not in run.stderr


def test_the_deploy_app_entry_restarts_itself_with_holoscans_stack_size(tmp_path):
    from pipeline.deploy.app import STACK_BYTES

    # the "interpreter" the entry re-executes reports the limit and arguments it was given
    probe = tmp_path / "probe.sh"
    probe.write_text('#!/bin/bash\nulimit -S -s\necho "$MMCRF_DEPLOY_STACK_RAISED" "$@"\n')
    probe.chmod(0o755)
    run = _under_small_stack(
        "import resource, sys\n"
        "from pipeline.deploy import app\n"
        "print(app.stack_shortfall())\n"
        f"sys.executable = {str(probe)!r}; sys.argv = ['app', '--input', 'in', '-o', 'out']\n"
        "app._entry()")
    shortfall, limit, restarted = run.stdout.splitlines()
    assert "8 MB" in shortfall and "ulimit -s 32768" in shortfall
    assert int(limit) * 1024 == STACK_BYTES
    assert restarted == "1 -m pipeline.deploy.app --input in -o out"
    check = _under_small_stack(
        "import resource\n"
        "from pipeline.deploy.app import _raise_stack_limit, stack_shortfall\n"
        "print(_raise_stack_limit(), resource.getrlimit(resource.RLIMIT_STACK)[0])\n"
        "print(_raise_stack_limit(), stack_shortfall())")
    # raised once, then left alone; the process itself still reports no shortfall by its
    # limit, though its threads keep the old size (hence the restart)
    assert check.stdout.split() == ["True", str(STACK_BYTES), "False", "None"]
