"""Brute-force oracle: the CRF energy written with plain loops, and exhaustive minimisation."""

from __future__ import annotations

import functools
import itertools

import numpy as np


def neighbours(height: int, width: int, connectivity: int) -> list[tuple[tuple, tuple]]:
    """Every unordered pair of grid neighbours, found by distance (not by the project's offsets)."""
    max_d2 = 1 if connectivity == 4 else 2
    pixels = [(r, c) for r in range(height) for c in range(width)]
    pairs = []
    for p, q in itertools.combinations(pixels, 2):
        d2 = (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2
        if d2 <= max_d2:
            pairs.append((p, q))
    return pairs


def beta_loop(image: np.ndarray, connectivity: int) -> float:
    img = image if image.ndim == 3 else image[None]
    pairs = neighbours(img.shape[1], img.shape[2], connectivity)
    sq = [float(np.sum((img[:, p[0], p[1]] - img[:, q[0], q[1]]) ** 2)) for p, q in pairs]
    mean = sum(sq) / len(sq)
    return 0.0 if mean == 0 else 1.0 / (2.0 * mean)


def features_loop(cost0, cost1, image, y, connectivity: int, beta: float) -> np.ndarray:
    """(ψ1, ψ2, ψ3) / P by loops over pixels and neighbour pairs."""
    img = image if image.ndim == 3 else image[None]
    height, width = y.shape
    psi1 = sum(cost1[r, c] if y[r, c] else cost0[r, c]
               for r in range(height) for c in range(width))
    psi2 = psi3 = 0.0
    for p, q in neighbours(height, width, connectivity):
        if y[p] != y[q]:
            psi2 += 1.0
            psi3 += np.exp(-beta * np.sum((img[:, p[0], p[1]] - img[:, q[0], q[1]]) ** 2))
    return np.array([psi1, psi2, psi3]) / y.size


def all_labellings(shape):
    for bits in itertools.product((0, 1), repeat=shape[0] * shape[1]):
        yield np.array(bits, dtype=np.uint8).reshape(shape)


def brute_minimum(cost0, cost1, image, weights, connectivity, beta, truth=None) -> float:
    """min_y w·ψ(y) − [truth given] Δ(truth, y)/P over all labellings."""
    best = np.inf
    for y in all_labellings(cost0.shape):
        value = weights @ features_loop(cost0, cost1, image, y, connectivity, beta)
        if truth is not None:
            value -= np.count_nonzero(y != truth) / y.size
        best = min(best, value)
    return best


# --- volumes (3-D grids, 6-connected) -------------------------------------------------------

@functools.lru_cache
def volume_neighbours(shape: tuple[int, ...]) -> tuple[tuple[tuple, tuple, int], ...]:
    """Every unordered pair of 6-neighbours (distance 1) with the axis they differ along."""
    voxels = list(itertools.product(*(range(n) for n in shape)))
    pairs = []
    for p, q in itertools.combinations(voxels, 2):
        steps = [abs(a - b) for a, b in zip(p, q, strict=True)]
        if sum(steps) == 1:
            pairs.append((p, q, steps.index(1)))
    return tuple(pairs)


def _voxel(image, p):
    img = image if image.ndim == len(p) + 1 else image[None]
    return img[(slice(None), *p)]


def volume_beta_loop(image: np.ndarray, shape) -> float:
    pairs = volume_neighbours(tuple(shape))
    sq = [float(np.sum((_voxel(image, p) - _voxel(image, q)) ** 2)) for p, q, _ in pairs]
    mean = sum(sq) / len(sq) if sq else 0.0
    return 0.0 if mean == 0 else 1.0 / (2.0 * mean)


def volume_energy_loop(cost0, cost1, image, y, weights, beta, spacing=None,
                       boundary=None) -> float:
    """w·ψ(y)/P on a volume by loops; an edge along axis k counts min(spacing)/spacing[k].
    With a ``boundary`` volume, ``weights`` has a fourth entry, for 1 − max(b_p, b_q)."""
    shape = y.shape
    factor = [1.0] * 3 if spacing is None else [min(spacing) / s for s in spacing]
    unary = sum(cost1[p] if y[p] else cost0[p] for p in itertools.product(*map(range, shape)))
    potts = contrast = learned = 0.0
    for p, q, axis in volume_neighbours(tuple(shape)):
        if y[p] != y[q]:
            potts += factor[axis]
            diff = _voxel(image, p) - _voxel(image, q)
            contrast += factor[axis] * np.exp(-beta * np.sum(diff ** 2))
            if boundary is not None:
                learned += factor[axis] * (1.0 - max(boundary[p], boundary[q]))
    w1, w2, w3 = weights[:3]
    w4 = weights[3] if boundary is not None else 0.0
    return (w1 * unary + w2 * potts + w3 * contrast + w4 * learned) / y.size


def volume_brute_minimum(cost0, cost1, image, weights, beta, spacing=None,
                         boundary=None) -> float:
    """min_y of :func:`volume_energy_loop` over all 2^P labellings of the volume."""
    best = np.inf
    for bits in itertools.product((0, 1), repeat=cost0.size):
        y = np.array(bits, dtype=np.uint8).reshape(cost0.shape)
        best = min(best, volume_energy_loop(cost0, cost1, image, y, weights, beta, spacing,
                                            boundary))
    return best
