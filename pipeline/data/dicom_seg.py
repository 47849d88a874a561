"""DICOM SEG output: a binary segmentation whose frames reference the source series' instances.

The mask comes on a voxel grid with a RAS affine (by default the grid :func:`read_volume` gives
for the series: X = columns, Y = rows, Z = slices sorted along the slice normal). Each source
instance is placed in that grid through its own ImagePositionPatient, so file order, instance
numbers and the direction the series was stored in do not matter.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pipeline.data.readers import pixel_steps, series_affine
from pipeline.data.writers import atomic_path

__all__ = ["write_dicom_seg"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse: also LPS → RAS
#: Type 2 attributes highdicom copies from the first source image (absent in some series).
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                 "ReferringPhysicianName")
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
             "Columns", "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID",
             "SeriesInstanceUID")


def _read_headers(source_files: Sequence[str | os.PathLike],
                  what: str = "DICOM SEG") -> list[pydicom.Dataset]:
    """Headers (no pixel data) of the source instances, checked to form one series that a
    ``what`` (the object that will reference them) can reference."""
    if not source_files:
        raise ValueError(f"{what}: no source DICOM files given")
    headers = []
    for path in source_files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:
            raise ValueError(f"{path}: unreadable DICOM file ({err})") from None
        missing = [key for key in _GEOMETRY if key not in ds or ds[key].is_empty]
        if missing:
            raise ValueError(f"{path}: DICOM file has no {', '.join(missing)} (absent or "
                             f"empty, e.g. removed by anonymisation); a {what} cannot "
                             f"reference it")
        headers.append(ds)
    first = headers[0]
    for path, ds in zip(source_files, headers, strict=True):
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
            if ds[key].value != first[key].value:
                raise ValueError(f"{path}: {key} {ds[key].value} differs from the first source "
                                 f"file's {first[key].value}; the source files must be one series")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float),
                           np.asarray(first.ImageOrientationPatient, float), atol=1e-4):
            raise ValueError(f"{path}: ImageOrientationPatient differs from the rest of the "
                             f"series")
    uids = [str(ds.SOPInstanceUID) for ds in headers]
    if len(set(uids)) != len(uids):
        raise ValueError(f"{what}: a SOPInstanceUID occurs twice among the source files")
    return headers


def _source_planes(mask: np.ndarray, affine: np.ndarray,
                   headers: Sequence[pydicom.Dataset]) -> np.ndarray:
    """One rows×columns plane of ``mask`` per source instance, paired by position.

    Raises:
        ValueError: the grid is not the series' pixel lattice (axes, spacing, origin), the
            shapes differ, or two instances fall on the same mask slice.
    """
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    to_voxel = np.linalg.inv(_RAS_TO_LPS @ np.asarray(affine, dtype=np.float64))
    column_step, row_step = pixel_steps(headers[0])
    tol = 0.1 / max(rows, cols)  # direction error accumulated over a row stays < 0.1 voxel
    axes = []
    for name, step in (("column", column_step), ("row", row_step)):
        d = to_voxel[:3, :3] @ step
        axis = int(np.argmax(np.abs(d)))
        sign = 1 if d[axis] > 0 else -1
        unit = np.zeros(3)
        unit[axis] = sign
        if not np.allclose(d, unit, atol=tol):
            raise ValueError(f"the mask's grid is not the series' pixel grid: one {name} step "
                             f"of the source images moves by {np.round(d, 4).tolist()} voxels "
                             f"of the mask (expected one voxel along one axis)")
        axes.append((axis, sign))
    (col_axis, col_sign), (row_axis, row_sign) = axes
    if col_axis == row_axis:
        raise ValueError("the mask's grid is not the series' pixel grid: rows and columns map "
                         "onto the same mask axis")
    slice_axis = 3 - col_axis - row_axis
    expected = [0, 0, 0]
    expected[col_axis], expected[row_axis], expected[slice_axis] = cols, rows, len(headers)
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the series: "
                         f"{len(headers)} instances of {rows}×{cols} pixels (rows×columns) "
                         f"need a mask of shape {tuple(expected)} on this grid")
    planes = np.zeros((len(headers), rows, cols), dtype=np.uint8)
    ordered = mask.transpose(row_axis, col_axis, slice_axis)  # rows × columns × slices
    used: dict[int, str] = {}
    for i, ds in enumerate(headers):
        voxel = to_voxel @ np.append(np.asarray(ds.ImagePositionPatient, float), 1.0)
        index = np.round(voxel[:3])
        start = [0, 0, 0]
        start[col_axis] = 0 if col_sign > 0 else cols - 1
        start[row_axis] = 0 if row_sign > 0 else rows - 1
        k = int(index[slice_axis])
        in_plane_ok = (index[col_axis] == start[col_axis] and index[row_axis] == start[row_axis])
        if np.abs(voxel[:3] - index).max() > 0.1 or not in_plane_ok or not 0 <= k < len(headers):
            raise ValueError(f"instance {ds.SOPInstanceUID} (ImagePositionPatient "
                             f"{list(map(float, ds.ImagePositionPatient))}) lies at voxel "
                             f"{np.round(voxel[:3], 3).tolist()} of the mask, not on one of its "
                             f"slices")
        if k in used:
            raise ValueError(f"instances {used[k]} and {ds.SOPInstanceUID} fall on the same "
                             f"mask slice {k}")
        used[k] = str(ds.SOPInstanceUID)
        plane = ordered[:, :, k]
        planes[i] = plane[::row_sign, ::col_sign]
    return planes


def write_dicom_seg(mask: np.ndarray, source_files: Sequence[str | os.PathLike],
                    path: str | os.PathLike, *, affine: np.ndarray | None = None,
                    segment_label: str = "heart",
                    segmented_property_category: Code | None = None,
                    segmented_property_type: Code | None = None,
                    algorithm_name: str = "mmcrf", algorithm_version: str | None = None,
                    algorithm_parameters: Mapping[str, str] | None = None,
                    series_description: str = "mmcrf segmentation",
                    series_number: int | None = None) -> Path:
    """Writes a binary mask as a DICOM SEG whose frames reference the source instances.

    One segment (algorithm type AUTOMATIC, identified as ``algorithm_name`` /
    ``algorithm_version``), BINARY, explicit VR little endian; frames holding no foreground are
    left out (an all-empty mask keeps every frame). The SEG joins the source study (patient
    and study attributes copied) as a new series, and each frame's DerivationImageSequence
    names the source instance it lies on. Written to a temporary name and renamed.

    Args:
        mask: X×Y×Z binary array (0/1 or bool) on the grid of ``affine``.
        source_files: the files of the source series (any order; one single-frame image per
            file).
        path: destination file (e.g. ``case_seg.dcm``); parent folders are created.
        affine: 4×4 voxel → RAS world mm of ``mask``. Default: the grid
            :func:`pipeline.data.read_volume` gives for this series (X = columns, Y = rows,
            Z = slices in increasing order along the slice normal). Any grid that is the
            series' pixel lattice with axes permuted or flipped works.
        segment_label: the segment's label.
        segmented_property_category: the segment's category (default SCT Anatomical
            Structure).
        segmented_property_type: the segment's property type (default SCT Heart).
        algorithm_name: algorithm identification name.
        algorithm_version: its version (default: this package's).
        algorithm_parameters: name → value recorded with the algorithm identification.
        series_description: SeriesDescription of the SEG.
        series_number: SeriesNumber of the SEG (default: the source's plus 1000).

    Returns:
        The written path.

    Raises:
        ValueError: the mask is not binary or not 3-D, its shape or grid does not match the
            series, the source files are not one readable series, or highdicom refuses them.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    out = Path(path)
    data = np.asarray(mask)
    if data.ndim != 3:
        raise ValueError(f"write_dicom_seg needs an X×Y×Z mask, got shape {data.shape}")
    if data.dtype != bool and np.any((data != 0) & (data != 1)):
        raise ValueError("write_dicom_seg needs a binary mask (values 0 and 1)")
    headers = _read_headers(source_files)
    grid = series_affine(headers) if affine is None else np.asarray(affine, dtype=np.float64)
    if grid.shape != (4, 4):
        raise ValueError(f"affine must be 4×4, got shape {grid.shape}")
    planes = _source_planes(data, grid, headers)
    for ds in headers:  # highdicom copies these from the first source image
        for key in _COPIED_TYPE2:
            if key not in ds:
                setattr(ds, key, None)
    first = headers[0]
    if series_number is None:
        source_number = first.get("SeriesNumber")
        series_number = (int(source_number) if source_number not in (None, "") else 0) + 1000
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version or __version__, source="mmcrf",
        parameters=dict(algorithm_parameters) if algorithm_parameters else None)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment_label,
        segmented_property_category=segmented_property_category or codes.SCT.AnatomicalStructure,
        segmented_property_type=segmented_property_type or codes.SCT.Heart,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    hd_logger = logging.getLogger("highdicom")
    level = hd_logger.level
    hd_logger.setLevel(max(logging.WARNING, hd_logger.getEffectiveLevel()))  # no INFO per module
    try:
        with warnings.catch_warnings():  # e.g. single-component patient names of the source
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended")
            seg = hd.seg.Segmentation(
                source_images=headers, pixel_array=planes,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment], series_instance_uid=generate_uid(),
                series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
                manufacturer="mmcrf", manufacturer_model_name=algorithm_name,
                software_versions=algorithm_version or __version__, device_serial_number="0",
                series_description=series_description, content_label="MMCRF",
                content_description=f"{algorithm_name} automatic segmentation",
                omit_empty_frames=bool(planes.any()))
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"{out}: cannot build a DICOM SEG for series "
                         f"{first.SeriesInstanceUID}: {err}") from None
    finally:
        hd_logger.setLevel(level)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(out)
    try:
        pydicom.dcmwrite(tmp, seg, enforce_file_format=True)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
