"""MaxMarginLoss: γ and its envelope gradient against finite differences and the KKT system."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.crf import GridCRF, MaxMarginLoss, cutting_plane
from tests.conftest import block_problem
from tests.oracles.kkt import kkt_gradient

BETA = 0.5


def _run(logits, images, truths, C, **kw):
    loss = MaxMarginLoss(C=C, beta=BETA, **kw)
    a = torch.tensor(logits[:, None], requires_grad=True)
    gamma = loss(a, torch.tensor(images), torch.tensor(truths[:, None], dtype=torch.float64),
                 ids=list(range(len(logits))))
    gamma.backward()
    return loss, gamma, a.grad[:, 0].numpy()


def _gamma_fixed_sets(logits, images, truths, working_sets, C):
    crfs = [GridCRF.from_logits(a, i, beta=BETA) for a, i in zip(logits, images, strict=True)]
    return cutting_plane(crfs, list(truths), C=C, working_sets=working_sets,
                         max_iterations=0).gamma


@pytest.mark.parametrize(("C", "seed"), [(1.0, 0), (10.0, 1), (100.0, 2)])
def test_gradient_matches_central_finite_differences(C, seed):
    rng = np.random.default_rng(seed)
    logits, images, truths = block_problem(rng)
    loss, gamma, grad = _run(logits, images, truths, C)
    sets = loss.last_result.working_sets
    assert gamma.item() == pytest.approx(_gamma_fixed_sets(logits, images, truths, sets, C),
                                         rel=1e-9)
    assert np.abs(grad).max() > 0
    h = 1e-4
    for _ in range(3):  # random directions, and single pixels with a non-zero gradient
        v = rng.standard_normal(logits.shape)
        fd = (_gamma_fixed_sets(logits + h * v, images, truths, sets, C)
              - _gamma_fixed_sets(logits - h * v, images, truths, sets, C)) / (2 * h)
        assert np.sum(grad * v) == pytest.approx(fd, rel=1e-5)
    significant = np.abs(grad) > 1e-3 * np.abs(grad).max()
    for idx in list(zip(*np.nonzero(significant), strict=True))[:4]:
        e = np.zeros_like(logits)
        e[idx] = 1.0
        fd = (_gamma_fixed_sets(logits + h * e, images, truths, sets, C)
              - _gamma_fixed_sets(logits - h * e, images, truths, sets, C)) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-5)


@pytest.mark.parametrize(("C", "seed"), [(1.0, 3), (100.0, 4)])
def test_gradient_matches_explicit_kkt_system(C, seed):
    rng = np.random.default_rng(seed)
    logits, images, truths = block_problem(rng)
    loss, gamma, grad = _run(logits, images, truths, C)
    oracle_gamma, oracle_grads = kkt_gradient(list(logits), list(images), list(truths),
                                              loss.last_result.working_sets, C, beta=BETA)
    assert gamma.item() == pytest.approx(oracle_gamma, rel=1e-8)
    np.testing.assert_allclose(grad, np.stack(oracle_grads), rtol=1e-6,
                               atol=1e-6 * np.abs(grad).max())


def test_two_channel_logits_get_opposite_gradients(rng):
    logits, images, truths = block_problem(rng)
    two = np.stack([np.zeros_like(logits), logits], axis=1)
    loss = MaxMarginLoss(C=10.0, beta=BETA)
    t2 = torch.tensor(two, requires_grad=True)
    gamma2 = loss(t2, torch.tensor(images), torch.tensor(truths[:, None]))
    gamma2.backward()
    _, gamma1, grad1 = _run(logits, images, truths, 10.0)
    assert gamma2.item() == pytest.approx(gamma1.item(), rel=1e-7)
    np.testing.assert_allclose(t2.grad[:, 1].numpy(), grad1, atol=1e-9)
    np.testing.assert_allclose(t2.grad[:, 0].numpy(), -grad1, atol=1e-9)


def test_descent_on_gamma_moves_probabilities_toward_truth(rng):
    logits, images, truths = block_problem(rng, batch=2, size=10)
    a = torch.tensor(logits[:, None], requires_grad=True)
    loss = MaxMarginLoss(C=10.0, beta=BETA)
    start = loss(a, torch.tensor(images), torch.tensor(truths[:, None])).item()
    optimiser = torch.optim.SGD([a], lr=50.0)
    for _ in range(20):
        optimiser.zero_grad()
        gamma = loss(a, torch.tensor(images), torch.tensor(truths[:, None]))
        gamma.backward()
        grad = a.grad[:, 0].numpy()
        sign = 2.0 * truths - 1.0
        assert np.all(grad * sign <= 1e-15)  # descent raises truth-pixels' logits, lowers others
        optimiser.step()
    end = loss(a, torch.tensor(images), torch.tensor(truths[:, None])).item()
    assert end < start


def test_working_sets_and_weights_are_kept_for_warm_start(rng):
    logits, images, truths = block_problem(rng)
    loss, _, _ = _run(logits, images, truths, 10.0)
    first_passes = loss.last_result.iterations
    assert set(loss.working_sets) == {0, 1, 2}
    gamma = loss(torch.tensor(logits[:, None]), torch.tensor(images),
                 torch.tensor(truths[:, None]), ids=[0, 1, 2])
    assert loss.last_result.iterations < first_passes
    assert gamma.item() > 0


def test_gamma_has_logits_dtype_and_is_scalar(rng):
    logits, images, truths = block_problem(rng)
    loss = MaxMarginLoss(C=1.0)
    gamma = loss(torch.tensor(logits[:, None], dtype=torch.float32),
                 torch.tensor(images, dtype=torch.float32), torch.tensor(truths[:, None]))
    assert gamma.dtype == torch.float32 and gamma.ndim == 0
