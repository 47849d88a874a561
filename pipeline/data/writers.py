"""Atomic writers: NIfTI volumes and CT DICOM series (temporary name, then rename)."""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_csv",
    "write_dicom_series",
    "write_nifti",
    "write_png_mask",
]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_csv(rows: Iterable[Mapping], path: str | os.PathLike, columns: Sequence[str]) -> Path:
    """Writes rows as CSV with the given columns (extra keys ignored), atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(out)
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    return out


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, *,
                dtype=None) -> Path:
    """Writes an X×Y×Z(×…) array with its RAS affine as NIfTI, atomically.

    Args:
        array: the data, in the affine's voxel order.
        affine: 4×4 voxel → RAS world mm.
        path: ``.nii`` or ``.nii.gz`` destination; parent folders are created.
        dtype: on-disk data type (default: the array's).

    Returns:
        The written path.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    # serialised in memory, so the temporary file keeps atomic_path's name, which never
    # looks like an input (nibabel would pick gzip from a .nii.gz suffix on it)
    data = image.to_bytes()
    if out.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    return atomic_write_bytes(out, data)


def write_dicom_series(volume_hu: np.ndarray, affine: np.ndarray, folder: str | os.PathLike, *,
                       patient_id: str = "PHANTOM", series_description: str = "mmcrf phantom",
                       series_uid: str | None = None, study_uid: str | None = None) -> Path:
    """Writes an X×Y×Z volume in HU as an uncompressed CT DICOM series, one file per z-slice.

    The voxel grid must be axis-aligned with DICOM's LPS patient axes up to flips (any affine
    whose 3×3 part is diagonal in LPS works; the slice direction is the affine's z column).

    Args:
        volume_hu: X×Y×Z values in Hounsfield units.
        affine: 4×4 voxel → RAS world mm.
        folder: destination folder (created); files are ``slice_0000.dcm`` ...
        patient_id: PatientID written.
        series_description: SeriesDescription written.
        series_uid: SeriesInstanceUID (generated when None).
        study_uid: StudyInstanceUID (generated when None).

    Returns:
        The folder.

    Raises:
        ValueError: the volume is not 3-D.
    """
    vol = np.asarray(volume_hu, dtype=np.float64)
    if vol.ndim != 3:
        raise ValueError(f"write_dicom_series needs an X×Y×Z volume, got shape {vol.shape}")
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing, row_spacing = np.linalg.norm(col_step), np.linalg.norm(row_step)
    orientation = [*(col_step / col_spacing), *(row_step / row_spacing)]
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.now()
    if vol.min() < -32768 or vol.max() > 32767:
        raise ValueError("write_dicom_series: values outside the int16 range")
    stored = np.round(vol).astype(np.int16)
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        # Type 2 attributes (present, empty where unknown) and the CT Image module's Type 1
        # ones, so the series is a valid CT Image IOD (dciodvfy, make test-dicom)
        ds.PatientBirthDate = ds.PatientSex = ""
        ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
        ds.StudyTime = now.strftime("%H%M%S")
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "CHEST"  # not a paired part: Laterality (Type 2C) not needed
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "mmcrf"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.KVP = ""
        ds.AcquisitionNumber = 1
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = series_description
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * slice_step]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(row_spacing), float(col_spacing)]
        ds.SliceThickness = float(np.linalg.norm(slice_step))
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0.0
        ds.RescaleSlope = 1.0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        target = out / f"slice_{k:04d}.dcm"
        tmp = atomic_path(target)
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        tmp.replace(target)
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Calls ``write(temporary path)``, then renames the file onto ``path``: readers see the
    old file or the whole new one, and a failed write leaves nothing behind.

    Args:
        path: destination; its folder is created if missing.
        write: writes the file it is given (a sibling of ``path``, see :func:`atomic_path`).

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (:func:`atomic_write`), synced to disk."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_png_mask(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes a binary H×W mask as a 0/255 8-bit PNG, atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(tmp, format="PNG")
    tmp.replace(path)
    return path
