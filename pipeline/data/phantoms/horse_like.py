"""Horse-like photographs laid out like the Weizmann set: the horse bundle's demo data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_horse_like_set"]


def _silhouette(height: int, width: int, gen: np.random.Generator) -> np.ndarray:
    """A body ellipse, a neck and head, and four legs: a crude four-legged animal."""
    rows, cols = np.mgrid[0:height, 0:width]
    cy, cx = gen.uniform(0.4, 0.5) * height, gen.uniform(0.4, 0.6) * width
    ry, rx = gen.uniform(0.12, 0.18) * height, gen.uniform(0.22, 0.3) * width
    mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
    head_x = cx + rx * gen.choice([-1, 1])
    head = ((rows - (cy - ry)) / (0.12 * height)) ** 2 + ((cols - head_x) / (0.07 * width)) ** 2
    mask |= head <= 1
    for offset in (-0.8, -0.5, 0.5, 0.8):
        leg_x = cx + offset * rx
        mask |= (np.abs(cols - leg_x) < 0.025 * width) & (rows > cy) & (rows < cy + 2.6 * ry)
    return mask.astype(np.uint8)


def write_horse_like_set(folder: str | os.PathLike, *, n_training: int = 12,
                         n_validation: int = 4, shape: tuple[int, int] = (96, 128),
                         seed: int = 0) -> Path:
    """Writes ``rgb/`` (JPEG, stored at twice the mask's size like the real set), ``gray/``,
    ``figure_ground/`` (noisy JPEG masks) and ``split.json``.

    Args:
        folder: destination.
        n_training: training images.
        n_validation: validation images.
        shape: mask size (H, W).
        seed: generator seed.

    Returns:
        The folder.
    """
    root = Path(folder)
    for sub in ("rgb", "gray", "figure_ground"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    names = [f"animal{i:03d}" for i in range(n_training + n_validation)]
    height, width = shape
    for name in names:
        mask = _silhouette(height, width, gen)
        background = gen.uniform(0.3, 0.7, size=3)
        coat = gen.uniform(0.05, 0.45, size=3)
        texture = gen.normal(0, 0.08, (height, width, 1))
        rgb = np.where(mask[..., None] == 1, coat, background) + texture
        rgb = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(rgb).resize((2 * width, 2 * height),
                                                     Image.Resampling.BILINEAR))
        Image.fromarray(big).save(root / "rgb" / f"{name}.jpg", quality=90)
        Image.fromarray(rgb).convert("L").save(root / "gray" / f"{name}.jpg", quality=90)
        Image.fromarray(mask * 255).save(root / "figure_ground" / f"{name}.jpg", quality=60)
    split = {"training": names[:n_training], "validation": names[n_training:]}
    (root / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    return root
