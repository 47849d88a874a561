"""Ultrasound frames and cine loops from DICOM, NIfTI, MetaImage and PNG/JPEG, with masks."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from monai.transforms import MapTransform, Transform

from pipeline.data.pictures import read_picture_frames

__all__ = [
    "SUPPORTED_SUFFIXES",
    "LoadUltrasoundFrames",
    "LoadUltrasoundFramesd",
    "UltrasoundFrame",
    "load_label_map",
    "load_ultrasound",
    "load_ultrasound_frame",
    "normalise_frames",
    "resolve_frames",
]

# Orientation convention, the same for every format: a frame is an H×W array indexed
# [row, col]; rows run along depth (the axial direction, row 0 at the transducer, drawn at the
# top), columns run laterally (col 0 drawn at the left). That is the stored pixel order of
# DICOM (Rows × Columns) and PNG/JPEG, SimpleITK's GetArrayFromImage order [.., y, x] for
# MetaImage (x = column), and the transpose of nibabel's [i, j] for NIfTI (i = x = column,
# j = y = row, as ITK/SimpleITK write it). Orientation matrices (affine, direction cosines,
# Image Orientation) are not applied: a frame reads as stored. Note that MONAI's own LoadImage
# yields spatial axes in (x, y) order, i.e. the transpose of this convention.

#: File suffixes read (case-insensitive); a file with another suffix is read as DICOM when it
#: carries the DICOM "DICM" preamble (DICOM files often have no suffix at all).
SUPPORTED_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".nii", ".nii.gz", ".mhd", ".mha",
                                       ".png", ".jpg", ".jpeg")

ThirdAxis = Literal["auto", "time", "space"]
FrameSelection = int | str | Sequence[int | str] | None

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the luma of DICOM's YBR_FULL
_SUFFIX_KIND = {".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti",
                ".mhd": "metaimage", ".mha": "metaimage", ".png": "png", ".jpg": "jpeg",
                ".jpeg": "jpeg"}
# Frame Increment Pointer targets that make a multi-frame DICOM a stack of slices, not a cine:
# Grid Frame Offset Vector (RT dose), Slice Vector (NM), Slice Location Vector.
_SPATIAL_FRAME_POINTERS = {0x3004000C: "Grid Frame Offset Vector", 0x00540080: "Slice Vector",
                           0x00182005: "Slice Location Vector"}
_NIFTI_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


@dataclass
class UltrasoundFrame:
    """One loaded frame (and its mask).

    Attributes:
        image: H×W float32 grey image (stored values, colour converted to BT.601 luma,
            MONOCHROME1 inverted, DICOM rescale applied; not normalised). Rows run along
            depth (row 0 at the transducer), columns laterally.
        mask: H×W uint8 binary mask (0/1), or None when no mask was given.
        source: the image file.
        frame: index of the frame in the image file (0 for a single-frame file).
        frame_name: the frame's name (e.g. "ED") when it was selected by name or the caller's
            frame names map one to its index, else None.
        spacing: (row, col) pixel spacing in mm where the format carries it, else None.
        mask_source: the mask file, or None.
    """

    image: np.ndarray
    mask: np.ndarray | None
    source: Path
    frame: int
    frame_name: str | None = None
    spacing: tuple[float, float] | None = None
    mask_source: Path | None = None


@dataclass
class _Source:
    """An opened file: frame count, frame shape, spacing and per-frame readers."""

    path: Path
    kind: str
    n_frames: int
    shape: tuple[int, int]
    spacing: tuple[float, float] | None
    grey: Callable[[int], np.ndarray]  # frame index -> H×W float grey image
    labels: Callable[[int], np.ndarray]  # frame index -> H×W stored values, for masks


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ _LUMA


def _kind_of(path: Path) -> str:
    """The reader for ``path`` from its suffix, or from the DICOM preamble."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: ultrasound file not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    name = path.name.lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()
    if suffix in _SUFFIX_KIND:
        return _SUFFIX_KIND[suffix]
    with path.open("rb") as fh:
        if fh.read(132)[128:] == b"DICM":
            return "dicom"
    hint = "; open the .mhd header instead of its .raw data" if suffix == ".raw" else ""
    raise ValueError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: "
                     f"{', '.join(SUPPORTED_SUFFIXES)} or DICOM without a suffix{hint}")


def _volume_error(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}: this is a 3D volume, not a 2D frame or a 2D+t cine loop "
                      "(pass third_axis='time' if the third axis really is time)")


# DICOM -----------------------------------------------------------------------------------------

