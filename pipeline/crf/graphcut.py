"""Exact MAP and loss-augmented inference on the grid CRF by graph cut (PyMaxflow)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import multiprocessing
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import maxflow
import numpy as np

from pipeline.crf.features import (
    CRFWeights,
    GridCRF,
    _as_channels,
    _beta_of,
    _check_beta,
    _check_boundary,
    _check_connectivity,
    _clamped_probabilities,
    _edge_nodes,
    _edge_slices,
    _Edges,
    _require_weights,
)

__all__ = ["GraphCutPool", "PendingLabellings", "graph_cut", "keep_freed_memory",
           "loss_augmented_labelling", "map_labelling"]


_GRAPHS = threading.local()
#: Largest grid (pixels) whose graph a thread keeps for reuse: about 150 MB at 1024².
_REUSE_MAX_NODES = 1 << 20


def _empty_graph(n_nodes: int, n_edges: int) -> maxflow.GraphFloat:
    """An empty graph for a cut, this thread's reused one where the grid is small enough.

    ``reset()`` keeps the node and arc memory, so a run of same-sized cuts (a volume's
    slices, a cutting plane's images) allocates it once: a fresh 512² graph per cut spent
    about 40 % of the cut's time faulting in new pages. A grid larger than
    :data:`_REUSE_MAX_NODES` gets a graph of its own, freed after its cut, so one huge image
    does not pin its memory to the thread.
    """
    if n_nodes > _REUSE_MAX_NODES:
        return maxflow.Graph[float](n_nodes, n_edges)
    graph = getattr(_GRAPHS, "graph", None)
    if graph is None:
        graph = _GRAPHS.graph = maxflow.Graph[float](n_nodes, n_edges)
    else:
        graph.reset()
    return graph


#: Relative slack on :func:`_pairwise_bound`, for round-off in sums of capacities: a pixel is
#: only taken as decided when its unary beats the bound by more than that.
_BOUND_SLACK = 1e-6


#: Absolute slack, in logit units, of the decision :func:`_probability_box` takes on
#: probabilities (for 2-D maps and for volumes).
_LOGIT_SLACK = 1e-12
#: Below this unary weight, w1·(cost1 − cost0) can underflow: no pixel is decided by it.
_TINY_UNARY_WEIGHT = 1e-250


def _pairwise_bound(capacity_maxima: Sequence[float]) -> float:
    """An upper bound on the summed capacity of the edges at any one node, from the largest
    capacity of each edge direction: a direction gives a node at most two edges."""
    return 2.0 * sum(capacity_maxima) * (1.0 + _BOUND_SLACK)


def _probability_box(z: np.ndarray, w1: float, capacity_maxima: Sequence[float]
                     ) -> tuple[slice, ...] | None:
    """:func:`_undecided_box` with persistency decided on clamped probabilities ``z`` before
    any unary is computed: w1·|logit z| above :func:`_pairwise_bound` fixes the label."""
    if w1 <= _TINY_UNARY_WEIGHT:  # no unary (or w1·(cost1 − cost0) underflows): cut it all
        return tuple(slice(0, n) for n in z.shape)
    # in logit units, with room for the round-off of z's logit itself (about 1e-16), which a
    # tiny pairwise weight's bound alone would not leave
    margin = min(_pairwise_bound(capacity_maxima) / w1 + _LOGIT_SLACK, 700.0)  # exp(700) fits
    lo, hi = 1.0 / (1.0 + np.exp(margin)), 1.0 / (1.0 + np.exp(-margin))
    return _undecided_box((z >= lo) & (z <= hi))


def _undecided_box(undecided: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the ``undecided`` pixels grown by one pixel on every side (clipped
    to the grid), or None when every pixel is decided."""
    box = []
    for axis, size in enumerate(undecided.shape):
        others = tuple(a for a in range(undecided.ndim) if a != axis)
        hit = np.flatnonzero(undecided.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, size)))
    return tuple(box)


