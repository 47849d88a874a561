"""The evaluation report object: summaries, paired comparisons, figures and provenance."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.evaluation.tables import EvalTable, load_tables, ordered_methods, ordered_views
from pipeline.reports.figures import ReportFigure, plot_training_curves
from pipeline.reports.stats import (
    NO_LABELS_NOTE,
    GroupSummary,
    PairedComparison,
    VolumeScore,
    compare_all,
    comparison_pairs,
    summarize,
    volume_scores,
)

__all__ = ["Report", "build_report"]

_POLICY_NOTE = ("Jaccard J = |A∩B|/|A∪B| per image. Images whose Jaccard is empty in the table "
                "(empty ground truth under the paper's protocol) are excluded from the means and "
                "counted separately, with the false-positive slices among them (non-empty "
                "prediction on an empty ground truth).")


@dataclass
class Report:
    """Everything a report shows; writers in :mod:`pipeline.reports.render` format it.

    Jaccard values are fractions in [0, 1]; writers print percentages.
    """

    title: str
    sources: list[str]
    n_rows: int
    views: list[str]
    methods: list[str]
    summaries: list[GroupSummary]
    comparisons: list[PairedComparison]
    figures: list[ReportFigure] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    volumes: list[VolumeScore] = field(default_factory=list)

    def summary(self, view: str, method: str) -> GroupSummary | None:
        """The summary of one (view, method), or ``None``."""
        return next((s for s in self.summaries if s.view == view and s.method == method), None)

    def comparison(self, method_a: str, method_b: str, view: str) -> PairedComparison | None:
        """The comparison A − B in one view (or ``"all"``), or ``None``."""
        return next((c for c in self.comparisons if (c.method_a, c.method_b, c.view)
                     == (method_a, method_b, view)), None)

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN → ``None``; figures by name and caption, without pixels)."""
        return _jsonable({
            "title": self.title, "sources": self.sources, "n_rows": self.n_rows,
            "views": self.views, "methods": self.methods, "notes": self.notes,
            "settings": self.settings,
            "summaries": [s.to_dict() for s in self.summaries],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "volumes": [v.to_dict() for v in self.volumes],
            "figures": [{"name": f.stem, "title": f.title, "caption": f.caption}
                        for f in self.figures],
            "provenance": self.provenance,
        })


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _unique_names(figures: list[ReportFigure]) -> list[ReportFigure]:
    """Give figures distinct file stems (``name``, ``name_2``, ...)."""
    seen: set[str] = set()
    out = []
    for fig in figures:
        stem, k = fig.stem, 2
        while stem in seen:
            stem, k = f"{fig.stem}_{k}", k + 1
        seen.add(stem)
        out.append(fig if stem == fig.stem else replace(fig, name=stem))
    return out


def build_report(tables: Sequence | str | os.PathLike | EvalTable, *,
                 training_log: str | os.PathLike | Mapping | None = None,
                 figures: Iterable[ReportFigure] = (),
                 provenance: Mapping | None = None,
                 comparisons: Sequence[tuple[str, str]] | None = None,
                 baseline: str | None = None,
                 n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                 title: str = "mmcrf evaluation") -> Report:
    """Compute the report from one or more per-image evaluation tables.

    Args:
        tables: CSV paths, :class:`~pipeline.reports.tables.EvalTable` objects or lists of row
            dicts (schema :data:`~pipeline.reports.tables.EVAL_COLUMNS`), concatenated.
        training_log: optional training log (CSV path or dict) drawn as training curves.
        figures: extra figures (e.g. :func:`~pipeline.reports.figures.plot_qualitative` PNGs for
            the :func:`~pipeline.reports.stats.select_cases` picks).
        provenance: e.g. :func:`~pipeline.reports.provenance.collect_provenance`'s dict.
        comparisons: (A, B) method pairs compared on the same images (A − B); default
            :func:`~pipeline.reports.stats.comparison_pairs` (``baseline`` against every
            other method, else cnn/piecewise/joint's pairs, else every pair).
        baseline: the method every other one is compared with.
        n_boot: bootstrap resamples for the intervals.
        confidence: interval coverage.
        seed: bootstrap seed.
        title: report title.

    Returns:
        The :class:`Report`.

    Raises:
        ValueError: a table violates the schema (the message names the file and column).
    """
    table = load_tables(tables)
    if comparisons is None:
        comparisons = comparison_pairs(table, baseline)
    summaries = summarize(table)
    paired = compare_all(table, comparisons, n_boot=n_boot, confidence=confidence, seed=seed)
    notes = [_POLICY_NOTE]
    if len(table) == 0:
        notes.append("the evaluation table has no rows: nothing was evaluated")
    elif not np.isfinite(table["jaccard"]).any():
        notes.append(f"{NO_LABELS_NOTE} (no image of any view was scored; the counts below "
                     f"still show the images and false-positive slices)")
    figs = list(figures)
    if training_log is not None:
        figs.insert(0, ReportFigure("Training curves", plot_training_curves(training_log),
                                    "Mean Jaccard per epoch (train; validation with the CNN "
                                    "alone and with the CRF) and γ, as in the paper's Fig. 3.",
                                    "training_curves"))
    figs = _unique_names(figs)
    return Report(
        title=title, sources=list(table.sources), n_rows=len(table),
        views=ordered_views(table), methods=ordered_methods(table),
        summaries=summaries, comparisons=paired, figures=figs,
        provenance=dict(provenance or {}), notes=notes,
        settings={"n_boot": n_boot, "confidence": confidence, "seed": seed,
                  "comparisons": [list(p) for p in comparisons]},
        volumes=volume_scores(table),
    )