def _check_dicom_frames(ds: Any, path: Path, n_frames: int, third_axis: ThirdAxis) -> None:
    """Raises when the frames of a multi-frame DICOM are slices of a volume, not time points."""
    if third_axis == "time":
        return
    if third_axis == "space":
        raise _volume_error(path, f"{n_frames} frames read as slices (third_axis='space')")
    pointers = ds.get("FrameIncrementPointer")
    if pointers is not None:
        for tag in pointers if isinstance(pointers, Sequence) else [pointers]:
            if int(tag) in _SPATIAL_FRAME_POINTERS:
                raise _volume_error(path, f"{n_frames} frames along "
                                          f"{_SPATIAL_FRAME_POINTERS[int(tag)]}")
    positions = set()
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        for plane in item.get("PlanePositionSequence", []):
            if "ImagePositionPatient" in plane:
                positions.add(tuple(float(v) for v in plane.ImagePositionPatient))
    if len(positions) > 1:
        raise _volume_error(path, f"{n_frames} frames at {len(positions)} distinct positions")


def _dicom_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, col) spacing in mm: Pixel Spacing, per-frame pixel measures or an ultrasound region."""
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        for group in ds.get("SharedFunctionalGroupsSequence", []):
            for measures in group.get("PixelMeasuresSequence", []):
                spacing = measures.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        return float(spacing[0]), float(spacing[1])
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
        if region.get("RegionSpatialFormat") == 1 and units == (3, 3):  # 2D tissue, in cm
            return 10.0 * float(region.PhysicalDeltaY), 10.0 * float(region.PhysicalDeltaX)
    return None


def _dicom_grey(arr: np.ndarray, photometric: str, ds: Any, path: Path) -> np.ndarray:
    """Grey values of one decoded frame, given the colour space the decoder returned."""
    if arr.ndim == 2:
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            return _luma(apply_color_lut(arr, ds))
        grey = arr.astype(np.float64)
        if photometric == "MONOCHROME1":  # low values are white: invert to MONOCHROME2
            bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
            grey = -1.0 - grey if ds.get("PixelRepresentation", 0) else (2.0**bits - 1) - grey
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None or intercept is not None:
            grey = grey * float(slope if slope is not None else 1) + float(intercept or 0)
        return grey
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if photometric == "RGB":
            return _luma(arr)
        if photometric in ("YBR_FULL", "YBR_FULL_422", "YBR_ICT"):
            return arr[..., 0].astype(np.float64)  # Y is the BT.601 luma already
        if photometric.startswith("YBR_PARTIAL"):  # Y in [16, 235] (8 bit), scaled up
            scale = 2.0 ** (8 * arr.dtype.itemsize - 8)
            return (arr[..., 0].astype(np.float64) - 16 * scale) * (255.0 / 219.0)
        if photometric == "YBR_RCT":  # JPEG 2000 reversible colour transform
            y, cb, cr = (arr[..., k].astype(np.float64) for k in range(3))
            green = y - np.floor((cb + cr) / 4.0)
            return _luma(np.stack([cr + green, green, cb + green], axis=-1))
    raise ValueError(f"{path}: unsupported DICOM pixel layout: photometric interpretation "
                     f"{photometric!r}, decoded shape {arr.shape}")


def _open_dicom(path: Path, third_axis: ThirdAxis) -> _Source:
    import pydicom
    from pydicom.pixels import get_decoder

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file has no pixel data (not an image)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ValueError(f"{path}: DICOM file meta lacks a transfer syntax")
    try:
        decoder = get_decoder(syntax)
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as exc:
        raise ValueError(f"{path}: cannot decode DICOM pixel data: {exc}") from exc
    if n_frames > 1:
        _check_dicom_frames(ds, path, n_frames, third_axis)

    def decode(i: int) -> tuple[np.ndarray, str]:
        try:  # as_rgb=False: keep YBR as Y; the decoder reports the colour space it returns
            arr, meta = decoder.as_array(ds, index=i, as_rgb=False)
        except Exception as exc:
            raise ValueError(f"{path}: cannot decode frame {i}: {exc}") from exc
        photometric = str(meta.get("photometric_interpretation")
                          or ds.get("PhotometricInterpretation", ""))
        return arr, photometric

    def grey(i: int) -> np.ndarray:
        return _dicom_grey(*decode(i), ds, path)

    def labels(i: int) -> np.ndarray:
        arr, photometric = decode(i)
        return arr if arr.ndim == 2 else np.round(_dicom_grey(arr, photometric, ds, path))

    return _Source(path, "dicom", n_frames, (rows, cols), _dicom_spacing(ds), grey, labels)


# NIfTI -----------------------------------------------------------------------------------------

def _nifti_spatial_reason(header: Any) -> str | None:
    """Why the header says a 3-D NIfTI's third axis is spatial, or None."""
    dim_info = getattr(header, "get_dim_info", lambda: (None, None, None))()
    if dim_info[2] == 2:
        return "the header's dim_info marks the third axis as the slice axis"
    if float(header.get("slice_duration", 0) or 0) > 0:
        return "the header gives a slice duration"
    z = float(header.get_zooms()[2])
    if z not in (0.0, 1.0):
        return f"the third axis has a voxel size of {z:g} (a spatial z spacing)"
    return None