def _grid_cut(diff: np.ndarray, edges: Sequence[tuple], w2: float, w3: float,
              w4: float = 0.0) -> np.ndarray:
    """The cut of one grid: ``diff`` = w1·(cost1 − cost0) per node (overwritten), ``edges``
    (offset, contrast, learned edge feature or None) per edge direction; edge capacity
    w2 + w3·contrast (+ w4·learned).

    Each direction's edges go in with one ``add_edges`` call on the node ids of its source
    and destination slices, in raster order of the source nodes: the graph
    ``add_grid_edges(..., symmetric=True)`` builds with that offset's structure, arc for arc
    (so max-flow returns the same labels, ties included). Building it takes about 40 % less
    time than the grid call, which walks every node through the structure; the whole cut of
    a 256² grid about 12 % less, 4- or 8-connected (``benchmarks/bench_crf.py``,
    ``graphcut_overhead_ratio[_c8]``: 0.89 and 0.87 against the grid call)."""
    # Only the difference of the two unaries matters: it goes to the source edge where
    # positive and to the sink edge where negative; label 1 is the sink side.
    source = np.maximum(diff, 0.0)
    np.negative(diff, out=diff)
    np.maximum(diff, 0.0, out=diff)
    graph = _empty_graph(diff.size, diff.size * len(edges))
    ids = graph.add_grid_nodes(diff.shape)
    graph.add_grid_tedges(ids, source, diff)
    first = int(ids.flat[0])  # 0 in a fresh or reset graph
    if w2 > 0 or w3 > 0 or w4 > 0:
        for offset, contrast, learned in edges:
            src, _ = _edge_slices(diff.shape, offset)
            sources, destinations = _edge_nodes(diff.shape, offset)  # cached per shape
            if first:
                sources, destinations = sources + first, destinations + first
            if w3 > 0:
                capacity = np.multiply(contrast[src], w3)
                capacity += w2
            else:
                capacity = np.full(contrast[src].shape, w2)
            if w4 > 0 and learned is not None:
                capacity += np.multiply(learned[src], w4)
            capacity = capacity.reshape(-1)
            graph.add_edges(sources, destinations, capacity, capacity)
    graph.maxflow()
    return graph.get_grid_segments(ids).astype(np.uint8)


@dataclass
class _Plan:
    """A cut reduced by persistency: the labels the unaries decide, and the part left to cut.

    ``labels`` holds every pixel's label where ``box`` is None; otherwise ``run(*args)`` gives
    the labels inside ``box`` (a plain function on plain arrays, so a pool worker can run it
    on the box's data alone).
    """

    labels: np.ndarray
    box: tuple[slice, ...] | None = None
    run: Callable[..., np.ndarray] | None = None
    args: tuple = ()

    def solve(self, box_labels: np.ndarray | None = None) -> np.ndarray:
        """The full labelling, given the box's labels (computed here when not given)."""
        if self.box is not None:
            self.labels[self.box] = self.run(*self.args) if box_labels is None else box_labels
        return self.labels


def _cut_plan(unary_difference: np.ndarray, edges: Sequence[_Edges], weights: np.ndarray,
              truth: np.ndarray | None) -> _Plan:
    """Persistency on prepared arrays (no validation): a node whose unary difference |d_i|
    exceeds the summed capacity of its edges takes the label its unary prefers in EVERY
    minimiser (flipping it to that label lowers the energy whatever its neighbours are), so
    only the bounding box of the other nodes, grown by one (decided) node, is left to cut;
    the decided ring carries the box's border. On a CT slice whose network is confident away
    from the organ that is about a tenth of the grid."""
    w1, w2, w3 = weights[:3]
    w4 = float(weights[3]) if len(weights) > 3 else 0.0
    learned = w4 > 0 and bool(edges) and edges[0].learned is not None
    diff = unary_difference * w1
    if truth is not None:
        diff += 2.0 * truth - 1.0  # −1 on the unary of the label that differs from the truth
    labels = (diff < 0).astype(np.uint8)
    maxima = [w2 + (w3 * e.contrast_max if w3 > 0 else 0.0)
              + (w4 * e.learned_max if learned else 0.0) for e in edges]
    box = _undecided_box(np.abs(diff) <= _pairwise_bound(maxima))
    if box is None:
        return _Plan(labels)
    return _Plan(labels, box, _grid_cut,
                 (diff[box], [(e.offset, e.contrast[box],
                               e.learned[box] if learned else None) for e in edges],
                  w2, w3, w4 if learned else 0.0))


