"""Graph-cut MAP and loss-augmented inference against exhaustive search on 3×3 grids."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.crf import (
    CRFWeights,
    GridCRF,
    data_driven_beta,
    energy,
    graph_cut,
    graphcut,
    loss_augmented_labelling,
    map_labelling,
)
from tests.oracles.brute import beta_loop, brute_minimum, features_loop


def _random_case(rng, channels):
    prob = rng.uniform(0.02, 0.98, (3, 3))
    image = rng.random((3, 3)) if channels == 0 else rng.random((channels, 3, 3))
    weights = CRFWeights(*rng.uniform(0.0, 2.0, 3))
    truth = (rng.random((3, 3)) < 0.5).astype(np.uint8)
    return prob, image, weights, truth


def _costs(prob):
    return -np.log1p(-prob), -np.log(prob)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("channels", [0, 3])
def test_map_labelling_matches_brute_force(rng, connectivity, channels):
    for _ in range(12):
        prob, image, weights, _ = _random_case(rng, channels)
        beta = float(rng.uniform(0.1, 5.0))
        y = map_labelling(prob, image, weights, connectivity=connectivity, beta=beta)
        assert y.dtype == np.uint8 and y.shape == (3, 3)
        found = weights.as_array() @ features_loop(*_costs(prob), image, y, connectivity, beta)
        best = brute_minimum(*_costs(prob), image, weights.as_array(), connectivity, beta)
        assert found == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("channels", [0, 3])
def test_loss_augmented_labelling_matches_brute_force(rng, connectivity, channels):
    for _ in range(12):
        prob, image, weights, truth = _random_case(rng, channels)
        y = loss_augmented_labelling(prob, image, weights, truth, connectivity=connectivity)
        beta = beta_loop(image, connectivity)
        value = weights.as_array() @ features_loop(*_costs(prob), image, y, connectivity, beta)
        value -= np.count_nonzero(y != truth) / 9
        best = brute_minimum(*_costs(prob), image, weights.as_array(), connectivity, beta, truth)
        assert value == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_energy_and_beta_match_loop_implementation(rng, connectivity):
    weights = CRFWeights(*rng.uniform(0.0, 2.0, 3))
    image = rng.random((3, 5, 4))
    prob = rng.uniform(0.01, 0.99, (5, 4))
    y = (rng.random((5, 4)) < 0.5).astype(np.uint8)
    beta = beta_loop(image, connectivity)
    assert data_driven_beta(image, connectivity=connectivity) == pytest.approx(beta, rel=1e-12)
    expected = weights.as_array() @ features_loop(*_costs(prob), image, y, connectivity, beta)
    assert energy(y, prob, image, weights, connectivity=connectivity) == pytest.approx(
        expected, rel=1e-12)


def test_from_logits_equals_from_probabilities(rng):
    logits = rng.normal(0, 3, (7, 5))
    image = rng.random((7, 5))
    a = GridCRF.from_logits(logits, image)
    b = GridCRF.from_probabilities(1 / (1 + np.exp(-logits)), image)
    np.testing.assert_allclose(a.cost0, b.cost0, rtol=1e-9)
    np.testing.assert_allclose(a.cost1, b.cost1, rtol=1e-9)


def test_pairwise_weights_smooth_a_speckled_labelling(rng):
    truth = np.zeros((32, 32), dtype=np.uint8)
    truth[8:24, 8:24] = 1
    prob = 1 / (1 + np.exp(-(2.0 * (2.0 * truth - 1) + 2.0 * rng.standard_normal(truth.shape))))
    unary_only = map_labelling(prob, truth, CRFWeights(1, 0, 0))
    np.testing.assert_array_equal(unary_only, (prob > 0.5).astype(np.uint8))
    smooth = map_labelling(prob, truth.astype(float), CRFWeights(1, 0.5, 1.0))
    assert np.count_nonzero(smooth != truth) < np.count_nonzero(unary_only != truth) / 4


def _cut_in_fresh_thread(*args):
    """graph_cut in a new thread, whose graph is therefore built from nothing."""
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(graph_cut(*args)))
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("reuse_max", [None, 1000])
def test_reused_graph_cuts_like_a_fresh_graph(rng, connectivity, reuse_max, monkeypatch):
    # the thread's graph is reset and refilled; grids shrink and grow between cuts, and loss
    # augmentation alternates with MAP: the cut must never depend on what the graph held before
    # (reuse_max=1000: the larger grids get graphs of their own between reused small ones)
    if reuse_max is not None:
        monkeypatch.setattr(graphcut, "_REUSE_MAX_NODES", reuse_max)
    shapes = [(40, 48), (3, 3), (64, 64), (3, 3), (5, 7), (40, 48), (3, 3)]
    for k, shape in enumerate(shapes):
        prob = rng.uniform(0.02, 0.98, shape)
        image = rng.random(shape)
        weights = CRFWeights(*rng.uniform(0.1, 2.0, 3))
        truth = (rng.random(shape) < 0.5).astype(np.uint8) if k % 2 else None
        crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity)
        reused = graph_cut(crf, weights, truth)
        np.testing.assert_array_equal(reused, _cut_in_fresh_thread(crf, weights, truth))
        if shape == (3, 3):  # and against exhaustive search, right after a larger grid
            beta = beta_loop(image, connectivity)
            value = weights.as_array() @ features_loop(*_costs(prob), image, reused,
                                                       connectivity, beta)
            if truth is not None:
                value -= np.count_nonzero(reused != truth) / 9
            best = brute_minimum(*_costs(prob), image, weights.as_array(), connectivity, beta,
                                 truth)
            assert value == pytest.approx(best, abs=1e-12)
    if reuse_max is not None:  # large grids get their own graph; small ones share one
        kept = graphcut._empty_graph(9, 18)
        assert graphcut._empty_graph(40 * 48, 4 * 40 * 48) is not kept
        assert graphcut._empty_graph(12, 24) is kept


@pytest.mark.parametrize("connectivity", [4, 8])
def test_pixels_decided_by_their_unaries_keep_the_cut_exact(rng, connectivity, graph_sizes):
    # persistency fixes pixels whose unary outweighs all their edges; exhaustive search says
    # the labelling is still a minimiser, whether the rest is cut in a box or not at all
    for k in range(40):
        prob = rng.uniform(0.02, 0.98, (3, 3))
        extreme = rng.random((3, 3)) < 0.7
        prob[extreme] = rng.choice([1e-4, 1 - 1e-4], size=int(extreme.sum()))
        image = rng.random((3, 3))
        weights = CRFWeights(rng.uniform(1.0, 2.0), *rng.uniform(0.0, 0.5, 2))
        truth = (rng.random((3, 3)) < 0.5).astype(np.uint8) if k % 2 else None
        if truth is None:
            y = map_labelling(prob, image, weights, connectivity=connectivity)
        else:
            y = loss_augmented_labelling(prob, image, weights, truth, connectivity=connectivity)
        beta = beta_loop(image, connectivity)
        value = weights.as_array() @ features_loop(*_costs(prob), image, y, connectivity, beta)
        if truth is not None:
            value -= np.count_nonzero(y != truth) / 9
        best = brute_minimum(*_costs(prob), image, weights.as_array(), connectivity, beta, truth)
        assert value == pytest.approx(best, abs=1e-12)
    assert 0 < min(graph_sizes) < 9  # some cuts ran on a box smaller than the grid


def _confident_map(rng, shape):
    """A network-like map: near 0 or 1 everywhere except two uncertain blobs."""
    truth = np.zeros(shape, dtype=np.uint8)
    truth[10:30, 15:45] = 1
    logit = 12.0 * (2.0 * truth - 1.0) + 0.5 * rng.standard_normal(shape)
    logit[8:20, 10:25] = 1.5 * rng.standard_normal((12, 15))
    logit[25:33, 40:52] = 1.5 * rng.standard_normal((8, 12))
    image = truth + 0.3 * rng.standard_normal(shape)
    return 1.0 / (1.0 + np.exp(-logit)), image, truth


@pytest.mark.parametrize("connectivity", [4, 8])
def test_cuts_reduced_by_persistency_equal_whole_grid_cuts(rng, connectivity, graph_sizes,
                                                          no_persistency):
    weights = CRFWeights(0.5, 0.1, 0.2)
    cases = [_confident_map(rng, (60, 80)) for _ in range(3)]
    reduced = []
    for prob, image, truth in cases:
        crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity)
        reduced.append((map_labelling(prob, image, weights, connectivity=connectivity),
                        graph_cut(crf, weights), graph_cut(crf, weights, truth)))
    assert 0 < max(graph_sizes) <= 30 * 45  # only the blobs' box is cut, not all 4800 pixels
    no_persistency()
    for (prob, image, truth), (mapped, cut, augmented) in zip(cases, reduced, strict=True):
        crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity)
        whole = graph_cut(crf, weights)
        np.testing.assert_array_equal(mapped, whole)
        np.testing.assert_array_equal(cut, whole)
        np.testing.assert_array_equal(augmented, graph_cut(crf, weights, truth))
    assert graph_sizes[-1] == 60 * 80


def test_deciding_on_probabilities_leaves_near_ties_to_the_cut(no_persistency):
    # pairwise weights so small that a centre pixel's probability sits within a few ulps of
    # the point where its unary outweighs its 4 edges: deciding it on the probability must
    # not overrule the cut's own arithmetic (w1·Δcost) there
    rng = np.random.default_rng(1)
    cases = []
    for w2 in 10 ** rng.uniform(-13.5, -11, 200):
        edge = 1.0 / (1.0 + np.exp(4.0 * w2))  # unary margin = the 4 edges' capacity
        for ulps in (1, 2, 5):
            prob = np.ones((3, 3))  # confident neighbours pull the centre towards 1
            prob[1, 1] = edge - ulps * np.spacing(edge)
            weights = CRFWeights(1.0, w2, 0.0)
            cases.append((prob, weights, map_labelling(prob, np.zeros((3, 3)), weights)))
    underflow = CRFWeights(5e-324)  # w1·Δcost underflows to 0: no pixel is decided
    prob = rng.random((4, 4))
    cases.append((prob, underflow, map_labelling(prob, np.zeros((4, 4)), underflow)))
    no_persistency()
    for prob, weights, reduced in cases:
        np.testing.assert_array_equal(reduced, map_labelling(prob, np.zeros(prob.shape), weights))


def _grid_call_cut(diff, edges, w2, w3, w4):
    """The cut with every direction's edges added by PyMaxflow's own ``add_grid_edges``
    (one structure per offset, symmetric): the graph ``_grid_cut`` must build arc for arc."""
    import maxflow

    g = maxflow.Graph[float]()
    ids = g.add_grid_nodes(diff.shape)
    g.add_grid_tedges(ids, np.maximum(diff, 0.0), np.maximum(-diff, 0.0))
    for offset, contrast, learned in edges:
        structure = np.zeros((3,) * diff.ndim)
        structure[tuple(1 + d for d in offset)] = 1.0
        capacity = w2 + w3 * contrast + (0.0 if learned is None else w4 * learned)
        g.add_grid_edges(ids, weights=capacity, structure=structure, symmetric=True)
    g.maxflow()
    return g.get_grid_segments(ids).astype(np.uint8)


@pytest.mark.parametrize("offsets", [((0, 1), (1, 0)), ((0, 1), (1, 0), (1, 1), (1, -1)),
                                     ((1, 0, 0), (0, 1, 0), (0, 0, 1))],
                         ids=["4-connected", "8-connected", "volume"])
@pytest.mark.parametrize("ties", [False, True])
def test_edges_build_the_graph_of_pymaxflows_grid_call(rng, offsets, ties):
    # the edges go in by add_edges on the slices' node ids; the labels must be the grid
    # call's, also where many labellings share the minimum (ties: unaries and capacities from
    # a few values), so that a mask made before the change is made again
    shape = (5, 6, 7) if len(offsets[0]) == 3 else (23, 31)
    for w2, w3, w4 in [(0.3, 0.7, 0.5), (0.4, 0.0, 0.0), (0.0, 0.9, 0.0), (0.0, 0.0, 0.6)]:
        if ties:
            diff = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], shape)
            edges = [(o, rng.choice([0.0, 0.5, 1.0], shape), rng.choice([0.0, 1.0], shape))
                     for o in offsets]
        else:
            diff = rng.normal(0.0, 1.0, shape)
            edges = [(o, rng.random(shape), rng.random(shape)) for o in offsets]
        expected = _grid_call_cut(diff, edges, w2, w3, w4)
        labels = graphcut._grid_cut(diff.copy(), edges, w2, w3, w4)
        np.testing.assert_array_equal(labels, expected)
        if not ties and w2 + w3 + w4 > 0:  # the pairwise terms matter here
            assert not np.array_equal(labels, (diff < 0).astype(np.uint8))
