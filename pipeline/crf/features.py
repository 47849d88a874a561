"""The binary grid CRF of one image: weights, unary costs, contrast edges, features and energy.

Conventions (see ``DESIGN.md``):

* ``y`` is an H×W labelling in {0, 1}; 1 is foreground.
* ψ1(y) = Σ_i −log z_i(y_i), ψ2(y) = Σ_(i,j)∈E [y_i≠y_j],
  ψ3(y) = Σ_(i,j)∈E [y_i≠y_j]·exp(−β‖x_i−x_j‖²).
* Optionally (a CRF built with a ``boundary`` map b ∈ [0, 1]^(H×W), e.g. from the network),
  ψ4(y) = Σ_(i,j)∈E [y_i≠y_j]·c_ij with the learned edge feature c_ij = 1 − max(b_i, b_j):
  cutting across a strong boundary is cheap. Its weight w4 ≥ 0 keeps E submodular.
* Every feature and the Hamming loss are divided by the pixel count P, so that the slack
  penalty C does not depend on image size. ``energy`` therefore returns E(y)/P.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CONNECTIVITIES",
    "CRFWeights",
    "GridCRF",
    "energy",
    "hamming_loss",
]

# Edge offsets (drow, dcol); each undirected edge appears once.
CONNECTIVITIES: dict[int, tuple[tuple[int, int], ...]] = {
    4: ((0, 1), (1, 0)),
    8: ((0, 1), (1, 0), (1, 1), (1, -1)),
}

#: Probabilities are clamped to [EPS, 1 − EPS] before taking logarithms.
EPS = 1e-7


@dataclass(frozen=True)
class CRFWeights:
    """Weights of the CRF energy E(y) = w1·ψ1 + w2·ψ2 + w3·ψ3 (+ w4·ψ4), all non-negative.

    Attributes:
        w1: unary weight (negative log-probabilities of the CNN).
        w2: constant (Potts) pairwise weight.
        w3: contrast-sensitive pairwise weight.
        w4: weight of the learned edge feature (0, and unused, for CRFs without one).

    Raises:
        ValueError: a weight is negative or not finite (a negative pairwise weight would make
            the energy non-submodular, and graph cuts would no longer be exact).
    """

    w1: float = 1.0
    w2: float = 0.0
    w3: float = 0.0
    w4: float = 0.0

    def __post_init__(self) -> None:
        for name in ("w1", "w2", "w3", "w4"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"CRF weight {name} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def as_array(self, learned: bool = False) -> np.ndarray:
        """The weights as a float64 vector (w1, w2, w3), or with ``learned`` (w1, …, w4)."""
        values = [self.w1, self.w2, self.w3] + ([self.w4] if learned else [])
        return np.array(values, dtype=np.float64)

    def to_dict(self) -> dict[str, float]:
        """{"w1": …, "w2": …, "w3": …} (and "w4" where it is not 0), e.g. for JSON."""
        names = ("w1", "w2", "w3", "w4") if self.w4 else ("w1", "w2", "w3")
        return {name: float(getattr(self, name)) for name in names}

    @classmethod
    def from_array(cls, values: Sequence[float] | np.ndarray, *, clip: float = 0.0) -> CRFWeights:
        """Builds weights from a vector of 3 (w1, w2, w3) or 4 (…, w4) values; entries in
        [−clip, 0) are set to 0 (solver round-off)."""
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.shape not in ((3,), (4,)):
            raise ValueError(f"CRF weights need 3 values (w1, w2, w3) or 4 (w1, ..., w4), "
                             f"got shape {arr.shape}")
        arr = np.where((arr < 0) & (arr >= -clip), 0.0, arr)
        return cls(*arr.tolist())


@dataclass(frozen=True)
class _Edges:
    """One edge direction of the grid: node (r, c) is joined to (r + dr, c + dc).

    The same holds on an N-D grid (a volume): node p is joined to p + offset.
    """

    offset: tuple[int, ...]
    src: tuple[slice, ...]
    dst: tuple[slice, ...]
    contrast: np.ndarray  # H×W, exp(−β‖x_i−x_j‖²) at the source node, 0 where no edge starts
    learned: np.ndarray | None = None  # H×W, c_ij = 1 − max(b_i, b_j) at the source node

    @functools.cached_property
    def contrast_max(self) -> float:
        """The largest contrast of this direction (kept: every cut's persistency bound needs
        it)."""
        return float(self.contrast.max())

    @functools.cached_property
    def learned_max(self) -> float:
        """The largest learned edge feature of this direction (0 without one)."""
        return 0.0 if self.learned is None else float(self.learned.max())

    @property
    def structure(self) -> np.ndarray:
        """The 3×3 (3×3×3 on a volume) PyMaxflow structure that selects this single offset."""
        structure = np.zeros((3,) * len(self.offset), dtype=np.float64)
        structure[tuple(1 + d for d in self.offset)] = 1.0
        return structure


#: Largest grid (nodes) whose edge node indices :func:`_edge_nodes` keeps: 512², whose
#: entry holds 4 MB per edge direction; a training's images share one shape, inference's
#: persistency boxes rarely repeat one.
_EDGE_NODES_CACHE_MAX = 1 << 18


def _edge_nodes(shape: tuple[int, ...], offset: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The flat grid indices of the source and destination nodes of the edges p → p + offset
    inside ``shape``, in raster order of the sources: the ``src`` and ``dst`` parts of the
    grid as indices into its flattened arrays (read-only; kept for the last few shapes up
    to :data:`_EDGE_NODES_CACHE_MAX` nodes, shared by every grid and every cut of one)."""
    if int(np.prod(shape)) <= _EDGE_NODES_CACHE_MAX:
        return _kept_edge_nodes(tuple(shape), tuple(offset))
    return _new_edge_nodes(tuple(shape), tuple(offset))