def _cut(unary_difference: np.ndarray, edges: Sequence[_Edges], weights: np.ndarray,
         truth: np.ndarray | None) -> np.ndarray:
    """Graph cut on prepared arrays (no validation), reduced by persistency (:func:`_cut_plan`)."""
    return _cut_plan(unary_difference, edges, weights, truth).solve()


def _crop_map(prob: np.ndarray, image: np.ndarray, weights: CRFWeights, connectivity: int,
              beta: float, boundary: np.ndarray | None = None) -> np.ndarray:
    """MAP labelling of a crop of (probabilities, C×H×W image[, boundary map]) with a given β."""
    crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity, beta=beta,
                                     boundary=boundary)
    return graph_cut(crf, weights)


def _map_plan(prob: np.ndarray, image: np.ndarray, weights: CRFWeights, connectivity: int,
              beta: float | None, boundary: np.ndarray | None = None) -> _Plan:
    """:func:`map_labelling` reduced by persistency before any CRF is built: w1·|logit z| above
    the pairwise bound (contrasts and learned edge features are at most 1) fixes a pixel's
    label, so only the box of the other pixels gets unaries, contrasts and a cut. β is taken
    over the whole image."""
    w = _require_weights(weights)
    offsets = _check_connectivity(connectivity)
    z = _clamped_probabilities(prob, 2)
    img = _as_channels(image, z.shape)
    bound = None if boundary is None else _check_boundary(boundary, z.shape, convert=False)
    # the box's crops go out as given (float32 maps travel at half the size): the crop's
    # CRF converts and clamps them exactly as z and img were
    given, raw = np.asarray(prob), np.asarray(image)
    raw = raw[None] if raw.ndim == 2 else raw
    beta_value = _check_beta(beta)
    if beta_value is None:
        beta_value = _beta_of(img, offsets)
    labels = (z > 0.5).astype(np.uint8)
    pairwise = w.w2 + w.w3 + (w.w4 if bound is not None else 0.0)
    box = _probability_box(z, w.w1, [pairwise] * len(offsets))
    if box is None:
        return _Plan(labels)
    args = (given[box], raw[(slice(None), *box)], w, connectivity, beta_value)
    if bound is not None:
        args += (bound[box],)
    return _Plan(labels, box, _crop_map, args)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Lets glibc's malloc keep freed memory for reuse instead of handing each freed
    slice-sized array back to the OS (arrays of up to 32 MB come from the heap, and up to
    256 MB of free heap is kept). A process that runs graph cuts slice after slice otherwise
    page-faults every array it builds afresh: the pool's workers run this as their
    initialiser (two workers cut 24 slices of 512² in 0.31–0.37 s instead of 0.41 s before
    persistency), and ``mmcrf infer``/``evaluate`` and the bundles' volume and frame
    inference and evaluation call it for their own process (its serial CRF on those slices:
    about 0.07 s instead of 0.10 s). Changes only the calling process's malloc settings;
    without glibc, a no-op.

    Returns:
        Whether both settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    trim_set = mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    return bool(mmap_set and trim_set)


def _run_boxes(jobs: list[tuple[Callable[..., np.ndarray], tuple]]) -> list[np.ndarray]:
    """Pool-worker task: the box labels of several plans."""
    return [run(*args) for run, args in jobs]


