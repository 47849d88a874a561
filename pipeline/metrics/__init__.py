"""Evaluation metrics: empty-mask-aware Jaccard and Dice."""

from __future__ import annotations

from pipeline.metrics.overlap import EMPTY_POLICIES, MeanJaccard, compute_dice, compute_jaccard

__all__ = ["EMPTY_POLICIES", "MeanJaccard", "compute_dice", "compute_jaccard"]
