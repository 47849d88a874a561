"""Finding the cases of a batch: NIfTI files and DICOM series under a folder, or a manifest."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.readers import find_dicom_series, is_nifti

__all__ = ["Case", "find_cases"]


@dataclass(frozen=True)
class Case:
    """One volume to segment.

    Attributes:
        name: unique name derived from the path relative to the input root (used for the
            output file names, so equal file names in different folders never collide).
        path: the NIfTI file or the DICOM folder.
        kind: ``nifti`` or ``dicom``.
        series_uid: for DICOM folders holding several series, the series of this case.
    """

    name: str
    path: Path
    kind: str
    series_uid: str | None = None


def _nifti_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.name)
    stem = rel.name
    for suffix in (".nii.gz", ".nii"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return (rel.parent / stem).as_posix()


def _dicom_cases(folder: Path, root: Path) -> list[Case]:
    series = find_dicom_series(folder)
    rel = folder.relative_to(root) if folder != root else Path(folder.name)
    base = rel.as_posix()
    if len(series) == 1:
        return [Case(base, folder, "dicom", next(iter(series)))]
    return [Case(f"{base}/series_{i:02d}", folder, "dicom", uid)
            for i, uid in enumerate(sorted(series))]


def _manifest_cases(path: Path, root: str | os.PathLike | None,
                    splits: Sequence[str] | None) -> list[Case]:
    from pipeline.data.manifests import SPLITS, load_manifest

    manifest = load_manifest(path)
    base = Path(root) if root is not None else path.parent
    cases = []
    for split in splits or SPLITS:
        for entry in manifest.get(split, []) or []:
            image = base / entry["image"]
            kind = "dicom" if image.is_dir() else "nifti"
            name = _nifti_name(image, base) if kind == "nifti" else Path(entry["image"]).as_posix()
            cases.append(Case(name, image, kind))
    if not cases:
        raise ValueError(f"{path}: the manifest lists no image in {', '.join(splits or SPLITS)}")
    return cases


def find_cases(source: str | os.PathLike, *, recursive: bool = True,
               exclude: Sequence[str] = (), root: str | os.PathLike | None = None,
               splits: Sequence[str] | None = None) -> list[Case]:
    """All cases under ``source``.

    ``source`` may be a NIfTI file, a folder holding one DICOM series, or a folder scanned
    (recursively) for NIfTI files and for folders holding DICOM files; a folder with several
    series gives one case per series. ``exclude`` holds glob patterns matched against case
    names and their last part (e.g. ``label`` or ``*_seg`` to skip label files that sit
    beside their images).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: nothing segmentable was found (the message names the folder).
    """
    root_dir = root
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if root.is_file() and root.suffix.lower() == ".json":
        return _manifest_cases(root, root_dir, splits)
    if root.is_file():
        if not is_nifti(root):
            raise ValueError(f"{root}: unsupported input; expected a .nii/.nii.gz file, a DICOM "
                             f"series folder, or a folder of them")
        return [Case(_nifti_name(root, root.parent), root, "nifti")]
    cases: list[Case] = []
    folders = [root] + (sorted(p for p in root.rglob("*") if p.is_dir()) if recursive else [])
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        cases.extend(Case(_nifti_name(f, root), f, "nifti") for f in files if is_nifti(f))
        others = [f for f in files if not is_nifti(f)]
        if others:
            try:
                if find_dicom_series(folder):
                    cases.extend(_dicom_cases(folder, root))
            except ValueError as err:  # a broken DICOM file: report the folder as a case
                cases.append(Case((folder.relative_to(root) if folder != root
                                   else Path(folder.name)).as_posix(), folder, "dicom"))
                del err
    if exclude:
        cases = [c for c in cases if not any(fnmatch.fnmatch(c.name, p)
                                             or fnmatch.fnmatch(Path(c.name).name, p)
                                             for p in exclude)]
    if not cases:
        raise ValueError(f"{root}: no NIfTI files or DICOM series found"
                         + (f" (after excluding {', '.join(exclude)})" if exclude else ""))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):  # e.g. a.nii and a.nii.gz side by side
        seen: dict[str, int] = {}
        unique = []
        for c in cases:
            n = seen.get(c.name, 0)
            seen[c.name] = n + 1
            unique.append(c if n == 0 else Case(f"{c.name}_{n}", c.path, c.kind, c.series_uid))
        cases = unique
    return cases
