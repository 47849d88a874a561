"""Export the 2-D sets a model sees (per view, NIfTI or PNG) with an index.csv."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.cta import cta_slice_transforms, entry_slices
from pipeline.data.views import VIEWS
from pipeline.data.writers import atomic_path, write_csv, write_nifti

__all__ = ["INDEX_COLUMNS", "export_slices"]

INDEX_COLUMNS: tuple[str, ...] = ("source", "view", "slice", "empty", "image_file",
                                  "label_file", "split")


def _safe_name(source: str) -> str:
    stem = Path(source.rstrip("/")).name
    for suffix in (".nii.gz", ".nii"):
        stem = stem.removesuffix(suffix)
    parent = Path(source.rstrip("/")).parent.name
    name = f"{parent}_{stem}" if parent else stem
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _write_png(array: np.ndarray, path: Path) -> None:
    tmp = atomic_path(path)
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def export_slices(cases: Iterable[Mapping], out_dir: str | os.PathLike, *,
                  views: Sequence[str] = VIEWS, fmt: str = "png", **transform_kwargs
                  ) -> Path:
    """Writes every 2-D image (and label) of the chosen views, and ``index.csv``.

    Files go to ``<out_dir>/<view>/<case>_<index>.png`` (image, windowed to 0–255) and
    ``..._label.png`` (0/255), or ``.nii.gz`` holding the 2-D slice with its world affine.
    A case split by slices (``slice_split`` and ``slice_part``, from
    :func:`pipeline.data.manifests.manifest_entries`) gives only that part's slices; the
    index's ``split`` column says which split each slice belongs to (empty when unknown).

    Args:
        cases: volume entries ``{"image": path, "label": path (optional)}``.
        out_dir: destination folder.
        views: views to export.
        fmt: ``png`` or ``nii``.
        **transform_kwargs: passed to :func:`pipeline.data.cta_volume_transforms`
            (``hu_window``, ``spacing``, ...).

    Returns:
        The path of ``index.csv``.

    Raises:
        ValueError: unknown format, or any problem reading a case (names the file).
    """
    if fmt not in ("png", "nii"):
        raise ValueError(f"format must be 'png' or 'nii', got {fmt!r}")
    out = Path(out_dir)
    for view in views:
        (out / view).mkdir(parents=True, exist_ok=True)
    pipeline = cta_slice_transforms(views, **transform_kwargs)
    rows = []
    for case in cases:
        samples = entry_slices(pipeline, case)
        name = _safe_name(str(case["image"]))
        for sample in samples:
            stem = out / sample["view"] / f"{name}_{sample['slice']:04d}"
            image = np.asarray(sample["image"])[0]
            has_label = "label" in sample
            if fmt == "png":
                image_file = stem.with_name(stem.name + ".png")
                _write_png(np.clip(np.round(image * 255), 0, 255).astype(np.uint8), image_file)
                label_file = stem.with_name(stem.name + "_label.png")
                if has_label:
                    _write_png((np.asarray(sample["label"])[0] > 0).astype(np.uint8) * 255,
                               label_file)
            else:
                image_file = stem.with_name(stem.name + ".nii.gz")
                write_nifti(image[..., None].astype(np.float32), sample["affine"], image_file)
                label_file = stem.with_name(stem.name + "_label.nii.gz")
                if has_label:
                    write_nifti(np.asarray(sample["label"])[0][..., None].astype(np.uint8),
                                sample["affine"], label_file)
            rows.append({
                "source": sample["source"], "view": sample["view"], "slice": sample["slice"],
                "empty": "" if not has_label else int(sample["label_empty"]),
                "image_file": image_file.relative_to(out).as_posix(),
                "label_file": label_file.relative_to(out).as_posix() if has_label else "",
                "split": case.get("split", ""),
            })
    index = write_csv(rows, out / "index.csv", INDEX_COLUMNS)
    return index
