"""DICOM RT Structure Set output (rt-utils): the mask's outline on each slice of the source
series, as radiotherapy planning systems read it."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.valuerep import DSfloat

from pipeline.data.dicom_seg import _read_headers, _source_planes
from pipeline.data.readers import series_affine

__all__ = ["write_rtstruct"]

#: Type 2 attributes of the RT Structure Set IOD that rt-utils leaves out; written empty.
_TYPE2_EMPTY = ("ReferringPhysicianName", "AccessionNumber", "StudyID", "OperatorsName")


def write_rtstruct(mask: np.ndarray, source_files: Sequence[str | os.PathLike],
                   path: str | os.PathLike, *, affine: np.ndarray | None = None,
                   roi_name: str = "heart", color: Sequence[int] = (255, 0, 0),
                   description: str = "mmcrf segmentation, not for clinical use") -> Path:
    """Writes a binary mask as one ROI of an RT Structure Set referencing the source series.

    The mask is placed on the series' slices by their positions (as for
    :func:`pipeline.data.write_dicom_seg`), and rt-utils draws each slice's contours. Written
    to a temporary name in the destination folder and renamed.

    Args:
        mask: X×Y×Z binary array on the grid of ``affine``.
        source_files: the files of the source series.
        path: destination file (e.g. ``case_rtstruct.dcm``).
        affine: 4×4 voxel → RAS mm of ``mask``; default: the grid
            :func:`pipeline.data.read_volume` gives for this series.
        roi_name: the ROI's name.
        color: its display colour (RGB).
        description: the structure set's description.

    Returns:
        The written path.

    Raises:
        ValueError: an empty mask (no contour to write), a grid that is not the series', or
            source files that are not one series.
    """
    from rt_utils import RTStructBuilder

    headers = _read_headers(source_files, "RT Structure Set")
    affine = series_affine(headers) if affine is None else np.asarray(affine, np.float64)
    planes = _source_planes(np.asarray(mask).astype(bool), affine, headers)
    if not planes.any():
        raise ValueError("the mask is empty: an RT Structure Set needs at least one contour")
    by_uid = {str(h.SOPInstanceUID): p for h, p in zip(headers, planes, strict=True)}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as series_dir, \
            tempfile.TemporaryDirectory(dir=target.parent, prefix=".rtstruct") as out_dir:
        for k, source in enumerate(source_files):  # rt-utils reads a folder of one series
            os.symlink(Path(source).resolve(), Path(series_dir) / f"{k:05d}.dcm")
        rtstruct = RTStructBuilder.create_new(dicom_series_path=series_dir)
        stack = np.stack([by_uid[str(ds.SOPInstanceUID)] for ds in rtstruct.series_data],
                         axis=-1).astype(bool)
        rtstruct.add_roi(mask=stack, color=list(color), name=roi_name)
        ds = rtstruct.ds
        for roi in ds.ROIContourSequence:  # rt-utils writes DS values of up to 20 characters
            for contour in roi.ContourSequence:
                contour.ContourData = [DSfloat(float(v), auto_format=True)
                                       for v in contour.ContourData]
        ds.StructureSetDescription = description
        ds.Manufacturer = "mmcrf"
        # the Frame of Reference module, complete: the source's frame, its reference indicator
        ds.FrameOfReferenceUID = headers[0].FrameOfReferenceUID
        ds.PositionReferenceIndicator = headers[0].get("PositionReferenceIndicator", "")
        for key in _TYPE2_EMPTY:
            if key not in ds:
                setattr(ds, key, "")
        written = Path(out_dir) / "rtstruct.dcm"
        with contextlib.redirect_stdout(io.StringIO()):  # rt-utils prints where it writes
            rtstruct.save(str(written))
        written.replace(target)
    return target
