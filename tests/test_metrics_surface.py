"""Precision, recall and HD95: edge cases, a brute-force oracle, MONAI agreement, volumes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from monai.metrics.utils import get_mask_edges
from scipy import ndimage
from scipy.spatial.distance import cdist

from pipeline.metrics import (
    HausdorffDistance95,
    MeanPrecision,
    MeanRecall,
    compute_hd95,
    compute_jaccard,
    compute_precision,
    compute_recall,
    mask_edges,
)

E = np.zeros((4, 4), dtype=np.uint8)
F = np.ones((4, 4), dtype=np.uint8)
HALF = np.zeros((4, 4), dtype=np.uint8)
HALF[:2] = 1
# both empty, truth empty with a false positive, prediction empty, full overlap, half overlap
PRED = np.stack([E, HALF, E, F, HALF])
TRUTH = np.stack([E, E, F, F, F])


def test_precision_recall_edge_cases():
    np.testing.assert_array_equal(compute_precision(PRED, TRUTH), [np.nan, 0.0, np.nan, 1.0, 1.0])
    np.testing.assert_array_equal(compute_recall(PRED, TRUTH), [np.nan, np.nan, 0.0, 1.0, 0.5])


def test_precision_recall_random_against_counts(rng):
    pred = rng.random((6, 1, 8, 9)) < 0.4
    truth = rng.random((6, 1, 8, 9)) < 0.5
    tp = (pred & truth).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(compute_precision(pred.astype(np.uint8), truth.astype(np.uint8)),
                               tp / pred.sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(compute_recall(torch.tensor(pred).float(), torch.tensor(truth)
                                              .float()), tp / truth.sum(axis=(1, 2, 3)))


def test_precision_counts_exact_beyond_float32():
    # more true negatives than float32 counts exactly (2**24): MONAI's float32 confusion matrix
    # gets fp wrong here (2108 for 2109, see pipeline/metrics/surface.py); integer counts do not
    truth = np.zeros((1, 4200, 4200), np.uint8)
    truth[0, 100:400, 200:500] = 1
    pred = np.roll(truth, 7, axis=1)
    pred[0, 5:8, 5:8] = 1
    tp = int(np.count_nonzero(pred & truth))
    assert compute_precision(pred, truth)[0] == tp / int(np.count_nonzero(pred))
    assert compute_recall(pred, truth)[0] == tp / int(np.count_nonzero(truth))


def test_mean_precision_recall_classes():
    precision, recall = MeanPrecision(), MeanRecall()
    precision(torch.tensor(PRED[:, None]), torch.tensor(TRUTH[:, None]))
    recall(torch.tensor(PRED[:, None]), torch.tensor(TRUTH[:, None]))
    assert precision.aggregate().item() == pytest.approx(2 / 3)
    assert recall.aggregate().item() == pytest.approx(0.5)
    recall.reset()
    recall(torch.tensor(PRED[:2, None]), torch.tensor(TRUTH[:2, None]))
    assert np.isnan(recall.aggregate().item())  # no labelled image: no mean of nothing


def _boundary_oracle(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (outside the array counts as outside),
    found by explicit neighbour shifts rather than morphology."""
    padded = np.pad(mask.astype(bool), 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = padded[inner].copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[inner]
    return mask.astype(bool) & ~interior


@pytest.mark.parametrize("shape", [(19, 23), (11, 9, 8)])
def test_mask_edges_are_monais(rng, shape):
    for mask in _blobs(rng, shape, 4).astype(bool):
        mask[(0,) * mask.ndim] = True  # a voxel on the array border is a boundary voxel
        theirs = get_mask_edges(mask, mask, crop=False)[0]
        np.testing.assert_array_equal(mask_edges(mask), theirs)
        np.testing.assert_array_equal(mask_edges(mask), _boundary_oracle(mask))


def _hd_oracle(pred: np.ndarray, truth: np.ndarray, spacing, q: float = 95.0) -> float:
    """Brute force: all pairwise distances between the boundary voxel sets (in mm)."""
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (pred.ndim,))
    bp = np.argwhere(_boundary_oracle(pred)) * sp
    bt = np.argwhere(_boundary_oracle(truth)) * sp
    d = cdist(bp, bt)
    return max(np.percentile(d.min(axis=1), q), np.percentile(d.min(axis=0), q))


def _blobs(rng, shape, n):
    """Random binary blobs (smoothed noise) so boundaries are irregular but not pure noise."""
    noise = ndimage.gaussian_filter(rng.random((n, *shape)), sigma=(0, *[1.2] * len(shape)))
    return (noise > np.median(noise)).astype(np.uint8)