def _open_nifti(path: Path, third_axis: ThirdAxis) -> _Source:
    import nibabel as nib

    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable NIfTI file: {exc}") from exc
    header = img.header
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    shape = data.shape
    if data.ndim == 2:
        xyt = data[:, :, None]
    elif data.ndim == 3:
        reason = _nifti_spatial_reason(header) if third_axis == "auto" else None
        if shape[2] > 1 and (third_axis == "space" or reason):
            raise _volume_error(path, f"NIfTI of shape {shape} with no time axis, "
                                      f"{reason or 'read with third_axis=space'}")
        xyt = data
    elif data.ndim == 4:
        if shape[2] != 1:
            what = "no time axis" if shape[3] == 1 else f"{shape[3]} time points"
            raise _volume_error(path, f"NIfTI of shape {shape} has z = {shape[2]} and {what}")
        xyt = data[:, :, 0, :]
    else:
        raise ValueError(f"{path}: NIfTI of shape {shape} is neither a 2D frame nor a 2D+t "
                         "cine (X×Y, X×Y×T or X×Y×1×T)")
    cine = xyt.transpose(2, 1, 0)  # T×H×W: rows = j (y), columns = i (x)
    rgb = data.dtype.names is not None and {"R", "G", "B"} <= set(data.dtype.names)
    if data.dtype.names is not None and not rgb:
        raise ValueError(f"{path}: unsupported NIfTI data type {data.dtype}")

    def grey(i: int) -> np.ndarray:
        frame = cine[i]
        if rgb:
            return _luma(np.stack([frame[c] for c in "RGB"], axis=-1))
        return np.asarray(frame, dtype=np.float64)

    def labels(i: int) -> np.ndarray:
        return np.round(grey(i)) if rgb else np.asarray(cine[i])

    zooms = header.get_zooms()
    factor = _NIFTI_UNIT_MM.get(header.get_xyzt_units()[0], 1.0)
    spacing = (float(zooms[1]) * factor, float(zooms[0]) * factor)
    return _Source(path, "nifti", cine.shape[0], cine.shape[1:], spacing if min(spacing) > 0
                   else None, grey, labels)


# MetaImage -------------------------------------------------------------------------------------

def _open_metaimage(path: Path, third_axis: ThirdAxis) -> _Source:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)  # [(t,) (z,) y, x (, component)]
    except Exception as exc:
        raise ValueError(f"{path}: not a readable MetaImage file: {exc}") from exc
    components = img.GetNumberOfComponentsPerPixel()
    if components not in (1, 3, 4):
        raise ValueError(f"{path}: {components} components per pixel; expected grey or RGB(A)")
    size = img.GetSize()
    dim = img.GetDimension()
    if components == 1:
        arr = arr[..., None]
    if dim == 2:
        cine = arr[None]
    elif dim == 3:
        if size[2] > 1 and third_axis == "space":
            raise _volume_error(path, f"MetaImage of size {size} read with third_axis='space'")
        cine = arr  # MetaImage has no time axis: z is time (as in CAMUS cine files)
    elif dim == 4 and size[2] == 1:
        cine = arr[:, 0]
    elif dim == 4:
        raise _volume_error(path, f"MetaImage of size {size} (x, y, z, t) has z = {size[2]}")
    else:
        raise ValueError(f"{path}: MetaImage of dimension {dim} is neither a 2D frame nor a "
                         "2D+t cine")

    def grey(i: int) -> np.ndarray:
        frame = cine[i]
        return frame[..., 0].astype(np.float64) if components == 1 else _luma(frame)

    def labels(i: int) -> np.ndarray:
        return cine[i][..., 0] if components == 1 else np.round(grey(i))

    sx, sy = img.GetSpacing()[:2]
    return _Source(path, "metaimage", cine.shape[0], cine.shape[1:3], (float(sy), float(sx)),
                   grey, labels)


# PNG / JPEG ------------------------------------------------------------------------------------

