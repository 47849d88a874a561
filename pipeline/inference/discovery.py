"""Finding the cases of a batch: NIfTI files and DICOM series under a folder, or a manifest."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.data.readers import find_dicom_series, is_nifti

__all__ = ["OUTPUT_MARKER", "Case", "find_cases"]


@dataclass(frozen=True)
class Case:
    """One volume to segment.

    Attributes:
        name: unique name derived from the path relative to the input root (used for the
            output file names, so equal file names in different folders never collide).
        path: the NIfTI file or the DICOM folder.
        kind: ``nifti`` or ``dicom``.
        series_uid: for DICOM folders holding several series, the series of this case.
        problem: why this case cannot be segmented although it was found (its output name
            collides with another case's); the batch reports it as failed.
    """

    name: str
    path: Path
    kind: str
    series_uid: str | None = None
    problem: str | None = None


#: A file written into every batch output folder: discovery never takes a folder holding it
#: (or anything below it) as input, so outputs never become inputs.
OUTPUT_MARKER = ".mmcrf-output"


def _nifti_name(path: Path, root: Path) -> str:
    """``a.nii.gz`` → ``a``; ``a.nii`` → ``a.nii`` (so ``a.nii`` and ``a.nii.gz`` side by side
    keep their own names, whatever else the folder holds)."""
    rel = path.relative_to(root) if path != root else Path(path.name)
    stem = rel.name
    if stem.lower().endswith(".nii.gz"):
        stem = stem[: -len(".nii.gz")]
    return (rel.parent / stem).as_posix()


def _series_name(base: str, uid: str) -> str:
    """A series of a multi-series folder, named by its UID (stable when series are added)."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in uid).strip("_") or "none"
    return f"{base}/series_{safe}"


def _folder_name(folder: Path, rel: Path) -> str:
    """A DICOM folder's case name: its path relative to the input (its own name for the
    input folder itself)."""
    return rel.as_posix() if rel != Path(".") else folder.name


def _dicom_cases(folder: Path, rel: Path) -> list[Case]:
    series = find_dicom_series(folder)
    base = _folder_name(folder, rel)
    if len(series) == 1:
        return [Case(base, folder, "dicom", next(iter(series)))]
    return [Case(_series_name(base, uid), folder, "dicom", uid) for uid in sorted(series)]


def _walk(root: Path, skip: Path | None) -> list[tuple[Path, Path, list[Path]]]:
    """(folder, its path relative to ``root``, its files) for ``root`` and every folder below,
    symbolic links followed, each real folder and each real file once (link loops end there);
    hidden names, output folders (:data:`OUTPUT_MARKER`) and ``skip`` are left out."""
    seen_dirs: set[Path] = set()
    seen_files: set[Path] = set()
    found = []
    stack = [(root, Path("."))]
    while stack:
        folder, rel = stack.pop()
        real = folder.resolve()
        if real in seen_dirs or (skip is not None and real == skip):
            continue
        seen_dirs.add(real)
        if rel != Path(".") and (folder / OUTPUT_MARKER).exists():
            continue
        try:  # real files before links to them, so a link to a file seen is the one dropped
            entries = sorted(folder.iterdir(), key=lambda e: (e.is_symlink(), e.name))
        except OSError:
            continue
        files, subdirs = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden: temporary files of an interrupted run, .git, ...
            if entry.is_dir():
                subdirs.append(entry)
            elif entry.is_file() and (target := entry.resolve()) not in seen_files:
                seen_files.add(target)
                files.append(entry)
        found.append((folder, rel, sorted(files)))
        stack.extend((d, rel / d.name) for d in reversed(subdirs))
    return found


def find_files(source: str | os.PathLike, suffixes: Sequence[str], *,
               exclude: Sequence[str] = ()) -> list[Path]:
    """Every file under ``source`` whose name ends in one of ``suffixes`` (case-insensitive),
    found by the same walk as :func:`find_cases` (links followed once; hidden names and
    output folders left out), without the names matching an ``exclude`` glob pattern; sorted.
    """
    ends = tuple(s.lower() for s in suffixes)
    return sorted(f for _, _, files in _walk(Path(source), None) for f in files
                  if f.name.lower().endswith(ends)
                  and not any(fnmatch.fnmatch(f.name, pattern) for pattern in exclude))


def _with_unique_names(cases: list[Case]) -> list[Case]:
    """Cases whose output names collide (e.g. a DICOM folder ``ct`` beside ``ct.nii.gz``)
    all get a problem naming the others: none is skipped against another's mask."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.name, []).append(case)
    out = []
    for case in cases:
        group = groups[case.name]
        if len(group) > 1:
            others = ", ".join(str(c.path) for c in group if c is not case)
            case = replace(case, problem=f"output name {case.name!r} is shared with {others}; "
                                         f"rename or --exclude one of them")
        out.append(case)
    return out


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
               splits: Sequence[str] | None = None,
               output: str | os.PathLike | None = None) -> list[Case]:
    """All cases under ``source``.

    ``source`` may be a NIfTI file, a folder holding one DICOM series, or a folder scanned
    (recursively, symbolic links followed, each real file once) for NIfTI files and for
    folders holding DICOM files; a folder with several series gives one case per series
    (``<folder>/series_<SeriesInstanceUID>``). Names come from the path relative to
    ``source`` alone (``a.nii.gz`` → ``a``, ``a.nii`` → ``a.nii``), so they stay the same
    whatever is added later; where two inputs still map to one name, both are returned with
    a ``problem`` (reported, never segmented over each other). Hidden files and folders
    (temporary files of an interrupted run) and batch output folders (holding
    :data:`OUTPUT_MARKER`, and ``output`` itself) are never inputs. ``exclude`` holds glob
    patterns matched against case names and their last part (e.g. ``label`` or ``*_seg`` to
    skip label files that sit beside their images).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: nothing segmentable was found (the message names the folder), or
            ``output`` is the input folder itself.
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
    skip = Path(output).resolve() if output is not None else None
    if skip is not None and skip == root.resolve():
        raise ValueError(f"{root}: the output folder is the input folder; the masks would be "
                         f"taken as inputs on the next run: write them to a folder of their own")
    cases: list[Case] = []
    for folder, rel, files in _walk(root, skip) if recursive else [(root, Path("."), sorted(
            p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")))]:
        cases.extend(Case(_nifti_name(f, root), f, "nifti") for f in files if is_nifti(f))
        if any(not is_nifti(f) for f in files):
            try:
                if find_dicom_series(folder):
                    cases.extend(_dicom_cases(folder, rel))
            except ValueError as err:  # a broken DICOM file: report the folder as a case
                cases.append(Case(_folder_name(folder, rel), folder, "dicom",
                                  problem=str(err)))
    if exclude:
        cases = [c for c in cases if not any(fnmatch.fnmatch(c.name, p)
                                             or fnmatch.fnmatch(Path(c.name).name, p)
                                             for p in exclude)]
    if not cases:
        raise ValueError(f"{root}: no NIfTI files or DICOM series found"
                         + (f" (after excluding {', '.join(exclude)})" if exclude else ""))
    return _with_unique_names(cases)
