"""Bad input to the CRF gets a ValueError that names what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.crf import (
    CRFWeights,
    MarginQP,
    MaxMarginLoss,
    energy,
    learn_weights,
    loss_augmented_labelling,
    map_labelling,
)

PROB = np.full((4, 5), 0.5)
IMAGE = np.zeros((4, 5))
TRUTH = np.zeros((4, 5), dtype=np.uint8)
W = CRFWeights(1.0, 0.5, 0.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"w1": -1.0}, "w1 must be finite and >= 0"),
    ({"w2": -0.1}, "w2 must be finite and >= 0"),
    ({"w3": float("nan")}, "w3 must be finite and >= 0"),
])
def test_negative_or_nan_weights_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CRFWeights(**kwargs)


@pytest.mark.parametrize(("prob", "image", "message"), [
    (np.full((4, 6), 0.5), IMAGE, "image must be H×W or C×H×W"),
    (PROB, np.zeros((3, 4, 6)), "image must be H×W or C×H×W"),
    (np.full((4, 5), 1.5), IMAGE, r"prob must lie in \[0, 1\]"),
    (np.where(np.eye(4, 5) > 0, np.nan, 0.5), IMAGE, "prob contains NaN"),
    (np.full((2, 4, 5), 0.5), IMAGE, "prob must be a non-empty H×W array"),
    (PROB, np.where(np.eye(4, 5) > 0, np.inf, 0.0), "image contains NaN or infinite"),
])
def test_map_labelling_rejects_bad_arrays(prob, image, message):
    with pytest.raises(ValueError, match=message):
        map_labelling(prob, image, W)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        map_labelling(PROB, IMAGE, W, connectivity=6)
    with pytest.raises(ValueError, match="beta must be None"):
        map_labelling(PROB, IMAGE, W, beta=-1.0)
    with pytest.raises(ValueError, match="weights must be a CRFWeights"):
        map_labelling(PROB, IMAGE, (1.0, 0.0, 0.0))


def test_non_binary_or_misshapen_truth_is_refused():
    with pytest.raises(ValueError, match="truth must be binary"):
        loss_augmented_labelling(PROB, IMAGE, W, TRUTH + 2)
    with pytest.raises(ValueError, match=r"truth must have shape \(4, 5\)"):
        loss_augmented_labelling(PROB, IMAGE, W, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="labelling must be binary"):
        energy(np.full((4, 5), 0.5), PROB, IMAGE, W)
    # uint8, the cuts' own dtype, is checked on its own (shorter) path
    bad = np.zeros((4, 5), dtype=np.uint8)
    bad[3, 4] = 2
    with pytest.raises(ValueError, match="truth must be binary"):
        loss_augmented_labelling(PROB, IMAGE, W, bad)
    with pytest.raises(ValueError, match="labelling must be binary"):
        energy(bad, PROB, IMAGE, W)


def test_learn_weights_rejects_empty_and_mismatched_batches():
    with pytest.raises(ValueError, match="empty batch"):
        learn_weights([], [], [])
    with pytest.raises(ValueError, match="differ in length"):
        learn_weights([PROB, PROB], [IMAGE], [TRUTH, TRUTH])
    with pytest.raises(ValueError, match=r"sample 1: prob must lie in \[0, 1\]"):
        learn_weights([PROB, PROB * 3], [IMAGE, IMAGE], [TRUTH, TRUTH])
    with pytest.raises(ValueError, match="truth 0 must be binary"):
        learn_weights([PROB], [IMAGE], [TRUTH + 0.5])
    with pytest.raises(ValueError, match="C must be a positive finite number"):
        learn_weights([PROB], [IMAGE], [TRUTH], C=0.0)
    with pytest.raises(ValueError, match="at least one sample"):
        MarginQP(0, 1.0)


def test_max_margin_loss_rejects_bad_batches():
    loss = MaxMarginLoss()
    logits = torch.zeros(2, 1, 4, 5)
    images = torch.zeros(2, 1, 4, 5)
    truths = torch.zeros(2, 1, 4, 5)
    with pytest.raises(ValueError, match="logits must be B×1×H×W or B×2×H×W"):
        loss(torch.zeros(2, 3, 4, 5), images, truths)
    with pytest.raises(ValueError, match="empty batch"):
        loss(logits[:0], images[:0], truths[:0])
    with pytest.raises(ValueError, match="images must be B×C×H×W"):
        loss(logits, torch.zeros(2, 1, 5, 4), truths)
    with pytest.raises(ValueError, match="truths must be B×1×H×W"):
        loss(logits, images, torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="truths must be binary"):
        loss(logits, images, truths + 0.3)
    with pytest.raises(ValueError, match="batch sample 1: logits contain NaN"):
        bad = logits.clone()
        bad[1, 0, 0, 0] = float("nan")
        loss(bad, images, truths)
    with pytest.raises(ValueError, match="C must be a positive finite number"):
        MaxMarginLoss(C=-1.0)