def graph_cut(crf: GridCRF, weights: CRFWeights, truth: np.ndarray | None = None) -> np.ndarray:
    """Minimises E(y) (or E(y) − Δ(truth, y) when ``truth`` is given) exactly by graph cut.

    The graph is built on the unnormalised energy P·E, which has the same minimisers as the
    normalised one. Label 1 is the sink side: the source edge of a node carries the cost of
    label 1. The loss augmentation subtracts 1 from the unary of the label that differs from
    the truth, which keeps the energy submodular.

    Args:
        crf: the prepared CRF of one image.
        weights: non-negative CRF weights.
        truth: H×W binary ground truth for loss-augmented inference, or None for MAP.

    Returns:
        H×W uint8 labelling.
    """
    w = _require_weights(weights).as_array(learned=True)  # w4 only cuts learned edges
    t = None if truth is None else crf.check_labelling(truth, "truth")
    return _cut(crf.unary_difference, crf.edges, w, t)


def _pair_up(probs: Sequence[np.ndarray], images: Sequence[np.ndarray], weights: CRFWeights,
             boundaries: Sequence[np.ndarray] | None) -> Sequence[np.ndarray | None]:
    """The boundary map of each pair (None each without); ValueError for lengths that differ."""
    _require_weights(weights)
    if len(probs) != len(images):
        raise ValueError(f"got {len(probs)} probability maps but {len(images)} images")
    if boundaries is None:
        return [None] * len(probs)
    if len(boundaries) != len(probs):
        raise ValueError(f"got {len(probs)} probability maps but {len(boundaries)} "
                         f"boundary maps")
    return boundaries


