"""Volume readers: NIfTI files and DICOM series folders, with the world affine kept (RAS)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.utils import MetaKeys, SpaceKeys
from pydicom.errors import InvalidDicomError

__all__ = [
    "NO_SERIES_UID",
    "DicomSeries",
    "DicomSeriesReader",
    "find_dicom_series",
    "is_nifti",
    "pixel_steps",
    "read_volume",
    "series_affine",
]

#: Key under which files without a SeriesInstanceUID are grouped (anonymised data lacks it).
NO_SERIES_UID = "<no SeriesInstanceUID>"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: str | os.PathLike) -> bool:
    """True for ``.nii`` / ``.nii.gz`` file names."""
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


@dataclass
class DicomSeries:
    """One DICOM series found on disk.

    Attributes:
        uid: SeriesInstanceUID (or :data:`NO_SERIES_UID`).
        files: the files of the series, in the order found (not yet sorted spatially).
        description: SeriesDescription where present.
        modality: Modality where present.
    """

    uid: str
    files: list[Path] = field(default_factory=list)
    description: str = ""
    modality: str = ""


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """Header of a DICOM file, None for a file that is not DICOM at all."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as err:  # truncated or otherwise broken file
        raise ValueError(f"{path}: unreadable DICOM file ({err})") from None


def find_dicom_series(folder: str | os.PathLike, *, recursive: bool = False
                      ) -> dict[str, DicomSeries]:
    """Groups the DICOM files of a folder by SeriesInstanceUID.

    Files that are not DICOM (no preamble/prefix and no valid header) are ignored; a DICOM file
    that cannot be parsed is an error.

    Args:
        folder: the folder to scan.
        recursive: also scan sub-folders.

    Returns:
        UID → series, in order of first appearance.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: a DICOM file in it is unreadable.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such DICOM folder")
    files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file())
    series: dict[str, DicomSeries] = {}
    for path in files:
        header = _dicom_header(path)
        if header is None:
            continue  # not DICOM (notes, thumbnails, ...)
        if "ImagePositionPatient" not in header:
            sop = header.get("SOPClassUID")
            if sop is not None and "Image Storage" in getattr(sop, "name", ""):
                raise ValueError(f"{path}: DICOM image without ImagePositionPatient "
                                 f"(truncated or corrupt file?)")
            continue  # DICOM without image geometry (DICOMDIR, reports, ...)
        uid = str(header.get("SeriesInstanceUID", "") or "") or NO_SERIES_UID
        entry = series.setdefault(uid, DicomSeries(uid, [], str(header.get("SeriesDescription",
                                                                            "")),
                                                   str(header.get("Modality", ""))))
        entry.files.append(path)
    return series


def _select_series(folder: Path, series_uid: str | None) -> DicomSeries:
    found = find_dicom_series(folder)
    if not found:
        raise ValueError(f"{folder}: no DICOM image files in this folder")
    if series_uid is not None:
        if series_uid not in found:
            raise ValueError(f"{folder}: no series with SeriesInstanceUID {series_uid}; "
                             f"found: {', '.join(found)}")
        return found[series_uid]
    if len(found) > 1:
        listing = "; ".join(f"{s.uid} ({len(s.files)} files"
                            f"{', ' + s.description if s.description else ''})"
                            for s in found.values())
        raise ValueError(f"{folder}: holds {len(found)} DICOM series, choose one by "
                         f"SeriesInstanceUID: {listing}")
    return next(iter(found.values()))


def pixel_steps(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """LPS mm moved by one column (along a row) and by one row (down a column) of a DICOM
    image: pixel_array is [row, col], and rows advance along the column direction cosine."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return iop[:3] * col_spacing, iop[3:] * row_spacing