def _open_pillow(path: Path, kind: str) -> _Source:
    raws: list[np.ndarray] = []
    greys: list[np.ndarray] = []
    try:
        # decoded by pictures.py like every picture; an animated PNG's frames are a cine loop
        for img in read_picture_frames(path):
            mode = img.mode
            if mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
                raw = np.asarray(img)
                grey = raw.astype(np.float64)
            elif mode in ("LA", "La"):
                raw = np.asarray(img)[..., 0]
                grey = raw.astype(np.float64)
            else:  # RGB(A), palette (indices are the labels of a mask), CMYK, YCbCr, ...
                rgb = np.asarray(img.convert("RGB"))
                grey = _luma(rgb)
                raw = np.asarray(img) if mode in ("P", "PA") else np.round(grey)
                raw = raw[..., 0] if raw.ndim == 3 else raw
            raws.append(raw)
            greys.append(grey)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable {kind.upper()} image: {exc}") from exc
    return _Source(path, kind, len(raws), greys[0].shape, None, greys.__getitem__,
                   raws.__getitem__)


def _open(path: str | os.PathLike[str], third_axis: ThirdAxis = "auto") -> _Source:
    """Opens an ultrasound file with the reader its format needs."""
    if third_axis not in ("auto", "time", "space"):
        raise ValueError(f"third_axis must be 'auto', 'time' or 'space', got {third_axis!r}")
    path = Path(path)
    kind = _kind_of(path)
    if kind == "dicom":
        source = _open_dicom(path, third_axis)
    elif kind == "nifti":
        source = _open_nifti(path, third_axis)
    elif kind == "metaimage":
        source = _open_metaimage(path, third_axis)
    else:
        source = _open_pillow(path, kind)
    if source.n_frames < 1 or min(source.shape) < 1:
        raise ValueError(f"{path}: no image data (frames: {source.n_frames}, "
                         f"frame shape: {source.shape})")
    return source


# Frame selection and masks ---------------------------------------------------------------------

def resolve_frames(frames: FrameSelection, n_frames: int,
                   frame_names: Mapping[str, int] | None = None, *,
                   source: str | os.PathLike[str] | None = None) -> list[tuple[int, str | None]]:
    """Turns a frame selection into (index, name) pairs, in the order given.

    Args:
        frames: None or "all" for every frame; an index; a name such as "ED" looked up in
            ``frame_names`` (case-insensitively); or a sequence of indices and names.
        n_frames: number of frames in the file.
        frame_names: named frames, e.g. ``{"ED": 0, "ES": 12}``; an index selected directly
            gets the first name that maps to it.
        source: the file, for error messages.

    Returns:
        (frame index, frame name or None) for each selected frame.

    Raises:
        ValueError: an index out of range, an unknown name, an empty or malformed selection.
    """
    where = f"{source}: " if source is not None else ""
    names = dict(frame_names or {})
    folded = {str(k).casefold(): k for k in names}
    index_names: dict[int, str] = {}
    for name, index in names.items():
        if isinstance(index, int | np.integer) and not isinstance(index, bool):
            index_names.setdefault(int(index), name)

    def check(index: int, what: str) -> int:
        if not 0 <= index < n_frames:
            raise ValueError(f"{where}{what} is out of range: the file has {n_frames} frame(s), "
                             f"valid indices are 0..{n_frames - 1}")
        return index

    def one(item: int | str) -> tuple[int, str | None]:
        if isinstance(item, bool) or not isinstance(item, int | np.integer | str):
            raise ValueError(f"{where}a frame must be an index or a name, got {item!r}")
        if isinstance(item, str):
            if not names:
                raise ValueError(f"{where}frame {item!r} selected by name but no frame names were "
                                 "given (e.g. frame_names={'ED': 0, 'ES': 12})")
            key = folded.get(item.casefold())
            if key is None:
                raise ValueError(f"{where}unknown frame name {item!r}; known names: "
                                 f"{', '.join(map(str, names))}")
            index = names[key]
            if isinstance(index, bool) or not isinstance(index, int | np.integer):
                raise ValueError(f"{where}frame name {key!r} maps to {index!r}, not an index")
            return check(int(index), f"frame {key!r} = {int(index)}"), key
        return check(int(item), f"frame {int(item)}"), index_names.get(int(item))

    if frames is None or (isinstance(frames, str) and frames.casefold() == "all"):
        return [(i, index_names.get(i)) for i in range(n_frames)]
    if isinstance(frames, str | int | np.integer):
        return [one(frames)]
    selected = [one(item) for item in frames]
    if not selected:
        raise ValueError(f"{where}no frames selected")
    return selected


