"""The grid CRF over a whole volume: exact MAP labelling by one 6-connected 3-D graph cut."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.crf.features import (
    CRFWeights,
    _as_channels,
    _beta_from_differences,
    _beta_of,
    _check_beta,
    _check_boundary,
    _check_labelling,
    _clamped_probabilities,
    _Edges,
    _require_weights,
    _squared_differences,
    _unary_costs,
)
from pipeline.crf.graphcut import _cut, _probability_box

__all__ = ["VOLUME_OFFSETS", "spacing_factors", "volume_energy", "volume_map_labelling"]

#: Edge offsets of the 6-neighbourhood, one per axis, each undirected edge once. Ordered so
#: that a volume of depth 1 has the 2-D grid's 4-connected edges in the 2-D order.
VOLUME_OFFSETS: tuple[tuple[int, int, int], ...] = ((0, 0, 1), (0, 1, 0), (1, 0, 0))


def spacing_factors(spacing: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """The factor of the pairwise weights along each axis: min(spacing) / spacing[k].

    An edge along axis k crosses a voxel face of area ∏_{j≠k} s_j = V / s_k, so a cut's
    surface area (the discrete Potts boundary term of Boykov and Kolmogorov's geodesic cuts)
    weights axis k by 1/s_k. Normalised by the finest spacing, the finest axes keep the
    learned weights unchanged: with isotropic in-plane spacing a slice's own edges carry
    exactly the 2-D CRF's weights, and edges across thicker slices count proportionally less.

    Args:
        spacing: voxel size per array axis (any unit), or None for an isotropic grid.

    Returns:
        Three factors in (0, 1], the largest 1 (all 1 for None).

    Raises:
        ValueError: not three finite values > 0.
    """
    if spacing is None:
        return np.ones(3, dtype=np.float64)
    try:
        s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three numbers > 0, got {spacing!r}") from None
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be three finite numbers > 0 (one per axis), "
                         f"got {spacing!r}")
    return s.min() / s


def _prepare(prob: np.ndarray, image: np.ndarray, spacing, beta: float | None,
             boundary: np.ndarray | None = None):
    """Validated unary costs, per-axis edges (contrast and, with a boundary volume, the
    learned edge feature 1 − max(b_i, b_j)), spacing factors and β of a volume."""
    cost0, cost1 = _unary_costs(prob, 3)
    shape = cost0.shape
    img = _as_channels(image, shape)
    bound = None if boundary is None else _check_boundary(boundary, shape)
    factors = spacing_factors(spacing)
    beta_value = _check_beta(beta)
    sq = _squared_differences(img, VOLUME_OFFSETS)
    if beta_value is None:
        beta_value = _beta_from_differences(sq)
    edges = []
    for offset, (d2, src, dst) in zip(VOLUME_OFFSETS, sq, strict=True):
        contrast = np.zeros(shape, dtype=np.float64)
        contrast[src] = np.exp(-beta_value * d2)
        learned = None
        if bound is not None:
            learned = np.zeros(shape, dtype=np.float64)
            learned[src] = 1.0 - np.maximum(bound[src], bound[dst])
        edges.append(_Edges(offset, src, dst, contrast, learned))
    return cost0, cost1, edges, _edge_factors(factors), beta_value


def volume_map_labelling(prob: np.ndarray, image: np.ndarray, weights: CRFWeights, *,
                         spacing: Sequence[float] | np.ndarray | None = None,
                         beta: float | None = None,
                         boundary: np.ndarray | None = None) -> np.ndarray:
    """Exact MAP labelling argmin_y E(y) of the grid CRF over a volume, by one graph cut.

    The energy is the 2-D CRF's (see :mod:`pipeline.crf.features`) with the 6-neighbourhood
    in place of the 4-neighbourhood: unary w1·Σ_i −log z_i(y_i), and for every edge (i, j)
    along axis k the pairwise cost f_k·(w2 + w3·exp(−β‖x_i − x_j‖²))·[y_i ≠ y_j], with
    f_k = :func:`spacing_factors` (all 1 without ``spacing``). With a ``boundary`` volume b
    (the boundary head's maps, stacked), every edge also gets the learned edge feature's
    f_k·w4·(1 − max(b_i, b_j))·[y_i ≠ y_j], the 2-D term on the edges of all three axes;
    without one, w4 is not used (as in :func:`pipeline.crf.graph_cut`). Normalising by the
    voxel count (as :func:`volume_energy` does) does not change the minimiser. With
    ``beta=None`` β is the data-driven 1/(2·mean‖x_i − x_j‖²) over all the volume's edges. A
    volume of depth 1 gives exactly :func:`pipeline.crf.map_labelling` with connectivity 4
    (with its boundary map, too). The energy is submodular
    for w ≥ 0, so the cut is exact.

    Args:
        prob: 3-D foreground probabilities in [0, 1] (clamped to [EPS, 1 − EPS]); any axis
            order, as long as ``image`` and ``spacing`` follow it.
        image: the volume's image, the same shape (or C× that shape) for the contrast term.
        weights: non-negative CRF weights (the 2-D model's learned w1, w2, w3, and w4
            with ``boundary``).
        spacing: voxel size per axis, for anisotropic volumes; None treats the grid as
            isotropic (every edge gets the learned weights).
        beta: contrast β; None for the data-driven choice over the whole volume.
        boundary: boundary strengths b in [0, 1], ``prob``'s shape, for the learned edge
            feature (weighted by w4); None: the paper's three features.

    Returns:
        uint8 labelling of ``prob``'s shape (1 = foreground).

    Raises:
        ValueError: prob not a finite non-empty 3-D array in [0, 1], image (or boundary) of
            another shape or not finite, boundary outside [0, 1], bad spacing or β, weights
            not a CRFWeights.
    """
    w = _require_weights(weights)
    z = _clamped_probabilities(prob, 3)
    img = _as_channels(image, z.shape)
    bound = None if boundary is None else _check_boundary(boundary, z.shape, convert=False)
    factors = spacing_factors(spacing)
    beta_value = _check_beta(beta)
    if beta_value is None:  # over the whole volume
        beta_value = _beta_of(img, VOLUME_OFFSETS)
    # persistency (see pipeline.crf.graphcut._cut_plan), decided on the probabilities: only
    # the box of the voxels it leaves open gets unaries, contrasts and the cut
    # (the learned edge feature is at most 1, as the contrast is)
    labels = (z > 0.5).astype(np.uint8)
    pairwise = w.w2 + w.w3 + (w.w4 if bound is not None else 0.0)
    box = _probability_box(z, w.w1, [f * pairwise for f in _edge_factors(factors)])
    if box is not None:
        labels[box] = _volume_cut(z[box], img[(slice(None), *box)], w, spacing, beta_value,
                                  None if bound is None else bound[box])
    return labels


def _edge_factors(factors: np.ndarray) -> list[float]:
    """The spacing factor of each edge direction, in the order of VOLUME_OFFSETS."""
    return [float(factors[offset.index(1)]) for offset in VOLUME_OFFSETS]


def _volume_cut(prob: np.ndarray, image: np.ndarray, w: CRFWeights, spacing,
                beta: float, boundary: np.ndarray | None = None) -> np.ndarray:
    """The exact cut of (a box of) a volume with a given β (and boundary volume)."""
    cost0, cost1, edges, factors, _ = _prepare(prob, image, spacing, beta, boundary)
    learned = boundary is not None and w.w4 > 0
    pairwise = w.w2 > 0 or w.w3 > 0 or learned
    capacities = []
    for edge, factor in zip(edges, factors, strict=True):
        capacity = edge.contrast  # built for this call: turned into the capacity in place
        capacity *= w.w3
        capacity += w.w2
        if learned:
            capacity += w.w4 * edge.learned
        if factor != 1.0:
            capacity *= factor
        capacities.append(_Edges(edge.offset, edge.src, edge.dst, capacity))
    # _cut gives edge e the capacity w2 + w3·e.contrast: with (w2, w3) = (0, 1) it takes the
    # per-axis capacities built above as they are (and adds no edges without a pairwise
    # weight).
    cut_weights = np.array([w.w1, 0.0, 1.0 if pairwise else 0.0])
    return _cut(cost1 - cost0, capacities, cut_weights, None)


def volume_energy(labelling: np.ndarray, prob: np.ndarray, image: np.ndarray,
                  weights: CRFWeights, *, spacing: Sequence[float] | np.ndarray | None = None,
                  beta: float | None = None, boundary: np.ndarray | None = None) -> float:
    """E(y)/P of a volume labelling: the energy :func:`volume_map_labelling` minimises,
    divided by the voxel count P as the 2-D features are.

    Args:
        labelling: binary labelling of ``prob``'s shape.
        prob: 3-D foreground probabilities in [0, 1].
        image: the same shape (or C× that shape) for the contrast term.
        weights: non-negative CRF weights.
        spacing: voxel size per axis, or None (isotropic).
        beta: contrast β; None for the data-driven choice over the whole volume.
        boundary: boundary strengths for the learned edge feature (weighted by w4), or None.

    Returns:
        E(y)/P.

    Raises:
        ValueError: as :func:`volume_map_labelling`, or a non-binary / misshapen labelling.
    """
    w = _require_weights(weights)
    cost0, cost1, edges, factors, _ = _prepare(prob, image, spacing, beta, boundary)
    y = _check_labelling(labelling, cost0.shape, "labelling")
    unary = float(np.where(y == 1, cost1, cost0).sum())
    cut = contrast = learned = 0.0
    for edge, factor in zip(edges, factors, strict=True):
        differ = y[edge.src] != y[edge.dst]
        cut += factor * np.count_nonzero(differ)
        contrast += factor * float(edge.contrast[edge.src][differ].sum())
        if edge.learned is not None:
            learned += factor * float(edge.learned[edge.src][differ].sum())
    return (w.w1 * unary + w.w2 * cut + w.w3 * contrast + w.w4 * learned) / y.size
