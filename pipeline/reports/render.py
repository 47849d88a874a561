"""Report writers: Markdown, self-contained HTML (base64 PNGs), CSV and JSON, atomically."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import jinja2

from pipeline.data.writers import atomic_write_bytes, atomic_write_text
from pipeline.reports.provenance import flatten_provenance
from pipeline.reports.report import Report
from pipeline.reports.stats import ALL_VIEWS, GroupSummary, PairedComparison, VolumeScore

__all__ = ["FORMATS", "render_html", "render_markdown", "write_report"]

#: Output formats of :func:`write_report`.
FORMATS: tuple[str, ...] = ("md", "html", "csv", "json")

_SUMMARY_HEAD = ("View", "Method", "Mean J (%)", "SD (%)", "Median J (%)", "Scored",
                 "Excluded (empty truth)", "FP slices among excluded", "Images", "Note")
_PAIRED_HEAD = ("View", "Comparison", "Pairs", "Mean A (%)", "Mean B (%)",
                "Mean A − B (points)", "CI (points)", "Wilcoxon p", "Wins / losses / ties",
                "Note")


def _pct(x: float, digits: int = 2) -> str:
    return "—" if x is None or math.isnan(x) else f"{100.0 * x:.{digits}f}"


def _signed_pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100.0 * x:+.2f}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "—"
    return "< 0.001" if p < 1e-3 else f"{p:.3g}"


def _view(view: str) -> str:
    return "all views" if view == ALL_VIEWS else view


def _summary_cells(s: GroupSummary) -> list[str]:
    mean = "undefined" if math.isnan(s.mean_jaccard) else _pct(s.mean_jaccard)
    return [_view(s.view), s.method, mean, _pct(s.std_jaccard), _pct(s.median_jaccard),
            str(s.n_scored), str(s.n_excluded), str(s.n_false_positive), str(s.n_images), s.note]


def _paired_cells(c: PairedComparison) -> list[str]:
    ci = "—" if math.isnan(c.ci_low) else \
        f"[{_signed_pct(c.ci_low)}, {_signed_pct(c.ci_high)}] ({100 * c.confidence:g}%)"
    return [_view(c.view), f"{c.method_a} − {c.method_b}", str(c.n_pairs), _pct(c.mean_a),
            _pct(c.mean_b), _signed_pct(c.mean_difference), ci, _p(c.p_value),
            f"{c.wins} / {c.losses} / {c.ties}", c.note]


_METRICS_HEAD = ("View", "Method", "Mean J (%)", "Mean Dice (%)", "Precision (%)",
                 "Recall (%)", "HD95 (mm)", "3-D Dice per volume (%)", "Volumes", "Scored")
_VOLUME_HEAD = ("View", "Case", "Method", "Slices", "3-D Dice (%)", "Truth (px)",
                "Prediction (px)")
_METRICS_INTRO = ("Means over the scored images (empty ground truth excluded). Precision, "
                  "recall and HD95 appear where the evaluation computed them (— otherwise). "
                  "3-D Dice per volume: 2·Σoverlap / (Σprediction + Σtruth) over all the "
                  "slices of a volume (empty ones included), averaged over the volumes.")


def _mm(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.2f}"


def _metric_cells(s: GroupSummary) -> list[str]:
    return [_view(s.view), s.method, _pct(s.mean_jaccard), _pct(s.mean_dice),
            _pct(s.mean_precision), _pct(s.mean_recall), _mm(s.mean_hd95_mm),
            _pct(s.mean_volume_dice), str(s.n_volumes or "—"), str(s.n_scored)]


def _volume_cells(v) -> list[str]:
    return [v.view, v.case, v.method, str(v.n_slices), _pct(v.dice), str(v.truth_px),
            str(v.pred_px)]


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ")
                                 for c in cells) + " |"
    return "\n".join([line(head), line(["---"] * len(head)), *map(line, rows)])


def _intro(report: Report) -> tuple[str, list[str]]:
    sources = ", ".join(report.sources) or "(in-memory rows)"
    return (f"{report.n_rows} image rows from {sources}; views: "
            f"{', '.join(report.views) or 'none'}; methods: {', '.join(report.methods) or 'none'}.",
            report.notes)


def _paired_intro(report: Report) -> str:
    s = report.settings
    return (f"Paired on the same images (matched by case, view, slice; only images scored by "
            f"both methods). Interval: percentile bootstrap of the mean difference, "
            f"{s.get('n_boot')} resamples, seed {s.get('seed')}. p: two-sided Wilcoxon "
            f"signed-rank test (zero differences dropped). Points = percentage points of "
            f"Jaccard.")


def render_markdown(report: Report, *, figure_dir: str | None = "figures",
                    embed_images: bool = False) -> str:
    """The report as Markdown.

    Args:
        report: the report.
        figure_dir: folder (relative to the Markdown file) holding ``<figure stem>.png``.
        embed_images: embed the PNGs as data URIs instead of linking to ``figure_dir``.

    Returns:
        Markdown text.
    """
    intro, notes = _intro(report)
    out = [f"# {report.title}", "", intro, ""]
    out += [f"- {n}" for n in notes] + [""]
    out += ["## Jaccard per view and method", "",
            _md_table(_SUMMARY_HEAD, [_summary_cells(s) for s in report.summaries]), ""]
    out += ["## Every metric per view and method", "", _METRICS_INTRO, "",
            _md_table(_METRICS_HEAD, [_metric_cells(s) for s in report.summaries]), ""]
    if report.volumes:
        out += ["## 3-D Dice per volume", "",
                _md_table(_VOLUME_HEAD, [_volume_cells(v) for v in report.volumes]), ""]
    out += ["## Paired comparisons", "", _paired_intro(report), ""]
    if report.comparisons:
        out += [_md_table(_PAIRED_HEAD, [_paired_cells(c) for c in report.comparisons]), ""]
    else:
        out += ["Only one method is present: nothing to compare.", ""]
    if report.figures:
        out += ["## Figures", ""]
        for fig in report.figures:
            if embed_images:
                src = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
            else:
                src = f"{figure_dir}/{fig.stem}.png" if figure_dir else f"{fig.stem}.png"
            out += [f"### {fig.title}", "", f"![{fig.title}]({src})", ""]
            if fig.caption:
                out += [fig.caption, ""]
    out += ["## Provenance", ""]
    rows = flatten_provenance(report.provenance)
    out += [_md_table(("Key", "Value"), rows) if rows else "No provenance was recorded.", ""]
    return "\n".join(out)


def _is_numeric(cell: str) -> bool:
    """Whether a table cell reads as a number (right-aligned in HTML): digits with at most one
    decimal point and an optional leading sign."""
    return str(cell).replace(".", "", 1).lstrip("+-−").isdigit()


#: The HTML template (package data ``pipeline/reports/templates/report.html.j2``); autoescape is
#: on, so titles, notes, cells and provenance values are all escaped.
_HTML = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline.reports", "templates"),
    autoescape=True, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
_HTML.tests["numeric"] = _is_numeric


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (figures embedded as base64 PNG).

    Args:
        report: the report.

    Returns:
        HTML text.
    """
    intro, notes = _intro(report)
    figures = [{"title": fig.title, "caption": fig.caption,
                "png_base64": base64.b64encode(fig.png).decode("ascii")}
               for fig in report.figures]
    return _HTML.get_template("report.html.j2").render(
        title=report.title, intro=intro, notes=notes,
        summary_head=_SUMMARY_HEAD, summary_rows=[_summary_cells(s) for s in report.summaries],
        metrics_intro=_METRICS_INTRO, metrics_head=_METRICS_HEAD,
        metric_rows=[_metric_cells(s) for s in report.summaries],
        volume_head=_VOLUME_HEAD, volume_rows=[_volume_cells(v) for v in report.volumes],
        paired_intro=_paired_intro(report), paired_head=_PAIRED_HEAD,
        paired_rows=[_paired_cells(c) for c in report.comparisons],
        figures=figures, provenance_rows=flatten_provenance(report.provenance),
    )


