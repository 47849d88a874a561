"""Evaluation reports: per-image tables, statistics, figures, Markdown/HTML/CSV/JSON output."""

from __future__ import annotations

from pipeline.reports.examples import PICKS, QualitativeCase, QualitativeCases, qualitative_figures
from pipeline.reports.figures import (
    ReportFigure,
    plot_qualitative,
    plot_qualitative_grid,
    plot_training_curves,
)
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
    select_cases,
    summarize,
    wilcoxon_test,
)
from pipeline.reports.tables import (
    EVAL_COLUMNS,
    KNOWN_METHODS,
    KNOWN_VIEWS,
    OPTIONAL_COLUMNS,
    TRAINING_LOG_COLUMNS,
    EvalTable,
    concat_tables,
    evaluation_rows,
    load_tables,
    read_eval_table,
    read_training_log,
    write_eval_table,
)

__all__ = [
    "ALL_VIEWS",
    "DEFAULT_COMPARISONS",
    "EVAL_COLUMNS",
    "FORMATS",
    "KNOWN_METHODS",
    "KNOWN_VIEWS",
    "NO_LABELS_NOTE",
    "OPTIONAL_COLUMNS",
    "PICKS",
    "TRAINING_LOG_COLUMNS",
    "EvalTable",
    "GroupSummary",
    "PairedComparison",
    "QualitativeCase",
    "QualitativeCases",
    "Report",
    "ReportFigure",
    "bootstrap_ci",
    "build_report",
    "collect_provenance",
    "compare_all",
    "compare_methods",
    "concat_tables",
    "evaluation_rows",
    "flatten_provenance",
    "load_tables",
    "paired_differences",
    "plot_qualitative",
    "plot_qualitative_grid",
    "plot_training_curves",
    "qualitative_figures",
    "read_eval_table",
    "read_training_log",
    "render_html",
    "render_markdown",
    "select_cases",
    "summarize",
    "wilcoxon_test",
    "write_eval_table",
    "write_report",
]
