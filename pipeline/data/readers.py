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
    "MAX_VOXELS",
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

#: The most voxels a volume may declare (its header, before anything is allocated): 2**29,
#: 2 GiB as float32, above a 512×512×2000 CT. The environment variable ``MMCRF_MAX_VOXELS``
#: or ``read_volume(max_voxels=...)`` changes it.
MAX_VOXELS = 2**29
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
            # the file meta's class too: a dataset cut short may have lost (part of) its own
            classes = (header.get("SOPClassUID"),
                       getattr(header.get("file_meta"), "MediaStorageSOPClassUID", None))
            if any(c is not None and "Image Storage" in getattr(c, "name", "")
                   for c in classes):
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


def _read_dicom_file(path: Path) -> pydicom.Dataset:
    """A whole DICOM file; a file cut off (pydicom then warns and returns what it could
    read) is a ValueError saying so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:
            raise ValueError(f"{path}: unreadable DICOM file ({err})") from None
    cut = [str(w.message) for w in caught
           if any(k in str(w.message).lower() for k in ("end of file", "truncat", "expected",
                                                        "unexpected", "bytes"))]
    if cut or ("PixelData" not in ds and "Rows" in ds):
        raise ValueError(f"{path}: truncated DICOM file (it ends before its pixel data does"
                         f"{': ' + cut[0] if cut else ''})")
    return ds


def _check_pixel_length(path: Path, ds: pydicom.Dataset) -> None:
    """ValueError when uncompressed pixel data is shorter than Rows × Columns × samples ×
    frames × bytes per sample (a file cut off or tampered with)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or syntax.is_compressed or "PixelData" not in ds:
        return
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                * int(ds.get("NumberOfFrames", 1) or 1) * (int(ds.BitsAllocated) // 8))
    actual = len(ds.PixelData)
    if actual < expected:
        raise ValueError(f"{path}: cannot decode pixel data: it is {actual} bytes, {expected} "
                         f"expected for {ds.Rows}x{ds.Columns} at {ds.BitsAllocated} bits (the "
                         f"file is truncated or corrupt)")


#: Header fields on which the slices of one scan agree; two values in a folder mean two scans.
#: (Not AcquisitionTime or AcquisitionNumber: helical and step-and-shoot scanners vary them
#: from slice to slice within one scan.)
_SCAN_KEYS = ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "Rows", "Columns",
              "PixelSpacing", "SliceThickness")


def _scans_mixed(slices: Sequence[tuple[Path, pydicom.Dataset]],
                 depth: np.ndarray) -> str | None:
    """Why the slices look like more than one scan (None when they do not): headers that
    disagree, or positions that fall on two interleaved grids."""
    for key in _SCAN_KEYS:
        values = {str(ds.get(key, "")) for _, ds in slices}
        if len(values) > 1:
            return f"{key} takes {len(values)} values ({', '.join(sorted(values)[:3])})"
    if len(depth) > 3:
        gaps = np.diff(np.sort(depth))
        small, large = gaps.min(), gaps.max()
        if small > 1e-6 and large / small > 1.5:
            steps = np.round(gaps / small)
            if not np.allclose(gaps, steps * small, rtol=0.05, atol=0.01):
                return (f"slice positions fall on more than one grid (gaps "
                        f"{small:.3f}-{large:.3f} mm, not multiples of one step)")
    return None


