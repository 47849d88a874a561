"""Max-margin learning of the CRF weights (Algorithm 1, n-slack cutting plane) and the exact
envelope-theorem gradient of its optimum γ with respect to the CNN's logits."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.crf.features import CRFWeights, GridCRF, hamming_loss
from pipeline.crf.graphcut import GraphCutPool, graph_cut
from pipeline.crf.qp import MarginQP

__all__ = ["LearningResult", "boundary_gradient", "cutting_plane", "edge_feature_gradient",
           "envelope_gradient", "learn_weights"]

#: Default violation threshold ε on the normalised loss scale (a fraction of the pixels).
DEFAULT_TOL = 1e-4


@dataclass
class LearningResult:
    """Outcome of the cutting-plane learner.

    Attributes:
        weights: learned CRF weights w*.
        gamma: optimum γ of the QP over the final working sets.
        working_sets: per sample n, the labellings S_n (H×W uint8 arrays).
        duals: per sample, the multipliers λ_k of S_n's margin constraints.
        slacks: ξ* per sample.
        iterations: inference passes over the samples.
        converged: True when the last pass added no constraint.
        dpsi: per sample, the K_n×3 feature differences ψ(y_k) − ψ(yₙ) (normalised).
        losses: per sample, the K_n normalised Hamming losses Δ(yₙ, y_k).
    """

    weights: CRFWeights
    gamma: float
    working_sets: list[list[np.ndarray]]
    duals: list[np.ndarray]
    slacks: np.ndarray
    iterations: int
    converged: bool
    dpsi: list[np.ndarray] = field(repr=False)
    losses: list[np.ndarray] = field(repr=False)


def _key(y: np.ndarray) -> bytes:
    return np.packbits(y, axis=None).tobytes()


def cutting_plane(crfs: Sequence[GridCRF], truths: Sequence[np.ndarray], *, C: float = 1.0,
                  tol: float = DEFAULT_TOL, max_iterations: int = 100,
                  initial_weights: CRFWeights | None = None,
                  working_sets: Sequence[Sequence[np.ndarray]] | None = None,
                  qp: MarginQP | None = None,
                  pool: GraphCutPool | None = None,
                  recut: str = "all", update: str = "auto") -> LearningResult:
    """Algorithm 1 on prepared CRFs.

    Each pass finds, for every sample n it cuts, the most violating labelling
    y* = argmin E(y) − Δ(yₙ, y) and adds it to S_n only if its violation Δ − w·Δψ exceeds
    ξ_n + tol. When the QP is re-solved is ``update``'s choice:

    - ``sample``: after each sample that gained a constraint, so the next sample is cut with
      the newest w (the n-slack algorithm of Tsochantaridis et al.). Measured on
      ``benchmarks/bench_crf.py``'s 10 images of 256²: 8 passes and 45 constraints instead
      of 14 and 123, about 1.4× less time; the cuts stay the cost (about 20 ms each), the
      45 QP solves take about 6 ms each.
    - ``pass``: once per pass, after every sample was cut with the same w, which lets a
      ``pool`` cut a pass's samples at once.
    - ``auto`` (default): ``sample`` without a pool, ``pass`` with one.

    A sample last cut under the current solution (no constraint added since) is not cut
    again: the cut is deterministic, so it would return the same labelling with the same
    verdict. On ``bench_train``'s warm 8-connected steps that saves about a fifth of the cuts,
    mostly in the last, verifying pass.

    Both stop when a pass over every sample adds nothing, so both end at an optimum of the
    same problem to within ``tol`` (their γ differ by about 1e-4 relative on that batch; γ
    over working sets is a lower bound of the full problem's, approached from below).

    With ``recut="violated"`` a pass after the first cuts only the samples that gained a
    constraint in the pass before; when such a pass adds nothing, one pass over every sample
    with the same w verifies, so the stopping rule is that of ``recut="all"`` (the default:
    every sample in every pass). Measured on the same batch, it saves no time, with either
    ``update``: nearly every sample stays violated until the last passes, and the
    verification passes then find new constraints. It also ends after ``max_iterations``
    passes (partial ones count). ``max_iterations=0`` just solves the QP on the given sets.

    Args:
        crfs: one prepared CRF per sample.
        truths: the ground-truth labellings yₙ.
        C: slack penalty (> 0).
        tol: violation threshold ε (normalised loss units).
        max_iterations: cap on inference passes.
        initial_weights: w used for the first pass when no working set is given
            (default w = (1, 0, 0)).
        working_sets: warm-start S_n per sample; their features are recomputed on ``crfs``.
        qp: a compiled QP to reuse (must be sized for this many samples and this C).
        pool: worker processes for the graph cuts of each pass (None: in this process).
        recut: ``all`` (default) or ``violated``: which samples a pass after the first cuts.
        update: ``auto`` (default), ``sample`` or ``pass``: when the QP is re-solved.

    Returns:
        The learning result.

    Raises:
        ValueError: empty batch, mismatched lengths or shapes, bad C, tol, recut or update
            (``sample`` with a pool).
    """
    n_samples = len(crfs)
    if n_samples == 0:
        raise ValueError("empty batch: the cutting plane needs at least one sample")
    if len(truths) != n_samples:
        raise ValueError(f"got {n_samples} CRFs but {len(truths)} truths")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite value >= 0, got {tol!r}")
    if recut not in ("violated", "all"):
        raise ValueError(f"recut must be 'violated' or 'all', got {recut!r}")
    if update not in ("auto", "sample", "pass"):
        raise ValueError(f"update must be 'auto', 'sample' or 'pass', got {update!r}")
    if update == "auto":
        update = "pass" if pool is not None else "sample"
    elif update == "sample" and pool is not None:
        raise ValueError("update='sample' cuts one sample after another, so a pool cannot "
                         "share its cuts: use update='pass' (or 'auto') with a pool")
    if working_sets is not None and len(working_sets) != n_samples:
        raise ValueError(f"got {n_samples} samples but {len(working_sets)} working sets")
    n_features = crfs[0].n_features
    if any(crf.n_features != n_features for crf in crfs):
        raise ValueError("every CRF of a batch needs the same features (all with the learned "
                         "edge feature, or none)")
    if qp is None:
        qp = MarginQP(n_samples, C, n_features=n_features)
    elif qp.n_samples != n_samples or qp.C != float(C) or qp.n_features != n_features:
        raise ValueError("the given MarginQP was compiled for another batch size, C or "
                         "number of features")

    ys = [crf.check_labelling(t, f"truth {n}") for n, (crf, t) in enumerate(zip(crfs, truths,
                                                                                 strict=True))]
    psi_truth = [crf.features(y) for crf, y in zip(crfs, ys, strict=True)]
    sets: list[list[np.ndarray]] = [[] for _ in range(n_samples)]
    keys: list[set[bytes]] = [set() for _ in range(n_samples)]
    dpsi: list[list[np.ndarray]] = [[] for _ in range(n_samples)]
    losses: list[list[float]] = [[] for _ in range(n_samples)]

    def add(n: int, y: np.ndarray, phi: np.ndarray | None = None) -> None:
        sets[n].append(y)
        keys[n].add(_key(y))
        dpsi[n].append((crfs[n].features(y) if phi is None else phi) - psi_truth[n])
        losses[n].append(hamming_loss(ys[n], y))

    def solve():
        return qp.solve([np.array(b).reshape(-1, n_features) for b in dpsi],
                        [np.array(b) for b in losses])

    if working_sets is not None:
        for n, ws in enumerate(working_sets):
            fresh = []
            for y in ws:
                y = crfs[n].check_labelling(y, f"working-set labelling of sample {n}")
                if _key(y) not in keys[n] and not np.array_equal(y, ys[n]):
                    fresh.append(y)
                    keys[n].add(_key(y))
            for y, phi in zip(fresh, crfs[n].features_of(fresh), strict=True):
                add(n, y, phi)
    if any(sets):
        solution = solve()
        w, xi = solution.w, solution.xi
    else:
        w = (initial_weights or CRFWeights()).as_array(learned=n_features == 4)
        xi = np.zeros(n_samples)
        solution = None

    iterations = 0
    converged = False
    everyone = list(range(n_samples))
    active = everyone  # the samples the next pass cuts
    # A cut is deterministic: a sample last cut under the current solution (w and ξ
    # unchanged since, as no constraint was added in between) would give the same labelling
    # and the same verdict, so it is not cut again. ``solved`` counts the QP solutions.
    solved = 0
    cut_at = [-1] * n_samples  # the solution each sample was last cut under
    while iterations < max_iterations:
        iterations += 1
        added: list[int] = []
        due = [n for n in active if cut_at[n] != solved]
        if update == "pass":  # every sample cut with the same w (in the pool, if any)
            weights = CRFWeights.from_array(w)
            if pool is None:
                cuts = [graph_cut(crfs[n], weights, ys[n]) for n in due]
            else:
                cuts = pool.cut_all([crfs[n] for n in due], weights, [ys[n] for n in due])
            candidates = dict(zip(due, cuts, strict=True))
        for n in active:
            if cut_at[n] == solved:
                continue
            cut_at[n] = solved
            # update="sample": each sample is cut with the w its predecessors left
            y = (candidates[n] if update == "pass"
                 else graph_cut(crfs[n], CRFWeights.from_array(w), ys[n]))
            key = _key(y)
            if key in keys[n]:
                continue
            phi = crfs[n].features(y)
            violation = hamming_loss(ys[n], y) - float(w @ (phi - psi_truth[n]))
            if violation > xi[n] + tol:
                add(n, y, phi)
                added.append(n)
                if update == "sample":
                    solution = solve()
                    w, xi = solution.w, solution.xi
                    solved += 1
        if not added and solution is not None:
            if recut == "all" or active is everyone:
                converged = True  # a pass over every sample added nothing
                break
            active = everyone  # the verification pass, with w unchanged
            continue
        if recut == "violated" and added:
            active = added
        if update == "pass" or solution is None:
            # A pass that adds nothing before any QP was solved only shows that w0 separates
            # the data; the optimum over the (empty) sets is w = 0, from which it continues.
            solution = solve()
            w, xi = solution.w, solution.xi
            solved += 1
    if max_iterations > 0 and not converged:
        warnings.warn(f"cutting plane stopped after {max_iterations} passes without converging",
                      RuntimeWarning, stacklevel=2)
    if solution is None:  # max_iterations == 0 and no working set: the QP over no constraint
        solution = solve()
    return LearningResult(
        weights=CRFWeights.from_array(solution.w),
        gamma=solution.gamma,
        working_sets=sets,
        duals=solution.duals,
        slacks=solution.xi,
        iterations=iterations,
        converged=converged,
        dpsi=[np.array(b).reshape(-1, n_features) for b in dpsi],
        losses=[np.array(b) for b in losses],
    )


def envelope_gradient(result: LearningResult, truths: Sequence[np.ndarray]) -> list[np.ndarray]:
    """∂γ/∂a for each sample's foreground logits a, by the envelope theorem.

    ∂γ/∂a_i = −w1*·(2yₙ_i − 1)·Σ_{k∈S_n: y_k,i ≠ yₙ_i} λ_k / P. It is exact wherever γ is
    differentiable and needs no linear system; pixels where no labelling of S_n differs from
    the truth get exactly 0. (With respect to probabilities z, divide by z(1 − z).)

    Args:
        result: the learner's result (working sets, multipliers, weights).
        truths: the ground-truth labellings, in the same order.

    Returns:
        One H×W float64 gradient per sample.
    """
    if len(truths) != len(result.working_sets):
        raise ValueError(f"got {len(truths)} truths for {len(result.working_sets)} working sets")
    w1 = result.weights.w1
    grads = []
    for truth, ws, lam in zip(truths, result.working_sets, result.duals, strict=True):
        t = np.asarray(truth).astype(np.uint8)
        grad = np.zeros(t.shape, dtype=np.float64)
        if ws:
            mismatch = np.stack(ws) != t  # K×H×W
            weighted = np.tensordot(lam, mismatch, axes=1)
            grad = -w1 * (2.0 * t - 1.0) * weighted / t.size
        grads.append(grad)
    return grads


def edge_feature_gradient(result: LearningResult, crfs: Sequence[GridCRF],
                          truths: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """∂γ/∂c for each sample's learned edge feature c_ij (one H×W array per edge direction,
    at each edge's source node), by the envelope theorem.

    Derivation. γ = min_{w≥0, ξ≥0} ½‖w‖² + (C/N)·Σ_n ξ_n subject to
    w·Δψ_k + ξ_n ≥ Δ_k for every k ∈ S_n, with Δψ_k = ψ(y_k) − ψ(yₙ) (features over P). Its
    Lagrangian is L = ½‖w‖² + (C/N)·Σξ − Σ_k λ_k(w·Δψ_k + ξ_n − Δ_k) − μ·ξ − ν·w, and the edge
    feature c enters only through Δψ_k, in its fourth entry Δψ4_k = Σ_(i,j) c_ij·([y_k,i ≠
    y_k,j] − [yₙ_i ≠ yₙ_j]) / P. With the working sets fixed, the envelope theorem gives
    dγ/dc = ∂L/∂c at the optimum (w*, ξ*, λ, μ, ν), i.e.
    ∂γ/∂c_ij = −w4*·Σ_{k∈S_n} λ_k·([y_k,i ≠ y_k,j] − [yₙ_i ≠ yₙ_j]) / P (DESIGN.md, general
    form): raising the feature of an edge that the violators cut (and the truth does not)
    raises their energy, which relaxes their margin constraints and lowers γ. Edges no
    labelling treats differently from the truth get exactly 0. Through c_ij = 1 − max(b_i,
    b_j) the boundary map gets −∂γ/∂c_ij at the node holding the maximum. Checked against
    central finite differences of γ with the working sets fixed (tests).

    Args:
        result: the learner's result on CRFs built with a boundary map (4 weights).
        crfs: those CRFs, in the same order.
        truths: the ground-truth labellings.

    Returns:
        Per sample, per edge direction, an H×W float64 gradient.

    Raises:
        ValueError: mismatched lengths, or CRFs without the learned edge feature.
    """
    return [[_padded(crf, edge, g) for edge, g in zip(crf.edges, per_edge, strict=True)]
            for crf, per_edge in zip(crfs, _edge_gradients(result, crfs, truths), strict=True)]


def _edge_gradients(result: LearningResult, crfs: Sequence[GridCRF],
                    truths: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """∂γ/∂c per sample and edge direction, on the edges' source nodes only (the
    ``edge.src`` part of the grid): −w4*·Σ_k λ_k·([y_k,i ≠ y_k,j] − [yₙ_i ≠ yₙ_j])/P, the
    differences taken as integers first, so that an edge every labelling treats as the truth
    does gets exactly 0."""
    if not len(truths) == len(crfs) == len(result.working_sets):
        raise ValueError(f"got {len(crfs)} CRFs and {len(truths)} truths for "
                         f"{len(result.working_sets)} working sets")
    if any(crf.n_features != 4 for crf in crfs):
        raise ValueError("the edge-feature gradient needs CRFs with the learned edge feature")
    w4 = result.weights.w4
    every = (slice(None),)
    grads = []
    for crf, truth, ws, lam in zip(crfs, truths, result.working_sets, result.duals,
                                   strict=True):
        t = crf.check_labelling(truth, "truth")
        stack = np.stack([crf.check_labelling(y) for y in ws]) if ws else None
        per_edge = []
        for edge in crf.edges:
            g = np.zeros(t[edge.src].shape, dtype=np.float64)
            if stack is not None:
                cut = (stack[every + edge.src] != stack[every + edge.dst]).view(np.int8)
                g = np.tensordot(lam, cut - (t[edge.src] != t[edge.dst]).view(np.int8), axes=1)
            per_edge.append(-w4 * g / crf.n_pixels)
        grads.append(per_edge)
    return grads


def _padded(crf: GridCRF, edge, values: np.ndarray) -> np.ndarray:
    """An H×W array holding ``values`` at the edge's source nodes, 0 elsewhere."""
    out = np.zeros(crf.shape, dtype=np.float64)
    out[edge.src] = values
    return out


