"""Fixed-size 2-D training samples ``{"image", "label", "id"}`` from slices or horse images."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Resized

from pipeline.data.cta import slice_datalist
from pipeline.data.datasets.horse import horse_datalist, load_horse

__all__ = ["DATA_KINDS", "ECHO_VIEW", "TWO_D_KINDS", "cta_samples", "generated_base_kind",
           "horse_samples", "split_samples", "to_samples", "training_sets"]

#: The data kinds :func:`training_sets` knows.
DATA_KINDS: tuple[str, ...] = ("demo", "cta", "horse", "horse_demo", "echo", "echo_demo",
                               "camus")
#: The kinds whose samples are 2-D images of their own (no volumes, no views).
TWO_D_KINDS: tuple[str, ...] = ("horse", "horse_demo", "echo", "echo_demo", "camus")

#: The ``view`` of ultrasound frame samples in evaluation tables and reports.
ECHO_VIEW = "echo"


def to_samples(items: Iterable[Mapping], size: int | Sequence[int] | None = None,
               keep: Sequence[str] = ("source", "view", "slice", "label_empty")) -> list[dict]:
    """Normalises 2-D items to ``image`` (C×H×W float32), ``label`` (1×H×W float32 {0,1}) and
    a string ``id``, resized to ``size`` (bilinear image, nearest label) when given.

    Args:
        items: dicts with ``image`` and ``label`` (C×H×W arrays/tensors) and optionally ``id``
            or ``source``/``view``/``slice``.
        size: output H×W (an int for square), or None to keep sizes.
        keep: extra keys copied through.

    Returns:
        The samples.
    """
    resize = None
    if size is not None:
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        resize = Resized(("image", "label"), spatial_size=spatial, mode=("bilinear", "nearest"))
    out = []
    for i, item in enumerate(items):
        sample = {"image": torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32),
                  "label": (torch.as_tensor(np.asarray(item["label"])) > 0).float()}
        if resize is not None:
            sample = resize(sample)
            sample = {k: torch.as_tensor(np.asarray(v)) for k, v in sample.items()}
        if "id" in item:
            sample["id"] = str(item["id"])
        elif "view" in item:
            sample["id"] = f"{item['source']}:{item['view']}:{item['slice']}"
        else:
            sample["id"] = str(i)
        for key in keep:
            if key in item:
                sample[key] = item[key]
        out.append(sample)
    return out


def cta_samples(datalist: Sequence[Mapping], view: str, *, size: int | None = None,
                **transform_kwargs) -> list[dict]:
    """2-D samples of one view of CTA volumes (see :func:`pipeline.data.slice_datalist`)."""
    return to_samples(slice_datalist(datalist, views=(view,), **transform_kwargs), size)


def horse_samples(root: str | os.PathLike, split: str | None, *, size: int | None = None,
                  colour: str = "rgb") -> list[dict]:
    """2-D samples of the Weizmann Horse set (broken images excluded and reported)."""
    datalist, _report = horse_datalist(root, split, colour=colour)
    items = []
    for entry in datalist:
        sample = load_horse(root, entry["name"], colour=colour)
        items.append({"image": sample.image, "label": sample.mask[None], "id": entry["name"]})
    return to_samples(items, size)


def generated_base_kind(kind: str, root: str | os.PathLike | None) -> str:
    """For the generated 2-D kinds (``horse_demo``, ``echo_demo``): writes the data to
    ``root`` where missing and returns the kind that reads it (``horse``, ``echo``); any other
    kind is returned unchanged.

    Raises:
        ValueError: a generated kind without a root folder.
    """
    if kind not in ("horse_demo", "echo_demo"):
        return kind
    if root is None:
        raise ValueError(f"{kind} data needs a root folder to write the generated data to")
    from pipeline.data.phantoms import ensure_demo_data

    ensure_demo_data(kind, root)
    return kind.removesuffix("_demo")


def split_samples(kind: str, split: str, *, root: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None, view: str = "axial",
                  size: int | None = 64, colour: str = "rgb",
                  camus: Mapping[str, Sequence] | None = None) -> list[dict]:
    """The samples of one split of a data kind: the one dispatch on the data kind.

    Args:
        kind: ``demo`` (the CTA phantom cohort, written to ``root`` if absent), ``cta`` (a
            manifest of volumes, sliced along ``view``), ``horse`` (the Weizmann Horse
            folder ``root`` with its ``split.json``), ``horse_demo`` (a generated
            horse-like set in the same layout, written to ``root`` if absent), ``echo`` (an
            ultrasound cohort folder, see :func:`pipeline.data.phantoms.echo.echo_samples`),
            ``echo_demo`` (the generated echo phantom cohort, written to ``root`` if absent)
            or ``camus`` (a CAMUS folder with a ``split.json`` of patients, see
            :func:`pipeline.data.datasets.camus.camus_samples`).
        split: ``training``, ``validation``, ...
        root: data root.
        manifest: manifest path (``cta``).
        view: CTA view.
        size: side of the square images, or None for the native size.
        colour: horse images in ``rgb`` or ``gray``.
        camus: ``views``, ``phases``, ``labels`` and ``drop_strays`` of a CAMUS selection
            (default 2CH, ED and ES, label 1 as given).

    Returns:
        The samples.

    Raises:
        ValueError: unknown kind or missing arguments.
    """
    from pipeline.data.manifests import load_manifest, manifest_entries
    from pipeline.data.phantoms import demo_cohort_manifest

    kind = generated_base_kind(kind, root)
    if kind in ("echo", "horse", "camus") and root is None:
        raise ValueError(f"{kind} data needs --root (the folder with split.json)")
    if kind == "echo":
        from pipeline.data.phantoms.echo import echo_samples

        return echo_samples(root, split, size=size)
    if kind == "horse":
        return horse_samples(root, split, size=size, colour=colour)
    if kind == "camus":
        from pipeline.data.datasets.camus import camus_samples

        selection = dict(camus or {})
        return camus_samples(root, split, size=size,
                             views=tuple(selection.get("views", ("2CH",))),
                             phases=tuple(selection.get("phases", ("ED", "ES"))),
                             labels=tuple(selection.get("labels", (1,))),
                             drop_strays=bool(selection.get("drop_strays", False)))
    if kind == "demo":
        if root is None:
            raise ValueError("demo data needs a root folder to write the phantoms to")
        spec = demo_cohort_manifest(root)
    elif kind == "cta":
        if root is None or manifest is None:
            raise ValueError("cta data needs --manifest and --root")
        spec = load_manifest(manifest)
    else:
        raise ValueError(f"data kind must be one of {DATA_KINDS}, got {kind!r}")
    return cta_samples(manifest_entries(spec, root, [split]), view, size=size)


def training_sets(kind: str, *, root: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None, view: str = "axial",
                  size: int = 64, colour: str = "rgb",
                  camus: Mapping[str, Sequence] | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """Training and validation samples of one data kind (see :func:`split_samples`).

    Returns:
        (training samples, validation samples).

    Raises:
        ValueError: unknown kind or missing arguments.
    """
    kwargs = {"root": root, "manifest": manifest, "view": view, "size": size,
              "colour": colour, "camus": camus}
    kind = generated_base_kind(kind, root)
    return split_samples(kind, "training", **kwargs), split_samples(kind, "validation", **kwargs)


def training_foreground_ml(kind: str, *, root: str | os.PathLike | None = None,
                           manifest: str | os.PathLike | None = None) -> list[float] | None:
    """[smallest, largest] foreground volume (mL) of the labelled training volumes of a
    volume kind (``cta``, ``demo``; None for the 2-D kinds or without labels): what a model
    saw in training, so inference can warn about a predicted volume far outside it.

    Raises:
        ValueError: a label volume that cannot be read.
    """
    from pipeline.data.manifests import load_manifest, manifest_entries
    from pipeline.data.phantoms import demo_cohort_manifest
    from pipeline.data.readers import read_volume

    if kind == "demo" and root is not None:
        spec = demo_cohort_manifest(root)
    elif kind == "cta" and root is not None and manifest is not None:
        spec = load_manifest(manifest)
    else:
        return None
    volumes = []
    for entry in manifest_entries(spec, root, ["training"]):
        if not entry.get("label"):
            continue
        label = read_volume(entry["label"])
        value = entry.get("label_value")
        voxels = float((label == value).sum() if value is not None else (label > 0).sum())
        volumes.append(voxels * abs(float(np.linalg.det(np.asarray(label.affine)[:3, :3])))
                       / 1000.0)
    return [round(min(volumes), 1), round(max(volumes), 1)] if volumes else None
