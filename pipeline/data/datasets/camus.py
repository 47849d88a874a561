"""CAMUS echocardiography (Leclerc et al., IEEE TMI 2019) in its released patient layout."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CAMUS_LABELS",
    "CAMUS_PHASES",
    "CAMUS_VIEWS",
    "CamusImage",
    "camus_samples",
    "camus_selection",
    "check_camus",
    "drop_stray_labels",
    "find_camus_images",
    "is_camus_folder",
    "load_camus",
]

#: The apical views of CAMUS.
CAMUS_VIEWS: tuple[str, ...] = ("2CH", "4CH")
#: The annotated frames: end-diastole and end-systole.
CAMUS_PHASES: tuple[str, ...] = ("ED", "ES")
#: The values of a CAMUS label map.
CAMUS_LABELS: dict[int, str] = {0: "background", 1: "left-ventricle cavity",
                                2: "myocardium", 3: "left atrium"}

_NAME = re.compile(r"^(?P<patient>patient\d+)_(?P<view>2CH|4CH)_(?P<phase>ED|ES)"
                   r"(?P<gt>_gt)?(?P<suffix>\.nii\.gz|\.nii|\.mhd|\.mha)$", re.IGNORECASE)


@dataclass(frozen=True)
class CamusImage:
    """One CAMUS image and its label map (None where the ``_gt`` file is missing)."""

    patient: str
    view: str
    phase: str
    image: Path
    label: Path | None

    @property
    def name(self) -> str:
        """``patientNNNN_<view>_<phase>``: the file's stem, the image's name in tables."""
        return f"{self.patient}_{self.view}_{self.phase}"


def camus_selection(value: str | Sequence[str] | None, allowed: Sequence[str],
                    what: str) -> tuple[str, ...]:
    """A view or phase setting as a tuple: ``"both"``/``"all"``/None → every one of
    ``allowed``; a name or names (case-insensitive) → those.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones).
    """
    if value is None or (isinstance(value, str) and value.lower() in ("both", "all")):
        return tuple(allowed)
    names = [value] if isinstance(value, str) else list(value)
    out = []
    for name in names:
        match = [a for a in allowed if a.lower() == str(name).lower()]
        if not match:
            raise ValueError(f"unknown CAMUS {what} {name!r}: use {', '.join(allowed)} or both")
        out.append(match[0])
    return tuple(dict.fromkeys(out))


def _scan(root: Path) -> tuple[dict[tuple[str, str, str], list[Path]],
                               dict[tuple[str, str, str], list[Path]]]:
    """Every CAMUS-named image and label file under ``root``, keyed (patient, view, phase)."""
    images: dict[tuple[str, str, str], list[Path]] = {}
    labels: dict[tuple[str, str, str], list[Path]] = {}
    for path in sorted(root.rglob("*")):
        match = _NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        key = (match["patient"].lower(), match["view"].upper(), match["phase"].upper())
        (labels if match["gt"] else images).setdefault(key, []).append(path)
    return images, labels


def is_camus_folder(root: str | os.PathLike) -> bool:
    """Whether a folder holds CAMUS-named images (``patientNNNN_2CH_ED.nii.gz`` …)."""
    base = Path(root)
    return base.is_dir() and any(_NAME.match(p.name) and not _NAME.match(p.name)["gt"]
                                 for p in base.rglob("patient*"))


def find_camus_images(root: str | os.PathLike, *, views: Sequence[str] = ("2CH",),
                      phases: Sequence[str] = CAMUS_PHASES,
                      patients: Iterable[str] | None = None) -> list[CamusImage]:
    """The CAMUS images under ``root`` (any depth; usually ``patientNNNN/`` folders).

    Args:
        root: the data folder.
        views: views to take (``2CH``, ``4CH``).
        phases: frames to take (``ED``, ``ES``).
        patients: only these patients (e.g. a split); each must have an image.

    Returns:
        The images, sorted by name; ``label`` is None where no ``_gt`` file exists.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: one image stored twice (``.nii.gz`` and ``.mhd``), or a listed patient
            with no image of the selection (the message names them).
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"CAMUS folder not found: {base}")
    images, labels = _scan(base)
    wanted = None if patients is None else {p.lower() for p in patients}
    out = []
    for key in sorted(images):
        patient, view, phase = key
        if view not in views or phase not in phases or (wanted and patient not in wanted):
            continue
        for found in (images[key], labels.get(key, [])):
            if len(found) > 1:
                raise ValueError(f"{base}: {patient}_{view}_{phase} is stored more than once: "
                                 + ", ".join(str(p) for p in found))
        label = labels.get(key, [None])[0]
        out.append(CamusImage(patient, view, phase, images[key][0], label))
    if wanted is not None:
        missing = sorted(wanted - {im.patient for im in out})
        if missing:
            raise ValueError(f"{base}: no {'/'.join(views)} {'/'.join(phases)} image for "
                             f"{len(missing)} listed patient(s): {', '.join(missing[:8])}"
                             + ("…" if len(missing) > 8 else ""))
    return out