def _mask_frames(source: _Source, indices: Sequence[int],
                 label_value: int | None) -> list[np.ndarray]:
    """Binary uint8 masks of the given frames of a mask file."""
    raws = [source.labels(i) for i in indices]
    if source.kind == "jpeg":
        if label_value is not None:
            raise ValueError(f"{source.path}: JPEG is lossy, so label values do not survive it; "
                             "a JPEG mask is binarised at 128 and takes no label_value")
        return [(r >= 128).astype(np.uint8) for r in raws]
    values = np.unique(np.concatenate([np.unique(r).astype(np.float64) for r in raws]))
    shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if values.size > 10 else "")
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise ValueError(f"{source.path}: mask is not binary: it holds non-integer values "
                         f"({shown}); a mask must be binary or hold integer labels")
    if label_value is None:
        nonzero = values[values != 0]
        if nonzero.size > 1 or np.any(nonzero < 0):
            raise ValueError(f"{source.path}: mask is not binary: values {shown}; pass "
                             "label_value to pick one label of a multi-label mask")
        return [(r != 0).astype(np.uint8) for r in raws]
    if label_value not in values:
        raise ValueError(f"{source.path}: label value {label_value} does not occur in the "
                         f"mask (values {shown})")
    return [(r == label_value).astype(np.uint8) for r in raws]


def _mask_indices(image: _Source, mask: _Source, indices: Sequence[int]) -> list[int]:
    """Frames of the mask file that pair with the selected image frames."""
    if mask.shape != image.shape:
        raise ValueError(f"{mask.path}: mask frames are {mask.shape[0]}×{mask.shape[1]} but the "
                         f"frames of {image.path} are {image.shape[0]}×{image.shape[1]}")
    if mask.n_frames == image.n_frames:
        return list(indices)
    if mask.n_frames == 1 and len(indices) == 1:
        return [0]  # a single-frame mask (e.g. of ED) pairs with a single selected frame
    raise ValueError(f"{mask.path}: mask has {mask.n_frames} frame(s) but {image.path} has "
                     f"{image.n_frames} and {len(indices)} were selected; a mask must have as "
                     "many frames as the image, or one frame for one selected frame")


def _load(image: str | os.PathLike[str], masks: Sequence[str | os.PathLike[str] | None],
          frames: FrameSelection, frame_names: Mapping[str, int] | None,
          label_value: int | None, third_axis: ThirdAxis,
          ) -> tuple[_Source, list[tuple[int, str | None]], list[np.ndarray],
                     list[tuple[_Source, list[int], list[np.ndarray]] | None]]:
    """Loads selected image frames and, for each mask file, its paired binary frames."""
    source = _open(image, third_axis)
    selected = resolve_frames(frames, source.n_frames, frame_names, source=source.path)
    indices = [i for i, _ in selected]
    mask_sources = [None if m is None else _open(m, third_axis) for m in masks]
    loaded_masks: list[tuple[_Source, list[int], list[np.ndarray]] | None] = []
    for mask in mask_sources:
        if mask is None:
            loaded_masks.append(None)
            continue
        mask_idx = _mask_indices(source, mask, indices)
        loaded_masks.append((mask, mask_idx, _mask_frames(mask, mask_idx, label_value)))
    images = [source.grey(i).astype(np.float32) for i in indices]
    return source, selected, images, loaded_masks


def load_ultrasound(image: str | os.PathLike[str], mask: str | os.PathLike[str] | None = None,
                    *, frames: FrameSelection = None, frame_names: Mapping[str, int] | None = None,
                    label_value: int | None = None, third_axis: ThirdAxis = "auto",
                    ) -> list[UltrasoundFrame]:
    """Loads frames of a 2D ultrasound image or cine loop, with their masks.

    Formats, by suffix: DICOM (``.dcm``/``.dicom`` or a suffix-less file with the DICM
    preamble; single- or multi-frame, grey, RGB, YBR or palette colour), NIfTI (``.nii``,
    ``.nii.gz``: X×Y, X×Y×T or X×Y×1×T), MetaImage (``.mhd``/``.mha`` via SimpleITK: 2-D, or
    3-D with time as z as in CAMUS) and PNG/JPEG. Colour becomes BT.601 luma. Every format
    yields frames indexed [row, col] with rows along depth (see the module's orientation
    note). A 3-D array's third axis is taken as time unless ``third_axis`` says otherwise or,
    for NIfTI and DICOM with ``"auto"``, the header marks it as spatial (NIfTI: a z voxel
    size other than 0/1, a slice axis or slice timing; DICOM: frames stepping along a spatial
    vector or positions).

    Masks take the same formats. A mask must be binary (0 and one other value), or
    ``label_value`` picks one label of a multi-label mask; JPEG masks are binarised at 128.
    A mask has as many frames as the image (paired by index) or a single frame, which pairs
    with a single selected frame (e.g. an ED mask with ``frames="ED"``).

    Args:
        image: the image file.
        mask: the mask file, or None.
        frames: which frames; see :func:`resolve_frames` (None: all).
        frame_names: named frames, e.g. ``{"ED": 0, "ES": 12}``.
        label_value: the label that is foreground in a multi-label mask.
        third_axis: what the third axis of a 3-D array is: "auto", "time" or "space"
            (a volume, rejected).

    Returns:
        One :class:`UltrasoundFrame` per selected frame, in selection order.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: unsupported type, unreadable or corrupt file, a 3D volume, a frame out of
            range or unknown name, mask/image shape or frame-count mismatch, a non-binary mask;
            each message starts with the file concerned.
    """
    source, selected, images, masks = _load(image, [mask], frames, frame_names, label_value,
                                            third_axis)
    loaded = masks[0]
    return [UltrasoundFrame(image=img, mask=None if loaded is None else loaded[2][n],
                            source=source.path, frame=index, frame_name=name,
                            spacing=source.spacing,
                            mask_source=None if loaded is None else loaded[0].path)
            for n, ((index, name), img) in enumerate(zip(selected, images, strict=True))]


