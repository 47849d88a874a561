"""The n-slack max-margin QP, compiled once with cvxpy Parameters and solved by Clarabel.

γ = min_{w,ξ} ½‖w‖² + (C/N) Σ_n ξ_n
    s.t. w·Δψ_k + ξ_n(k) ≥ Δ_k for every constraint k of sample n(k);  ξ ≥ 0;  w ≥ 0,

with Δψ_k = ψ(y_k) − ψ(yₙ) and Δ_k = Δ(yₙ, y_k), both normalised by the pixel count.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = ["DEFAULT_SOLVER_OPTIONS", "MarginQP", "QPSolution"]

#: Clarabel settings: tight enough that multipliers and γ are accurate to ~1e-9.
DEFAULT_SOLVER_OPTIONS: dict[str, float | int] = {
    "tol_gap_abs": 1e-10,
    "tol_gap_rel": 1e-10,
    "tol_feas": 1e-10,
    "max_iter": 500,
}

#: The paper's features (ψ1, ψ2, ψ3); a CRF with the learned edge feature has a fourth.
_N_FEATURES = 3


@dataclass
class QPSolution:
    """Optimum of the margin QP.

    Attributes:
        w: optimal weights (3 or 4 of them), clipped at 0 against solver round-off.
        xi: optimal slacks (N,).
        gamma: objective value ½‖w‖² + (C/N)Σξ.
        duals: per sample, the multipliers λ_k ≥ 0 of its margin constraints.
    """

    w: np.ndarray
    xi: np.ndarray
    gamma: float
    duals: list[np.ndarray]


class MarginQP:
    """The margin QP for N samples with up to ``capacity`` constraints each.

    The problem is compiled once; re-solving with new constraints only changes parameter
    values (unused rows are ``0·w + ξ ≥ −1``, never active). The rows reserved per sample are
    the smallest ``capacity·2^k`` that fits the largest working set, a function of the
    constraints alone, so a resumed run solves exactly the problem an uninterrupted one does;
    the problem is rebuilt when that size changes.

    Args:
        n_samples: N.
        C: slack penalty (> 0); the objective uses C/N.
        capacity: initial number of constraint rows reserved per sample.
        solver_options: Clarabel settings overriding :data:`DEFAULT_SOLVER_OPTIONS`.
        n_features: 3 (ψ1–ψ3), or 4 with the learned edge feature ψ4.

    Raises:
        ValueError: N < 1, C not a positive finite number, or n_features not 3 or 4.
    """

    def __init__(self, n_samples: int, C: float, *, capacity: int = 8,
                 solver_options: dict | None = None, n_features: int = _N_FEATURES) -> None:
        if n_features not in (3, 4):
            raise ValueError(f"the margin QP has 3 or 4 features, got {n_features!r}")
        self.n_features = int(n_features)
        if n_samples < 1:
            raise ValueError(f"the margin QP needs at least one sample, got {n_samples}")
        if not np.isfinite(C) or C <= 0:
            raise ValueError(f"C must be a positive finite number, got {C!r}")
        self.n_samples = int(n_samples)
        self.C = float(C)
        self.solver_options = {**DEFAULT_SOLVER_OPTIONS, **(solver_options or {})}
        self.initial_capacity = max(1, int(capacity))
        self._build(self.initial_capacity)

    def _build(self, capacity: int) -> None:
        n, m = self.n_samples, capacity
        self.capacity = m
        self._w = cp.Variable(self.n_features, nonneg=True)
        self._xi = cp.Variable(n, nonneg=True)
        self._G = cp.Parameter((n * m, self.n_features))
        self._d = cp.Parameter(n * m)
        owner = sp.kron(sp.eye(n, format="csr"), np.ones((m, 1)), format="csr")
        self._margin = self._G @ self._w + owner @ self._xi >= self._d
        objective = 0.5 * cp.sum_squares(self._w) + (self.C / n) * cp.sum(self._xi)
        self._problem = cp.Problem(cp.Minimize(objective), [self._margin])

    def solve(self, dpsi: Sequence[np.ndarray], losses: Sequence[np.ndarray]) -> QPSolution:
        """Solves the QP for the given constraints.

        Args:
            dpsi: per sample, a K_n×n_features array of Δψ_k.
            losses: per sample, the K_n losses Δ_k.

        Returns:
            The optimum with per-sample multipliers.

        Raises:
            ValueError: the number of samples or the shapes are wrong.
            RuntimeError: Clarabel did not reach an optimal solution.
        """
        if len(dpsi) != self.n_samples or len(losses) != self.n_samples:
            raise ValueError(f"expected constraints for {self.n_samples} samples, "
                             f"got {len(dpsi)} feature blocks and {len(losses)} loss blocks")
        counts = [len(block) for block in losses]
        if sum(counts) == 0:
            zeros = np.zeros(self.n_samples)
            return QPSolution(np.zeros(self.n_features), zeros, 0.0,
                              [np.zeros(0) for _ in range(self.n_samples)])
        capacity = self.initial_capacity
        while capacity < max(counts):
            capacity *= 2
        if capacity != self.capacity:
            self._build(capacity)
        m = self.capacity
        G = np.zeros((self.n_samples * m, self.n_features))
        d = np.full(self.n_samples * m, -1.0)
        for n, (block, loss) in enumerate(zip(dpsi, losses, strict=True)):
            block = np.asarray(block, dtype=np.float64).reshape(-1, self.n_features)
            loss = np.asarray(loss, dtype=np.float64).reshape(-1)
            if len(block) != len(loss):
                raise ValueError(f"sample {n}: {len(block)} feature rows but {len(loss)} losses")
            G[n * m:n * m + len(block)] = block
            d[n * m:n * m + len(loss)] = loss
        self._G.value = G
        self._d.value = d
        # warm_start=False: cvxpy would otherwise update the previous Clarabel solver in place,
        # which makes the result depend on the solve history (and a resumed run drift).
        self._problem.solve(solver=cp.CLARABEL, warm_start=False, **self.solver_options)
        status = self._problem.status
        if status == cp.OPTIMAL_INACCURATE:
            warnings.warn("Clarabel reached only an inaccurate optimum of the margin QP",
                          RuntimeWarning, stacklevel=2)
        elif status != cp.OPTIMAL:
            raise RuntimeError(f"the margin QP was not solved: Clarabel status {status!r}")
        w = np.maximum(np.asarray(self._w.value, dtype=np.float64), 0.0)
        xi = np.maximum(np.asarray(self._xi.value, dtype=np.float64), 0.0)
        lam = np.maximum(np.asarray(self._margin.dual_value, dtype=np.float64), 0.0)
        duals = [lam[n * m:n * m + k].copy() for n, k in enumerate(counts)]
        gamma = 0.5 * float(w @ w) + self.C / self.n_samples * float(xi.sum())
        return QPSolution(w, xi, gamma, duals)
