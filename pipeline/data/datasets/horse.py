"""Weizmann Horse loader: binary JPEG masks, RGB resampled to the mask, broken images reported."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from monai.transforms import MapTransform
from PIL import Image

from pipeline.data.pictures import read_picture
from pipeline.data.splits import SPLIT_FILE, read_split

__all__ = [
    "DARK_FRACTION",
    "DARK_LEVEL",
    "MASK_THRESHOLD",
    "MIN_STD",
    "BrokenImageError",
    "HorseDatalist",
    "HorseFolderScan",
    "HorseIssue",
    "HorseSample",
    "LoadHorsed",
    "find_defect",
    "horse_datalist",
    "horse_manifest",
    "horse_split",
    "load_horse",
    "load_horse_manifest",
    "scan_horse_folder",
    "write_horse_manifest",
]

logger = logging.getLogger(__name__)

Colour = Literal["rgb", "gray"]

MASK_THRESHOLD = 128
"""A mask pixel is foreground when its grey level is >= this (masks are noisy JPEGs)."""
DARK_LEVEL = 16
"""Luminance (0..255) below which a pixel counts as dark for the broken-image criterion."""
DARK_FRACTION = 0.95
"""An image is broken when at least this fraction of its pixels is darker than DARK_LEVEL."""
MIN_STD = 2.0
"""An image is broken when its luminance standard deviation (0..255) is below this."""
MAX_ASPECT_MISMATCH = 0.02
"""Largest relative difference of aspect ratio (width/height) allowed between rgb and mask."""

RGB_DIR = "rgb"
GRAY_DIR = "gray"
MASK_DIR = "figure_ground"
SUFFIX = ".jpg"
_IMAGE_DIRS: dict[str, str] = {"rgb": RGB_DIR, "gray": GRAY_DIR}
_MANIFEST_SPLITS = ("training", "validation")


class BrokenImageError(ValueError):
    """An image file decodes but its content is unusable (e.g. almost entirely black).

    Attributes:
        path: the offending file.
        reason: what the criterion found, with the measured numbers.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"broken image {self.path}: {reason}")


