"""Real-data tier: the shared heart CT (label on a shifted grid) and the JPEG 2000 DICOM series."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.data import AlignLabel, read_volume, slice_datalist

pytestmark = pytest.mark.realdata


def test_heart_mask_lands_inside_the_ct(shared_data):
    ct = read_volume(shared_data / "ct_heart" / "ct_cropped.nii.gz")
    heart = read_volume(shared_data / "ct_heart" / "heart.nii.gz")
    assert heart.shape != ct.shape
    aligned = AlignLabel()(heart, ct).numpy()
    assert aligned.shape == (122, 102, 112)
    assert int(aligned.sum()) == 198_176 == int(heart.numpy().sum())
    samples = slice_datalist([{"image": str(shared_data / "ct_heart" / "ct_cropped.nii.gz"),
                               "label": str(shared_data / "ct_heart" / "heart.nii.gz")}])
    axial = [s for s in samples if s["view"] == "axial"]
    assert len(axial) == 112
    assert sum(not s["label_empty"] for s in axial) == 86
    for view in ("coronal", "sagittal"):
        flags = [s["label_empty"] for s in samples if s["view"] == view]
        assert any(flags) and not all(flags)


def test_jpeg2000_series_reads_like_simpleitk_and_takes_its_las_segmentation(shared_data):
    folder = shared_data / "ct_dicom_series"
    ours = read_volume(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    np.testing.assert_array_equal(ours.numpy(), sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    assert ours.shape == (512, 512, 20)
    seg = read_volume(shared_data / "ct_dicom_series_seg" / "example_seg_dicom.nii.gz")
    values = [v for v in np.unique(seg.numpy()) if v > 0]
    aligned = AlignLabel(label_value=int(values[0]))(seg, ours).numpy()
    assert int(aligned.sum()) == int((seg.numpy() == values[0]).sum()) > 0
    # LAS → LPS on the same grid is a flip of the second axis
    np.testing.assert_array_equal(aligned, (seg.numpy() == values[0])[:, ::-1, :])