def load_ultrasound_frame(image: str | os.PathLike[str],
                          mask: str | os.PathLike[str] | None = None, *, frame: int | str = 0,
                          frame_names: Mapping[str, int] | None = None,
                          label_value: int | None = None,
                          third_axis: ThirdAxis = "auto") -> UltrasoundFrame:
    """Loads one frame (by index or name) and its mask; see :func:`load_ultrasound`.

    Args:
        image: the image file.
        mask: the mask file, or None.
        frame: the frame index or name (default: the first frame).
        frame_names: named frames, e.g. ``{"ED": 0, "ES": 12}``.
        label_value: the label that is foreground in a multi-label mask.
        third_axis: what the third axis of a 3-D array is: "auto", "time" or "space".

    Returns:
        The frame.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: as for :func:`load_ultrasound`.
    """
    if (isinstance(frame, bool) or not isinstance(frame, int | np.integer | str)
            or (isinstance(frame, str) and frame.casefold() == "all")):
        raise ValueError(f"{image}: frame must be one index or name, got {frame!r}")
    return load_ultrasound(image, mask, frames=frame, frame_names=frame_names,
                           label_value=label_value, third_axis=third_axis)[0]


def load_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """The stored values of a single-frame label file, oriented as :func:`load_ultrasound`
    orients frames (so a label map pairs pixel for pixel with its image).

    Args:
        path: a label file in any format the loader reads.

    Returns:
        H×W array of the stored values (not binarised).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or more than one frame (the message names the file).
    """
    source = _open(path)
    if source.n_frames != 1:
        raise ValueError(f"{source.path}: a label map must have one frame, this file has "
                         f"{source.n_frames}")
    return np.asarray(source.labels(0))


# Intensity normalisation -----------------------------------------------------------------------

_PILLOW_UINT8_MODES = {"L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                       "YCbCr", "LAB", "HSV"}


def _unscaled(slope: Any, intercept: Any) -> bool:
    """Whether a rescale (slope, intercept) leaves stored values as they are."""
    return float(1 if slope is None else slope) == 1.0 and float(intercept or 0) == 0.0


def _dicom_dtype(path: Path) -> np.dtype | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if not _unscaled(ds.get("RescaleSlope"), ds.get("RescaleIntercept")):
        return None
    bits = int(ds.get("BitsAllocated", 8))
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None else 16
    if bits == 1:
        return np.dtype(bool)
    if bits not in (8, 16, 32, 64):
        return None
    return np.dtype(f"{'i' if ds.get('PixelRepresentation', 0) else 'u'}{bits // 8}")


def _nifti_dtype(path: Path) -> np.dtype | None:
    import nibabel as nib

    header = nib.load(path).header
    if not _unscaled(*(None if v is None or not np.isfinite(v) else v
                       for v in header.get_slope_inter())):
        return None
    dtype = header.get_data_dtype()
    return dtype["R"] if dtype.names else dtype


def _metaimage_dtype(path: Path) -> np.dtype | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    pixel = reader.GetPixelID()
    for name in ("UInt8", "Int8", "UInt16", "Int16", "UInt32", "Int32", "UInt64", "Int64"):
        if pixel in (getattr(sitk, f"sitk{name}"), getattr(sitk, f"sitkVector{name}")):
            return np.dtype(name.lower())
    return None


def _pillow_dtype(path: Path) -> np.dtype | None:
    from PIL import Image

    with Image.open(path) as img:
        mode = img.mode
    if mode == "1":
        return np.dtype(bool)
    if mode in _PILLOW_UINT8_MODES:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if mode.startswith("I;16") else None


def _stored_dtype(path: Path) -> np.dtype | None:
    """The integer sample type whose range the file's grey values span, or None (float data,
    or values rescaled by the header), read from the header only."""
    kind = _kind_of(path)
    readers = {"dicom": _dicom_dtype, "nifti": _nifti_dtype, "metaimage": _metaimage_dtype}
    try:
        dtype = readers.get(kind, _pillow_dtype)(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the sample type from the header: {exc}") from exc
    if dtype is None or not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)):
        return None
    return dtype


