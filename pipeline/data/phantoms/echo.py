"""Apical-view echocardiography phantom (a beating left ventricle), its cohort, read back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.data.writers import atomic_path

__all__ = [
    "ECHO_DEMO_COHORT",
    "ECHO_FORMATS",
    "EchoFiles",
    "EchoPhantom",
    "echo_phantom",
    "echo_samples",
    "write_echo_cine",
    "write_echo_cohort",
    "write_echo_phantom",
]

#: Formats :func:`write_echo_phantom` writes, with the file suffix of each.
ECHO_FORMATS: dict[str, str] = {"dicom": ".dcm", "nifti": ".nii.gz", "mhd": ".mhd", "png": ".png"}

_US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
_US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"


@dataclass
class EchoPhantom:
    """A synthetic cine loop of one cardiac cycle.

    Array convention (shared with :mod:`pipeline.data.ultrasound`): ``frames[t, row, col]``,
    rows run with depth (row 0 at the transducer, at the top), columns run laterally.

    Attributes:
        frames: T×H×W float32 B-mode intensities in [0, 1]; 0 outside the sector.
        masks: T×H×W uint8 left-ventricle cavity masks.
        ed: index of the end-diastolic frame (largest cavity).
        es: index of the end-systolic frame (smallest cavity).
        sector: H×W bool field of view (the fan).
        spacing: (row, col) pixel spacing in mm.
        frame_time_ms: time between frames in milliseconds.
    """

    frames: np.ndarray
    masks: np.ndarray
    ed: int
    es: int
    sector: np.ndarray
    spacing: tuple[float, float]
    frame_time_ms: float

    @property
    def frame_names(self) -> dict[str, int]:
        """The named frames, as a manifest would carry them: ``{"ED": ed, "ES": es}``."""
        return {"ED": self.ed, "ES": self.es}

    def as_uint8(self) -> np.ndarray:
        """Returns the frames quantised to uint8 (0..255), the form written to disk."""
        return np.round(np.clip(self.frames, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass
class EchoFiles:
    """Files of one phantom written in one format.

    Attributes:
        images: the image files: one cine file, or one file per frame (PNG).
        masks: the mask files, matching ``images``.
    """

    images: list[Path]
    masks: list[Path]


def _ellipse(rows: np.ndarray, cols: np.ndarray, centre: tuple[float, float],
             axes: tuple[float, float], tilt: float) -> np.ndarray:
    """Inside test for an ellipse, semi-axes (long, short), long axis ``tilt`` off vertical."""
    dy, dx = rows - centre[0], cols - centre[1]
    u = dy * np.cos(tilt) + dx * np.sin(tilt)
    v = -dy * np.sin(tilt) + dx * np.cos(tilt)
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0


def _speckle(gen: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Unit-mean Rayleigh speckle: the envelope of a correlated complex Gaussian field."""
    sigma = (0.7, 1.4)  # resolution cells are longer laterally than axially
    re = ndimage.gaussian_filter(gen.standard_normal(shape), sigma)
    im = ndimage.gaussian_filter(gen.standard_normal(shape), sigma)
    amplitude = np.hypot(re, im)
    return amplitude / amplitude.mean()


def _contraction_phase(n_frames: int, es: int) -> np.ndarray:
    """0 at ED (frame 0), rising smoothly to 1 at ES, back towards 0 at the end of the cycle."""
    t = np.arange(n_frames, dtype=np.float64)
    phase = np.where(t <= es, 0.5 * (1.0 - np.cos(np.pi * t / es)),
                     0.5 * (1.0 + np.cos(np.pi * (t - es) / max(n_frames - es, 1))))
    return phase


