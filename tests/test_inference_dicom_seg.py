"""DICOM SEG output of batch inference (``mmcrf infer --dicom-seg``): real series written to
disk, real SEG files read back with pydicom and highdicom and checked against the NIfTI mask
through the source instances' own positions, whatever order the series was stored in."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from pipeline import __version__
from pipeline.bundle import infer as bundle_infer
from pipeline.cli import main
from pipeline.data import read_volume, write_cta_phantom, write_dicom_series
from pipeline.data.dicom_seg import write_dicom_seg
from tests._tiny_models import tiny_cta_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (40, 36, 24)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny axial CNN + piecewise CRF trained on phantom volumes."""
    return tiny_cta_model(tmp_path_factory.mktemp("train"), SHAPE)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """One phantom as a NIfTI file and as three DICOM series: as written (slices stored
    inferior → superior), stored in reversed slice order (superior → inferior, so instance
    numbers and file names run against the slice normal), and mirrored (columns running
    right → left as well as reversed slices)."""
    case = write_cta_phantom(tmp_path_factory.mktemp("phantom"), "patient", rng=77,
                             shape=SHAPE)
    root = tmp_path_factory.mktemp("in")
    shutil.copytree(case["dicom"], root / "series")
    shutil.copy(case["image"], root / "volume.nii.gz")
    image = nib.load(case["image"])
    data = np.asarray(image.dataobj, dtype=np.float64)
    nx, _, nz = data.shape
    flip_z = np.eye(4)
    flip_z[2, 2], flip_z[2, 3] = -1.0, nz - 1
    write_dicom_series(data[:, :, ::-1], image.affine @ flip_z, root / "reversed",
                       patient_id="patient")
    flip_xz = flip_z.copy()
    flip_xz[0, 0], flip_xz[0, 3] = -1.0, nx - 1
    write_dicom_series(data[::-1, :, ::-1], image.affine @ flip_xz, root / "mirrored",
                       patient_id="patient")
    return {"root": root, "image": case["image"], "label": case["label"]}


