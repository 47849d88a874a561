"""Noisy rectangles with simulated CNN probabilities: the smallest CRF learning problem."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NoisyBlocks", "noisy_blocks"]


@dataclass
class NoisyBlocks:
    """One synthetic sample.

    Attributes:
        image: H×W float image (bright blocks on a dark background, with noise).
        truth: H×W uint8 mask of the blocks.
        prob: H×W simulated CNN foreground probability (per-pixel noisy, so thresholding it
            gives speckle that a CRF can clean up).
    """

    image: np.ndarray
    truth: np.ndarray
    prob: np.ndarray


def noisy_blocks(shape: tuple[int, int] = (64, 64), *, n_blocks: int = 3,
                 noise: float = 1.5, image_noise: float = 0.2,
                 rng: np.random.Generator | int | None = None) -> NoisyBlocks:
    """Generates rectangles as ground truth, a noisy image of them and noisy probabilities.

    The probability of pixel i is sigmoid(2·(2t_i − 1) + noise·ε_i) with ε_i standard normal,
    i.e. a CNN that is right on average but wrong on many isolated pixels.

    Args:
        shape: (H, W), each at least 8.
        n_blocks: number of rectangles (they may overlap).
        noise: standard deviation of the logit noise.
        image_noise: standard deviation of the image noise (blocks are 1, background 0).
        rng: a numpy Generator or a seed.

    Returns:
        The sample.

    Raises:
        ValueError: shape smaller than 8×8 or negative noise.
    """
    height, width = shape
    if height < 8 or width < 8:
        raise ValueError(f"noisy_blocks needs a shape of at least 8×8, got {shape}")
    if noise < 0 or image_noise < 0:
        raise ValueError("noise levels must be >= 0")
    gen = np.random.default_rng(rng)
    truth = np.zeros(shape, dtype=np.uint8)
    for _ in range(n_blocks):
        h = gen.integers(height // 6, height // 2 + 1)
        w = gen.integers(width // 6, width // 2 + 1)
        r = gen.integers(0, height - h + 1)
        c = gen.integers(0, width - w + 1)
        truth[r:r + h, c:c + w] = 1
    image = truth + image_noise * gen.standard_normal(shape)
    logit = 2.0 * (2.0 * truth - 1.0) + noise * gen.standard_normal(shape)
    prob = 1.0 / (1.0 + np.exp(-logit))
    return NoisyBlocks(image=image, truth=truth, prob=prob)