def echo_phantom(shape: tuple[int, int] = (128, 128), n_frames: int = 16, *,
                 contraction: float = 0.3, attenuation: float = 1.0,
                 spacing: tuple[float, float] = (0.4, 0.4), frame_time_ms: float = 50.0,
                 centre: tuple[float, float] = (0.52, 0.40), tilt: float = 15.0,
                 size: float = 1.0,
                 rng: np.random.Generator | int | None = None) -> EchoPhantom:
    """Generates an ultrasound-like cine loop of a beating left ventricle.

    The field of view is a fan whose apex (the transducer) sits just above the top centre.
    Inside it, tissue echogenicity (dark blood in the cavity, bright myocardium around it, grey
    tissue elsewhere) is multiplied by depth attenuation ``exp(-attenuation · r / H)`` (r the
    distance from the apex, so intensity falls with the row index) and by unit-mean Rayleigh
    speckle drawn afresh for each frame. The cavity is a tilted ellipse placed left of and
    below the centre, so a flip or a transpose of a frame is detectable. Over the cycle the cavity
    shrinks from ED (frame 0, largest) to ES (about 40 % into the cycle, smallest) and expands
    again, while the wall thickens as it contracts.

    Args:
        shape: (H, W) of each frame, each at least 32.
        n_frames: number of frames in the cycle, at least 2.
        contraction: fractional shortening of the cavity's short axis at ES, in (0, 0.8).
        attenuation: depth attenuation rate per image height, >= 0.
        spacing: (row, col) pixel spacing in mm, carried to the written files.
        frame_time_ms: time between frames in ms, carried to the written files.
        centre: the cavity's centre as fractions of (H, W).
        tilt: the cavity's long-axis tilt in degrees.
        size: scale factor of the cavity's axes at ED.
        rng: a numpy Generator or a seed.

    Returns:
        The phantom: frames, cavity masks, ED/ES indices, sector, spacing and frame time.

    Raises:
        ValueError: shape below 32×32, fewer than 2 frames, contraction outside (0, 0.8),
            negative attenuation or non-positive spacing/frame time.
    """
    height, width = (int(s) for s in shape)
    if height < 32 or width < 32:
        raise ValueError(f"echo_phantom needs a shape of at least 32×32, got {shape}")
    if n_frames < 2:
        raise ValueError(f"echo_phantom needs at least 2 frames for a cycle, got {n_frames}")
    if not 0.0 < contraction < 0.8:
        raise ValueError(f"contraction must lie in (0, 0.8), got {contraction}")
    if attenuation < 0:
        raise ValueError(f"attenuation must be >= 0, got {attenuation}")
    if min(spacing) <= 0 or frame_time_ms <= 0:
        raise ValueError(f"spacing and frame_time_ms must be positive, got {spacing}, "
                         f"{frame_time_ms}")
    if not (0.2 <= centre[0] <= 0.8 and 0.2 <= centre[1] <= 0.8) or not 0.5 <= size <= 1.5:
        raise ValueError(f"centre must lie in [0.2, 0.8]² of the frame and size in [0.5, 1.5], "
                         f"got {centre}, {size}")
    gen = np.random.default_rng(rng)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)

    # The fan: apex just above the top centre, ±38° about the vertical, down to 95 % depth.
    apex = (-0.05 * height, (width - 1) / 2.0)
    radius = np.hypot(rows - apex[0], cols - apex[1])
    angle = np.arctan2(cols - apex[1], rows - apex[0])
    sector = (radius <= 1.0 * height) & (np.abs(angle) <= np.deg2rad(38.0))
    gain = np.exp(-attenuation * radius / height)

    es = max(1, round(0.4 * n_frames))
    phase = _contraction_phase(n_frames, es)
    # by default off-centre: left of the midline, below mid-depth
    centre = (centre[0] * height, centre[1] * width)
    tilt = np.deg2rad(tilt)
    long_axis, short_axis = 0.26 * size * height, 0.12 * size * width
    wall = 0.07 * min(height, width)

    frames = np.empty((n_frames, height, width), dtype=np.float32)
    masks = np.empty((n_frames, height, width), dtype=np.uint8)
    for t, p in enumerate(phase):
        # The long axis shortens less than the short axis; the wall thickens as it contracts.
        axes = (long_axis * (1.0 - 0.5 * contraction * p), short_axis * (1.0 - contraction * p))
        thick = wall * (1.0 + 0.5 * p)
        cavity = _ellipse(rows, cols, centre, axes, tilt)
        outer = _ellipse(rows, cols, centre, (axes[0] + thick, axes[1] + thick), tilt)
        echo = np.full((height, width), 0.45)
        echo[outer] = 1.0
        echo[cavity] = 0.08
        echo = ndimage.gaussian_filter(echo, 1.0)  # soft tissue boundaries, crisp masks
        frame = 0.55 * echo * gain * _speckle(gen, (height, width))
        frames[t] = np.where(sector, np.clip(frame, 0.0, 1.0), 0.0)
        masks[t] = cavity & sector
    return EchoPhantom(frames=frames, masks=masks, ed=0, es=es, sector=sector,
                       spacing=(float(spacing[0]), float(spacing[1])),
                       frame_time_ms=float(frame_time_ms))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _write_dicom(frames: np.ndarray, path: Path, spacing: tuple[float, float] | None,
                 frame_time_ms: float | None) -> None:
    """Writes an ultrasound (multi-frame) image with file meta, spacing as an ultrasound region."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.tag import Tag
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    multi = frames.ndim == 3
    height, width = frames.shape[-2:]
    sop_class = _US_MULTIFRAME_STORAGE if multi else _US_IMAGE_STORAGE
    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.PatientName = "Phantom^Echo"
    ds.PatientID = "ECHO-PHANTOM"
    # Type 2 attributes (present, empty where unknown) and the US Image module's ImageType,
    # so the file is a valid US (Multi-frame) Image IOD (dciodvfy, make test-dicom)
    ds.PatientBirthDate = ds.PatientSex = ""
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
    ds.BodyPartExamined = "HEART"  # not a paired part: Laterality (Type 2C) not needed
    ds.Manufacturer = "mmcrf"
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = int(height), int(width)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = 8 * frames.dtype.itemsize
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if multi:
        ds.NumberOfFrames = int(frames.shape[0])
        ds.FrameIncrementPointer = Tag(0x0018, 0x1063)  # Frame Time: the frames are time
        ds.FrameTime = float(frame_time_ms if frame_time_ms is not None else 40.0)
    if spacing is not None:
        region = Dataset()
        region.RegionSpatialFormat = 1  # 2D tissue
        region.RegionDataType = 1
        region.RegionFlags = 0
        region.RegionLocationMinX0 = 0
        region.RegionLocationMinY0 = 0
        region.RegionLocationMaxX1 = int(width) - 1
        region.RegionLocationMaxY1 = int(height) - 1
        region.PhysicalUnitsXDirection = 3  # cm
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = float(spacing[1]) / 10.0
        region.PhysicalDeltaY = float(spacing[0]) / 10.0
        ds.SequenceOfUltrasoundRegions = [region]
    data = np.ascontiguousarray(frames.astype(frames.dtype.newbyteorder("<"))).tobytes()
    ds.PixelData = data + b"\0" if len(data) % 2 else data
    ds.save_as(path, enforce_file_format=True)


def _write_nifti(frames: np.ndarray, path: Path, spacing: tuple[float, float] | None,
                 frame_time_ms: float | None) -> None:
    """Writes i = column (x), j = row (y): a frame as X×Y, a cine as X×Y×1×T (time in dim 4)."""
    import nibabel as nib

    row, col = spacing if spacing is not None else (1.0, 1.0)
    if frames.ndim == 2:
        data = frames.T
    else:
        data = frames.transpose(2, 1, 0)[:, :, None, :]
    img = nib.Nifti1Image(np.ascontiguousarray(data), np.diag([col, row, 1.0, 1.0]))
    if frames.ndim == 3:
        zooms = (col, row, 1.0, (frame_time_ms if frame_time_ms is not None else 40.0) / 1000.0)
        img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _write_metaimage(frames: np.ndarray, path: Path, spacing: tuple[float, float] | None) -> None:
    """Writes via SimpleITK: x = column, y = row, and for a cine z = time (as CAMUS does)."""
    import SimpleITK as sitk

    row, col = spacing if spacing is not None else (1.0, 1.0)
    img = sitk.GetImageFromArray(frames)
    img.SetSpacing((col, row) if frames.ndim == 2 else (col, row, 1.0))
    sitk.WriteImage(img, str(path))


def write_echo_cine(frames: np.ndarray, path: str | os.PathLike[str], *,
                    spacing: tuple[float, float] | None = None,
                    frame_time_ms: float | None = None) -> Path:
    """Writes a frame (H×W) or a cine (T×H×W) of uint8/uint16 values, format from the suffix.

    ``.dcm`` gives an ultrasound (multi-frame) DICOM, explicit VR little endian, spacing as an
    ultrasound region in cm; ``.nii``/``.nii.gz`` a NIfTI with i = column, j = row and time in
    dimension 4; ``.mhd``/``.mha`` a MetaImage via SimpleITK with time as z; ``.png``/``.jpg``/
    ``.jpeg`` a single greyscale frame via Pillow (JPEG at quality 95, lossy).

    Args:
        frames: H×W or T×H×W array of dtype uint8 or uint16 (uint8 only for DICOM, PNG and
            JPEG: the ultrasound IODs hold 8-bit samples).
        path: destination; parent folders are created.
        spacing: (row, col) pixel spacing in mm, written where the format carries it.
        frame_time_ms: time between frames (DICOM Frame Time, NIfTI pixdim[4]).

    Returns:
        The path written (for MetaImage, the ``.mhd`` header; the ``.raw`` lies beside it).

    Raises:
        ValueError: unsupported suffix, dtype or number of dimensions, or a cine for PNG/JPEG.
    """
    path = Path(path)
    arr = np.asarray(frames)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: expected an H×W frame or a T×H×W cine, got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: frames must be uint8 or uint16, got {arr.dtype}")
    suffix = _suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".dcm", ".dicom"):
        if arr.dtype != np.uint8:  # the US (Multi-frame) Image IOD: Bits Allocated is 8
            raise ValueError(f"{path}: ultrasound DICOM holds 8-bit samples; got {arr.dtype} "
                             f"(write 16-bit frames as NIfTI or MetaImage)")
        _write_dicom(arr, path, spacing, frame_time_ms)
    elif suffix in (".nii", ".nii.gz"):
        _write_nifti(arr, path, spacing, frame_time_ms)
    elif suffix in (".mhd", ".mha"):
        _write_metaimage(arr, path, spacing)
    elif suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        if arr.ndim != 2 or arr.dtype != np.uint8:
            raise ValueError(f"{path}: PNG/JPEG take one uint8 H×W frame per file, got "
                             f"{arr.dtype} {arr.shape}")
        options = {"quality": 95} if suffix != ".png" else {}
        Image.fromarray(arr).save(path, **options)
    else:
        raise ValueError(f"{path}: unsupported suffix {suffix!r}; use one of "
                         ".dcm, .nii, .nii.gz, .mhd, .mha, .png, .jpg, .jpeg")
    return path


def write_echo_phantom(phantom: EchoPhantom, directory: str | os.PathLike[str], *,
                       formats: tuple[str, ...] = tuple(ECHO_FORMATS), stem: str = "echo",
                       ) -> dict[str, EchoFiles]:
    """Writes a phantom's cine and cavity masks to disk in each requested format.

    Frames are quantised to uint8 (:meth:`EchoPhantom.as_uint8`) and masks written as 0/1, so
    every format reads back to the same arrays. DICOM, NIfTI and MetaImage hold the whole cine
    in one file (``{stem}.dcm`` and ``{stem}_mask.dcm``, ...); PNG gets one file per frame
    (``{stem}_000.png``, ``{stem}_mask_000.png``, ...).

    Args:
        phantom: the phantom from :func:`echo_phantom`.
        directory: destination folder (created if absent).
        formats: a subset of :data:`ECHO_FORMATS`' keys.
        stem: file-name stem.

    Returns:
        For each format, the image and mask files.

    Raises:
        ValueError: an unknown format.
    """
    unknown = [f for f in formats if f not in ECHO_FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {list(ECHO_FORMATS)}")
    directory = Path(directory)
    frames, masks = phantom.as_uint8(), phantom.masks.astype(np.uint8)
    options = {"spacing": phantom.spacing, "frame_time_ms": phantom.frame_time_ms}
    written: dict[str, EchoFiles] = {}
    for fmt in formats:
        suffix = ECHO_FORMATS[fmt]
        if fmt == "png":
            images = [write_echo_cine(f, directory / f"{stem}_{t:03d}{suffix}", **options)
                      for t, f in enumerate(frames)]
            mask_files = [write_echo_cine(m, directory / f"{stem}_mask_{t:03d}{suffix}",
                                          **options) for t, m in enumerate(masks)]
        else:
            images = [write_echo_cine(frames, directory / f"{stem}{suffix}", **options)]
            mask_files = [write_echo_cine(masks, directory / f"{stem}_mask{suffix}", **options)]
        written[fmt] = EchoFiles(images=images, masks=mask_files)
    return written


#: The demo echo cohort: (training, validation) case counts; case ``echo_NNN`` has seed NNN.
ECHO_DEMO_COHORT: tuple[int, int] = (6, 2)


def write_echo_cohort(folder: str | os.PathLike[str], *,
                      cases: tuple[int, int] = ECHO_DEMO_COHORT,
                      shape: tuple[int, int] = (96, 96), n_frames: int = 12,
                      seed: int = 0) -> dict[str, list[str]]:
    """Writes a cohort of echo phantoms, one patient per folder, with a split file.

    Each case differs in cavity position, tilt, size, contraction, attenuation and speckle.
    Layout: ``<folder>/echo_NNN/cine.dcm`` (multi-frame ultrasound DICOM, uint8),
    ``<folder>/echo_NNN/cine_mask.nii.gz`` (the cavity masks, frames in the same order) and
    ``<folder>/split.json`` (``{"training": [...], "validation": [...]}``, by patient). Files
    already present are kept, so a second call is cheap; the split file is written last.

    Args:
        folder: destination folder (created if absent).
        cases: (training, validation) numbers of cases.
        shape: (H, W) of the frames.
        n_frames: frames per cine loop.
        seed: seed of the first case (case i uses ``seed + i``).

    Returns:
        The split: case names per subset.

    Raises:
        ValueError: fewer than one case in a subset, or bad phantom settings.
    """
    if min(cases) < 1:
        raise ValueError(f"an echo cohort needs at least one training and one validation "
                         f"case, got {cases}")
    base = Path(folder)
    names = [f"echo_{seed + i:03d}" for i in range(sum(cases))]
    for i, name in enumerate(names):
        image, mask = base / name / "cine.dcm", base / name / "cine_mask.nii.gz"
        if image.exists() and mask.exists():
            continue
        gen = np.random.default_rng(seed + i)
        phantom = echo_phantom(
            shape, n_frames, contraction=float(gen.uniform(0.2, 0.45)),
            attenuation=float(gen.uniform(0.6, 1.4)),
            centre=(float(gen.uniform(0.45, 0.58)), float(gen.uniform(0.35, 0.6))),
            tilt=float(gen.uniform(-25.0, 25.0)), size=float(gen.uniform(0.8, 1.15)), rng=gen)
        for target, data in ((mask, phantom.masks.astype(np.uint8)),
                             (image, phantom.as_uint8())):
            # a temporary name with the same suffix (the writer picks the format by suffix)
            tmp = target.with_name(f".tmp{os.getpid()}-{target.name}")
            write_echo_cine(data, tmp, spacing=phantom.spacing,
                            frame_time_ms=phantom.frame_time_ms)
            tmp.replace(target)
    split = {"training": names[:cases[0]], "validation": names[cases[0]:]}
    tmp = atomic_path(base / "split.json")
    tmp.write_text(json.dumps(split, indent=2) + "\n")
    tmp.replace(base / "split.json")
    return split


def echo_samples(root: str | os.PathLike, split: str, *, size: int | None = None) -> list[dict]:
    """2-D samples of every frame of an echo cohort's split, normalised as at inference: the
    layout :func:`write_echo_cohort` writes (``split.json`` and ``<case>/cine.<ext>`` with
    ``<case>/cine_mask.<ext>``), of phantoms or of real cine loops (``--data echo``).

    Raises:
        FileNotFoundError: no ``split.json``.
        ValueError: a malformed ``split.json`` (see :func:`pipeline.data.splits.read_split`:
            a case in two splits is one), an unknown split, or a case without its files (the
            message names the file).
    """
    from pipeline.data.samples import ECHO_VIEW, to_samples
    from pipeline.data.splits import split_members
    from pipeline.data.ultrasound import load_ultrasound, normalise_frames

    base = Path(root)
    items = []
    for case in split_members(base, split):
        image, mask = _cine_files(base / case)
        frames = load_ultrasound(image, mask)
        stack = normalise_frames(image, np.stack([f.image for f in frames]))
        for frame, norm in zip(frames, stack, strict=True):
            items.append({"image": norm[None], "label": frame.mask[None], "source": case,
                          "view": ECHO_VIEW, "slice": frame.frame})
    return to_samples(items, size)


def _cine_files(case: Path):
    """The (image, mask) files of an echo case folder: ``cine.*`` and ``cine_mask.*``."""
    from pipeline.data.ultrasound import SUPPORTED_SUFFIXES

    def one(stem: str):
        found = [p for p in sorted(case.glob(f"{stem}.*"))
                 if any(p.name.lower().endswith(s) for s in SUPPORTED_SUFFIXES)]
        if len(found) != 1:
            raise ValueError(f"{case}: expected one {stem}.<ext> file "
                             f"({', '.join(SUPPORTED_SUFFIXES)}), found {len(found)}")
        return found[0]

    return one("cine"), one("cine_mask")
