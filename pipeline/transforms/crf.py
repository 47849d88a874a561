"""The grid CRF as a MONAI transform pair: a foreground probability map (and its image) in,
the exact MAP labelling out, per 2-D image, per slice of a volume, or by one 3-D cut."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from pipeline.crf import CRFWeights, map_labelling, volume_map_labelling
from pipeline.data.views import restack_slices, slice_volume
from pipeline.models import has_learned_pairwise, load_checkpoint

__all__ = ["GraphCutCRF", "GraphCutCRFd", "crf_settings"]


def crf_settings(checkpoint: str | os.PathLike) -> tuple[CRFWeights, int, float | None]:
    """The learned CRF of a checkpoint: its weights (w4 too, for the learned edge feature),
    connectivity and fixed β (None: chosen per image from the data).

    Raises:
        ValueError: the checkpoint holds no CRF weights (a CNN-only model), naming it.
    """
    return _settings(load_checkpoint(checkpoint), checkpoint)


def _settings(payload: dict, checkpoint) -> tuple[CRFWeights, int, float | None]:
    """:func:`crf_settings` of a loaded checkpoint payload."""
    if payload.get("crf") is None:
        raise ValueError(f"{checkpoint}: a CNN-only model, without CRF weights")
    config = payload.get("config") or {}
    return (CRFWeights.from_array(payload["crf"]), int(config.get("connectivity", 4)),
            config.get("beta"))


class GraphCutCRF(Transform):
    """MAP labelling argmin_y E(y) of the binary grid CRF by exact graph cut
    (:func:`pipeline.crf.map_labelling`, or :func:`pipeline.crf.volume_map_labelling`).

    Called with a 1×H×W (or H×W) foreground probability map and its C×H×W image, it cuts the
    image's grid; with 1×X×Y×Z probabilities of a RAS volume and its 1×X×Y×Z image, it cuts
    each 2-D slice of ``view`` (as the model was trained) or, with ``crf_3d``, the whole
    volume at once (6-connected, pairwise weights scaled by the voxel spacing of the
    probabilities' affine). The image must be on the scale the model was trained on (e.g.
    CT windowed to [0, 1]). The result is a 1×spatial uint8 mask carrying the
    probabilities' metadata (so ``Invertd`` puts it back on the input's grid).

    With ``learned_pairwise`` (a CRF with the learned edge feature) the input has a second
    channel, the boundary strengths b of the network's boundary head (2×H×W or 2×X×Y×Z, as
    :class:`~pipeline.inference.inferer.SliceResizeInferer` gives for such a model), and
    each cut takes the edge feature 1 − max(b_i, b_j) with weight w4 (with ``crf_3d``, on
    the edges of all three axes of the stacked maps).

    Args:
        weights: the CRF weights (w1, w2, w3 and, with ``learned_pairwise``, w4); None with
            ``checkpoint``.
        checkpoint: an mmcrf checkpoint to take the weights, connectivity, β and
            ``learned_pairwise`` from (:func:`crf_settings`,
            :func:`pipeline.models.has_learned_pairwise`), instead of ``weights``.
        view: for volumes, the view whose slices are cut (``axial``, ``coronal``,
            ``sagittal``).
        connectivity: 4 or 8 (2-D cuts); with ``checkpoint``, the checkpoint's.
        beta: contrast β, None for the data-driven choice per image; with ``checkpoint``,
            the checkpoint's.
        crf_3d: cut a volume as one 3-D grid instead of slice by slice.
        learned_pairwise: the input carries the boundary map as its second channel; with
            ``checkpoint``, the checkpoint's.

    Raises:
        ValueError: neither or both of ``weights`` and ``checkpoint``; weights with w4 > 0
            but no ``learned_pairwise``; at call time, shapes that do not fit (a volume
            without a view, image and probabilities of different grids, no boundary
            channel).
    """

    def __init__(self, weights: CRFWeights | Sequence[float] | None = None, *,
                 checkpoint: str | os.PathLike | None = None, view: str | None = None,
                 connectivity: int = 4, beta: float | None = None,
                 crf_3d: bool = False, learned_pairwise: bool = False) -> None:
        if (weights is None) == (checkpoint is None):
            raise ValueError("give the CRF weights or a checkpoint to take them from")
        where = "" if checkpoint is None else f"{checkpoint}: "
        if checkpoint is not None:
            payload = load_checkpoint(checkpoint)  # read once for both
            weights, connectivity, beta = _settings(payload, checkpoint)
            learned_pairwise = has_learned_pairwise(payload)
        self.weights = (weights if isinstance(weights, CRFWeights)
                        else CRFWeights.from_array(weights))
        self.learned_pairwise = bool(learned_pairwise)
        if self.weights.w4 > 0 and not self.learned_pairwise:
            raise ValueError(f"{where}w4 = {self.weights.w4:g} weighs the learned edge feature, "
                             f"whose boundary map only comes with learned_pairwise=True")
        self.view, self.connectivity, self.beta = view, int(connectivity), beta
        self.crf_3d = bool(crf_3d)

    def __call__(self, probability, image):
        maps = np.asarray(_numpy(probability), dtype=np.float32)
        img = np.asarray(_numpy(image), dtype=np.float32)
        if self.learned_pairwise:
            if maps.ndim not in (3, 4) or maps.shape[0] != 2:
                raise ValueError(f"a CRF with the learned edge feature needs 2×H×W or 2×X×Y×Z "
                                 f"input (probabilities, boundary map), got shape "
                                 f"{tuple(np.shape(probability))}")
            prob, boundary = maps[0], maps[1]
        else:
            prob = maps[0] if maps.ndim in (3, 4) and maps.shape[0] == 1 else maps
            boundary = None
        if prob.ndim == 2:
            mask = map_labelling(prob, img, self.weights, connectivity=self.connectivity,
                                 beta=self.beta, boundary=boundary)
        elif prob.ndim == 3:
            mask = self._volume(prob, img[0] if img.ndim == 4 else img, probability, boundary)
        else:
            raise ValueError(f"expected 1×H×W or 1×X×Y×Z probabilities, got shape "
                             f"{tuple(np.shape(probability))}")
        out = torch.as_tensor(mask[None].astype(np.uint8))
        if isinstance(probability, MetaTensor):
            return MetaTensor(out, meta=probability.meta,
                              applied_operations=probability.applied_operations)
        return out

    def _volume(self, prob: np.ndarray, img: np.ndarray, source,
                boundary: np.ndarray | None) -> np.ndarray:
        if img.shape != prob.shape:
            raise ValueError(f"the image's grid {img.shape} is not the probabilities' "
                             f"{prob.shape}")
        if self.crf_3d:
            spacing = None
            if isinstance(source, MetaTensor):
                spacing = np.linalg.norm(np.asarray(source.affine, np.float64)[:3, :3], axis=0)
            return volume_map_labelling(prob, img, self.weights, spacing=spacing,
                                        beta=self.beta, boundary=boundary)
        if self.view is None:
            raise ValueError("a volume's CRF needs the view whose slices it cuts (or crf_3d)")
        probs = slice_volume(prob[None], self.view)[:, 0]
        images = slice_volume(img[None], self.view)[:, 0]
        edges = ([None] * len(probs) if boundary is None
                 else slice_volume(boundary[None], self.view)[:, 0])
        masks = [map_labelling(p, x, self.weights, connectivity=self.connectivity,
                               beta=self.beta, boundary=b)
                 for p, x, b in zip(probs, images, edges, strict=True)]
        return restack_slices(np.stack(masks)[:, None], self.view)[0]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class GraphCutCRFd(MapTransform):
    """Dictionary form of :class:`GraphCutCRF`: each key's probabilities (e.g. ``pred``) are
    replaced by their CRF mask, with the image under ``image_key``.

    Args:
        keys: the probability keys.
        image_key: the key of the image the contrast term reads.
        allow_missing_keys: skip keys that are absent.
        **kwargs: :class:`GraphCutCRF`'s arguments (``weights`` or ``checkpoint``, ``view``,
            ``connectivity``, ``beta``, ``crf_3d``, ``learned_pairwise``).
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", *,
                 allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.crf = GraphCutCRF(**kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.crf(d[key], d[self.image_key])
        return d
