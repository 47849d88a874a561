"""Evaluation: trained runs, saved predictions and image folders scored into per-image tables."""

from __future__ import annotations

from pipeline.evaluation.examples import PICKS, QualitativeCase, QualitativeCases
from pipeline.evaluation.folders import (
    IMAGE_TABLE_COLUMNS,
    evaluate_camus_folder,
    evaluate_image_folder,
)
from pipeline.evaluation.predictions import (
    IMAGE_SUFFIXES,
    evaluate_predictions,
    prediction_candidates,
)
from pipeline.evaluation.runs import (
    Evaluation,
    collect_examples,
    evaluate_runs,
    evaluate_runs_with_examples,
    predict_samples,
)
from pipeline.evaluation.samples import evaluation_entries, evaluation_samples, multiview_samples
from pipeline.evaluation.tables import (
    EVAL_COLUMNS,
    KNOWN_METHODS,
    KNOWN_VIEWS,
    OPTIONAL_COLUMNS,
    EvalTable,
    concat_tables,
    evaluation_rows,
    load_tables,
    read_eval_table,
    select_cases,
    write_eval_table,
)

__all__ = [
    "EVAL_COLUMNS",
    "IMAGE_SUFFIXES",
    "IMAGE_TABLE_COLUMNS",
    "KNOWN_METHODS",
    "KNOWN_VIEWS",
    "OPTIONAL_COLUMNS",
    "PICKS",
    "EvalTable",
    "Evaluation",
    "QualitativeCase",
    "QualitativeCases",
    "collect_examples",
    "concat_tables",
    "evaluate_camus_folder",
    "evaluate_image_folder",
    "evaluate_predictions",
    "evaluate_runs",
    "evaluate_runs_with_examples",
    "evaluation_entries",
    "evaluation_rows",
    "evaluation_samples",
    "load_tables",
    "multiview_samples",
    "predict_samples",
    "prediction_candidates",
    "read_eval_table",
    "select_cases",
    "write_eval_table",
]
