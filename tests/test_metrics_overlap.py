"""Jaccard/Dice edge cases under each empty policy, and agreement with MONAI's compute_iou."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_iou

from pipeline.metrics import MeanJaccard, compute_dice, compute_jaccard

E = np.zeros((4, 4), dtype=np.uint8)
F = np.ones((4, 4), dtype=np.uint8)
HALF = np.zeros((4, 4), dtype=np.uint8)
HALF[:2] = 1
# both empty, truth empty with a false positive, prediction empty, full overlap, half overlap
PRED = np.stack([E, HALF, E, F, HALF])
TRUTH = np.stack([E, E, F, F, F])


@pytest.mark.parametrize(("policy", "expected"), [
    ("exclude_empty_truth", [np.nan, np.nan, 0.0, 1.0, 0.5]),
    ("exclude_both_empty", [np.nan, 0.0, 0.0, 1.0, 0.5]),
    ("score_empty", [1.0, 0.0, 0.0, 1.0, 0.5]),
])
def test_jaccard_edge_cases_per_policy(policy, expected):
    np.testing.assert_array_equal(compute_jaccard(PRED, TRUTH, empty=policy), expected)


def test_dice_relates_to_jaccard():
    j = compute_jaccard(PRED, TRUTH, empty="score_empty")
    d = compute_dice(PRED, TRUTH, empty="score_empty")
    np.testing.assert_allclose(d, 2 * j / (1 + j))


def test_agrees_with_monai_compute_iou(rng):
    pred = (rng.random((12, 1, 9, 7)) < 0.4).astype(np.float32)
    truth = (rng.random((12, 1, 9, 7)) < 0.3).astype(np.float32)
    truth[:3] = 0  # empty ground truth, MONAI gives NaN there too
    ours = compute_jaccard(pred, truth)
    theirs = compute_iou(torch.tensor(pred), torch.tensor(truth), ignore_empty=True)[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, equal_nan=True)


def test_mean_jaccard_accumulates_and_excludes_empty_truth():
    metric = MeanJaccard()
    metric(torch.tensor(PRED[:, None]), torch.tensor(TRUTH[:, None]))
    metric(torch.tensor(PRED[3:, None]), torch.tensor(TRUTH[3:, None]))
    assert metric.aggregate().item() == pytest.approx(np.mean([0.0, 1.0, 0.5, 1.0, 0.5]))
    metric.reset()
    metric(torch.tensor(PRED[:2, None]), torch.tensor(TRUTH[:2, None]))
    assert np.isnan(metric.aggregate().item())  # nothing scored: no mean of nothing


def test_bad_metric_input():
    with pytest.raises(ValueError, match="must be binary"):
        compute_jaccard(PRED * 0.5, TRUTH)
    with pytest.raises(ValueError, match="differ in shape"):
        compute_jaccard(PRED[:2], TRUTH)
    with pytest.raises(ValueError, match="empty must be one of"):
        compute_jaccard(PRED, TRUTH, empty="ignore")
