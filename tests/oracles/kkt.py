"""Test oracle: ∂γ/∂a from the paper's explicit KKT linear system (supplement), per pixel.

Independent of the project's learner: features by loops (``brute.features_loop``), its own
cvxpy formulation of the QP (one constraint object per row, so every multiplier is read off
separately), active sets from the multipliers, and one linear solve per pixel as the paper
describes. Slow on purpose; not on the training path.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from tests.oracles.brute import features_loop

TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "max_iter": 500}
ACTIVE = 1e-7


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_qp(dpsi_blocks, loss_blocks, C):
    """Solves the margin QP plainly; returns w, ξ, λ per block, μ (for ξ ≥ 0), ν (for w ≥ 0)."""
    n = len(dpsi_blocks)
    w = cp.Variable(np.shape(dpsi_blocks[0])[1])  # 3 features, or 4 with the learned one
    xi = cp.Variable(n)
    margin = [[g @ w + xi[i] >= d for g, d in zip(G, D, strict=True)]
              for i, (G, D) in enumerate(zip(dpsi_blocks, loss_blocks, strict=True))]
    slack_nonneg = xi >= 0
    w_nonneg = w >= 0
    constraints = [c for block in margin for c in block] + [slack_nonneg, w_nonneg]
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(w) + C / n * cp.sum(xi)), constraints)
    problem.solve(solver=cp.CLARABEL, **TIGHT)
    assert problem.status == cp.OPTIMAL, problem.status
    lam = [np.array([float(c.dual_value) for c in block]) for block in margin]
    return (np.asarray(w.value), np.asarray(xi.value), lam,
            np.asarray(slack_nonneg.dual_value), np.asarray(w_nonneg.dual_value), problem.value)


def kkt_gradient(logits, images, truths, working_sets, C, *, connectivity=4, beta=0.5):
    """γ and ∂γ/∂a (one H×W array per sample) from the differentiated KKT conditions.

    Unknowns per pixel: dw (3), dξ (N), dλ_k of active margin constraints, dμ_n of active slack
    bounds, dν_j of active weight bounds. Equations: stationarity in w and ξ, and the active
    constraints kept active. dγ = w·dw + (C/N)·Σ dξ.
    """
    cost = [(_softplus(a), _softplus(-a)) for a in logits]
    psi_truth = [features_loop(c0, c1, img, t, connectivity, beta)
                 for (c0, c1), img, t in zip(cost, images, truths, strict=True)]
    dpsi = [np.array([features_loop(c0, c1, img, y, connectivity, beta) - pt for y in ws])
            for (c0, c1), img, ws, pt in zip(cost, images, working_sets, psi_truth, strict=True)]
    losses = [np.array([np.count_nonzero(y != t) / t.size for y in ws])
              for ws, t in zip(working_sets, truths, strict=True)]
    qp = reference_qp(dpsi, losses, C)
    return qp[-1], kkt_system_gradient(logits, truths, working_sets, dpsi, qp, C)


def kkt_system_gradient(logits, truths, working_sets, dpsi, qp, C):
    """∂γ/∂a from the QP optimum ``qp`` (as returned by :func:`reference_qp`), one linear
    solve per pixel."""
    w, _, lam, mu, nu, _ = qp
    n = len(logits)
    active = [(s, k) for s in range(n) for k in range(len(lam[s])) if lam[s][k] > ACTIVE]
    active_mu = [s for s in range(n) if mu[s] > ACTIVE]
    active_nu = [j for j in range(3) if nu[j] > ACTIVE]
    n_unknowns = 3 + n + len(active) + len(active_mu) + len(active_nu)
    i_xi, i_lam = 3, 3 + n
    i_mu = i_lam + len(active)
    i_nu = i_mu + len(active_mu)
    A = np.zeros((n_unknowns, n_unknowns))
    row = 0
    for j in range(3):  # dw_j − Σ dλ_k g_kj − dν_j = Σ λ_k dg_kj
        A[row, j] = 1.0
        for col, (s, k) in enumerate(active):
            A[row, i_lam + col] = -dpsi[s][k, j]
        if j in active_nu:
            A[row, i_nu + active_nu.index(j)] = -1.0
        row += 1
    for s in range(n):  # −Σ_{k∈S_s} dλ_k − dμ_s = 0
        for col, (s2, _) in enumerate(active):
            if s2 == s:
                A[row, i_lam + col] = -1.0
        if s in active_mu:
            A[row, i_mu + active_mu.index(s)] = -1.0
        row += 1
    for s, k in active:  # g_k·dw + dξ_s = −dg_k·w
        A[row, :3] = dpsi[s][k]
        A[row, i_xi + s] = 1.0
        row += 1
    for s in active_mu:  # dξ_s = 0
        A[row, i_xi + s] = 1.0
        row += 1
    for j in active_nu:  # dw_j = 0
        A[row, j] = 1.0
        row += 1
    assert row == n_unknowns

    grads = []
    for s in range(n):
        a, t = logits[s], truths[s]
        p = t.size
        # ∂(U_{y,i})/∂a_i: U1 = softplus(−a) → −σ(−a); U0 = softplus(a) → σ(a).
        d_u1, d_u0 = -_sigmoid(-a), _sigmoid(a)
        d_truth = np.where(t == 1, d_u1, d_u0)
        grad = np.zeros(t.shape)
        for idx in np.ndindex(t.shape):
            rhs = np.zeros(n_unknowns)
            dg1 = {}  # ∂g_k1/∂a_i for the constraints of sample s
            for k, y in enumerate(working_sets[s]):
                dg1[k] = ((d_u1[idx] if y[idx] else d_u0[idx]) - d_truth[idx]) / p
                rhs[0] += lam[s][k] * dg1[k] if lam[s][k] > ACTIVE else 0.0
            # rows of the active margin constraints come after the 3 + n stationarity rows
            for col, (s2, k) in enumerate(active):
                if s2 == s:
                    rhs[3 + n + col] = -dg1[k] * w[0]
            dx = np.linalg.lstsq(A, rhs, rcond=None)[0]
            grad[idx] = w @ dx[:3] + C / n * dx[i_xi:i_xi + n].sum()
        grads.append(grad)
    return grads