def normalise_frames(source: str | os.PathLike[str],
                     frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Scales the grey frames of one ultrasound file to [0, 1]: the one rule that training
    samples and inference share.

    Rule, decided by the file's stored sample type (read from its header):

    * integer samples (DICOM Pixel Data without a rescale slope/intercept, integer NIfTI
      without ``scl_slope``/``scl_inter``, integer MetaImage, 8-/16-bit PNG and JPEG; colour
      files by the type of their channels, whose BT.601 luma keeps that range): the type's
      full range maps to [0, 1], ``(v - min) / (max - min)``, i.e. ``v / 255`` for uint8 and
      ``v / 65535`` for uint16 (whatever DICOM's Bits Stored says), clipped to [0, 1];
    * anything else (float samples, values rescaled by the header, 32-bit integer PNG
      modes): min-max over all the frames given, ``(v - lo) / (hi - lo)`` (zeros when the
      frames are constant). Pass every frame of the file to make this per file.

    Non-finite values become 0.

    Args:
        source: the file the frames were read from (only its header is read again).
        frames: its frames as :func:`load_ultrasound` returns them (``UltrasoundFrame.image``),
            one H×W array or a T×H×W stack / sequence of H×W arrays.

    Returns:
        float32 array of the frames' shape (a sequence is stacked to T×H×W), in [0, 1].

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is not a supported ultrasound file or its header is unreadable.
    """
    path = Path(source)
    values = np.asarray(frames if isinstance(frames, np.ndarray) else np.stack(frames),
                        dtype=np.float64)
    finite = np.isfinite(values)
    dtype = _stored_dtype(path)
    if dtype is not None:
        low, high = (0, 1) if dtype == np.bool_ else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        scaled = np.clip((values - float(low)) / (float(high) - float(low)), 0.0, 1.0)
    elif finite.any():
        low, high = float(values[finite].min()), float(values[finite].max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        scaled = np.zeros_like(values)
    return np.where(finite, scaled, 0.0).astype(np.float32)


# MONAI transforms ------------------------------------------------------------------------------

class LoadUltrasoundFrames(Transform):
    """Loads frames of an ultrasound file as a channel-first N×H×W array (N selected frames).

    Images come as float32 grey values, masks (``mask=True``) as binary uint8. Rows run along
    depth, columns laterally, in every format (see :func:`load_ultrasound`).

    Args:
        frames: which frames; see :func:`resolve_frames` (None: all).
        frame_names: named frames, e.g. ``{"ED": 0, "ES": 12}``.
        mask: load the file as a mask (binary uint8) instead of an image.
        label_value: for masks, the label that is foreground in a multi-label mask.
        third_axis: what the third axis of a 3-D array is: "auto", "time" or "space".
    """

    def __init__(self, frames: FrameSelection = None,
                 frame_names: Mapping[str, int] | None = None, *, mask: bool = False,
                 label_value: int | None = None, third_axis: ThirdAxis = "auto") -> None:
        self.frames = frames
        self.frame_names = dict(frame_names or {})
        self.mask = mask
        self.label_value = label_value
        self.third_axis = third_axis

    def __call__(self, path: str | os.PathLike[str],
                 frame_names: Mapping[str, int] | None = None) -> np.ndarray:
        """Loads the selected frames of ``path``.

        Args:
            path: the file.
            frame_names: per-file frame names, merged over the ones given at construction.

        Returns:
            N×H×W float32 image frames, or uint8 masks with ``mask=True``.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: as for :func:`load_ultrasound`.
        """
        source = _open(path, self.third_axis)
        names = {**self.frame_names, **(frame_names or {})}
        indices = [i for i, _ in resolve_frames(self.frames, source.n_frames, names,
                                                source=source.path)]
        if self.mask:
            return np.stack(_mask_frames(source, indices, self.label_value))
        return np.stack([source.grey(i).astype(np.float32) for i in indices])


class LoadUltrasoundFramesd(MapTransform):
    """Dictionary twin of :class:`LoadUltrasoundFrames`: an image file and its mask files.

    Each selected frame gives a copy of the input dictionary in which the image key holds a
    1×H×W float32 array, each mask key a 1×H×W binary uint8 array, and ``{key}_meta_dict``
    holds ``source`` (and MONAI's ``filename_or_obj``), ``frame``, ``frame_name`` ("" when the
    frame has none) and ``spacing`` (a float64 array (row, col) in mm, NaN where unknown), all
    collatable by MONAI's ``list_data_collate``. One frame selected by an index or a name
    gives one dictionary; a list of frames, "all" or None gives a list of dictionaries, which
    MONAI's Compose and DataLoader treat as several samples.

    Args:
        keys: the image key first, then mask keys (unless ``mask_keys`` says otherwise).
        frames: which frames; see :func:`resolve_frames` (None: all).
        frame_names: named frames, e.g. ``{"ED": 0, "ES": 12}``.
        mask_keys: which keys are masks; default: every key but the first. Exactly one key
            must remain as the image.
        label_value: the label that is foreground in multi-label masks.
        frame_names_key: a data key whose mapping (e.g. from a manifest) adds per-sample
            frame names over ``frame_names``; absent keys are ignored.
        third_axis: what the third axis of a 3-D array is: "auto", "time" or "space".
        meta_key_postfix: metadata goes under ``{key}_{meta_key_postfix}``.
        allow_missing_keys: tolerate absent (or None) mask keys; the image key is required.

    Raises:
        ValueError: not exactly one image key, or mask keys outside ``keys``.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable = ("image", "label"),
                 frames: FrameSelection = None, frame_names: Mapping[str, int] | None = None,
                 *, mask_keys: Sequence[Hashable] | None = None, label_value: int | None = None,
                 frame_names_key: str | None = "frame_names", third_axis: ThirdAxis = "auto",
                 meta_key_postfix: str = "meta_dict", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = tuple(self.keys[1:]) if mask_keys is None else tuple(mask_keys)
        if not set(self.mask_keys) <= set(self.keys):
            raise ValueError(f"mask_keys {self.mask_keys} must be among keys {self.keys}")
        image_keys = [k for k in self.keys if k not in self.mask_keys]
        if len(image_keys) != 1:
            raise ValueError(f"exactly one image key is needed, got {image_keys} "
                             f"(keys {self.keys}, mask_keys {self.mask_keys})")
        self.image_key = image_keys[0]
        self.frames = frames
        self.frame_names = dict(frame_names or {})
        self.label_value = label_value
        self.frame_names_key = frame_names_key
        self.third_axis = third_axis
        self.meta_key_postfix = meta_key_postfix

    def _meta(self, source: _Source, frame: int, name: str | None) -> dict[str, Any]:
        spacing = source.spacing if source.spacing is not None else (np.nan, np.nan)
        return {"source": str(source.path), "filename_or_obj": str(source.path), "frame": frame,
                "frame_name": name or "", "spacing": np.asarray(spacing, dtype=np.float64)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any] | list[
            dict[Hashable, Any]]:
        """Loads the selected frames of ``data[image key]`` and the paired mask frames.

        Args:
            data: a dictionary with the image path, mask paths and optional frame names.

        Returns:
            One dictionary for a single selected frame, else a list of them.

        Raises:
            KeyError: the image key (or, without ``allow_missing_keys``, a mask key) is absent.
            FileNotFoundError: a file does not exist.
            ValueError: as for :func:`load_ultrasound`.
        """
        if self.image_key not in data or data[self.image_key] is None:
            raise KeyError(f"image key {self.image_key!r} is missing from the data")
        names = dict(self.frame_names)
        if self.frame_names_key is not None and data.get(self.frame_names_key) is not None:
            names.update(data[self.frame_names_key])
        mask_keys = []
        for key in self.mask_keys:
            if data.get(key) is not None:
                mask_keys.append(key)
            elif not self.allow_missing_keys:
                raise KeyError(f"mask key {key!r} is missing from the data")
        source, selected, images, masks = _load(
            data[self.image_key], [data[k] for k in mask_keys], self.frames, names,
            self.label_value, self.third_axis)
        post = self.meta_key_postfix
        outputs = []
        for n, ((index, name), img) in enumerate(zip(selected, images, strict=True)):
            out = dict(data)
            out[self.image_key] = img[None]
            out[f"{self.image_key}_{post}"] = self._meta(source, index, name)
            for key, loaded in zip(mask_keys, masks, strict=True):
                assert loaded is not None
                mask_source, mask_idx, mask_frames = loaded
                out[key] = mask_frames[n][None]
                out[f"{key}_{post}"] = self._meta(mask_source, mask_idx[n], name)
            outputs.append(out)
        single = isinstance(self.frames, int | np.integer | str) and not (
            isinstance(self.frames, str) and self.frames.casefold() == "all")
        return outputs[0] if single else outputs