def _new_edge_nodes(shape: tuple[int, ...], offset: tuple[int, ...]
                    ) -> tuple[np.ndarray, np.ndarray]:
    src, _ = _edge_slices(shape, offset)
    sources = np.arange(int(np.prod(shape)), dtype=np.intp).reshape(shape)[src].reshape(-1)
    strides = np.cumprod((1, *shape[:0:-1]))[::-1]  # of a flat index, per axis
    destinations = sources + int(np.dot(strides, offset))
    for nodes in (sources, destinations):
        nodes.flags.writeable = False
    return sources, destinations


_kept_edge_nodes = functools.lru_cache(maxsize=16)(_new_edge_nodes)


#: How the spatial axes are named in messages, by number of axes.
_AXES = {2: "H×W", 3: "D×H×W"}


def _edge_slices(shape: tuple[int, ...], offset: tuple[int, ...]) -> tuple[tuple, tuple]:
    """Source and destination slices of the edges p → p + offset that stay inside ``shape``."""
    src, dst = [], []
    for size, d in zip(shape, offset, strict=True):
        if d >= 0:
            src.append(slice(0, size - d))
            dst.append(slice(d, size))
        else:
            src.append(slice(-d, size))
            dst.append(slice(0, size + d))
    return tuple(src), tuple(dst)