class GraphCutPool:
    """Worker processes for graph cuts (PyMaxflow holds the GIL, so threads do not help).

    The workers start once (``spawn``; they import NumPy and PyMaxflow, not torch) and are
    reused by every call. As with any process pool, a script that creates one must guard its
    entry point with ``if __name__ == "__main__":``.

    Args:
        workers: number of processes (≥ 1).
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a graph-cut pool needs at least 1 worker, got {workers}")
        self.workers = int(workers)
        self._executor = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"),
                                             initializer=keep_freed_memory)

    def cut_all(self, crfs: Sequence[GridCRF], weights: CRFWeights,
                truths: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Graph cut of every CRF (loss-augmented where a truth is given), in order."""
        w = _require_weights(weights).as_array(learned=True)
        truths = [None] * len(crfs) if truths is None else truths
        if len(truths) != len(crfs):
            raise ValueError(f"got {len(crfs)} CRFs but {len(truths)} truths")
        return self._solve([
            functools.partial(_cut_plan, crf.unary_difference, crf.edges, w,
                              None if t is None else crf.check_labelling(t, "truth"))
            for crf, t in zip(crfs, truths, strict=True)])

    def map_labellings(self, probs: Sequence[np.ndarray], images: Sequence[np.ndarray],
                       weights: CRFWeights, *, connectivity: int = 4,
                       beta: float | None = None,
                       boundaries: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """:func:`map_labelling` of every (probability, image[, boundary map]) pair, in order.
        This process checks each pair, takes β and decides the confident pixels; only the
        boxes left to cut travel to the workers, which build their CRFs and cut them."""
        bounds = _pair_up(probs, images, weights, boundaries)
        return self._solve([functools.partial(_map_plan, p, x, weights, connectivity, beta, b)
                            for p, x, b in zip(probs, images, bounds, strict=True)])

    def submit_map_labellings(self, probs: Sequence[np.ndarray], images: Sequence[np.ndarray],
                              weights: CRFWeights, *, connectivity: int = 4,
                              beta: float | None = None,
                              boundaries: Sequence[np.ndarray] | None = None
                              ) -> PendingLabellings:
        """Starts :func:`map_labelling` of every (probability, image) pair and returns at once,
        so this process is free (e.g. for the network's next batch) while the cuts run. As in
        :meth:`map_labellings`, this process checks each pair, takes β and decides the
        confident pixels; only the boxes left to cut travel to a worker (a few percent of a
        confident network's slice, instead of whole slices). The labellings are those of
        :func:`map_labelling`, bit for bit.

        Returns:
            The pending labellings; ``result()`` waits for them, in order.

        Raises:
            ValueError: a bad pair (the message names what is wrong), or lengths that differ.
        """
        bounds = _pair_up(probs, images, weights, boundaries)
        return self._submit([_map_plan(p, x, weights, connectivity, beta, b)
                             for p, x, b in zip(probs, images, bounds, strict=True)])

    def _solve(self, plans: list[Callable[[], _Plan]]) -> list[np.ndarray]:
        """Makes each plan here and cuts its box in the workers; labellings in order.

        Plans go in about 4 chunks per worker (few round trips for many cheap cuts, such as a
        volume's mostly empty slices), each chunk a stride through the plans, so that
        neighbouring slices, whose cuts cost alike, spread over the workers. A chunk is sent
        as soon as its plans are made, so the workers cut while this process plans the rest.
        """
        n_chunks = min(len(plans), 4 * self.workers)
        sent = []
        for k in range(n_chunks):
            indices = list(range(k, len(plans), n_chunks))
            sent.append((indices, self._submit([plans[i]() for i in indices])))
        out: list[np.ndarray | None] = [None] * len(plans)
        for indices, pending in sent:
            for i, labels in zip(indices, pending.result(), strict=True):
                out[i] = labels
        return out  # type: ignore[return-value]

    def _submit(self, plans: list[_Plan]) -> PendingLabellings:
        """Sends the boxes the plans leave to cut to one worker (nothing when none is left)."""
        jobs = [(plan.run, plan.args) for plan in plans if plan.box is not None]
        return PendingLabellings(plans, self._executor.submit(_run_boxes, jobs) if jobs
                                 else None)

    def close(self) -> None:
        """Stops the workers."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> GraphCutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PendingLabellings:
    """Labellings being cut in a pool (:meth:`GraphCutPool.submit_map_labellings`)."""

    def __init__(self, plans: list[_Plan], future) -> None:
        self._plans, self._future = plans, future

    def result(self) -> list[np.ndarray]:
        """The H×W uint8 labellings, in the order the pairs were given (waits for them)."""
        boxes = iter(self._future.result() if self._future is not None else ())
        return [plan.solve(next(boxes)) if plan.box is not None else plan.labels
                for plan in self._plans]


def map_labelling(prob: np.ndarray, image: np.ndarray, weights: CRFWeights, *,
                  connectivity: int = 4, beta: float | None = None,
                  boundary: np.ndarray | None = None) -> np.ndarray:
    """Exact MAP labelling argmin_y E(y) by graph cut.

    Args:
        prob: H×W foreground probabilities in [0, 1].
        image: H×W or C×H×W image for the contrast term.
        weights: non-negative CRF weights.
        connectivity: 4 or 8.
        beta: contrast β; None for the data-driven choice per image.
        boundary: H×W boundary strengths in [0, 1] for the learned edge feature (weighted
            by ``weights.w4``); None: the paper's three features.

    Returns:
        H×W uint8 labelling (1 = foreground).

    Raises:
        ValueError: shapes mismatch, prob out of range or not finite, bad weights or settings.
    """
    return _map_plan(prob, image, weights, connectivity, beta, boundary).solve()


def loss_augmented_labelling(prob: np.ndarray, image: np.ndarray, weights: CRFWeights,
                             truth: np.ndarray, *, connectivity: int = 4,
                             beta: float | None = None,
                             boundary: np.ndarray | None = None) -> np.ndarray:
    """The most violating labelling argmin_y E(y) − Δ(truth, y), exactly, by graph cut.

    E and Δ are both normalised by the pixel count, so the argmin is that of the raw problem.

    Args:
        prob: H×W foreground probabilities in [0, 1].
        image: H×W or C×H×W image for the contrast term.
        weights: non-negative CRF weights.
        truth: H×W binary ground truth.
        connectivity: 4 or 8.
        beta: contrast β; None for the data-driven choice per image.
        boundary: H×W boundary strengths for the learned edge feature (None: without it).

    Returns:
        H×W uint8 labelling.

    Raises:
        ValueError: shapes mismatch, non-binary truth, prob out of range, bad weights.
    """
    _require_weights(weights)
    crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity, beta=beta,
                                     boundary=boundary)
    return graph_cut(crf, weights, truth)