@pytest.mark.parametrize(("shape", "spacing"), [
    ((19, 23), (0.7, 1.3)),
    ((11, 9, 8), (0.5, 0.8, 2.5)),
])
def test_hd95_matches_bruteforce_oracle(rng, shape, spacing):
    pred, truth = _blobs(rng, shape, 4), _blobs(rng, shape, 4)
    ours = compute_hd95(pred[:, None], truth[:, None], spacing=spacing)
    oracle = [_hd_oracle(p, t, spacing) for p, t in zip(pred, truth, strict=True)]
    np.testing.assert_allclose(ours, oracle, rtol=1e-12)
    full = compute_hd95(pred[:, None], truth[:, None], spacing=spacing, percentile=100)
    np.testing.assert_allclose(full, [_hd_oracle(p, t, spacing, 100) for p, t in
                                      zip(pred, truth, strict=True)], rtol=1e-12)


@pytest.mark.parametrize(("shape", "spacing"), [
    ((6, 1, 20, 17), (0.7, 1.3)),
    ((3, 1, 12, 10, 9), (0.5, 0.8, 2.5)),
])
def test_hd95_agrees_with_monai(rng, shape, spacing):
    pred = (rng.random(shape) < 0.3).astype(np.float32)
    truth = (rng.random(shape) < 0.3).astype(np.float32)
    ours = compute_hd95(pred, truth, spacing=spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = compute_hausdorff_distance(torch.tensor(pred), torch.tensor(truth),
                                            percentile=95, spacing=list(spacing))[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_hd_of_a_shifted_square_uses_spacing_per_axis():
    truth = np.zeros((1, 1, 20, 20), np.uint8)
    truth[0, 0, 4:12, 5:13] = 1
    pred = np.roll(truth, 3, axis=2)  # 3 rows down (axis 0 of the image)
    assert compute_hd95(pred, truth, spacing=(2.0, 0.5), percentile=100)[0] == pytest.approx(6.0)
    assert compute_hd95(pred, truth, spacing=(0.5, 2.0), percentile=100)[0] == pytest.approx(1.5)
    assert compute_hd95(truth, truth, spacing=(2.0, 0.5))[0] == 0.0


def test_hd95_empty_policy_and_shapes():
    # both empty, truth empty, prediction empty → NaN; identical → 0
    out = compute_hd95(PRED, TRUTH, spacing=1.0)
    assert np.isnan(out[:3]).all()
    assert out[3] == 0.0 and out[4] > 0
    np.testing.assert_array_equal(compute_hd95(PRED[:, None], TRUTH[:, None]), out)
    per_item = compute_hd95(PRED, TRUTH, spacing=np.array([[1.0, 1.0]] * 4 + [[3.0, 3.0]]))
    assert per_item[4] == pytest.approx(3 * out[4])
    with pytest.raises(ValueError, match="spatial axes"):
        compute_hd95(PRED, TRUTH, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="must be binary"):
        compute_hd95(PRED * 0.5, TRUTH)
    with pytest.raises(ValueError, match="positive"):
        compute_hd95(PRED, TRUTH, spacing=(0.0, 1.0))
    with pytest.raises(ValueError, match="size 1"):
        compute_hd95(np.stack([PRED, PRED], 1), np.stack([TRUTH, TRUTH], 1))


def test_hausdorff_class_takes_spacing_per_call():
    metric = HausdorffDistance95(spacing=(1.0, 1.0))
    metric(torch.tensor(PRED[:, None]), torch.tensor(TRUTH[:, None]))
    metric(torch.tensor(PRED[4:, None]), torch.tensor(TRUTH[4:, None]), spacing=(2.0, 2.0))
    single = compute_hd95(PRED[4:], TRUTH[4:])[0]
    assert metric.aggregate().item() == pytest.approx(np.mean([0.0, single, 2 * single]))
    metric.reset()
    metric(torch.tensor(PRED[:3, None]), torch.tensor(TRUTH[:3, None]))
    assert np.isnan(metric.aggregate().item())


def test_per_volume_jaccard_on_b1hwd(rng):
    pred = (rng.random((3, 1, 7, 6, 5)) < 0.5).astype(np.uint8)
    truth = (rng.random((3, 1, 7, 6, 5)) < 0.5).astype(np.uint8)
    truth[2] = 0
    inter = (pred & truth).reshape(3, -1).sum(1)
    union = (pred | truth).reshape(3, -1).sum(1)
    expected = [inter[0] / union[0], inter[1] / union[1], np.nan]
    np.testing.assert_allclose(compute_jaccard(pred, truth), expected)
