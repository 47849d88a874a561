"""The MONAI Deploy application (pipeline.deploy.app) for real: Holoscan runs DICOM loading,
CT series selection, the CTA bundle through MONAI Deploy's MonaiBundleInferenceOperator and
the SDK's DICOM SEG writer; the SEG's mask is ``mmcrf infer``'s voxel for voxel and it
references the input instances. Run by ``make test-deploy`` (needs the ``deploy`` extra)."""

from __future__ import annotations

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
