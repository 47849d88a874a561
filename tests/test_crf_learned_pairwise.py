"""The learned edge feature ψ4 = Σ [y_i≠y_j]·(1 − max(b_i, b_j)) (issue 20, the CRF side):
features and exact MAP against loop-and-exhaustive oracles, the envelope gradient of γ with
respect to the edge features against central finite differences, and the paper's
three-feature CRF untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from pipeline.crf import (
    CRFWeights,
    GridCRF,
    MarginQP,
    cutting_plane,
    edge_feature_gradient,
    graph_cut,
)
from pipeline.data import noisy_blocks
from tests.oracles.brute import all_labellings, beta_loop, features_loop, neighbours


def _learned_loop(boundary: np.ndarray, y: np.ndarray, connectivity: int) -> float:
    """ψ4/P by a loop over neighbour pairs (found by distance)."""
    total = sum(1.0 - max(boundary[p], boundary[q])
                for p, q in neighbours(*y.shape, connectivity) if y[p] != y[q])
    return total / y.size


def _small(seed: int, shape=(3, 3)):
    rng = np.random.default_rng(seed)
    prob = rng.uniform(0.05, 0.95, shape)
    image = rng.uniform(0.0, 1.0, shape)
    boundary = rng.uniform(0.0, 1.0, shape)
    return prob, image, boundary


@pytest.mark.parametrize("connectivity", [4, 8])
def test_features_and_the_exact_map_match_the_brute_force_oracle(connectivity):
    weights = CRFWeights(0.7, 0.2, 0.3, 0.9)
    for seed in range(4):
        prob, image, boundary = _small(seed)
        crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity,
                                         boundary=boundary)
        beta = beta_loop(image, connectivity)
        cost0, cost1 = -np.log1p(-prob), -np.log(prob)
        assert crf.n_features == 4

        def oracle(y, cost0=cost0, cost1=cost1, boundary=boundary, image=image, beta=beta):
            three = features_loop(cost0, cost1, image, y, connectivity, beta)
            return np.append(three, _learned_loop(boundary, y, connectivity))

        truth = (prob > 0.5).astype(np.uint8)
        for y in list(all_labellings((3, 3)))[::37]:
            np.testing.assert_allclose(crf.features(y), oracle(y), rtol=1e-12, atol=1e-15)
        w = weights.as_array(learned=True)
        for augmented in (None, truth):
            values = []
            for y in all_labellings((3, 3)):
                value = w @ oracle(y)
                if augmented is not None:
                    value -= np.count_nonzero(y != augmented) / y.size
                values.append(value)
            best = min(values)
            cut = graph_cut(crf, weights, augmented)
            value = w @ oracle(cut) - (0 if augmented is None
                                       else np.count_nonzero(cut != augmented) / cut.size)
            assert value == pytest.approx(best, abs=1e-12)


def test_a_strong_boundary_makes_cutting_there_cheap():
    """Unaries that weakly prefer one label everywhere and a Potts weight that forbids a cut:
    the learned feature lets the cut follow the boundary map (b = 1 makes c = 0)."""
    prob = np.full((6, 6), 0.45)
    prob[:, 3:] = 0.55
    image = np.zeros((6, 6))
    boundary = np.zeros((6, 6))
    boundary[:, 2:4] = 1.0  # a boundary between columns 2 and 3
    plain = GridCRF.from_probabilities(prob, image, beta=0.0)
    learned = GridCRF.from_probabilities(prob, image, beta=0.0, boundary=boundary)
    expected = (prob > 0.5).astype(np.uint8)
    assert np.all(graph_cut(plain, CRFWeights(1.0, 0.0, 0.0, 2.0)) == expected)
    # a constant pairwise weight smooths the two halves into one label ...
    assert graph_cut(plain, CRFWeights(1.0, 0.0, 1.0)).std() == 0
    # ... the learned feature, carrying that weight instead, keeps the cut on the boundary
    np.testing.assert_array_equal(graph_cut(learned, CRFWeights(1.0, 0.0, 0.0, 1.0)), expected)


def _batch(seed: int, n: int = 3, shape=(12, 12)):
    samples = [noisy_blocks(shape, rng=seed + k, noise=2.0) for k in range(n)]
    crfs, truths = [], []
    for s in samples:
        edges = np.zeros(shape)
        edges[:-1] += s.truth[1:] != s.truth[:-1]
        edges[:, :-1] += s.truth[:, 1:] != s.truth[:, :-1]
        rng = np.random.default_rng(seed)
        boundary = np.clip(0.7 * (edges > 0) + 0.3 * rng.random(shape), 0, 1)
        crfs.append(GridCRF.from_probabilities(s.prob, s.image, boundary=boundary))
        truths.append(s.truth)
    return crfs, truths


@pytest.mark.parametrize("connectivity", [4, 8])
def test_features_of_a_working_set_match_the_loop_oracle_on_an_oblong_grid(connectivity):
    """The pairwise sums gather the cut edges' values by flat node index: on a grid that is
    not square (so that rows and columns cannot be swapped unnoticed), for smooth outlines,
    speckle, the empty and the full labelling, one by one and as a stack."""
    prob, image, boundary = _small(7, shape=(7, 11))
    crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity,
                                     boundary=boundary)
    beta = beta_loop(image, connectivity)
    cost0, cost1 = -np.log1p(-prob), -np.log(prob)
    rows, cols = np.mgrid[:7, :11]
    ys = [np.zeros((7, 11), np.uint8), np.ones((7, 11), np.uint8),
          ((rows - 3) ** 2 + (cols - 6) ** 2 < 9).astype(np.uint8),  # a disc
          (cols > rows).astype(np.uint8),                              # a diagonal outline
          (np.random.default_rng(3).random((7, 11)) < 0.5).astype(np.uint8)]
    expected = np.array([np.append(features_loop(cost0, cost1, image, y, connectivity, beta),
                                   _learned_loop(boundary, y, connectivity)) for y in ys])
    np.testing.assert_allclose(crf.features_of(ys), expected, rtol=1e-12, atol=1e-15)
    for y, row in zip(ys, expected, strict=True):
        np.testing.assert_allclose(crf.features(y), row, rtol=1e-12, atol=1e-15)


def test_the_edge_feature_gradient_is_the_finite_difference_of_gamma():
    crfs, truths = _batch(30)
    result = cutting_plane(crfs, truths, C=10.0, tol=0.0)
    assert result.converged and result.weights.w4 > 0
    grads = edge_feature_gradient(result, crfs, truths)

    def gamma(mod):  # working sets fixed: the QP over them alone
        return cutting_plane(mod, truths, C=10.0, working_sets=result.working_sets,
                             max_iterations=0, qp=MarginQP(len(mod), 10.0, n_features=4)).gamma

    checked = 0
    rng = np.random.default_rng(0)
    for n in range(len(crfs)):
        for e, grad in enumerate(grads[n]):
            candidates = np.argwhere(np.abs(grad) > 1e-6)
            for r, c in candidates[rng.permutation(len(candidates))[:2]]:
                h = 1e-6
                values = []
                for step in (h, -h):
                    mod = copy.deepcopy(crfs)
                    mod[n].edges[e].learned[r, c] += step
                    values.append(gamma(mod))
                fd = (values[0] - values[1]) / (2 * h)
                assert fd == pytest.approx(grad[r, c], rel=1e-5, abs=1e-12)
                checked += 1
    assert checked >= 4
    # an edge that no labelling of the working sets treats differently gets exactly 0
    assert any(np.count_nonzero(g == 0) > 0 for sample in grads for g in sample)


def test_the_papers_three_features_are_untouched_and_old_weights_load():
    sample = noisy_blocks((16, 16), rng=4)
    crf = GridCRF.from_probabilities(sample.prob, sample.image)
    assert crf.n_features == 3 and crf.features(sample.truth).shape == (3,)
    old = CRFWeights.from_array([0.5, 0.2, 0.1])  # a checkpoint's three values
    assert old.w4 == 0 and old.as_array().shape == (3,)
    assert CRFWeights.from_array([0.5, 0.2, 0.1, 0.3]).w4 == 0.3
    with_zero_w4 = CRFWeights(0.5, 0.2, 0.1, 0.0)
    np.testing.assert_array_equal(graph_cut(crf, old), graph_cut(crf, with_zero_w4))
    with pytest.raises(ValueError, match="w4 must be finite and >= 0"):
        CRFWeights(1.0, 0.0, 0.0, -0.1)
    with pytest.raises(ValueError, match="boundary must have shape"):
        GridCRF.from_probabilities(sample.prob, sample.image, boundary=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="lie in \\[0, 1\\]"):
        GridCRF.from_probabilities(sample.prob, sample.image,
                                   boundary=np.full((16, 16), 1.5))
    mixed = [crf, GridCRF.from_probabilities(sample.prob, sample.image,
                                             boundary=np.zeros((16, 16)))]
    with pytest.raises(ValueError, match="the same features"):
        cutting_plane(mixed, [sample.truth, sample.truth])


def test_the_loss_sends_the_gradient_through_the_boundary_map():
    """MaxMarginLoss with a boundary map: its backward gives ∂γ/∂b, which matches central
    finite differences of γ (working sets fixed) through c_ij = 1 − max(b_i, b_j)."""
    import torch

    from pipeline.crf import MaxMarginLoss

    shape = (10, 10)
    samples = [noisy_blocks(shape, rng=60 + k, noise=2.0) for k in range(2)]
    rng = np.random.default_rng(5)
    boundary = torch.tensor(np.stack([
        np.clip(0.6 * (np.abs(np.gradient(s.truth.astype(float))).sum(0) > 0)
                + 0.35 * rng.random(shape), 0, 1) for s in samples]), requires_grad=True)
    logits = torch.tensor(np.stack([np.log(s.prob) - np.log1p(-s.prob) for s in samples])[:, None],
                          requires_grad=True)
    images = torch.tensor(np.stack([s.image for s in samples])[:, None])
    truths = torch.tensor(np.stack([s.truth for s in samples]).astype(np.float64))
    loss = MaxMarginLoss(C=10.0, tol=0.0)
    gamma = loss(logits, images, truths, boundary=boundary)
    gamma.backward()
    result = loss.last_result
    assert result.weights.w4 > 0 and logits.grad is not None
    grad = boundary.grad.numpy()

    def gamma_at(b):
        crfs = [GridCRF.from_logits(logits[n, 0].detach().numpy(), images[n].numpy(),
                                    boundary=b[n]) for n in range(len(samples))]
        return cutting_plane(crfs, [s.truth for s in samples], C=10.0,
                             working_sets=result.working_sets, max_iterations=0,
                             qp=MarginQP(len(samples), 10.0, n_features=4)).gamma

    b0 = boundary.detach().numpy()
    checked = 0
    for n, r, c in np.argwhere(np.abs(grad) > 1e-6)[:6]:
        h = 1e-7
        up, down = b0.copy(), b0.copy()
        up[n, r, c] += h
        down[n, r, c] -= h
        fd = (gamma_at(up) - gamma_at(down)) / (2 * h)
        assert fd == pytest.approx(grad[n, r, c], rel=1e-4, abs=1e-10)
        checked += 1
    assert checked >= 3
    with pytest.raises(ValueError, match="boundary must be B×H×W"):
        loss(logits, images, truths, boundary=boundary[:, :5])
