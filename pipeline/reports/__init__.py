"""Reports: statistics, figures and Markdown/HTML/CSV/JSON output of evaluation tables."""

from __future__ import annotations

from pipeline.reports.examples import qualitative_figures
from pipeline.reports.figures import (
    ReportFigure,
    plot_qualitative,
    plot_qualitative_grid,
    plot_training_curves,
)
from pipeline.reports.logs import TRAINING_LOG_COLUMNS, read_training_log
from pipeline.reports.provenance import collect_provenance, flatten_provenance
from pipeline.reports.render import FORMATS, render_html, render_markdown, write_report
from pipeline.reports.report import Report, build_report
from pipeline.reports.stats import (
    ALL_VIEWS,
    DEFAULT_COMPARISONS,
    NO_LABELS_NOTE,
    GroupSummary,
    PairedComparison,
    bootstrap_ci,
    compare_all,
    compare_methods,
    paired_differences,
    summarize,
    wilcoxon_test,
)

__all__ = [
    "ALL_VIEWS",
    "DEFAULT_COMPARISONS",
    "FORMATS",
    "NO_LABELS_NOTE",
    "TRAINING_LOG_COLUMNS",
    "GroupSummary",
    "PairedComparison",
    "Report",
    "ReportFigure",
    "bootstrap_ci",
    "build_report",
    "collect_provenance",
    "compare_all",
    "compare_methods",
    "flatten_provenance",
    "paired_differences",
    "plot_qualitative",
    "plot_qualitative_grid",
    "plot_training_curves",
    "qualitative_figures",
    "read_training_log",
    "render_html",
    "render_markdown",
    "summarize",
    "wilcoxon_test",
    "write_report",
]