def boundary_gradient(result: LearningResult, crfs: Sequence[GridCRF],
                      truths: Sequence[np.ndarray],
                      boundaries: Sequence[np.ndarray]) -> list[np.ndarray]:
    """∂γ/∂b for each sample's boundary map b, through c_ij = 1 − max(b_i, b_j): each edge's
    −∂γ/∂c_ij goes to the end holding the larger b (the source node on a tie, a
    subgradient), from :func:`edge_feature_gradient`.

    Returns:
        One H×W float64 gradient per sample.
    """
    grads = []
    for crf, b, per_edge in zip(crfs, boundaries, _edge_gradients(result, crfs, truths),
                                strict=True):
        b = np.asarray(b, dtype=np.float64)
        grad = np.zeros(crf.shape, dtype=np.float64)
        for edge, g in zip(crf.edges, per_edge, strict=True):
            src_wins = b[edge.src] >= b[edge.dst]
            grad[edge.src] -= np.where(src_wins, g, 0.0)
            grad[edge.dst] -= np.where(src_wins, 0.0, g)
        grads.append(grad)
    return grads


def _as_list(arrays, name: str) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray):
        if arrays.ndim < 3:
            raise ValueError(f"{name} must be a sequence of images (N×H×W array or list), "
                             f"got a {arrays.ndim}-D array")
        return list(arrays)
    return [np.asarray(a) for a in arrays]