def series_affine(headers: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The RAS affine of a DICOM series on the grid :func:`read_volume` gives it: X along a
    row (columns), Y down a column (rows), Z through the slices sorted by
    ImagePositionPatient along the slice normal (one slice: SliceThickness deep, else 1 mm).

    Args:
        headers: the series' datasets (any order; pixel data not needed), which must carry
            ImagePositionPatient, ImageOrientationPatient and PixelSpacing.
    """
    iop = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    positions = sorted((np.asarray(ds.ImagePositionPatient, dtype=np.float64)
                        for ds in headers), key=lambda p: float(p @ normal))
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = normal * float(headers[0].get("SliceThickness", 1.0) or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0], affine_lps[:3, 1] = pixel_steps(headers[0])
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return _LPS_TO_RAS @ affine_lps


def _read_dicom_series(series: DicomSeries, folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads a series into an X×Y×Z float32 array (HU for CT) and its RAS affine."""
    slices = []
    for path in series.files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:
            raise ValueError(f"{path}: unreadable DICOM file ({err})") from None
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if key not in ds:
                raise ValueError(f"{path}: DICOM file lacks {key}; cannot place it in space")
        slices.append((path, ds))
    iop = np.array(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    for path, ds in slices:
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=np.float64), iop,
                           atol=1e-4):
            raise ValueError(f"{path}: ImageOrientationPatient differs from the rest of series "
                             f"{series.uid} in {folder}")
    slices.sort(key=lambda item: float(np.dot(normal,
                                              np.array(item[1].ImagePositionPatient, float))))
    positions = np.array([np.array(ds.ImagePositionPatient, float) for _, ds in slices])
    depth = positions @ normal
    if len(slices) > 1:
        gaps = np.diff(depth)
        if np.any(gaps < 1e-6):
            dup = slices[int(np.argmin(gaps)) + 1][0]
            raise ValueError(f"{dup}: two slices of series {series.uid} share the same position")
        if not np.allclose(gaps, gaps.mean(), rtol=1e-3, atol=1e-3):
            raise ValueError(f"{folder}: slices of series {series.uid} are unevenly spaced "
                             f"(gaps {gaps.min():.3f}–{gaps.max():.3f} mm); a missing slice?")
    frames = []
    shape = None
    for path, ds in slices:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:
            raise ValueError(f"{path}: cannot decode pixel data "
                             f"(transfer syntax {ds.file_meta.TransferSyntaxUID}): {err}"
                             ) from None
        if pixels.ndim != 2:
            raise ValueError(f"{path}: expected one 2-D frame per file, got shape {pixels.shape}")
        if shape is None:
            shape = pixels.shape
        elif pixels.shape != shape:
            raise ValueError(f"{path}: frame shape {pixels.shape} differs from {shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        frames.append(pixels * slope + intercept)
    volume = np.stack([f.T for f in frames], axis=-1)  # X (col) × Y (row) × Z
    first = slices[0][1]
    meta = {
        "series_uid": series.uid,
        "modality": str(first.get("Modality", "")),
        "series_description": series.description,
        "patient_id": str(first.get("PatientID", "")),
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "sop_instance_uids": [str(ds.get("SOPInstanceUID", "")) for _, ds in slices],
        "files": [str(p) for p, _ in slices],
    }
    return volume, series_affine([ds for _, ds in slices]), meta


class DicomSeriesReader(ImageReader):
    """MONAI image reader for a folder holding one DICOM series (pydicom; JPEG 2000 through
    pylibjpeg-openjpeg).

    Slices are sorted along the slice normal, rescaled to HU (slope/intercept) and stacked as
    X×Y×Z with a RAS affine, like MONAI's NIfTI reader, so MONAI's spatial transforms,
    ``Invertd`` and ``SaveImaged`` treat both formats alike. A folder with several series is
    refused with a message listing their SeriesInstanceUIDs unless ``series_uid`` picks one.

    Args:
        series_uid: the series to read from a folder holding several.
    """

    def __init__(self, series_uid: str | None = None) -> None:
        super().__init__()
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and Path(names[0]).is_dir()

    def read(self, data, **kwargs):
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(names) != 1:
            raise ValueError(f"DicomSeriesReader reads one series folder at a time, got {names}")
        folder = Path(names[0])
        series = _select_series(folder, kwargs.get("series_uid", self.series_uid))
        volume, affine, meta = _read_dicom_series(series, folder)
        meta["filename_or_obj"] = str(folder)
        return volume, affine, meta

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        volume, affine, extra = img
        meta = dict(extra)
        meta[MetaKeys.AFFINE] = affine.copy()
        meta[MetaKeys.ORIGINAL_AFFINE] = affine.copy()
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(volume.shape)
        meta[MetaKeys.SPACE] = SpaceKeys.RAS
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan")
        return volume, meta


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None,
                require_3d: bool = True) -> MetaTensor:
    """Reads a 3-D volume from a NIfTI file or a DICOM series folder.

    Args:
        path: a ``.nii``/``.nii.gz`` file, or a folder holding one DICOM series.
        series_uid: with a DICOM folder holding several series, the one to read.
        require_3d: refuse 2-D images (and 3-D images with a single slice).

    Returns:
        A channel-less X×Y×Z MetaTensor whose ``affine`` maps voxel indices to RAS world mm.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported format, unreadable/corrupt file, several series, not 3-D.
    """
    p = Path(path)
    _check_exists(p)
    # The readers are called directly: MONAI's LoadImage would fall back to other readers when
    # ours refuses an input (e.g. a folder with several series), hiding the problem.
    if p.is_dir():
        reader: ImageReader = DicomSeriesReader(series_uid)
    elif is_nifti(p):
        reader = NibabelReader()
    else:
        raise ValueError(f"{p}: unsupported volume format; expected a .nii/.nii.gz file or a "
                         f"folder holding a DICOM series")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array, meta = reader.get_data(reader.read(str(p)))
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # nibabel/zlib errors on corrupt files
        raise ValueError(f"{p}: unreadable volume ({type(err).__name__}: {err})") from None
    meta["filename_or_obj"] = str(p)
    affine = torch.as_tensor(np.asarray(meta.pop(MetaKeys.AFFINE), dtype=np.float64))
    volume = MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32)), affine=affine,
                        meta=meta)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if require_3d and (volume.ndim != 3 or min(volume.shape) < 2):
        raise ValueError(f"{p}: a 3-D volume is needed, got an image of shape "
                         f"{tuple(volume.shape)}")
    if not bool(torch.isfinite(volume).all()):
        raise ValueError(f"{p}: volume contains NaN or infinite values")
    return volume