def _label_problems(path: Path, values: np.ndarray, shape: tuple[int, ...]) -> list[str]:
    """What is wrong with a label map read from ``path`` for an image of ``shape``."""
    problems = []
    if values.shape != tuple(shape):
        problems.append(f"{path}: label map is {values.shape[0]}×{values.shape[1]} but the "
                        f"image is {shape[0]}×{shape[1]}")
    unexpected = sorted(set(np.unique(values).tolist()) - set(CAMUS_LABELS))
    if unexpected:
        problems.append(f"{path}: unexpected label values {unexpected[:8]} "
                        f"(CAMUS labels are 0–3)")
    return problems


def drop_stray_labels(values: np.ndarray) -> np.ndarray:
    """A CAMUS label map with each label kept only in its largest 8-connected region.

    The shared copy of CAMUS was resized by its publisher with linear interpolation and then
    rounded, which leaves stray pixels of the labels in between along the borders of others:
    label 1 (cavity) where myocardium (2) meets background (0), label 2 where the atrium (3)
    meets background or the cavity. Each structure is one connected region, so every pixel
    of a label outside that label's largest 8-connected region is such a stray; it becomes
    background. Pixels 8-connected to the main region are kept, whatever their origin.

    Args:
        values: an H×W label map (0–3).

    Returns:
        A new label map: each label's other regions set to 0.
    """
    from scipy import ndimage

    cleaned = values.copy()
    for label in CAMUS_LABELS:
        if label == 0:
            continue
        regions, count = ndimage.label(values == label, structure=np.ones((3, 3), bool))
        if count > 1:
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            cleaned[(regions > 0) & (regions != int(np.argmax(sizes)))] = 0
    return cleaned


