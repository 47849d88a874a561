"""The boundary head's supervised outline loss: the learned pairwise term from the CNN stage on."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch

from pipeline.crf.loss import label_outline, outline_loss
from pipeline.engines import TrainConfig, train
from pipeline.models import build_model, load_checkpoint, load_run, predict_maps
from tests.test_engines_training import TINY_NET, _samples

LP_NET = {**TINY_NET, "boundary_head": True}


def _outline_oracle(y: np.ndarray, connectivity: int) -> np.ndarray:
    """Pixel by pixel: does any grid neighbour carry the other label?"""
    steps = ([(0, 1), (1, 0), (0, -1), (-1, 0)] if connectivity == 4
             else [(a, b) for a, b in itertools.product((-1, 0, 1), repeat=2) if (a, b) != (0, 0)])
    h, w = y.shape
    out = np.zeros_like(y, dtype=bool)
    for r in range(h):
        for c in range(w):
            out[r, c] = any(0 <= r + dr < h and 0 <= c + dc < w and y[r + dr, c + dc] != y[r, c]
                            for dr, dc in steps)
    return out


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_outline_marks_both_pixels_of_every_cut_edge(connectivity):
    rng = np.random.default_rng(connectivity)
    labels = np.stack([rng.random((7, 9)) < p for p in (0.1, 0.5, 0.9)]).astype(np.float32)
    labels = np.concatenate([labels, np.zeros((1, 7, 9), np.float32)])  # no outline at all
    got = label_outline(torch.as_tensor(labels), connectivity).numpy()
    for y, g in zip(labels, got, strict=True):
        np.testing.assert_array_equal(g, _outline_oracle(y, connectivity))
    assert not got[-1].any()
    # one image without a batch axis gives the same
    np.testing.assert_array_equal(label_outline(torch.as_tensor(labels[1]), connectivity).numpy(),
                                  got[1])
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        label_outline(torch.as_tensor(labels), 6)


def test_outline_loss_is_hed_class_balanced_cross_entropy():
    rng = np.random.default_rng(0)
    labels = np.zeros((3, 10, 12), np.float32)
    labels[0, 2:7, 3:9] = 1
    labels[1, 4:, :5] = 1
    # image 2 is empty: no outline, so it adds nothing
    logits = rng.normal(0, 2, labels.shape).astype(np.float64)
    got = outline_loss(torch.as_tensor(logits), torch.as_tensor(labels))
    # an independent computation in NumPy, image by image
    per_image = []
    for x, y in zip(logits, labels, strict=True):
        t = _outline_oracle(y, 4).astype(np.float64)
        frac = t.mean()
        weight = np.where(t > 0, 1 - frac, frac)
        p = 1 / (1 + np.exp(-x))
        per_image.append(np.mean(-weight * (t * np.log(p) + (1 - t) * np.log(1 - p))))
    assert per_image[2] == 0.0
    np.testing.assert_allclose(float(got), np.mean(per_image), rtol=1e-10)
    # its gradient at b = 0.5 pulls b up on the outline and down elsewhere
    zero = torch.zeros(labels.shape, dtype=torch.float64, requires_grad=True)
    outline_loss(zero, torch.as_tensor(labels)).backward()
    t = label_outline(torch.as_tensor(labels))
    assert (zero.grad[t] < 0).all() and (zero.grad[:2][~t[:2]] > 0).all()
    assert (zero.grad[2] == 0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        outline_loss(torch.zeros(3, 10, 11), torch.as_tensor(labels))


def test_boundary_weight_needs_the_learned_edge_feature():
    assert TrainConfig().boundary_weight == 0.0
    with pytest.raises(ValueError, match="set learned_pairwise too"):
        TrainConfig(boundary_weight=1.0)
    with pytest.raises(ValueError, match="boundary_weight must be >= 0"):
        TrainConfig(boundary_weight=-1.0, learned_pairwise=True)


def _separation(model, samples) -> float:
    """Mean b on the ground truth's outline minus mean b elsewhere, over ``samples``."""
    images = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["label"][0]) for s in samples])
    _, edges = predict_maps(model, images)
    on = label_outline(labels)
    return float(edges[on].mean() - edges[~on].mean())


def test_the_cnn_stage_teaches_the_head_the_outline_and_piecewise_keeps_it(tmp_path):
    """With ``boundary_weight`` the cnn stage trains the head on the outline (without it the
    head stays frozen: test_learned_pairwise_model); on held-out images its map is then
    higher on the outline than off it, which the fresh head's is not. The piecewise stage,
    whose network is frozen, leaves the head as the cnn stage left it and learns w4 on it."""
    data = _samples(12, 0), _samples(4, 100)
    cnn = train(TrainConfig(mode="cnn", epochs=12, batch_size=2, lr=1e-2, network=TINY_NET,
                            learned_pairwise=True, boundary_weight=1.0), *data, tmp_path / "cnn")
    payload = load_checkpoint(cnn.last_checkpoint)
    torch.manual_seed(0)  # the trainer's seed before it builds the network
    fresh = build_model(LP_NET).eval()
    model, _, _ = load_run(cnn.last_checkpoint)
    before, after = _separation(fresh, data[1]), _separation(model, data[1])
    assert abs(before) < 0.05 and after > 0.15, (before, after)
    assert len(payload["optimizer"]["param_groups"]) == 2  # the head learns, in its own group
    with open(cnn.run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train_boundary_loss"]) for r in rows]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    piecewise = train(TrainConfig(mode="piecewise", batch_size=4, C=10.0, network=TINY_NET,
                                  learned_pairwise=True, boundary_weight=1.0), *data,
                      tmp_path / "piecewise", init=cnn.last_checkpoint)
    learned = load_checkpoint(piecewise.last_checkpoint)
    for key, value in payload["model"].items():
        torch.testing.assert_close(learned["model"][key], value, rtol=0, atol=0)
    assert len(learned["crf"]) == 4 and learned["crf"][3] > 0


def test_mmcrf_train_takes_the_outline_loss_and_the_grid(tmp_path):
    import json

    from pipeline.cli import main

    out = tmp_path / "run"
    assert main(["train", "--mode", "cnn", "--data", "demo", "--root", str(tmp_path / "data"),
                 "--size", "32", "--epochs", "1", "--learned-pairwise", "--boundary-weight",
                 "0.5", "--connectivity", "8", "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["boundary_weight"], config["connectivity"]) == (0.5, 8)
    assert config["network"]["boundary_head"] is True
    with open(out / "log.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["train_boundary_loss"]) > 0