@pytest.fixture(scope="module")
def inferred(model, inputs, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """``mmcrf infer --dicom-seg`` over the input folder; the output folder and the summary
    rows by case."""
    out = tmp_path_factory.mktemp("out")
    code = main(["infer", "--input", str(inputs["root"]), "--output", str(out), "--model",
                 str(model), "--dicom-seg", "--no-progress"])
    rows = {r["case"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert code == 0, rows
    return out, rows


def _source_headers(folder: Path) -> dict[str, pydicom.Dataset]:
    """SOPInstanceUID → header of every file of a series folder."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    return {str(ds.SOPInstanceUID): ds for ds in headers}


def _expected_planes(mask_path: Path, headers: dict[str, pydicom.Dataset]
                     ) -> dict[str, np.ndarray]:
    """The NIfTI mask cut into one rows×columns plane per source instance: each instance's
    ImagePositionPatient is put through the inverse NIfTI affine to find its slice, and the
    slice is transposed into DICOM (row, column) order, flipped where the grid's x or y axis
    runs against the image's columns or rows."""
    image = nib.load(mask_path)
    data = np.asarray(image.dataobj)
    to_voxel = np.linalg.inv(image.affine)
    planes = {}
    for uid, ds in headers.items():
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        corner = np.append(np.asarray(ds.ImagePositionPatient, dtype=np.float64), 1.0)
        voxel = to_voxel @ (LPS_TO_RAS @ corner)
        next_col = to_voxel[:3, :3] @ (LPS_TO_RAS[:3, :3] @ (iop[:3] * col_spacing))
        next_row = to_voxel[:3, :3] @ (LPS_TO_RAS[:3, :3] @ (iop[3:] * row_spacing))
        # read_volume's grid: x follows the columns, y the rows, z the slices
        np.testing.assert_allclose(np.abs(next_col), [1, 0, 0], atol=1e-6)
        np.testing.assert_allclose(np.abs(next_row), [0, 1, 0], atol=1e-6)
        k = round(float(voxel[2]))
        assert abs(voxel[2] - k) < 1e-3 and 0 <= k < data.shape[2]
        xs = round(float(voxel[0])) + np.sign(next_col[0]) * np.arange(int(ds.Columns))
        ys = round(float(voxel[1])) + np.sign(next_row[1]) * np.arange(int(ds.Rows))
        planes[uid] = data[np.ix_(xs.astype(int), ys.astype(int), [k])][:, :, 0].T
    return planes


def _seg_planes_pydicom(seg_path: Path, headers: dict[str, pydicom.Dataset]
                        ) -> dict[str, np.ndarray]:
    """Rebuilds one plane per source instance from the SEG with pydicom only: each frame goes
    to the instance its DerivationImageSequence names (its PlanePositionSequence must agree
    with that instance's position); instances without a frame are empty."""
    seg = pydicom.dcmread(seg_path)
    rows, cols = int(seg.Rows), int(seg.Columns)
    frames = seg.pixel_array.reshape(-1, rows, cols)
    assert len(frames) == int(seg.NumberOfFrames) == len(seg.PerFrameFunctionalGroupsSequence)
    shared = seg.SharedFunctionalGroupsSequence[0]
    planes = {uid: np.zeros((rows, cols), dtype=np.uint8) for uid in headers}
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        uid = str(source.ReferencedSOPInstanceUID)
        assert uid in headers, f"frame references {uid}, not an instance of the series"
        assert str(source.ReferencedSOPClassUID) == str(headers[uid].SOPClassUID)
        assert uid not in seen
        seen.add(uid)
        np.testing.assert_allclose(
            np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float),
            np.asarray(headers[uid].ImagePositionPatient, float), atol=1e-4)
        ident = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        assert int(ident[0].ReferencedSegmentNumber) == 1
        planes[uid] = frame.astype(np.uint8)
    return planes


@pytest.mark.parametrize("name", ["series", "reversed", "mirrored"])
def test_seg_references_the_series_and_matches_the_nifti_mask(inferred, inputs, name):
    out, rows = inferred
    assert rows[name]["status"] == "ok", rows[name]["error"]
    seg_path = out / f"{name}_seg.dcm"
    mask_path = out / f"{name}_mask.nii.gz"
    headers = _source_headers(inputs["root"] / name)
    first = next(iter(headers.values()))

    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.PatientID == first.PatientID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced.ReferencedInstanceSequence} \
        == set(headers)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "mmcrf" and algorithm.AlgorithmVersion == __version__

    expected = _expected_planes(mask_path, headers)
    assert sum(int(p.sum()) for p in expected.values()) > 100  # a real, non-trivial mask
    ours = _seg_planes_pydicom(seg_path, headers)
    for uid in headers:
        np.testing.assert_array_equal(ours[uid], expected[uid], err_msg=uid)

    # highdicom's own reading, by source instance, agrees
    hd_seg = hd.seg.segread(seg_path)
    assert {t[1] for t in hd_seg.get_source_image_uids()} == {first.SeriesInstanceUID}
    uids = list(headers)
    pixels = hd_seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
    for uid, plane in zip(uids, pixels, strict=True):
        np.testing.assert_array_equal(plane, expected[uid], err_msg=uid)


def test_stored_slice_order_changes_nothing_but_the_references(inferred, inputs):
    """The three series hold the same image: the same mask in world space (the reversed
    series even on the same grid, since read_volume sorts slices along the normal), and the
    SEG frames of instances at the same position are equal."""
    out, _ = inferred
    masks = {n: nib.load(out / f"{n}_mask.nii.gz") for n in ("series", "reversed", "mirrored")}
    np.testing.assert_allclose(masks["reversed"].affine, masks["series"].affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(masks["reversed"].dataobj),
                                  np.asarray(masks["series"].dataobj))
    canonical = {n: nib.as_closest_canonical(m) for n, m in masks.items()}
    np.testing.assert_allclose(canonical["mirrored"].affine, canonical["series"].affine,
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(canonical["mirrored"].dataobj),
                                  np.asarray(canonical["series"].dataobj))
    by_position = {}
    for name in ("series", "reversed"):
        headers = _source_headers(inputs["root"] / name)
        planes = _seg_planes_pydicom(out / f"{name}_seg.dcm", headers)
        by_position[name] = {round(float(ds.ImagePositionPatient[2]), 3): planes[uid]
                             for uid, ds in headers.items()}
    assert by_position["series"].keys() == by_position["reversed"].keys()
    for z, plane in by_position["series"].items():
        np.testing.assert_array_equal(by_position["reversed"][z], plane)


def test_nifti_input_gets_no_seg_and_still_succeeds(inferred):
    out, rows = inferred
    assert rows["volume"]["status"] == "ok" and rows["volume"]["error"] == ""
    assert (out / "volume_mask.nii.gz").is_file()
    assert not (out / "volume_seg.dcm").exists()
    assert sorted(p.name for p in out.glob("*_seg.dcm")) == [
        "mirrored_seg.dcm", "reversed_seg.dcm", "series_seg.dcm"]
    assert not list(out.glob(".*tmp"))  # nothing left under a temporary name


def test_a_seg_that_cannot_be_written_leaves_the_nifti_mask_and_a_warning(model, inputs,
                                                                          tmp_path):
    """A series without StudyInstanceUID reads and segments, but cannot be referenced by a SEG:
    that case keeps its NIfTI mask, its row warns naming the SEG and why, the others go on;
    without --dicom-seg the same series is fine."""
    root = tmp_path / "in"
    shutil.copytree(inputs["root"] / "series", root / "good")
    (root / "nostudy").mkdir()
    for path in sorted((inputs["root"] / "series").iterdir()):
        ds = pydicom.dcmread(path)
        del ds.StudyInstanceUID
        ds.save_as(root / "nostudy" / path.name)
    code = main(["infer", "--input", str(root), "--output", str(tmp_path / "out"), "--model",
                 str(model), "--dicom-seg", "--no-progress"])
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    assert code == 0
    assert rows["good"]["status"] == "ok" and (tmp_path / "out" / "good_seg.dcm").is_file()
    assert rows["nostudy"]["status"] == "ok"
    assert "DICOM SEG nostudy_seg.dcm not written" in rows["nostudy"]["warning"]
    assert "StudyInstanceUID" in rows["nostudy"]["warning"]
    assert "NIfTI mask is written" in rows["nostudy"]["warning"]
    plain = nib.load(tmp_path / "out" / "nostudy_mask.nii.gz")
    assert plain.shape == nib.load(tmp_path / "out" / "good_mask.nii.gz").shape
    assert not (tmp_path / "out" / "nostudy_seg.dcm").exists()
    assert main(["infer", "--input", str(root / "nostudy"), "--output", str(tmp_path / "plain"),
                 "--model", str(model), "--no-progress"]) == 0


def test_bundle_infer_writes_the_seg(model, inputs, tmp_path):
    rows = bundle_infer(input_dir=str(inputs["root"] / "reversed"), output_dir=str(tmp_path),
                        model_file=str(model), write_dicom_seg=True)
    assert [r["status"] for r in rows] == ["ok"]
    seg = pydicom.dcmread(tmp_path / "reversed_seg.dcm")
    headers = _source_headers(inputs["root"] / "reversed")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == \
        next(iter(headers.values())).SeriesInstanceUID


def test_writer_pairs_instances_by_position_not_by_file_order(inputs, tmp_path):
    """Shuffled source files, the default (read_volume) grid or an explicit affine: the same
    plane lands on the same instance; a mask of another shape is refused clearly."""
    folder = inputs["root"] / "reversed"
    volume = read_volume(folder)
    rng = np.random.default_rng(3)
    mask = (rng.random(volume.shape) > 0.6).astype(np.uint8)
    mask[:, :, 5] = 0  # an empty slice: its instance gets no frame
    files = sorted(folder.iterdir())
    shuffled = [files[i] for i in rng.permutation(len(files))]
    a = write_dicom_seg(mask, shuffled, tmp_path / "a_seg.dcm")
    b = write_dicom_seg(mask, files, tmp_path / "b_seg.dcm",
                        affine=np.asarray(volume.affine), segment_label="foreground")
    headers = _source_headers(folder)
    planes_a = _seg_planes_pydicom(a, headers)
    planes_b = _seg_planes_pydicom(b, headers)
    assert pydicom.dcmread(a).NumberOfFrames == SHAPE[2] - 1
    # volume.meta["files"] lists the instances in the order of the grid's z axis
    by_z = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in volume.meta["files"]]
    for k, uid in enumerate(by_z):
        np.testing.assert_array_equal(planes_a[uid], mask[:, :, k].T)
        np.testing.assert_array_equal(planes_b[uid], mask[:, :, k].T)
    assert pydicom.dcmread(b).SegmentSequence[0].SegmentLabel == "foreground"

    # the same mask on another grid of the same lattice: x and z flipped, x and y swapped
    affine = np.asarray(volume.affine, dtype=np.float64)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = SHAPE[0] - 1, SHAPE[2] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    for name, data, grid in (("flipped", mask[::-1, :, ::-1], affine @ flip),
                             ("swapped", mask.transpose(1, 0, 2), affine @ swap)):
        path = write_dicom_seg(data, files, tmp_path / f"{name}_seg.dcm", affine=grid)
        planes = _seg_planes_pydicom(path, headers)
        for uid in headers:
            np.testing.assert_array_equal(planes[uid], planes_a[uid], err_msg=name)

    with pytest.raises(ValueError, match=r"mask shape \(40, 36, 23\) does not match the series"):
        write_dicom_seg(mask[:, :, 1:], files, tmp_path / "c_seg.dcm")
    with pytest.raises(ValueError, match=r"mask shape \(36, 40, 24\) does not match"):
        write_dicom_seg(mask.transpose(1, 0, 2), files, tmp_path / "c_seg.dcm")
    with pytest.raises(ValueError, match="binary mask"):
        write_dicom_seg(mask * 2, files, tmp_path / "c_seg.dcm")
    shifted = np.asarray(volume.affine).copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 2]  # half a slice off: no instance on a mask slice
    with pytest.raises(ValueError, match="not on one of its slices"):
        write_dicom_seg(mask, files, tmp_path / "c_seg.dcm", affine=shifted)
    with pytest.raises(ValueError, match="must be one series"):
        write_dicom_seg(mask, [*files[:-1], sorted((inputs["root"] / "series").iterdir())[0]],
                        tmp_path / "c_seg.dcm")
    assert not (tmp_path / "c_seg.dcm").exists()
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("name", ["series", "mirrored"])
def test_rtstruct_contours_give_back_the_nifti_mask(model, inputs, tmp_path, name):
    """``mmcrf infer --rtstruct``: the RT Structure Set's contours, filled again by rt-utils on
    the series' own slices, are the NIfTI mask, instance by instance (paired by position)."""
    from rt_utils import RTStructBuilder

    out = tmp_path / "out"
    assert main(["infer", "--input", str(inputs["root"] / name), "--output", str(out),
                 "--model", str(model), "--rtstruct", "--no-progress"]) == 0
    (rtstruct_path,) = out.glob("*_rtstruct.dcm")
    (mask_path,) = out.glob("*_mask.nii.gz")
    headers = _source_headers(inputs["root"] / name)
    rtstruct = RTStructBuilder.create_from(dicom_series_path=str(inputs["root"] / name),
                                           rt_struct_path=str(rtstruct_path))
    assert rtstruct.get_roi_names() == ["heart"]  # rt-utils reads it back
    expected = _expected_planes(mask_path, headers)
    # the geometry, from DICOM's definitions alone: every contour point, put on its slice
    # through the referenced instance's own position and pixel steps, is a foreground pixel
    # of that slice, and the points span each slice's foreground exactly (its bounding box)
    ds = pydicom.dcmread(rtstruct_path)
    spans: dict[str, list[np.ndarray]] = {}
    for contour in ds.ROIContourSequence[0].ContourSequence:
        source = headers[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        iop = np.asarray(source.ImageOrientationPatient, float)
        row_spacing, col_spacing = (float(v) for v in source.PixelSpacing)
        steps = np.stack([iop[:3] * col_spacing, iop[3:] * row_spacing], axis=1)
        xyz = np.asarray(contour.ContourData, float).reshape(-1, 3)
        offsets = xyz - np.asarray(source.ImagePositionPatient, float)
        cols, rows = np.round(np.linalg.lstsq(steps, offsets.T, rcond=None)[0]).astype(int)
        assert np.all(expected[str(source.SOPInstanceUID)][rows, cols] == 1)
        spans.setdefault(str(source.SOPInstanceUID), []).append(np.stack([rows, cols]))
    assert set(spans) == {uid for uid, plane in expected.items() if plane.any()}
    for uid, pieces in spans.items():
        points = np.concatenate(pieces, axis=1)
        rows, cols = np.nonzero(expected[uid])
        assert (points[0].min(), points[0].max()) == (rows.min(), rows.max())
        assert (points[1].min(), points[1].max()) == (cols.min(), cols.max())
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == next(iter(headers.values())).StudyInstanceUID


def test_an_empty_mask_gets_no_rtstruct_but_a_warning(inputs, tmp_path):
    from pipeline.data.rtstruct import write_rtstruct

    files = sorted((inputs["root"] / "series").iterdir())
    volume = read_volume(inputs["root"] / "series")
    with pytest.raises(ValueError, match="the mask is empty"):
        write_rtstruct(np.zeros(volume.shape, np.uint8), files, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