def learn_weights(probs, images, truths, *, C: float = 1.0, connectivity: int = 4,
                  beta: float | None = None, tol: float = DEFAULT_TOL, max_iterations: int = 100,
                  initial_weights: CRFWeights | None = None,
                  working_sets: Sequence[Sequence[np.ndarray]] | None = None,
                  solver_options: dict | None = None, workers: int = 0,
                  recut: str = "all", update: str = "auto",
                  boundaries=None) -> LearningResult:
    """Learns CRF weights from CNN probabilities by the n-slack cutting plane (Algorithm 1).

    Args:
        probs: N foreground-probability maps (H×W each; sizes may differ between samples).
        images: N images (H×W or C×H×W) for the contrast term.
        truths: N binary ground-truth masks.
        C: slack penalty on the normalised scale (C_raw = C·P).
        connectivity: 4 or 8.
        beta: contrast β; None for the data-driven choice per image.
        tol: violation threshold ε.
        max_iterations: cap on inference passes.
        initial_weights: w for the first pass (default (1, 0, 0)).
        working_sets: warm-start S_n per sample.
        solver_options: Clarabel settings.
        workers: graph-cut worker processes for this call (0: in this process).
        recut: which samples a pass after the first cuts (see :func:`cutting_plane`).
        update: when the QP is re-solved (see :func:`cutting_plane`; ``auto``: after each
            sample without workers, after each pass with them).
        boundaries: N boundary maps (H×W in [0, 1]) for the learned edge feature ψ4 (then
            4 weights are learned), or None for the paper's three features.

    Returns:
        The learning result (``.weights``, ``.gamma``, ``.working_sets``, ``.duals``,
        ``.iterations``, ...).

    Raises:
        ValueError: empty batch, mismatched lengths or shapes, invalid probabilities or truths.
    """
    probs_l = _as_list(probs, "probs")
    images_l = _as_list(images, "images")
    truths_l = _as_list(truths, "truths")
    if not probs_l:
        raise ValueError("empty batch: learn_weights needs at least one sample")
    if not len(probs_l) == len(images_l) == len(truths_l):
        raise ValueError(f"probs, images and truths differ in length: "
                         f"{len(probs_l)}, {len(images_l)}, {len(truths_l)}")
    bounds = [None] * len(probs_l) if boundaries is None else _as_list(boundaries, "boundaries")
    if len(bounds) != len(probs_l):
        raise ValueError(f"got {len(bounds)} boundary maps for {len(probs_l)} samples")
    crfs = []
    for n, (p, img, b) in enumerate(zip(probs_l, images_l, bounds, strict=True)):
        try:
            crfs.append(GridCRF.from_probabilities(p, img, connectivity=connectivity, beta=beta,
                                                   boundary=b))
        except ValueError as err:
            raise ValueError(f"sample {n}: {err}") from None
    qp = MarginQP(len(crfs), C, solver_options=solver_options, n_features=crfs[0].n_features)
    pool = GraphCutPool(workers) if workers > 0 else None
    try:
        return cutting_plane(crfs, truths_l, C=C, tol=tol, max_iterations=max_iterations,
                             initial_weights=initial_weights, working_sets=working_sets, qp=qp,
                             pool=pool, recut=recut, update=update)
    finally:
        if pool is not None:
            pool.close()