def _as_channels(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Returns the image as C×H×W (C×D×H×W for a 3-D ``shape``) float64; raises ValueError
    if it does not match ``shape``."""
    img = np.asarray(image)
    spatial = len(shape)
    axes = _AXES.get(spatial, "×".join(["N"] * spatial))
    if img.ndim == spatial:
        img = img[None]
    if img.ndim != spatial + 1 or img.shape[1:] != tuple(shape):
        raise ValueError(
            f"image must be {axes} or C×{axes} with {axes} = {tuple(shape)}, "
            f"got shape {np.shape(image)}"
        )
    if not np.issubdtype(img.dtype, np.number) or np.issubdtype(img.dtype, np.complexfloating):
        raise ValueError(f"image must be real-valued, got dtype {img.dtype}")
    img = img.astype(np.float64, copy=False)
    if not np.all(np.isfinite(img)):
        raise ValueError("image contains NaN or infinite values")
    return img


def _check_connectivity(connectivity: int) -> tuple[tuple[int, int], ...]:
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return CONNECTIVITIES[connectivity]


def _squared_differences(image: np.ndarray, offsets) -> list[tuple[np.ndarray, tuple, tuple]]:
    """‖x_i − x_j‖² of every edge per offset, for a C×H×W (or C×D×H×W) image."""
    shape = image.shape[1:]
    out = []
    for offset in offsets:
        src, dst = _edge_slices(shape, offset)
        diff = image[(slice(None), *src)] - image[(slice(None), *dst)]
        out.append((np.einsum("c...,c...->...", diff, diff), src, dst))
    return out


def _beta_from_differences(sq: list[tuple[np.ndarray, tuple, tuple]]) -> float:
    """β = 1 / (2·mean‖x_i − x_j‖²) over all edges of :func:`_squared_differences` (0 when
    the mean is 0 or there are no edges)."""
    total = sum(float(d.sum()) for d, _, _ in sq)
    count = sum(d.size for d, _, _ in sq)
    mean = total / count if count else 0.0
    return 0.0 if mean <= 0 else 1.0 / (2.0 * mean)


def _check_beta(beta: float | None) -> float | None:
    """Returns β as a float (None stays None: data-driven); raises ValueError if invalid."""
    if beta is None:
        return None
    value = float(beta)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"beta must be None (data-driven) or a finite value >= 0, got {beta!r}")
    return value


def _unary_costs(prob: np.ndarray, ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(−log(1 − z), −log z) of probabilities z clamped to [EPS, 1 − EPS].

    Raises:
        ValueError: prob is not a finite, non-empty ``ndim``-D array in [0, 1].
    """
    z = _clamped_probabilities(prob, ndim)
    return -np.log1p(-z), -np.log(z)


def _clamped_probabilities(prob: np.ndarray, ndim: int = 2) -> np.ndarray:
    """Probabilities as float64, checked and clamped to [EPS, 1 − EPS].

    Raises:
        ValueError: prob is not a finite, non-empty ``ndim``-D array in [0, 1].
    """
    z = np.asarray(prob)
    if z.ndim != ndim or min(z.shape) < 1:
        raise ValueError(f"prob must be a non-empty {_AXES[ndim]} array, got shape {z.shape}")
    if not np.issubdtype(z.dtype, np.floating) and not np.issubdtype(z.dtype, np.integer):
        raise ValueError(f"prob must be numeric, got dtype {z.dtype}")
    z = z.astype(np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError("prob contains NaN or infinite values")
    if z.min() < 0 or z.max() > 1:
        raise ValueError(f"prob must lie in [0, 1], got range [{z.min():g}, {z.max():g}]")
    return np.clip(z, EPS, 1 - EPS)


def data_driven_beta(image: np.ndarray, *, connectivity: int = 4) -> float:
    """GrabCut's β = 1 / (2·mean‖x_i − x_j‖²) over the grid's edges (0 for a constant image).

    Args:
        image: H×W or C×H×W image.
        connectivity: 4 or 8, the edges the mean is taken over.

    Returns:
        β ≥ 0.
    """
    offsets = _check_connectivity(connectivity)
    return _beta_of(_as_channels(image, np.shape(image)[-2:]), offsets)


def _beta_of(image: np.ndarray, offsets) -> float:
    """``_beta_from_differences(_squared_differences(image, offsets))``, to the last bit,
    without keeping the per-edge arrays. A single channel is squared in place (the same
    products), not by ``np.dot``, whose BLAS threads oversubscribe the graph-cut workers'
    cores."""
    if image.shape[0] != 1:
        return _beta_from_differences(_squared_differences(image, offsets))
    shape = image.shape[1:]
    total, count = 0.0, 0
    for offset in offsets:
        src, dst = _edge_slices(shape, offset)
        diff = image[(0, *src)] - image[(0, *dst)]
        np.square(diff, out=diff)
        total += float(diff.sum())
        count += diff.size
    mean = total / count if count else 0.0
    return 0.0 if mean <= 0 else 1.0 / (2.0 * mean)


def _check_labelling(y: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.uint8:  # the cuts' own dtype: one pass decides it
        if arr.size and arr.max() > 1:
            raise ValueError(f"{name} must be binary (values 0 and 1 only)")
        return arr.copy()
    if not np.issubdtype(arr.dtype, np.number) or not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must be binary (values 0 and 1 only)")
    return arr.astype(np.uint8)


class GridCRF:
    """One image's CRF, prepared once and reused by every graph cut on it.

    Holds the unary costs −log z_i(0), −log z_i(1) and, per edge direction, the contrast term
    exp(−β‖x_i − x_j‖²). Build it with :meth:`from_probabilities` or :meth:`from_logits`.

    Attributes:
        shape: (H, W).
        cost0, cost1: H×W float64 unary costs of labels 0 and 1 (unnormalised).
        unary_difference: cost1 − cost0, all that graph cuts need of the unaries.
        edges: one entry per edge direction of the chosen connectivity.
        beta: the β used for the contrast term.
        connectivity: 4 or 8.
    """

    def __init__(self, cost0: np.ndarray, cost1: np.ndarray, image: np.ndarray, *,
                 connectivity: int = 4, beta: float | None = None,
                 boundary: np.ndarray | None = None) -> None:
        offsets = _check_connectivity(connectivity)
        self.shape: tuple[int, int] = tuple(cost0.shape)  # type: ignore[assignment]
        img = _as_channels(image, self.shape)
        bound = None if boundary is None else _check_boundary(boundary, self.shape)
        beta_value = _check_beta(beta)
        squared = _squared_differences(img, offsets)
        if beta_value is None:  # the data-driven β of the same differences, to the last bit
            beta_value = _beta_from_differences(squared)
        self.beta = beta_value
        self.connectivity = connectivity
        self.cost0 = cost0
        self.cost1 = cost1
        self.unary_difference = cost1 - cost0
        self._cost0_total = float(cost0.sum())
        edges = []
        for sq, src, dst in squared:
            contrast = np.zeros(self.shape, dtype=np.float64)
            contrast[src] = np.exp(-beta_value * sq)
            learned = None
            if bound is not None:
                learned = np.zeros(self.shape, dtype=np.float64)
                learned[src] = 1.0 - np.maximum(bound[src], bound[dst])
            edges.append(_Edges(offsets[len(edges)], src, dst, contrast, learned))
        self.edges: tuple[_Edges, ...] = tuple(edges)

    @property
    def n_pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_features(self) -> int:
        """3, or 4 with the learned edge feature (a CRF built with a boundary map)."""
        return 4 if self.edges and self.edges[0].learned is not None else 3

    @classmethod
    def from_probabilities(cls, prob: np.ndarray, image: np.ndarray, *, connectivity: int = 4,
                           beta: float | None = None,
                           boundary: np.ndarray | None = None) -> GridCRF:
        """Builds the CRF from foreground probabilities z in [0, 1] (clamped to [EPS, 1−EPS]).

        Args:
            prob: H×W foreground probabilities.
            image: H×W or C×H×W image for the contrast term.
            connectivity: 4 or 8.
            beta: contrast β; None for the data-driven GrabCut choice per image.
            boundary: H×W boundary strengths b in [0, 1] for the learned edge feature ψ4
                (None: the paper's three features).

        Raises:
            ValueError: prob is not a finite H×W array in [0, 1], or the image (or the
                boundary map) does not match.
        """
        cost0, cost1 = _unary_costs(prob, 2)
        return cls(cost0, cost1, image, connectivity=connectivity, beta=beta,
                   boundary=boundary)

    @classmethod
    def from_logits(cls, logit: np.ndarray, image: np.ndarray, *, connectivity: int = 4,
                    beta: float | None = None,
                    boundary: np.ndarray | None = None) -> GridCRF:
        """Builds the CRF from foreground logits a (z = sigmoid(a)), without clamping.

        −log z = softplus(−a) and −log(1 − z) = softplus(a), computed stably as
        max(±a, 0) + log1p(exp(−|a|)), the one log1p term shared by both (NumPy's
        ``logaddexp`` computes the same expression, with scalar exp/log1p: about 3× the
        time on a 256² map, to within 1 ulp of it).

        Raises:
            ValueError: logit is not a finite H×W array, or the image does not match.
        """
        a = np.asarray(logit, dtype=np.float64)
        if a.ndim != 2 or min(a.shape) < 1:
            raise ValueError(f"logits must be a non-empty H×W array, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError("logits contain NaN or infinite values")
        shared = np.log1p(np.exp(-np.abs(a)))
        return cls(np.maximum(a, 0.0) + shared, np.maximum(-a, 0.0) + shared, image,
                   connectivity=connectivity, beta=beta, boundary=boundary)

    def check_labelling(self, y: np.ndarray, name: str = "labelling") -> np.ndarray:
        """Returns y as uint8 after checking it is a binary H×W array of this CRF's shape."""
        return _check_labelling(y, self.shape, name)

    def features(self, y: np.ndarray) -> np.ndarray:
        """ψ(y)/P = (ψ1, ψ2, ψ3)/P (and ψ4/P with a learned edge feature) as a float64
        vector of :attr:`n_features` values."""
        return self._features(self.check_labelling(y)[None])[0]

    def features_of(self, ys: Sequence[np.ndarray]) -> np.ndarray:
        """:meth:`features` of several labellings at once (a working set), as a K×
        :attr:`n_features` array: the same sums as :meth:`features` gives one by one.

        Raises:
            ValueError: a labelling is not a binary array of this CRF's shape.
        """
        if len(ys) == 0:
            return np.empty((0, self.n_features), dtype=np.float64)
        return self._features(np.stack([self.check_labelling(y, f"labelling {k}")
                                        for k, y in enumerate(ys)]))

    def _features(self, ys: np.ndarray) -> np.ndarray:
        """The features of a checked K×H×W uint8 stack, K×n_features.

        Per labelling and edge direction, the pairwise sums gather the contrasts (and
        learned features) of the cut edges alone, in raster order of their source nodes: a
        labelling from a cut has a smooth outline, so about 1 % of the edges are cut, and
        the gather takes about a third of the time of a dot product over the whole grid
        (256², 8-connected; the same sums to round-off).
        """
        psi = np.zeros((len(ys), self.n_features), dtype=np.float64)
        # ψ1 = Σ cost0 + Σ_{y=1} (cost1 − cost0): one product per pixel instead of a select
        psi[:, 0] = self._cost0_total + np.einsum("kij,ij->k", ys, self.unary_difference)
        for edge in self.edges:
            sources = _edge_nodes(self.shape, edge.offset)[0]
            contrast = edge.contrast.reshape(-1)
            learned = None if edge.learned is None else edge.learned.reshape(-1)
            for k, y in enumerate(ys):
                cut = sources[np.flatnonzero(y[edge.src] != y[edge.dst])]
                psi[k, 1] += cut.size
                psi[k, 2] += contrast[cut].sum()
                if learned is not None:
                    psi[k, 3] += learned[cut].sum()
        return psi / self.n_pixels

    def energy(self, y: np.ndarray, weights: CRFWeights) -> float:
        """E(y)/P = w·ψ(y)/P."""
        return float(weights.as_array(self.n_features == 4) @ self.features(y))


def _check_boundary(boundary: np.ndarray, shape: tuple[int, ...], *,
                    convert: bool = True) -> np.ndarray:
    """The boundary map as float64 of ``shape`` in [0, 1] (as given, checked, with
    ``convert=False``: a volume's cut converts only the box it cuts); ValueError otherwise."""
    b = np.asarray(boundary)
    if b.shape != tuple(shape):
        raise ValueError(f"boundary must have shape {tuple(shape)}, got {b.shape}")
    if not np.issubdtype(b.dtype, np.number) or np.issubdtype(b.dtype, np.complexfloating):
        raise ValueError(f"boundary must be real-valued, got dtype {b.dtype}")
    if b.size and (not np.all(np.isfinite(b)) or b.min() < 0 or b.max() > 1):
        raise ValueError("boundary strengths must be finite and lie in [0, 1]")
    return b.astype(np.float64) if convert else b


def hamming_loss(truth: np.ndarray, y: np.ndarray) -> float:
    """Δ(truth, y)/P: the fraction of pixels whose labels differ."""
    t = np.asarray(truth)
    yy = np.asarray(y)
    if t.shape != yy.shape:
        raise ValueError(f"truth and labelling shapes differ: {t.shape} vs {yy.shape}")
    return float(np.count_nonzero(t != yy)) / t.size


def energy(labelling: np.ndarray, prob: np.ndarray, image: np.ndarray, weights: CRFWeights, *,
           connectivity: int = 4, beta: float | None = None) -> float:
    """E(y) = w·ψ(y) of a labelling, divided by the pixel count P.

    Args:
        labelling: H×W binary labelling.
        prob: H×W foreground probabilities in [0, 1].
        image: H×W or C×H×W image (colour contrast uses squared Euclidean distance).
        weights: CRF weights.
        connectivity: 4 or 8.
        beta: contrast β; None for the data-driven choice per image.

    Returns:
        E(y)/P.

    Raises:
        ValueError: shapes mismatch, prob out of range, non-binary labelling, bad settings.
    """
    _require_weights(weights)
    crf = GridCRF.from_probabilities(prob, image, connectivity=connectivity, beta=beta)
    return crf.energy(labelling, weights)


def _require_weights(weights: object) -> CRFWeights:
    if not isinstance(weights, CRFWeights):
        raise ValueError(f"weights must be a CRFWeights, got {type(weights).__name__}")
    return weights
