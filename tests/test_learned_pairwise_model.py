"""The learned pairwise term end to end (issue 20): the network's boundary head, joint
training of it from γ's gradient, and inference that feeds its map to the graph cuts."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from pipeline.crf import (
    CRFWeights,
    GraphCutPool,
    GridCRF,
    graph_cut,
    map_labelling,
    volume_map_labelling,
)
from pipeline.data import noisy_blocks
from pipeline.engines import TrainConfig, train
from pipeline.evaluation.runs import predict_samples
from pipeline.inference.images import predict_image
from pipeline.inference.inferer import SliceResizeInferer
from pipeline.inference.predictor import TrainedModel
from pipeline.models import (
    build_model,
    load_checkpoint,
    load_run,
    predict_maps,
    predict_probabilities,
    save_checkpoint,
)
from pipeline.networks import FCN8s, boundary_outputs, load_network_state, split_boundary
from pipeline.transforms import GraphCutCRF, crf_settings
from tests.test_engines_training import TINY_NET, _samples

LP_NET = {**TINY_NET, "boundary_head": True}


def test_a_boundary_head_changes_nothing_until_asked_for():
    torch.manual_seed(0)
    plain = FCN8s.lite(3).eval()
    headed = FCN8s.lite(3, boundary_head=True).eval()
    assert load_network_state(headed, plain.state_dict())  # the head's keys were missing
    x = torch.rand(2, 3, 50, 67)
    torch.testing.assert_close(headed(x), plain(x), rtol=0, atol=0)
    with boundary_outputs(headed) as on:
        out = headed(x)
    assert on and out.shape == (2, 2, 50, 67) and not headed.emit_boundary
    logits, edges = split_boundary(out, on)
    torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)
    assert edges.shape == (2, 50, 67)
    with boundary_outputs(plain) as on:  # a network without a head: nothing changes
        assert not on and plain(x).shape == (2, 1, 50, 67)
    # both script (the bundles' TorchScript export); the scripted head still emits
    for net in (plain, headed):
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))
    # the segmentation part of a trained network must fit: other missing keys are refused
    state = plain.state_dict()
    del state["score_fr.bias"]
    with pytest.raises(RuntimeError, match=r"score_fr\.bias"):
        load_network_state(FCN8s.lite(3, boundary_head=True), state)


def test_predicted_maps_average_the_boundary_over_flips_too():
    torch.manual_seed(1)
    net = FCN8s(1, width=1 / 16, batch_norm=True, fc_kernel=3, fc_channels=16,
                boundary_head=True).eval()
    with torch.no_grad():
        net.boundary.score_pool3.weight.normal_(0, 1.0)  # a boundary map that is not flat
    x = torch.rand(3, 1, 40, 40)
    probs, edges = predict_maps(net, x)
    # the same logits in another memory layout: the vectorised sigmoid may differ by an ulp
    torch.testing.assert_close(probs, predict_probabilities(net, x), rtol=0, atol=1e-6)
    with boundary_outputs(net):
        expected = torch.sigmoid(net(x)[:, 1])
    torch.testing.assert_close(edges, expected)
    flips = ((), (-1,))
    _, flipped = predict_maps(net, x, flips=flips)
    with boundary_outputs(net):
        mirrored = torch.sigmoid(net(torch.flip(x, (-1,)))[:, 1]).flip(-1)
    torch.testing.assert_close(flipped, (expected + mirrored) / 2)
    assert predict_maps(net, x, boundary=False)[1] is None


@pytest.mark.parametrize("connectivity", [4, 8])
def test_map_labelling_with_a_boundary_map_is_the_full_graph_cut(connectivity):
    """Persistency (only the box of undecided pixels is cut) and the pool give the labelling
    of the whole grid's cut with the learned edge feature, bit for bit."""
    weights = CRFWeights(0.4, 0.05, 0.3, 0.6)
    cases = []
    for seed in range(4):
        s = noisy_blocks((48, 40), rng=seed, noise=1.5)
        rng = np.random.default_rng(seed)
        edge = np.abs(np.gradient(s.truth.astype(float))).sum(0) > 0
        boundary = np.clip(0.8 * edge + 0.2 * rng.random(s.truth.shape), 0, 1)
        cases.append((s.prob, s.image, boundary.astype(np.float32)))
    k = {"connectivity": connectivity}
    full = [graph_cut(GridCRF.from_probabilities(p, x, boundary=b, **k), weights)
            for p, x, b in cases]
    assert any(not np.array_equal(f, graph_cut(GridCRF.from_probabilities(p, x, **k), weights))
               for f, (p, x, _) in zip(full, cases, strict=True))  # the term matters here
    for (p, x, b), f in zip(cases, full, strict=True):
        np.testing.assert_array_equal(map_labelling(p, x, weights, boundary=b, **k), f)
    with GraphCutPool(1) as pool:
        got = pool.map_labellings([c[0] for c in cases], [c[1] for c in cases], weights,
                                  boundaries=[c[2] for c in cases], **k)
        pending = pool.submit_map_labellings([c[0] for c in cases], [c[1] for c in cases],
                                             weights, boundaries=[c[2] for c in cases], **k)
        late = pending.result()
        with pytest.raises(ValueError, match="2 boundary maps"):
            pool.map_labellings([c[0] for c in cases], [c[1] for c in cases], weights,
                                boundaries=[c[2] for c in cases[:2]])
    for a, b, f in zip(got, late, full, strict=True):
        np.testing.assert_array_equal(a, f)
        np.testing.assert_array_equal(b, f)