@dataclass
class HorseSample:
    """One loaded image with its mask.

    Attributes:
        name: the image name, e.g. ``"horse003"``.
        image: float32 C×H×W, channel-first, values in 0..1 (8-bit levels divided by 255);
            C is 3 for ``colour="rgb"`` (also for the grey fallback, replicated) and 1 for
            ``colour="gray"``. H×W is the mask's size.
        mask: uint8 H×W in {0, 1}: 1 where the JPEG mask's grey level is >= MASK_THRESHOLD.
        rgb_size: (height, width) of the rgb file as stored, before resampling; None when the
            rgb file was not read (``colour="gray"`` or the grey fallback replaced it).
        source: the image file actually read.
        defect: the broken-image reason when the image was found broken (it was then replaced
            by the grey fallback or kept on request), else None.
        fallback: True when the grey image stands in for a broken rgb image.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    rgb_size: tuple[int, int] | None
    source: Path
    defect: str | None = None
    fallback: bool = False


@dataclass(frozen=True)
class HorseIssue:
    """One report entry: an image left out of (or replaced in) a datalist, and why.

    Attributes:
        name: the image name.
        path: the file concerned (the broken or missing one).
        reason: what is wrong, in words and numbers.
        action: ``"excluded"`` (left out) or ``"gray_fallback"`` (grey image used instead).
    """

    name: str
    path: str
    reason: str
    action: str


class HorseDatalist(NamedTuple):
    """A datalist with its report; unpacks as ``data, report = horse_datalist(...)``.

    Attributes:
        data: MONAI decathlon-style items ``{"image": path, "label": path, "name": name}``,
            absolute paths as strings, sorted by name.
        report: the images excluded or replaced, with reasons (empty when all is well).
    """

    data: list[dict[str, str]]
    report: list[HorseIssue]


@dataclass(frozen=True)
class HorseFolderScan:
    """What a folder laid out like the Weizmann set holds.

    Attributes:
        root: the folder.
        rgb: names with ``rgb/NAME.jpg``.
        gray: names with ``gray/NAME.jpg``.
        masks: names with ``figure_ground/NAME.jpg``.
    """

    root: Path
    rgb: frozenset[str]
    gray: frozenset[str]
    masks: frozenset[str]

    @property
    def names(self) -> list[str]:
        """All names seen in any of the three folders, sorted."""
        return sorted(self.rgb | self.gray | self.masks)

    @property
    def missing_mask(self) -> list[str]:
        """Names that have an image but no mask, sorted."""
        return sorted((self.rgb | self.gray) - self.masks)

    def usable(self, colour: Colour = "rgb") -> list[str]:
        """Names that have both a mask and the image of the given colour, sorted.

        Args:
            colour: ``"rgb"`` or ``"gray"``.

        Returns:
            The names.
        """
        images = self.rgb if _check_colour(colour) == "rgb" else self.gray
        return sorted(images & self.masks)


def find_defect(image: Image.Image | np.ndarray, *, dark_level: int = DARK_LEVEL,
                dark_fraction: float = DARK_FRACTION, min_std: float = MIN_STD) -> str | None:
    """Applies the broken-image criterion to one image.

    On the luminance (0..255) the image is broken when at least ``dark_fraction`` of its
    pixels are below ``dark_level`` (almost all black) or when its standard deviation is below
    ``min_std`` (near-constant, whatever the level). On the real set the broken
    ``rgb/horse318.jpg`` has 100% dark pixels and std 0.4; the next darkest image has 39% dark
    pixels and the flattest one std 22.9, so the margins are wide.

    Args:
        image: a PIL image (converted to luminance) or a 2-D array of levels on 0..255.
        dark_level: luminance below which a pixel counts as dark.
        dark_fraction: fraction of dark pixels from which the image is broken.
        min_std: standard deviation below which the image is broken.

    Returns:
        The reason in words and numbers when the image is broken, else None.

    Raises:
        ValueError: an array that is not 2-D or an empty image.
    """
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    else:
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.ndim != 2:
            raise ValueError(f"find_defect needs a 2-D luminance array, got shape {pixels.shape}")
    if pixels.size == 0:
        raise ValueError("find_defect got an empty image")
    dark = float(np.mean(pixels < dark_level))
    std = float(pixels.std())
    if dark >= dark_fraction:
        return (f"almost entirely dark: {dark:.1%} of pixels below {dark_level}/255 "
                f"(limit {dark_fraction:.0%}), luminance std {std:.1f}")
    if std < min_std:
        return f"near-constant: luminance std {std:.2f}/255 below {min_std}"
    return None


def load_horse(root: str | os.PathLike[str], name: str, *, colour: Colour = "rgb",
               on_broken: Literal["raise", "gray", "keep"] = "raise") -> HorseSample:
    """Loads one image and its mask from a folder laid out like the Weizmann set.

    The rgb image is resampled to the mask's size (Pillow bilinear, which is antialiased when
    it shrinks); the grey image must already have the mask's size. The mask is binarised at
    MASK_THRESHOLD.

    Args:
        root: the folder holding ``rgb/``, ``gray/`` and ``figure_ground/``.
        name: the image name without extension, e.g. ``"horse003"``.
        colour: ``"rgb"`` (3 channels) or ``"gray"`` (1 channel).
        on_broken: what to do with an image that find_defect calls broken: ``"raise"``
            BrokenImageError, ``"gray"`` use ``gray/NAME.jpg`` replicated to 3 channels instead
            (only for ``colour="rgb"``; logged as a warning), ``"keep"`` return it anyway with
            ``defect`` set.

    Returns:
        The sample.

    Raises:
        FileNotFoundError: a needed file is missing (the message names it).
        ValueError: a file cannot be decoded, the grey image and the mask differ in size, the
            rgb image's aspect ratio differs from the mask's, or a bad argument.
        BrokenImageError: a broken image under ``on_broken="raise"`` (or a broken grey image
            under ``on_broken="gray"``).
    """
    root = Path(root)
    folder = _IMAGE_DIRS[_check_colour(colour)]
    return _load_pair(root / folder / f"{name}{SUFFIX}", root / MASK_DIR / f"{name}{SUFFIX}",
                      name=name, colour=colour, on_broken=on_broken)


def horse_split(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The Weizmann set's ``split.json``, read and validated by
    :func:`pipeline.data.splits.read_split` (split name → image names, in file order)."""
    return read_split(root)