def _read_dicom_series(series: DicomSeries, folder: Path, max_voxels: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads a series into an X×Y×Z float32 array (HU for CT) and its RAS affine."""
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    _check_size(folder, (int(first.get("Columns", 0) or 0), int(first.get("Rows", 0) or 0),
                         len(series.files)), max_voxels)
    slices = []
    for path in series.files:
        ds = _read_dicom_file(path)
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
    mixed = _scans_mixed(slices, depth)
    if mixed is not None:
        raise ValueError(f"{folder}: holds slices of two scans or more under series "
                         f"{series.uid} ({mixed}); put each scan in a folder of its own")
    if len(slices) > 1:
        gaps = np.diff(depth)
        if np.any(gaps < 1e-6):
            dup = slices[int(np.argmin(gaps)) + 1][0]
            raise ValueError(f"{dup}: two slices of series {series.uid} share the same position "
                             f"(two scans mixed in one folder, or a file copied twice?)")
        if not np.allclose(gaps, gaps.mean(), rtol=1e-3, atol=1e-3):
            raise ValueError(f"{folder}: slices of series {series.uid} are unevenly spaced "
                             f"(gaps {gaps.min():.3f}–{gaps.max():.3f} mm); a missing slice?")
    frames = []
    shape = None
    for path, ds in slices:
        _check_pixel_length(path, ds)
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

    def __init__(self, series_uid: str | None = None, max_voxels: int | None = None) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.max_voxels = max_voxels

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and Path(names[0]).is_dir()

    def read(self, data, **kwargs):
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(names) != 1:
            raise ValueError(f"DicomSeriesReader reads one series folder at a time, got {names}")
        folder = Path(names[0])
        series = _select_series(folder, kwargs.get("series_uid", self.series_uid))
        volume, affine, meta = _read_dicom_series(series, folder, self.max_voxels)
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


def _voxel_limit(max_voxels: int | None) -> int:
    if max_voxels is not None:
        return int(max_voxels)
    value = os.environ.get("MMCRF_MAX_VOXELS", "")
    try:
        return int(value) if value else MAX_VOXELS
    except ValueError:
        raise ValueError(f"MMCRF_MAX_VOXELS must be a whole number, got {value!r}") from None


def _check_size(path: Path, shape: Sequence[int], max_voxels: int | None) -> None:
    """ValueError, before anything is allocated, when ``shape`` (as a header declares it)
    holds more voxels than the limit."""
    limit = _voxel_limit(max_voxels)
    count = int(np.prod([int(n) for n in shape], dtype=np.float64))
    if count > limit:
        dims = "x".join(str(int(n)) for n in shape)
        raise ValueError(f"{path}: the header declares {dims} voxels ({count:,}, "
                         f"{count * 4 / 2**30:.1f} GiB as float32), over the limit of "
                         f"{limit:,} voxels (MMCRF_MAX_VOXELS); refused before reading")


def _check_nifti_header(path: Path, max_voxels: int | None) -> None:
    """Reads only the NIfTI header (nibabel loads lazily) and applies :func:`_check_size`."""
    import nibabel as nib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = nib.load(path).header
    except Exception as err:
        raise ValueError(f"{path}: unreadable volume ({type(err).__name__}: {err})") from None
    _check_size(path, header.get_data_shape(), max_voxels)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None,
                require_3d: bool = True, max_voxels: int | None = None) -> MetaTensor:
    """Reads a 3-D volume from a NIfTI file or a DICOM series folder.

    Args:
        path: a ``.nii``/``.nii.gz`` file, or a folder holding one DICOM series.
        series_uid: with a DICOM folder holding several series, the one to read.
        require_3d: refuse 2-D images (and 3-D images with a single slice).
        max_voxels: the most voxels the header may declare (default: ``MMCRF_MAX_VOXELS``
            from the environment, else :data:`MAX_VOXELS`); checked before reading any voxel.

    Returns:
        A channel-less X×Y×Z MetaTensor whose ``affine`` maps voxel indices to RAS world mm.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported format, unreadable/corrupt/truncated file, several series or
            scans mixed, not 3-D, NaN voxels, or more voxels declared than the limit.
    """
    p = Path(path)
    _check_exists(p)
    # The readers are called directly: MONAI's LoadImage would fall back to other readers when
    # ours refuses an input (e.g. a folder with several series), hiding the problem.
    if p.is_dir():
        reader: ImageReader = DicomSeriesReader(series_uid, max_voxels)
    elif is_nifti(p):
        _check_nifti_header(p, max_voxels)
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