def load_camus(item: CamusImage, labels: Sequence[int] = (1,), *, drop_strays: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """An image scaled to [0, 1] as at inference, and its foreground mask.

    Args:
        item: the image.
        labels: the label values that are foreground (default: the LV cavity, 1).
        drop_strays: take the labels through :func:`drop_stray_labels` first (the resizing
            artefacts of the shared copy); default: the labels as given.

    Returns:
        (H×W float32 image, H×W uint8 mask or None where the label file is missing).

    Raises:
        ValueError: an unreadable file, a label map of another size or with values outside
            0–3 (the message names the file).
    """
    from pipeline.data.ultrasound import load_label_map, load_ultrasound, normalise_frames

    frames = load_ultrasound(item.image)
    if len(frames) != 1:
        raise ValueError(f"{item.image}: a CAMUS image has one frame, this file has "
                         f"{len(frames)}")
    image = normalise_frames(item.image, frames[0].image[None])[0]
    if item.label is None:
        return image, None
    values = load_label_map(item.label)
    problems = _label_problems(item.label, values, image.shape)
    if problems:
        raise ValueError(problems[0])
    if drop_strays:
        values = drop_stray_labels(values)
    return image, np.isin(values, list(labels)).astype(np.uint8)


def camus_samples(root: str | os.PathLike, split: str, *, size: int | None = None,
                  views: Sequence[str] = ("2CH",), phases: Sequence[str] = CAMUS_PHASES,
                  labels: Sequence[int] = (1,), drop_strays: bool = False) -> list[dict]:
    """2-D samples of one split (by patient, from ``root/split.json``) of a CAMUS folder.

    ``labels`` and ``drop_strays`` as in :func:`load_camus`.

    Raises:
        FileNotFoundError: no folder or no ``split.json``.
        ValueError: a malformed split (a patient in two splits is one), an unknown split, a
            listed patient without images, or an image without its ``_gt`` file.
    """
    from pipeline.data.samples import ECHO_VIEW, to_samples
    from pipeline.data.splits import split_members

    items = []
    for item in find_camus_images(root, views=views, phases=phases,
                                  patients=split_members(root, split)):
        image, mask = load_camus(item, labels, drop_strays=drop_strays)
        if mask is None:
            raise ValueError(f"{item.image}: no label file {item.name}_gt.* beside it")
        # case = patient, slice = the image's name: the keys of evaluation tables
        items.append({"image": image[None], "label": mask[None], "id": item.name,
                      "source": item.patient, "view": ECHO_VIEW, "slice": item.name})
    return to_samples(items, size)


def check_camus(root: str | os.PathLike) -> dict[str, Any]:
    """Every problem of a CAMUS folder, in one pass.

    Reports images without a ``_gt`` file, label files without an image, files stored twice,
    unreadable files, label maps with values outside 0–3, image/label size mismatches,
    byte-identical images (the same pixels) under different names, and a malformed
    ``split.json`` or split patients without images.

    Also counts, without calling it a problem, the label maps with stray pixels outside each
    label's largest region (:func:`drop_stray_labels`; a copy resized with linear
    interpolation has them in every map).

    Returns:
        ``{"images": n, "patients": n, "problems": [message, ...], "strays": {"maps": label
        maps read, "with": those with strays, "pixels": stray pixels in them, "labelled":
        their labelled (non-zero) pixels}}``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    from pipeline.data.splits import read_split
    from pipeline.data.ultrasound import load_label_map, load_ultrasound

    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"CAMUS folder not found: {base}")
    images, labels = _scan(base)
    problems: list[str] = []
    digests: dict[str, list[str]] = {}
    strays = {"maps": 0, "with": 0, "pixels": 0, "labelled": 0}
    for key in sorted(set(images) | set(labels)):
        name = "_".join(key)
        twice = [found for found in (images.get(key, []), labels.get(key, [])) if len(found) > 1]
        for found in twice:
            problems.append(f"{name}: stored more than once: " + ", ".join(str(p) for p in found))
        if twice:
            continue  # which file is meant is unclear: the other checks wait for the fix
        if key not in images:
            problems.append(f"{labels[key][0]}: label file without its image {name}.*")
            continue
        image_path = images[key][0]
        try:
            pixels = load_ultrasound(image_path)[0].image
        except (OSError, ValueError) as err:
            problems.append(f"{image_path}: unreadable image: {err}")
            continue
        digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
        digests.setdefault(digest, []).append(str(image_path))
        if key not in labels:
            problems.append(f"{image_path}: no label file {name}_gt.* beside it")
            continue
        label_path = labels[key][0]
        try:
            values = load_label_map(label_path)
        except (OSError, ValueError) as err:
            problems.append(f"{label_path}: unreadable label map: {err}")
            continue
        found = _label_problems(label_path, values, pixels.shape)
        problems.extend(found)
        if not found:
            labelled = int((values > 0).sum())
            dropped = labelled - int((drop_stray_labels(values) > 0).sum())
            strays["maps"] += 1
            if dropped:
                strays["with"] += 1
                strays["pixels"] += dropped
                strays["labelled"] += labelled
    for paths in digests.values():
        if len(paths) > 1:
            problems.append("byte-identical images under different names: " + ", ".join(paths))
    if (base / "split.json").exists():
        try:
            splits = read_split(base)
        except (OSError, ValueError) as err:
            problems.append(str(err))
        else:
            present = {k[0] for k in images}
            for split, patients in splits.items():
                absent = [p for p in patients if p.lower() not in present]
                if absent:
                    problems.append(f"{base / 'split.json'}: split {split!r} lists "
                                    f"{len(absent)} patient(s) without images: "
                                    + ", ".join(absent[:8]) + ("…" if len(absent) > 8 else ""))
    return {"images": len(images), "patients": len({k[0] for k in images}),
            "problems": problems, "strays": strays}