def scan_horse_folder(root: str | os.PathLike[str]) -> HorseFolderScan:
    """Lists the names in ``rgb/``, ``gray/`` and ``figure_ground/`` (``*.jpg``, no split file).

    Args:
        root: a folder laid out like the Weizmann set; an absent sub-folder counts as empty.

    Returns:
        The scan; ``missing_mask`` lists names with an image but no mask.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder {root}")
    return HorseFolderScan(root=root, rgb=_names_in(root / RGB_DIR),
                           gray=_names_in(root / GRAY_DIR), masks=_names_in(root / MASK_DIR))


def horse_datalist(root: str | os.PathLike[str], split: str | None = "training", *,
                   colour: Colour = "rgb",
                   on_broken: Literal["exclude", "gray", "raise"] = "exclude",
                   check: bool = True) -> HorseDatalist:
    """Builds a MONAI decathlon-style datalist with a report of what was left out.

    With a split name the names come from ``split.json`` and every file must exist. With
    ``split=None`` the folder is scanned (no ``split.json`` needed): every name present is
    listed, and names without a mask or without the image of the requested colour are
    reported as excluded.

    Args:
        root: the data folder.
        split: a key of ``split.json`` (``"training"``, ``"validation"``, ...) or None for
            every name in the folder.
        colour: ``"rgb"`` or ``"gray"``: which folder ``"image"`` points into.
        on_broken: for an image find_defect calls broken: ``"exclude"`` it (reported),
            ``"gray"`` point ``"image"`` at ``gray/NAME.jpg`` instead (reported; LoadHorsed
            with ``colour="rgb"`` then replicates it to 3 channels), or ``"raise"``.
        check: decode every image to apply find_defect (a few ms an image); False skips it
            (LoadHorsed still refuses broken images by default).

    Returns:
        The items ``{"image", "label", "name"}`` (absolute paths as strings, sorted by name)
        and the report; excluded and replaced images are also logged as warnings.

    Raises:
        FileNotFoundError: no ``split.json`` (when a split is asked), a listed file missing,
            or (with ``split=None``) no mask folder or no folder for ``colour``.
        KeyError: ``split`` is not in ``split.json``.
        ValueError: a malformed ``split.json``, an undecodable image or a bad argument.
        BrokenImageError: a broken image under ``on_broken="raise"``.
    """
    root = Path(root).absolute()
    folder = _IMAGE_DIRS[_check_colour(colour)]
    if on_broken not in ("exclude", "gray", "raise"):
        raise ValueError(f"on_broken must be 'exclude', 'gray' or 'raise', got {on_broken!r}")
    if on_broken == "gray" and colour == "gray":
        raise ValueError("on_broken='gray' is a fallback for colour='rgb' only")
    report: list[HorseIssue] = []
    if split is None:
        scan = scan_horse_folder(root)
        for sub in (MASK_DIR, folder):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"no folder {root / sub}")
        have = scan.rgb if colour == "rgb" else scan.gray
        for name in scan.names:
            if name not in scan.masks:
                report.append(HorseIssue(name, str(root / MASK_DIR / f"{name}{SUFFIX}"),
                                         "no mask", "excluded"))
            elif name not in have:
                report.append(HorseIssue(name, str(root / folder / f"{name}{SUFFIX}"),
                                         f"no {folder} image", "excluded"))
        names = scan.usable(colour)
    else:
        splits = horse_split(root)
        if split not in splits:
            raise KeyError(f"split {split!r} not in {root / SPLIT_FILE} (has {sorted(splits)})")
        names = sorted(splits[split])
        for name in names:
            for sub in (folder, MASK_DIR):
                _require_file(root / sub / f"{name}{SUFFIX}")
    data: list[dict[str, str]] = []
    for name in names:
        image = root / folder / f"{name}{SUFFIX}"
        label = root / MASK_DIR / f"{name}{SUFFIX}"
        defect = find_defect(read_picture(image, "L")) if check else None
        if defect is not None:
            if on_broken == "raise":
                raise BrokenImageError(image, defect)
            if on_broken == "gray":
                twin = root / GRAY_DIR / f"{name}{SUFFIX}"
                twin_defect = find_defect(read_picture(twin, "L"))
                if twin_defect is not None:
                    raise BrokenImageError(twin, f"grey fallback also broken: {twin_defect}")
                report.append(HorseIssue(name, str(image), defect, "gray_fallback"))
                image = twin
            else:
                report.append(HorseIssue(name, str(image), defect, "excluded"))
                continue
        data.append({"image": str(image), "label": str(label), "name": name})
    for issue in report:
        logger.warning("weizmann horse %s %s (%s): %s", issue.name, issue.action, issue.path,
                       issue.reason)
    return HorseDatalist(data, report)


def horse_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Builds the decathlon-style manifest of the training and validation splits.

    Paths are relative to the data root. Broken rgb images are NOT listed under their split:
    they go under ``"excluded"`` with their split, the reason and a ``"fallback_image"`` (the
    grey twin), so a plain ``monai.data.load_decathlon_datalist`` never trains on them and
    load_horse_manifest can add the fallback back on request.

    Args:
        root: the data folder (with ``split.json``).

    Returns:
        The manifest as a JSON-ready dict.

    Raises:
        FileNotFoundError, ValueError, KeyError: as horse_datalist.
    """
    root = Path(root).absolute()
    manifest: dict[str, Any] = {
        "name": "weizmann_horse",
        "description": (
            "Weizmann Horse database (Borenstein & Ullman, ECCV 2002), the 150 training and 50 "
            "validation names of split.json. Masks (figure_ground/) are JPEG: binarise at "
            f"{MASK_THRESHOLD}. rgb/ is stored at another resolution than the mask: resample "
            "it to the mask's size. Broken rgb images are listed under 'excluded' with the "
            "reason and their grey twin as 'fallback_image', not under their split. Built by "
            "pipeline.data.datasets.horse.write_horse_manifest."
        ),
        "reference": ("E. Borenstein and S. Ullman, 'Class-specific, top-down segmentation', "
                      "ECCV 2002. No licence stated; research use."),
        "data_root_hint": "../shared/data/weizmann_horse",
        "modality": {"0": "RGB"},
        "labels": {"0": "background", "1": "horse"},
        "excluded": [],
    }
    for split in _MANIFEST_SPLITS:
        data, report = horse_datalist(root, split, colour="rgb", on_broken="exclude")
        manifest[split] = [{"image": _relative(item["image"], root),
                            "label": _relative(item["label"], root),
                            "name": item["name"]} for item in data]
        manifest[f"num{split.capitalize()}"] = len(data)
        manifest["excluded"] += [
            {"name": issue.name, "split": split, "image": _relative(issue.path, root),
             "label": f"{MASK_DIR}/{issue.name}{SUFFIX}", "reason": issue.reason,
             "fallback_image": f"{GRAY_DIR}/{issue.name}{SUFFIX}"}
            for issue in report]
    manifest["excluded"].sort(key=lambda entry: entry["name"])
    return manifest


