"""Decathlon-style data manifests: build from a folder convention (split by patient), check.

An entry may also be split by SLICES (leave-slices-out within one volume, for data sets of a
single labelled volume): ``"slice_split": {"held_out": [0.4, 0.6], "gap": 3, "split":
"validation"}`` in an entry of the ``training`` list puts, view by view, the block of slice
positions 40–60 % along the view's axis into ``validation``, drops 3 slices on each side of it,
and keeps the rest in ``training`` (see :class:`pipeline.data.cta.SliceSplit`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.alignment import AlignLabel
from pipeline.data.cta import SliceSplit
from pipeline.data.hashing import sha256_file
from pipeline.data.pictures import read_picture
from pipeline.data.readers import find_dicom_series, is_nifti, read_volume

__all__ = [
    "SPLITS",
    "ManifestProblem",
    "build_manifest",
    "check_manifest",
    "load_manifest",
    "manifest_entries",
    "manifest_hash",
    "slice_split_of",
    "write_manifest",
]

SPLITS: tuple[str, ...] = ("training", "validation", "test")
_IMAGE_2D = (".png", ".jpg", ".jpeg")
_IMAGE_NAMES = ("image", "img", "ct", "cta", "scan")
_LABEL_NAMES = ("label", "labels", "mask", "seg", "segmentation")
_PAIR_FOLDERS = (("imagesTr", "labelsTr"), ("images", "labels"), ("image", "label"))


@dataclass
class ManifestProblem:
    """One problem found by :func:`check_manifest`."""

    split: str
    index: int
    key: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.split}[{self.index}] {self.key} {self.path}: {self.message}"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_volume(path: Path) -> bool:
    return is_nifti(path) or (path.is_dir() and bool(find_dicom_series(path)))


def _find_cases(root: Path) -> list[dict]:
    """Image/label pairs under ``root`` by one of the supported conventions."""
    for image_dir, label_dir in _PAIR_FOLDERS:
        if (root / image_dir).is_dir():
            labels = {_stem(p): p for p in (root / label_dir).iterdir()} \
                if (root / label_dir).is_dir() else {}
            cases = []
            for path in sorted((root / image_dir).iterdir()):
                if not (is_nifti(path) or path.suffix.lower() in _IMAGE_2D or path.is_dir()):
                    continue
                entry = {"id": _stem(path), "image": path}
                if _stem(path) in labels:
                    entry["label"] = labels[_stem(path)]
                cases.append(entry)
            return cases
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        entries = sorted(folder.iterdir())
        image = next((p for p in entries if _stem(p).lower() in _IMAGE_NAMES
                      and _is_volume(p)), None)
        if image is None:
            image = next((p for p in entries if p.is_dir() and _is_volume(p)), None)
        if image is None:
            continue
        label = next((p for p in entries if _stem(p).lower() in _LABEL_NAMES and p != image),
                     None)
        entry = {"id": folder.name, "image": image}
        if label is not None:
            entry["label"] = label
        cases.append(entry)
    return cases


def _group_of(case: Mapping, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return str(case["id"])
    match = pattern.search(str(case["id"]))
    if match is None:
        raise ValueError(f"case {case['id']}: group pattern {pattern.pattern!r} does not match")
    return match.group(1) if match.groups() else match.group(0)


def build_manifest(root: str | os.PathLike, *, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                   seed: int = 0, group_pattern: str | None = None, name: str | None = None,
                   description: str = "") -> dict:
    """Builds a decathlon-style manifest from a folder convention.

    Supported layouts (paths are stored relative to ``root``):

    * ``imagesTr/<id>.nii.gz`` + ``labelsTr/<id>.nii.gz`` (also ``images/`` + ``labels/``);
    * one folder per case holding ``image.nii.gz`` (or a DICOM series folder) and
      ``label.nii.gz`` (also ``mask``/``seg``).

    The split is made by GROUP (patient): all cases of a group land in one split, and the
    assignment is deterministic for a seed (groups sorted, shuffled by a seeded generator).

    Args:
        root: the data root.
        fractions: training/validation/test fractions (normalised; a zero drops the split).
        seed: seed of the deterministic shuffle.
        group_pattern: regex extracting the patient id from a case id (first group, or the
            whole match); default: every case is its own patient.
        name: manifest name (default: the folder's name).
        description: free text.

    Returns:
        The manifest dict.

    Raises:
        FileNotFoundError: root does not exist.
        ValueError: no cases found, bad fractions or a pattern that does not match.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such data folder")
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or np.any(frac < 0) or frac.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    frac = frac / frac.sum()
    cases = _find_cases(base)
    if not cases:
        raise ValueError(f"{base}: no image/label cases found (expected imagesTr/+labelsTr/, "
                         f"images/+labels/, or one folder per case with image and label)")
    pattern = re.compile(group_pattern) if group_pattern else None
    groups: dict[str, list[dict]] = {}
    for case in cases:
        groups.setdefault(_group_of(case, pattern), []).append(case)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    bounds = np.round(np.cumsum(frac) * len(order)).astype(int)
    manifest: dict = {"name": name or base.name, "description": description,
                      "split_by": "group" if pattern else "case", "seed": seed}
    for split, start, stop in zip(SPLITS, np.r_[0, bounds[:-1]], bounds, strict=True):
        entries = []
        for group in sorted(order[start:stop]):
            for case in groups[group]:
                entry = {"id": case["id"], "group": group,
                         "image": case["image"].relative_to(base).as_posix()}
                if "label" in case:
                    entry["label"] = case["label"].relative_to(base).as_posix()
                entries.append(entry)
        manifest[split] = entries
    return manifest


def write_manifest(manifest: Mapping, path: str | os.PathLike) -> Path:
    """Writes a manifest as pretty JSON, atomically."""
    from pipeline.data.writers import atomic_write_text

    return atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")


def load_manifest(path: str | os.PathLike) -> dict:
    """Reads a manifest; raises ValueError naming the file when it is not a manifest."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such manifest")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or not any(isinstance(manifest.get(s), list)
                                                  for s in SPLITS):
        raise ValueError(f"{p}: a manifest needs at least one of the lists {SPLITS}")
    for split in SPLITS:
        entries = manifest.get(split, []) or []
        if not isinstance(entries, list):
            raise ValueError(f"{p}: {split!r} must be a list of entries, got "
                             f"{type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry:
                raise ValueError(f"{p}: {split}[{i}] needs an 'image' path")
            for key in ("image", "label"):
                value = entry.get(key)
                if key in entry and (not isinstance(value, str) or not value.strip()) \
                        and not (key == "label" and value is None):
                    raise ValueError(f"{p}: {split}[{i}] {key!r} must be a path (a string), "
                                     f"got {value!r}")
    return manifest


def slice_split_of(entry: Mapping, split: str, where: str | None = None) -> SliceSplit | None:
    """The checked :class:`~pipeline.data.cta.SliceSplit` of a manifest entry listed under
    ``split``, or None when the entry is not split by slices.

    Raises:
        ValueError: a bad ``slice_split`` (see :meth:`SliceSplit.from_spec`), one on an entry
            without a label, or one whose held-out block goes to the entry's own split.
    """
    spec = entry.get("slice_split")
    if spec is None:
        return None
    where = where or f"{split} entry {entry.get('id', entry.get('image'))}"
    rule = SliceSplit.from_spec(spec, where=where)
    if rule.split == split:
        raise ValueError(f"{where}: slice_split sends the held-out slices to {split!r}, the "
                         f"split the entry is listed in; list it under another split (e.g. "
                         f"training)")
    if not entry.get("label"):
        raise ValueError(f"{where}: slice_split needs a labelled entry (no 'label')")
    return rule


def manifest_entries(manifest: Mapping, root: str | os.PathLike,
                     splits: Iterable[str] = SPLITS) -> list[dict]:
    """Entries of the given splits with ``image``/``label`` resolved against ``root``; each
    entry gets ``split`` and ``source`` (its image path as written in the manifest).

    An entry with a ``slice_split`` appears in two splits: in its own list's split with
    ``slice_part = "rest"`` (the slices outside the held-out block and its gaps) and in the
    slice split's ``split`` with ``slice_part = "held_out"`` (the block);
    :func:`pipeline.data.cta.slice_datalist` then keeps only that part of its slices.

    Raises:
        ValueError: a bad ``slice_split`` (names the entry).
    """
    base = Path(root)
    out = []
    for split in splits:
        for home in SPLITS:
            for i, entry in enumerate(manifest.get(home, []) or []):
                rule = slice_split_of(entry, home, f"{home}[{i}] {entry.get('id', '')}".strip())
                if home == split:
                    part = None if rule is None else "rest"
                elif rule is not None and rule.split == split:
                    part = "held_out"
                else:
                    continue
                resolved = dict(entry)
                resolved["split"] = split
                resolved["source"] = entry["image"]
                for key in ("image", "label"):
                    if key in entry:
                        resolved[key] = str(base / entry[key])
                if rule is not None:
                    resolved["slice_split"] = rule.to_spec()
                    resolved["slice_part"] = part
                out.append(resolved)
    return out


def _check_2d(image: Path, label: Path | None) -> list[tuple[str, str, str]]:
    problems = []
    try:
        size = read_picture(image).size
    except (ValueError, FileNotFoundError) as err:
        return [("image", str(image), f"unreadable image ({err})")]
    if label is not None:
        try:
            mask = np.asarray(read_picture(label, "L"))
        except (ValueError, FileNotFoundError) as err:
            return [("label", str(label), f"unreadable label ({err})")]
        if mask.shape[::-1] != size:
            problems.append(("label", str(label), f"label size {mask.shape[::-1]} differs from "
                                                  f"image size {size} (resample the image?)"))
        if label.suffix.lower() == ".png" and not np.all(np.isin(np.unique(mask), (0, 1, 255))):
            problems.append(("label", str(label), "label is not binary (0/1 or 0/255)"))
    return problems


def _check_volume(image: Path, label: Path | None) -> list[tuple[str, str, str]]:
    try:
        vol = read_volume(image)
    except (ValueError, FileNotFoundError) as err:
        return [("image", str(image), str(err).removeprefix(f"{image}: "))]
    if label is None:
        return []
    try:
        lab = read_volume(label)
        AlignLabel()(lab, vol)
    except (ValueError, FileNotFoundError) as err:
        return [("label", str(label), str(err).removeprefix(f"{label}: "))]
    return []


def check_manifest(manifest: Mapping, root: str | os.PathLike) -> list[ManifestProblem]:
    """Checks every entry and reports ALL problems (not just the first).

    Checks: files exist and are readable; volumes are 3-D; labels are binary and on (or
    alignable onto) their image's grid; 2-D labels have their image's size; no group
    (patient) or image appears in two splits; ``slice_split`` specs are valid (fractions,
    gap, target split; whether a block holds slices is checked when the volume is sliced).

    Args:
        manifest: the manifest dict.
        root: data root the relative paths refer to.

    Returns:
        The problems found (empty when all is well).
    """
    base = Path(root)
    problems: list[ManifestProblem] = []
    seen_group: dict[str, str] = {}
    seen_image: dict[str, str] = {}
    for split in SPLITS:
        for i, entry in enumerate(manifest.get(split, []) or []):
            image = base / entry["image"]
            label = base / entry["label"] if entry.get("label") else None
            try:
                slice_split_of(entry, split, "entry")
            except ValueError as err:
                problems.append(ManifestProblem(split, i, "slice_split", str(image),
                                                str(err).removeprefix("entry: ")))
            for key, path in (("image", image), ("label", label)):
                if path is not None and not path.exists():
                    problems.append(ManifestProblem(split, i, key, str(path), "no such file"))
            if image.exists() and (label is None or label.exists()):
                check = _check_2d if image.suffix.lower() in _IMAGE_2D else _check_volume
                problems.extend(ManifestProblem(split, i, key, path, message)
                                for key, path, message in check(image, label))
            group = str(entry.get("group", entry.get("id", entry["image"])))
            for seen, key, what in ((seen_group, group, "group"),
                                    (seen_image, entry["image"], "image")):
                if key in seen and seen[key] != split:
                    problems.append(ManifestProblem(split, i, what, str(image),
                                                    f"{what} {key} is also in {seen[key]}: "
                                                    f"data leak between splits"))
                seen.setdefault(key, split)
    return problems


def manifest_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a manifest file (for provenance in reports)."""
    return sha256_file(path)
