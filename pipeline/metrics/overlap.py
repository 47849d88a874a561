"""Empty-mask-aware overlap metrics (Jaccard, Dice) per image, functional and class API."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric

__all__ = ["EMPTY_POLICIES", "MeanJaccard", "compute_dice", "compute_jaccard"]

EmptyPolicy = Literal["exclude_empty_truth", "exclude_both_empty", "score_empty"]
#: How images with an empty ground truth are scored:
#: ``exclude_empty_truth`` (the paper; MONAI's ``ignore_empty=True``): NaN, left out of the mean;
#: ``exclude_both_empty`` (nnU-Net): NaN only when the prediction is empty too, else 0;
#: ``score_empty``: 1 when both are empty, 0 when the prediction is not.
EMPTY_POLICIES: tuple[str, ...] = ("exclude_empty_truth", "exclude_both_empty", "score_empty")


def _as_flat_binary(x, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim < 2:
        raise ValueError(f"{name} must be batch-first (B×H×W, B×1×H×W or B×1×H×W×D), "
                         f"got shape {arr.shape}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be binary (0/1); threshold probabilities first")
    return arr.reshape(arr.shape[0], -1).astype(bool)


def _overlap(y_pred, y, empty: str):
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    pred = _as_flat_binary(y_pred, "y_pred")
    truth = _as_flat_binary(y, "y")
    if pred.shape != truth.shape:
        raise ValueError(f"y_pred and y differ in shape: {np.shape(y_pred)} vs {np.shape(y)}")
    inter = np.count_nonzero(pred & truth, axis=1).astype(np.float64)
    size_p = np.count_nonzero(pred, axis=1).astype(np.float64)
    size_t = np.count_nonzero(truth, axis=1).astype(np.float64)
    return inter, size_p, size_t


def _apply_policy(score: np.ndarray, size_p: np.ndarray, size_t: np.ndarray, empty: str):
    truth_empty = size_t == 0
    pred_empty = size_p == 0
    if empty == "exclude_empty_truth":
        score[truth_empty] = np.nan
    elif empty == "exclude_both_empty":
        score[truth_empty & pred_empty] = np.nan
        score[truth_empty & ~pred_empty] = 0.0
    else:
        score[truth_empty & pred_empty] = 1.0
        score[truth_empty & ~pred_empty] = 0.0
    return score


def compute_jaccard(y_pred, y, *, empty: EmptyPolicy = "exclude_empty_truth") -> np.ndarray:
    """Jaccard index |A∩B|/|A∪B| of each image (or volume) of a batch.

    Args:
        y_pred: binary predictions, batch-first (B×H×W, B×1×H×W, B×1×H×W×D; array or tensor).
        y: binary ground truth of the same shape.
        empty: policy for empty ground truth, one of :data:`EMPTY_POLICIES`.

    Returns:
        (B,) float64 scores; NaN marks an image excluded by the policy.

    Raises:
        ValueError: shapes differ, inputs are not binary, or the policy is unknown.
    """
    inter, size_p, size_t = _overlap(y_pred, y, empty)
    union = size_p + size_t - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(union > 0, inter / union, np.nan)
    return _apply_policy(score, size_p, size_t, empty)


def compute_dice(y_pred, y, *, empty: EmptyPolicy = "exclude_empty_truth") -> np.ndarray:
    """Dice coefficient 2|A∩B|/(|A|+|B|) of each image; same conventions as
    :func:`compute_jaccard`."""
    inter, size_p, size_t = _overlap(y_pred, y, empty)
    total = size_p + size_t
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(total > 0, 2 * inter / total, np.nan)
    return _apply_policy(score, size_p, size_t, empty)


class _MeanOverScored(CumulativeIterationMetric):
    """Accumulates a per-image score; ``aggregate`` averages the non-NaN ones (NaN if none)."""

    def _score(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> np.ndarray:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs):
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the ground truth y")
        return torch.as_tensor(self._score(y_pred, y, **kwargs))[:, None]

    def aggregate(self) -> torch.Tensor:
        """Mean over the images scored so far (NaN if none was scored)."""
        data = self.get_buffer()
        if data is None or data.numel() == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        values = data.reshape(-1)
        scored = values[~torch.isnan(values)]
        return scored.mean() if scored.numel() else torch.tensor(float("nan"), dtype=torch.float64)


class MeanJaccard(_MeanOverScored):
    """Accumulates per-image Jaccard over iterations; ``aggregate`` gives the mean over scored
    images (NaN when none was scored: a mean of nothing is not reported as a number).

    Args:
        empty: policy for empty ground truth, one of :data:`EMPTY_POLICIES`.
    """

    def __init__(self, empty: EmptyPolicy = "exclude_empty_truth") -> None:
        super().__init__()
        if empty not in EMPTY_POLICIES:
            raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
        self.empty = empty

    def _score(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> np.ndarray:
        return compute_jaccard(y_pred, y, empty=self.empty)