@pytest.fixture(scope="module")
def lp_runs(tmp_path_factory):
    """A tiny CNN without a boundary head, its piecewise CRF, then joint training with the
    learned pairwise term started from it (the head grown onto the trained network)."""
    root = tmp_path_factory.mktemp("lp")
    data = _samples(12, 0), _samples(4, 100)
    base = {"batch_size": 4, "C": 10.0, "network": TINY_NET}
    cnn = train(TrainConfig(mode="cnn", epochs=10, lr=1e-2, **{**base, "batch_size": 2}),
                *data, root / "cnn")
    piecewise = train(TrainConfig(mode="piecewise", **base), *data, root / "piecewise",
                      init=cnn.best_checkpoint)
    joint = train(TrainConfig(mode="joint", epochs=3, lr=1e-4, boundary_lr=1e-2,
                              learned_pairwise=True, **base), *data, root / "joint",
                  init=piecewise.best_checkpoint)
    return data, piecewise, joint


def test_joint_training_learns_the_boundary_head_and_w4(lp_runs):
    _, _, joint = lp_runs
    payload = load_checkpoint(joint.best_checkpoint)
    assert payload["network"]["boundary_head"] is True
    assert len(payload["crf"]) == 4 and payload["crf"][3] > 0
    assert joint.weights.w4 > 0
    with open(joint.run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["w4"]) > 0 for r in rows)
    # the head moved away from its initialisation (its only gradient is γ's), at its own
    # learning rate: Adam's second parameter group
    torch.manual_seed(0)  # the trainer's seed before it builds the network
    fresh = build_model(LP_NET)
    trained = payload["model"]
    moved = max(float((trained[k] - v).abs().max())
                for k, v in fresh.state_dict().items() if k.startswith("boundary.score"))
    assert moved > 1e-2
    groups = payload["optimizer"]["param_groups"]
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, pytest.approx(100.0)]


