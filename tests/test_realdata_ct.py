"""Real-data tier, end to end: the shared heart CT split by slices (data_manifests/ct_heart.json),
a tiny leave-slices-out training, batch inference of the whole CT, and the real JPEG 2000 DICOM
series through batch inference, each mask checked against its input's grid."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.cli import main
from pipeline.data import read_volume, slice_datalist
from pipeline.data.alignment import resample_to_grid
from pipeline.data.dicom_seg import write_dicom_seg
from pipeline.data.manifests import check_manifest, load_manifest, manifest_entries
from tests.oracles.geometry import sitk_ras_affine

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "ct_heart.json"
CONFIG = REPO / "configs" / "ct_heart_smoke.json"


def _mmcrf(*args: str) -> None:
    assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def _trained() -> dict:
    return {}


@pytest.fixture
def heart_model(shared_data, tmp_path_factory, _trained) -> Path:
    """An axial CNN + piecewise CRF trained for one epoch at 32×32 on the training slices of
    the heart CT (leave-slices-out); trained once per module."""
    if "model" not in _trained:
        runs = tmp_path_factory.mktemp("heart_runs")
        common = ["--config", CONFIG, "--data", "cta", "--manifest", MANIFEST, "--root",
                  shared_data, "--view", "axial", "--size", "32", "--epochs", "1"]
        _mmcrf("train", "--mode", "cnn", *common, "--out", runs / "cnn")
        _mmcrf("train", "--mode", "piecewise", *common, "--init", runs / "cnn" / "best.pt",
               "--out", runs / "piecewise")
        _trained["model"] = runs / "piecewise" / "best.pt"
    return _trained["model"]


def test_heart_manifest_slices_with_the_label_resampled_and_split_by_slices(shared_data):
    manifest = load_manifest(MANIFEST)
    assert check_manifest(manifest, shared_data) == []
    (train,) = manifest_entries(manifest, shared_data, ["training"])
    (val,) = manifest_entries(manifest, shared_data, ["validation"])
    whole = slice_datalist([{k: v for k, v in train.items() if k != "slice_part"}],
                           views=("axial",))
    assert len(whole) == 112  # the label (233×167×191) was put on the CT's 122×102×112 grid
    assert sum(not s["label_empty"] for s in whole) == 86
    assert sum(int(np.asarray(s["label"]).sum()) for s in whole) == 198_176  # nothing lost
    parts = {name: slice_datalist([entry]) for name, entry in (("rest", train), ("held", val))}
    for view, n in (("axial", 112), ("coronal", 102), ("sagittal", 122)):
        held = [s["slice"] for s in parts["held"] if s["view"] == view]
        rest = [s["slice"] for s in parts["rest"] if s["view"] == view]
        assert held == list(range(round(0.4 * n), round(0.6 * n)))
        assert not set(rest) & set(range(held[0] - 3, held[-1] + 4))
        assert len(rest) == n - len(held) - 6
        # the block sits in the heart: every held-out slice shows heart
        assert not any(s["label_empty"] for s in parts["held"] if s["view"] == view)


def test_tiny_training_then_batch_inference_gives_a_mask_on_the_ct_grid(
        heart_model, shared_data, tmp_path):
    ct_path = shared_data / "ct_heart" / "ct_cropped.nii.gz"
    ct = nib.load(ct_path)
    for view in ("axial", "all"):  # one view, and the three views fused (same model)
        out = tmp_path / view
        _mmcrf("infer", "--input", ct_path, "--output", out, "--model", heart_model,
               "--view", view, "--any-view", "--no-progress")
        (row,) = list(csv.DictReader((out / "summary.csv").open()))
        assert row["status"] == "ok", row["error"]
        mask = nib.load(out / "ct_cropped_mask.nii.gz")
        assert mask.shape == ct.shape == (122, 102, 112)
        np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-5)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_dicom_series_batch_inference_gives_a_mask_on_the_series_grid(
        heart_model, shared_data, tmp_path):
    """The abdomen series segmented with the heart model (the content is meaningless; the
    grid is the point): SimpleITK reads the mask with the series' own size, spacing, origin
    and direction, and the LAS segmentation shipped with the series lands on the same grid."""
    folder = shared_data / "ct_dicom_series"
    _mmcrf("infer", "--input", folder, "--output", tmp_path, "--model", heart_model,
           "--no-progress")
    (row,) = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert row["status"] == "ok", row["error"]
    mask_path = tmp_path / "ct_dicom_series_mask.nii.gz"

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    series = reader.Execute()
    ours = sitk.ReadImage(str(mask_path))
    assert ours.GetSize() == series.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(ours.GetSpacing(), series.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(ours.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), series.GetDirection(), atol=1e-6)
    mask = nib.load(mask_path)
    np.testing.assert_allclose(mask.affine, sitk_ras_affine(series), atol=1e-4)

    # the shipped segmentation is stored LAS on the same 512×512×20 grid: after putting both
    # in canonical (RAS) order they share shape and affine ...
    seg = nib.load(shared_data / "ct_dicom_series_seg" / "example_seg_dicom.nii.gz")
    assert nib.aff2axcodes(seg.affine) == ("L", "A", "S")
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S")
    seg_ras, mask_ras = nib.as_closest_canonical(seg), nib.as_closest_canonical(mask)
    assert seg_ras.shape == mask_ras.shape
    np.testing.assert_allclose(seg_ras.affine, mask_ras.affine, atol=1e-4)
    # ... and, through the affines, every one of its organ voxels falls inside the body
    # outline of the series (HU > -500, holes filled slice by slice) on the mask's grid;
    # taking the LAS array for LPS (same indices, no flip) would put about a quarter outside
    hu = read_volume(folder).numpy()
    body = np.stack([ndimage.binary_fill_holes(hu[..., k] > -500) for k in range(hu.shape[2])],
                    axis=-1)
    organs = np.asarray(seg.dataobj) > 0
    on_grid = resample_to_grid(organs.astype(np.uint8), seg.affine, mask.affine, mask.shape)
    assert int(on_grid.sum()) == int(organs.sum())
    inside, naive = body[on_grid > 0].mean(), body[organs].mean()
    assert inside > 0.999 and naive < 0.9, (inside, naive)


def test_dicom_seg_of_the_real_series_references_its_instances(heart_model, shared_data,
                                                               tmp_path):
    """The shared series was anonymised down to empty UIDs (SOP instance, SOP class, series,
    study), so no SEG can reference it and the writer says so. With UIDs filled in (headers
    only, the JPEG 2000 pixel data untouched) ``--dicom-seg`` writes a SEG that references
    the series and its instances, each frame holding the NIfTI mask's slice at its instance's
    position."""
    folder = shared_data / "ct_dicom_series"
    with pytest.raises(ValueError, match=r"has no SOPInstanceUID.*anonymisation"):
        write_dicom_seg(np.zeros((512, 512, 20), np.uint8), sorted(folder.iterdir()),
                        tmp_path / "refused_seg.dcm")
    series, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    (tmp_path / "in").mkdir()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.save_as(tmp_path / "in" / path.name)
    _mmcrf("infer", "--input", tmp_path / "in", "--output", tmp_path / "out", "--model",
           heart_model, "--dicom-seg", "--no-progress")
    sources = {str(ds.SOPInstanceUID): ds for ds in
               (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "in").iterdir())}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in sources.values()} == {
        pydicom.uid.JPEG2000Lossless}
    seg = pydicom.dcmread(tmp_path / "out" / "in_seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced.ReferencedInstanceSequence} \
        == set(sources)
    mask = nib.load(tmp_path / "out" / "in_mask.nii.gz")
    data, to_voxel = np.asarray(mask.dataobj), np.linalg.inv(mask.affine)
    frames = seg.pixel_array.reshape(-1, 512, 512)
    assert len(frames) == int(seg.NumberOfFrames) >= 1
    covered = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        uid = str(source.ReferencedSOPInstanceUID)
        position = np.append(np.asarray(sources[uid].ImagePositionPatient, float), 1.0)
        x, y, z = (to_voxel @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ position)[:3]
        assert abs(x) < 1e-3 and abs(y) < 1e-3 and abs(z - round(z)) < 1e-3
        np.testing.assert_array_equal(frame, data[:, :, round(z)].T, err_msg=uid)
        covered.add(round(z))
    for k in set(range(data.shape[2])) - covered:  # slices without a frame are empty
        assert not data[:, :, k].any()


def test_the_bundle_models_find_the_real_heart_and_warn_on_an_abdomen(shared_data, tmp_path):
    """The CTA bundle's default models (trained on this CT, leave-slices-out) through
    `mmcrf infer --model BUNDLE`: the fused three views cover the heart on the CT's own grid,
    the label file beside the CT is excluded, and on the abdominal series (no heart) the row
    warns that the predicted volume is far from the one seen in training."""
    bundle = REPO / "bundles" / "cta_pericardium_crf"
    _mmcrf("infer", "--input", shared_data / "ct_heart", "--output", tmp_path / "ct",
           "--model", bundle, "--view", "all", "--no-progress")
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "ct" / "summary.csv").open())}
    assert rows["heart"]["status"] == "excluded"
    row = rows["ct_cropped"]
    assert row["status"] == "ok" and row["warning"] == ""
    ct = nib.load(shared_data / "ct_heart" / "ct_cropped.nii.gz")
    label = nib.load(shared_data / "ct_heart" / "heart.nii.gz")
    ref = resample_to_grid(np.asarray(label.dataobj).astype(np.uint8), label.affine,
                           ct.affine, ct.shape, order=0) > 0
    mask = np.asarray(nib.load(tmp_path / "ct" / "ct_cropped_mask.nii.gz").dataobj) > 0
    assert 2 * (mask & ref).sum() / (mask.sum() + ref.sum()) > 0.88
    assert 0.8 < float(row["foreground_ml"]) / (ref.sum() * 1.5 ** 3 / 1000) < 1.2
    assert "axial=" in row["model_sha256"] and row["views"] == "axial,coronal,sagittal"
    assert main(["infer", "--input", str(shared_data / "ct_dicom_series"), "--output",
                 str(tmp_path / "abdomen"), "--model", str(bundle), "--no-progress"]) == 0
    (row,) = list(csv.DictReader((tmp_path / "abdomen" / "summary.csv").open()))
    assert row["status"] == "ok" and "outside the range the model saw" in row["warning"]
