"""A network's foreground probabilities at its training size, put back on the images' size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from monai.transforms import Resize

from pipeline.models.loading import autocast, predict_maps

__all__ = ["resized_maps", "resized_probabilities"]


def resized_probabilities(model: torch.nn.Module, images: np.ndarray | torch.Tensor,
                          size: int | None, *, batch_size: int = 16,
                          device: str | torch.device = "cpu",
                          flips: Sequence[tuple[int, ...]] = ((),), amp: bool = False,
                          bar=None) -> Iterator[tuple[int, np.ndarray]]:
    """Foreground probabilities of N×C×H×W images, batch by batch: each image resized to
    ``size``² (bilinear, MONAI ``Resize``; None: as it is), through the network, and the
    probabilities resized back to H×W and clipped to [0, 1].

    This is the one resize → CNN → resize of the project: volumes' slices, photographs,
    echo frames and the bundles' inferer all go through it, so they give the same
    probabilities for the same images.

    Args:
        model: the network (already on ``device``).
        images: N×C×H×W, the model's intensity scale.
        size: the training size (square), or None.
        batch_size: images per forward pass.
        device: where the network runs.
        flips: test-time flips to average over (:func:`predict_probabilities`).
        amp: mixed precision (:func:`autocast`); the probabilities are float32 either way.
        bar: a tqdm bar (optional), advanced by the images of each batch.

    Yields:
        (index of the batch's first image, its B×H×W float32 probabilities).
    """
    for start, p, _ in resized_maps(model, images, size, batch_size=batch_size, device=device,
                                    flips=flips, amp=amp, bar=bar, boundary=False):
        yield start, p


def resized_maps(model: torch.nn.Module, images: np.ndarray | torch.Tensor,
                 size: int | None, *, batch_size: int = 16, device: str | torch.device = "cpu",
                 flips: Sequence[tuple[int, ...]] = ((),), amp: bool = False, bar=None,
                 boundary: bool = True
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """:func:`resized_probabilities` with the boundary map of a network's boundary head
    (its sigmoid, resized back and clipped in the same way; None without a boundary head or
    with ``boundary=False``).

    Yields:
        (index of the batch's first image, its B×H×W float32 probabilities, its B×H×W
        float32 boundary strengths or None).
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4:
        raise ValueError(f"expected N×C×H×W images, got shape {tuple(images.shape)}")
    channels, height, width = images.shape[1:]
    # Resize treats the leading axis as channels: each image (and channel) is resized alone
    down = Resize((size, size), mode="bilinear") if size else None
    up = Resize((height, width), mode="bilinear") if size else None
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        count = len(chunk)
        if down is not None:
            chunk = torch.as_tensor(np.asarray(down(chunk.reshape(-1, height, width))))
            chunk = chunk.reshape(count, channels, size, size)
        with autocast(device, amp):
            p, b = predict_maps(model, chunk.to(device), flips=flips, boundary=boundary)
        maps = [p] if b is None else [p, b]
        maps = [m.float().cpu() for m in maps]
        if up is not None:
            maps = [torch.as_tensor(np.asarray(up(m))) for m in maps]
        if bar is not None:
            bar.update(count)
        maps = [m.numpy().clip(0.0, 1.0).astype(np.float32) for m in maps]
        yield start, maps[0], (maps[1] if len(maps) > 1 else None)
