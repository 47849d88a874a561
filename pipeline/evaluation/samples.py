"""Which samples to score: one split of a data kind, CTA volumes in several views."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pipeline.data.samples import (
    TWO_D_KINDS,
    cta_samples,
    generated_base_kind,
    split_samples,
)
from pipeline.data.views import VIEWS

__all__ = [
    "evaluation_entries",
    "evaluation_samples",
    "multiview_samples",
]


def multiview_samples(datalist: Sequence[Mapping], views: Sequence[str] = VIEWS, *,
                      size: int | None = None, **transform_kwargs) -> list[dict]:
    """2-D samples of several views of CTA volumes, made exactly as for training
    (:func:`pipeline.data.samples.cta_samples`, view by view).

    Args:
        datalist: volume entries ``{"image": path, "label": path, "source": ...}`` (e.g.
            :func:`pipeline.data.manifests.manifest_entries`).
        views: any of ``axial``, ``coronal``, ``sagittal``.
        size: side of the square images (as in training), or None for the native size.
        **transform_kwargs: passed to :func:`pipeline.data.cta_volume_transforms`.

    Returns:
        The samples, volume by volume, then view by view, slice by slice; each carries
        ``source``, ``view`` and ``slice``.

    Raises:
        ValueError: an unknown view, no view, or a problem with a volume (names the file).
    """
    views = list(views)
    if not views:
        raise ValueError("give at least one view")
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    out: list[dict] = []
    for entry in datalist:  # volume by volume: only one volume's slices at full size at once
        for view in views:
            out.extend(cta_samples([entry], view, size=size, **transform_kwargs))
    return out


def evaluation_entries(kind: str, *, root: str | os.PathLike | None = None,
                       manifest: str | os.PathLike | None = None,
                       split: str = "validation") -> list[dict]:
    """The volume entries of one split, chosen as :func:`pipeline.data.samples.training_sets`
    chooses them.

    Args:
        kind: ``demo`` (the phantom cohort under ``root``, written if absent, split 4:1:1 with
            seed 0 like training) or ``cta`` (``manifest`` with paths under ``root``).
        root: data root.
        manifest: manifest path (``cta``).
        split: ``training``, ``validation`` or ``test``.

    Returns:
        Entries with ``image``, ``label`` and ``source``.

    Raises:
        ValueError: unknown kind, missing arguments, or an empty split.
    """
    from pipeline.data.manifests import load_manifest, manifest_entries
    from pipeline.data.phantoms import demo_cohort_manifest

    if kind == "demo":
        if root is None:
            raise ValueError("demo data needs a root folder to write the phantoms to")
        spec = demo_cohort_manifest(root)
        where = f"the demo cohort in {root}"
    elif kind == "cta":
        if root is None or manifest is None:
            raise ValueError("cta data needs --manifest and --root")
        spec = load_manifest(manifest)
        where = str(manifest)
    else:
        raise ValueError(f"volume data kind must be 'demo' or 'cta', got {kind!r}")
    entries = manifest_entries(spec, root, [split])
    if not entries:
        raise ValueError(f"{where}: the {split!r} split is empty")
    return entries


def evaluation_samples(kind: str, *, root: str | os.PathLike | None = None,
                       manifest: str | os.PathLike | None = None, split: str = "validation",
                       views: Sequence[str] = ("axial",), size: int | None = 64,
                       colour: str = "rgb", camus: Mapping[str, Sequence] | None = None
                       ) -> list[dict]:
    """The 2-D samples to evaluate: one split of a data kind, in one or several views.

    Args:
        kind: ``demo``, ``cta`` (volumes, sliced along each of ``views``), or a 2-D kind
            (``horse``, ``horse_demo``, ``echo``, ``echo_demo``, ``camus``: see
            :func:`pipeline.data.samples.split_samples`); ``views`` is ignored for the 2-D
            kinds. The generated kinds are written to ``root`` where absent.
        root: data root.
        manifest: manifest path (``cta``).
        split: the split to evaluate.
        views: CTA views.
        size: side of the square images (as in training), or None for the native size.
        colour: horse images in ``rgb`` or ``gray``.
        camus: the CAMUS selection (``views``, ``phases``, ``labels``).

    Returns:
        The samples (for :func:`evaluate_runs`).
    """
    kind = generated_base_kind(kind, root)
    if kind in TWO_D_KINDS:
        return split_samples(kind, split, root=root, size=size, colour=colour, camus=camus)
    entries = evaluation_entries(kind, root=root, manifest=manifest, split=split)
    return multiview_samples(entries, views, size=size)