def test_a_learned_pairwise_model_segments_with_its_boundary_map(lp_runs):
    data, piecewise, joint = lp_runs
    model, weights, _ = load_run(joint.best_checkpoint)
    vm = TrainedModel.from_checkpoint(joint.best_checkpoint)
    assert vm.learned_pairwise and len(vm.describe()["crf_weights"]) == 4
    val = data[1]
    images = torch.stack([torch.as_tensor(s["image"]) for s in val])
    probs, edges = predict_maps(model, images)
    expected = [map_labelling(p, x, weights, boundary=b)
                for p, x, b in zip(probs.numpy(), images.numpy(), edges.numpy(), strict=True)]
    without = [map_labelling(p, x, weights) for p, x in zip(probs.numpy(), images.numpy(),
                                                               strict=True)]
    assert 0.05 < np.mean(expected) < 0.6  # masks with foreground (the blocks)
    assert any(not np.array_equal(a, b) for a, b in zip(expected, without, strict=True))
    _, crf = predict_samples(model, weights, val, batch_size=3)
    for got, want in zip(crf, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # a photograph through mmcrf's image path: the same boundary map reaches the cut
    prob, mask = predict_image(vm, val[0]["image"])
    np.testing.assert_allclose(prob, probs[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(mask, expected[0])
    # echo frames (FramePredictor, in this process and with a graph-cut worker) likewise
    from pipeline.inference.frames import FramePredictor

    frames = images[:, 0].numpy()
    for workers in (0, 1):
        with FramePredictor(joint.best_checkpoint, workers=workers) as predictor:
            got = predictor.predict(frames).crf
        for mask, want in zip(got, expected, strict=True):
            np.testing.assert_array_equal(mask, want)
    # the MONAI transforms: the inferer's second channel is the map, GraphCutCRF cuts with
    # it; without that channel the model is refused, not cut without its term
    maps = SliceResizeInferer(checkpoint=joint.best_checkpoint)(images, model)
    assert maps.shape[1] == 2
    transform = GraphCutCRF(checkpoint=joint.best_checkpoint)
    for k, want in enumerate(expected):
        np.testing.assert_array_equal(transform(maps[k], images[k])[0].numpy(), want)
    assert crf_settings(joint.best_checkpoint)[0].w4 == weights.w4
    with pytest.raises(ValueError, match="learned edge feature needs 2×H×W"):
        transform(maps[0, :1], images[0])
    # an old model (no boundary head) still gives its three-feature masks
    old = TrainedModel.from_checkpoint(piecewise.best_checkpoint)
    assert not old.learned_pairwise
    p_old, m_old = predict_image(old, val[0]["image"])
    np.testing.assert_array_equal(m_old, map_labelling(p_old, val[0]["image"], old.weights))


def test_learned_pairwise_is_off_by_default_and_one_switch():
    assert TrainConfig().learned_pairwise is False
    assert "boundary_head" not in TrainConfig().network
    on = TrainConfig(learned_pairwise=True)
    assert on.network["boundary_head"] is True
    # a recorded network spec with the head turns the feature on (a resumed run's config)
    assert TrainConfig(network={"preset": "lite", "boundary_head": True}).learned_pairwise
    with pytest.raises(ValueError, match="boundary_lr must be > 0"):
        TrainConfig(boundary_lr=0.0)


def test_a_mode_that_does_not_train_the_head_freezes_it(tmp_path):
    """Without the supervised outline loss (``boundary_weight``) only γ's gradient reaches a
    boundary head, so in cnn mode it is frozen and left out of the optimiser (an idle weight
    would also stop DDP): it leaves the run as it started."""
    data = _samples(4, 0), []
    run = train(TrainConfig(mode="cnn", epochs=1, batch_size=2, lr=1e-2, network=TINY_NET,
                            learned_pairwise=True), *data, tmp_path / "cnn")
    payload = load_checkpoint(run.last_checkpoint)
    torch.manual_seed(0)
    fresh = build_model(LP_NET).state_dict()
    for key, value in payload["model"].items():
        if key.startswith("boundary."):
            torch.testing.assert_close(value, fresh[key], rtol=0, atol=0)
    assert not torch.equal(payload["model"]["score_fr.weight"], fresh["score_fr.weight"])
    assert len(payload["optimizer"]["param_groups"]) == 1


def test_a_volume_is_cut_with_the_boundary_map_per_slice_in_3d_and_fused(lp_runs, tmp_path):
    """Volume inference with a learned-pairwise model: each slice of its view is cut with the
    head's map of that slice, in this process or in the workers while the network goes on;
    the 3-D cut takes the maps stacked into a volume, fused views their average."""
    from monai.data import MetaTensor

    from pipeline.data import CTA_HU_WINDOW
    from pipeline.data.views import restack_slices, slice_volume
    from pipeline.inference import VolumePredictor

    _, _, joint = lp_runs
    # the tiny model's own w4 barely moves a cut on CT slices; a large one makes the map
    # decide, so that a cut without it would differ
    payload = load_checkpoint(joint.best_checkpoint)
    payload["crf"] = [*payload["crf"][:3], 0.5]
    checkpoint = save_checkpoint({k: v for k, v in payload.items() if k != "format"},
                                 tmp_path / "strong_w4.pt")
    # a volume whose axial slices are images like the model's training ones (noisy blocks),
    # on the HU scale its window maps back to them
    low, high = CTA_HU_WINDOW
    images = np.stack([noisy_blocks((36, 40), rng=200 + k, n_blocks=2, image_noise=0.3).image
                       for k in range(32)]).astype(np.float32)
    hu = low + restack_slices(images[:, None], "axial")[0] * (high - low)
    volume = MetaTensor(torch.as_tensor(hu), affine=torch.eye(4))  # RAS: no reorientation
    serial = VolumePredictor(checkpoint, batch_size=5).predict(volume)
    with VolumePredictor(checkpoint, batch_size=5, workers=1,
                         pipeline=True) as pooled:
        pending = pooled.start(volume)
        assert pending.cut_batches == 7  # 32 slices in batches of 5 (32: a coronal slice's
        # height must fit one stride-32 cell, below)
        piped = pending.result()
    np.testing.assert_array_equal(piped.crf, serial.crf)
    # the oracle: windowed axial slices, the model's maps, one cut per slice
    slices = slice_volume(np.clip((hu - low) / (high - low), 0, 1)[None], "axial")[:, 0]
    vm = TrainedModel.from_checkpoint(checkpoint)
    probs, edges = vm.maps(slices, batch_size=5)
    masks = np.stack([map_labelling(p, x, vm.weights, boundary=b)
                      for p, x, b in zip(probs, slices, edges, strict=True)])
    np.testing.assert_array_equal(serial.crf, restack_slices(masks[:, None], "axial")[0])
    without = np.stack([map_labelling(p, x, vm.weights) for p, x in zip(probs, slices,
                                                                        strict=True)])
    assert not np.array_equal(masks, without)  # the map changed the cut
    # the 3-D cut: the slices' maps stacked into a boundary volume, on every axis's edges
    windowed = np.clip((hu - low) / (high - low), 0, 1)
    prob_volume = restack_slices(probs[:, None], "axial")[0]
    edge_volume = restack_slices(edges[:, None], "axial")[0]
    cut3d = VolumePredictor(checkpoint, batch_size=5, crf_3d=True).predict(volume)
    oracle3d = volume_map_labelling(prob_volume, windowed, vm.weights, spacing=np.ones(3),
                                    boundary=edge_volume)
    np.testing.assert_array_equal(cut3d.crf, oracle3d)
    assert not np.array_equal(oracle3d, volume_map_labelling(prob_volume, windowed, vm.weights))
    # fused views: the views' maps averaged as the probabilities are, then cut slice by slice
    # along the first view, in this process or in the workers
    views = {"axial": checkpoint, "coronal": checkpoint}
    fused = VolumePredictor(views, batch_size=5, any_view=True).predict(volume)
    with VolumePredictor(views, batch_size=5, any_view=True, workers=1,
                         pipeline=True) as pooled:
        np.testing.assert_array_equal(pooled.predict(volume).crf, fused.crf)
    prob_views, edge_views = [], []
    for view in views:
        p, b = vm.maps(slice_volume(windowed[None], view)[:, 0], batch_size=5)
        prob_views.append(restack_slices(p[:, None], view)[0])
        edge_views.append(restack_slices(b[:, None], view)[0])
    fused_prob = slice_volume(np.mean(prob_views, axis=0)[None], "axial")[:, 0]
    fused_edges = slice_volume(np.mean(edge_views, axis=0)[None], "axial")[:, 0]
    oracle = np.stack([map_labelling(p, x, vm.weights, boundary=b)
                       for p, x, b in zip(fused_prob, slices, fused_edges, strict=True)])
    np.testing.assert_array_equal(fused.crf, restack_slices(oracle[:, None], "axial")[0])
    # every fused view needs a boundary map: a model without a head is refused by name
    plain = os.fspath(lp_runs[1].best_checkpoint)
    with pytest.raises(ValueError, match=r"learned edge feature.*the coronal model has no "
                                         r"boundary head"):
        VolumePredictor({"axial": checkpoint, "coronal": plain}, any_view=True)


def test_resuming_a_run_with_the_head_switched_on_is_refused(tmp_path):
    """Only a run's start (init) may grow the head onto a network without one; a resumed run
    must fit its own checkpoint, so switching the term on at resume names the file."""
    data = _samples(4, 0), []
    plain = TrainConfig(mode="cnn", epochs=1, batch_size=2, lr=1e-2, network=TINY_NET)
    run = train(plain, *data, tmp_path / "cnn")
    recorded = (tmp_path / "cnn" / "config.json").read_text()
    later = TrainConfig(mode="cnn", epochs=2, batch_size=2, lr=1e-2, network=TINY_NET,
                        learned_pairwise=True)
    with pytest.raises(ValueError, match=r"last\.pt: its weights do not fit this run's network"):
        train(later, *data, tmp_path / "cnn", resume=True)
    assert load_checkpoint(run.last_checkpoint)["epoch"] == 1  # nothing overwritten
    assert (tmp_path / "cnn" / "config.json").read_text() == recorded