def _csv_text(records: Sequence, cls) -> str:
    names = [f.name for f in fields(cls)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for record in records:
        row = []
        for name in names:
            value = getattr(record, name)
            row.append("" if isinstance(value, float) and math.isnan(value) else value)
        writer.writerow(row)
    return buffer.getvalue()


def write_report(report: Report, out_dir: str | os.PathLike, *,
                 formats: Sequence[str] = FORMATS, stem: str = "report") -> dict[str, Path]:
    """Write the report into ``out_dir``; every file is written atomically.

    Files: ``<stem>.md`` (+ ``figures/<name>.png`` it links to), ``<stem>.html`` (self-contained),
    ``<stem>_summary.csv`` and ``<stem>_comparisons.csv`` (one row per
    :class:`~pipeline.reports.stats.GroupSummary` /
    :class:`~pipeline.reports.stats.PairedComparison`, Jaccard as fractions, empty =
    undefined), ``<stem>_volumes.csv`` for volumes (3-D Dice per volume), ``<stem>.json``
    (the same numbers, ``null`` = undefined, with notes, settings
    and provenance).

    Args:
        report: the report.
        out_dir: output folder (created if missing).
        formats: any of :data:`FORMATS`.
        stem: base name of the files.

    Returns:
        ``{kind: path}`` with kinds ``md``, ``html``, ``summary_csv``, ``comparisons_csv``,
        ``volumes_csv`` (volumes only), ``json`` and ``figure:<name>``.

    Raises:
        ValueError: an unknown format.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown report format(s) {unknown}; choose from {FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "md" in formats:
        for fig in report.figures:
            written[f"figure:{fig.stem}"] = atomic_write_bytes(out / "figures" / f"{fig.stem}.png",
                                                              fig.png)
        written["md"] = atomic_write_text(out / f"{stem}.md", render_markdown(report))
    if "html" in formats:
        written["html"] = atomic_write_text(out / f"{stem}.html", render_html(report))
    if "csv" in formats:
        written["summary_csv"] = atomic_write_text(out / f"{stem}_summary.csv",
                                                   _csv_text(report.summaries, GroupSummary))
        written["comparisons_csv"] = atomic_write_text(
            out / f"{stem}_comparisons.csv", _csv_text(report.comparisons, PairedComparison))
        if report.volumes:
            written["volumes_csv"] = atomic_write_text(out / f"{stem}_volumes.csv",
                                                       _csv_text(report.volumes, VolumeScore))
    if "json" in formats:
        text = json.dumps(report.to_dict(), indent=2, allow_nan=False, ensure_ascii=False)
        written["json"] = atomic_write_text(out / f"{stem}.json", text + "\n")
    return written
