"""Evaluation metrics: empty-mask-aware Jaccard and Dice, precision, recall, HD95."""

from __future__ import annotations

from pipeline.metrics.overlap import EMPTY_POLICIES, MeanJaccard, compute_dice, compute_jaccard
from pipeline.metrics.surface import (
    HausdorffDistance95,
    MeanPrecision,
    MeanRecall,
    compute_hd95,
    compute_precision,
    compute_recall,
    mask_edges,
)

__all__ = [
    "EMPTY_POLICIES",
    "HausdorffDistance95",
    "MeanJaccard",
    "MeanPrecision",
    "MeanRecall",
    "compute_dice",
    "compute_hd95",
    "compute_jaccard",
    "compute_precision",
    "compute_recall",
    "mask_edges",
]
