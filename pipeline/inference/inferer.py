"""A MONAI inferer for the project's 2-D networks: images, or a volume's slices of one view,
at the network's training size; what bundles and MONAI Deploy call ``inferer``."""

from __future__ import annotations

import os

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from pipeline.data.views import restack_slices, slice_volume
from pipeline.models import has_learned_pairwise, load_checkpoint, training_flips, tta_flips
from pipeline.models.prediction import resized_maps

__all__ = ["SliceResizeInferer"]


class SliceResizeInferer(Inferer):
    """Foreground probabilities of a batch: B×C×H×W images each through the network, or
    B×C×X×Y×Z RAS volumes cut into ``view``'s slices (:func:`pipeline.data.views.slice_volume`)
    and stacked back; each image resized to the training size and its probabilities back
    (:func:`pipeline.models.prediction.resized_maps`), exactly as ``mmcrf infer`` does. The
    result is B×1×spatial float32 in [0, 1] on the inputs' grid, with their metadata; with
    ``boundary``, B×2×spatial: the probabilities, then the boundary strengths of the
    network's boundary head, which a CRF with the learned edge feature cuts with
    (:class:`~pipeline.transforms.GraphCutCRF` with ``learned_pairwise``).

    Args:
        size: the training size (None: the images as they are).
        view: for volumes, the view to slice (``axial``, ``coronal``, ``sagittal``).
        checkpoint: an mmcrf checkpoint whose recorded training size, view and flips are
            taken for any of ``size``/``view`` not given.
        batch_size: images per forward pass.
        tta: average over the flips the model trained with (needs ``checkpoint``).
        amp: mixed precision (float16 on CUDA, bfloat16 on the CPU).
        boundary: add the boundary map as a second channel (None: with ``checkpoint``,
            when its CRF has the learned edge feature,
            :func:`~pipeline.models.has_learned_pairwise`; otherwise not).

    Raises:
        ValueError: ``tta`` without a checkpoint, or for a model trained without flips; at
            call time, ``boundary`` for a network without a boundary head.
    """

    def __init__(self, size: int | None = None, view: str | None = None, *,
                 checkpoint: str | os.PathLike | None = None, batch_size: int = 16,
                 tta: bool = False, amp: bool = False, boundary: bool | None = None) -> None:
        super().__init__()
        flips: tuple[tuple[int, ...], ...] = ((),)
        if checkpoint is not None:
            payload = load_checkpoint(checkpoint)
            config = payload.get("config") or {}
            data = config.get("data") or {}
            size = data.get("size") if size is None else size
            view = data.get("view") if view is None else view
            flips = tta_flips(training_flips(config), checkpoint, tta)
            if boundary is None:
                boundary = has_learned_pairwise(payload)
        elif tta:
            raise ValueError("tta needs the checkpoint, for the flips the model trained with")
        self.size, self.view, self.batch_size = size, view, int(batch_size)
        self.flips, self.amp = flips, bool(amp)
        self.boundary = bool(boundary)

    def _maps(self, network, images: np.ndarray, device) -> np.ndarray:
        """N×K×H×W: the probabilities (K = 1), and the boundary map with ``boundary``."""
        chunks = []
        for _, p, b in resized_maps(network, images, self.size, batch_size=self.batch_size,
                                    device=device, flips=self.flips, amp=self.amp,
                                    boundary=self.boundary):
            if self.boundary and b is None:
                raise ValueError("boundary=True, but the network has no boundary head")
            chunks.append(np.stack([p, b], axis=1) if self.boundary else p[:, None])
        return np.concatenate(chunks)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        """Runs ``network`` over ``inputs`` (B×C×H×W or B×C×X×Y×Z)."""
        device = inputs.device
        array = inputs.detach().cpu().as_tensor() if isinstance(inputs, MetaTensor) \
            else inputs.detach().cpu()
        if array.ndim == 4:
            out = self._maps(network, array.numpy(), device)
        elif array.ndim == 5:
            if self.view is None:
                raise ValueError("volumes need the view to slice (view= or checkpoint=)")
            out = np.stack([restack_slices(self._maps(
                network, slice_volume(volume, self.view), device), self.view)
                for volume in array.numpy()])
        else:
            raise ValueError(f"expected B×C×H×W or B×C×X×Y×Z inputs, got shape "
                             f"{tuple(inputs.shape)}")
        result = torch.as_tensor(out).to(device)
        if isinstance(inputs, MetaTensor):
            return MetaTensor(result, meta=inputs.meta,
                              applied_operations=inputs.applied_operations)
        return result