def write_horse_manifest(root: str | os.PathLike[str],
                         out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Writes horse_manifest(root) as pretty-printed JSON with sorted keys.

    Args:
        root: the data folder (with ``split.json``).
        out_path: the JSON file to write (e.g. ``data_manifests/weizmann_horse.json``).

    Returns:
        The manifest written.

    Raises:
        FileNotFoundError, ValueError, KeyError: as horse_datalist.
    """
    manifest = horse_manifest(root)
    Path(out_path).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                              encoding="utf-8")
    return manifest


def load_horse_manifest(manifest: str | os.PathLike[str], root: str | os.PathLike[str],
                        split: str = "training", *,
                        on_broken: Literal["exclude", "gray"] = "exclude") -> HorseDatalist:
    """Reads a manifest written by write_horse_manifest against a data root.

    Args:
        manifest: the manifest JSON file.
        root: the data folder the manifest's relative paths start from.
        split: ``"training"`` or ``"validation"``.
        on_broken: ``"exclude"`` keeps the manifest's exclusions; ``"gray"`` adds the excluded
            images of this split back with their grey fallback as ``"image"``.

    Returns:
        The items (absolute paths, sorted by name) and the manifest's exclusions for this split
        as the report.

    Raises:
        FileNotFoundError: no manifest file.
        ValueError: ``split`` not in the manifest or a bad ``on_broken``.
    """
    from monai.data import load_decathlon_datalist

    if on_broken not in ("exclude", "gray"):
        raise ValueError(f"on_broken must be 'exclude' or 'gray', got {on_broken!r}")
    path = Path(manifest)
    root = Path(root)
    _require_file(path)
    data = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split,
                                   base_dir=root)
    excluded = [entry for entry in json.loads(path.read_text(encoding="utf-8"))
                .get("excluded", []) if entry.get("split") == split]
    action = "gray_fallback" if on_broken == "gray" else "excluded"
    report = [HorseIssue(entry["name"], str(root / entry["image"]), entry["reason"], action)
              for entry in excluded]
    if on_broken == "gray":
        data += [{"image": str(root / entry["fallback_image"]),
                  "label": str(root / entry["label"]), "name": entry["name"]}
                 for entry in excluded]
        data.sort(key=lambda item: item["name"])
    return HorseDatalist(data, report)


class LoadHorsed(MapTransform):
    """Loads an image and its JPEG mask for MONAI pipelines, channel-first.

    Given ``{"image": rgb or grey path, "label": mask path, ...}`` it replaces the paths by
    ``image`` float32 C×H×W in 0..1 (rgb resampled to the mask's size; a grey file read with
    ``colour="rgb"`` is replicated to 3 channels, which is how horse_datalist's grey fallback
    arrives) and ``label`` uint8 1×H×W in {0, 1} (binarised at MASK_THRESHOLD). Other keys
    pass through. Broken images (find_defect) raise BrokenImageError unless told otherwise, so
    a broken image cannot slip into training silently.
    """

    def __init__(self, keys: Sequence[Hashable] = ("image", "label"), *,
                 colour: Colour = "rgb",
                 on_broken: Literal["raise", "gray", "keep"] = "raise") -> None:
        """Sets the keys and options.

        Args:
            keys: the image key and the mask key, in that order.
            colour: ``"rgb"`` (3 channels) or ``"gray"`` (1 channel).
            on_broken: as load_horse; ``"gray"`` looks for the grey twin at
                ``../gray/NAME.jpg`` beside the image's folder.

        Raises:
            ValueError: not exactly two keys or a bad option.
        """
        super().__init__(keys, allow_missing_keys=False)
        if len(self.keys) != 2:
            raise ValueError(f"LoadHorsed needs two keys (image, mask), got {self.keys}")
        self.colour = _check_colour(colour)
        self.on_broken = _check_on_broken(on_broken)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Loads one item.

        Args:
            data: a dict with the image and mask paths under the two keys.

        Returns:
            A new dict with the arrays in place of the paths.

        Raises:
            FileNotFoundError, ValueError, BrokenImageError: as load_horse.
        """
        d = dict(data)
        image_key, label_key = self.keys
        image_path = Path(d[image_key])
        sample = _load_pair(image_path, Path(d[label_key]),
                            name=str(d.get("name", image_path.stem)), colour=self.colour,
                            on_broken=self.on_broken)
        d[image_key] = sample.image
        d[label_key] = sample.mask[None]
        return d


def _check_colour(colour: str) -> Colour:
    if colour not in _IMAGE_DIRS:
        raise ValueError(f"colour must be 'rgb' or 'gray', got {colour!r}")
    return colour  # type: ignore[return-value]


def _check_on_broken(on_broken: str) -> Literal["raise", "gray", "keep"]:
    if on_broken not in ("raise", "gray", "keep"):
        raise ValueError(f"on_broken must be 'raise', 'gray' or 'keep', got {on_broken!r}")
    return on_broken  # type: ignore[return-value]


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")


def _names_in(folder: Path) -> frozenset[str]:
    if not folder.is_dir():
        return frozenset()
    return frozenset(p.stem for p in folder.iterdir() if p.suffix == SUFFIX and p.is_file())


def _relative(path: str | os.PathLike[str], root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _to_array(img: Image.Image) -> np.ndarray:
    """PIL L or RGB image → float32 C×H×W in 0..1."""
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _check_size(img: Image.Image, image_path: Path, mask_path: Path, size: tuple[int, int],
                *, exact: bool) -> None:
    """Raises ValueError when an image cannot be brought onto the mask's (width, height)."""
    if img.size == size:
        return
    width, height = size
    if exact:
        raise ValueError(f"grey image {image_path} is {img.size[0]}×{img.size[1]} but mask "
                         f"{mask_path} is {width}×{height} (width×height)")
    mismatch = abs((img.size[0] / img.size[1]) / (width / height) - 1.0)
    if mismatch > MAX_ASPECT_MISMATCH:
        raise ValueError(f"image {image_path} ({img.size[0]}×{img.size[1]}) and mask "
                         f"{mask_path} ({width}×{height}) differ in aspect ratio by "
                         f"{mismatch:.1%} (limit {MAX_ASPECT_MISMATCH:.0%})")


def _load_pair(image_path: Path, mask_path: Path, *, name: str, colour: Colour,
               on_broken: str) -> HorseSample:
    """Shared core of load_horse and LoadHorsed (see load_horse).

    A file in a ``gray`` folder must have the mask's size exactly; any other image is
    resampled to it (bilinear, antialiased when shrinking) if its aspect ratio agrees.
    """
    colour = _check_colour(colour)
    on_broken = _check_on_broken(on_broken)
    if on_broken == "gray" and colour == "gray":
        raise ValueError("on_broken='gray' is a fallback for colour='rgb' only")
    _require_file(image_path)
    _require_file(mask_path)
    mask_img = read_picture(mask_path, "L")
    mask = (np.asarray(mask_img) >= MASK_THRESHOLD).astype(np.uint8)
    img = read_picture(image_path, "RGB" if colour == "rgb" else "L")
    is_gray_file = image_path.parent.name == GRAY_DIR
    _check_size(img, image_path, mask_path, mask_img.size, exact=is_gray_file)
    stored = (img.size[1], img.size[0])
    defect = find_defect(img)
    fallback = False
    if defect is not None and on_broken != "keep":
        if on_broken == "raise":
            raise BrokenImageError(image_path, defect)
        twin = image_path.parent.parent / GRAY_DIR / image_path.name
        img = read_picture(twin, "L")
        _check_size(img, twin, mask_path, mask_img.size, exact=True)
        twin_defect = find_defect(img)
        if twin_defect is not None:
            raise BrokenImageError(twin, f"grey fallback also broken: {twin_defect}")
        logger.warning("weizmann horse %s: broken image %s (%s); using grey %s", name,
                       image_path, defect, twin)
        img = img.convert("RGB")
        image_path, fallback, is_gray_file = twin, True, True
    if img.size != mask_img.size:
        img = img.resize(mask_img.size, Image.Resampling.BILINEAR)
    return HorseSample(name=name, image=_to_array(img), mask=mask,
                       rgb_size=None if is_gray_file else stored, source=image_path,
                       defect=defect, fallback=fallback)
