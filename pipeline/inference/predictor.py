"""A trained 2-D model over a 3-D volume: per view, fused across views, CRF per slice (or one
3-D graph cut over the volume), and the result put back on the input's own voxel grid."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Resize, ScaleIntensityRange
from tqdm.auto import tqdm

from pipeline.crf import CRFWeights, GraphCutPool, map_labelling, volume_map_labelling
from pipeline.data.alignment import resample_to_grid
from pipeline.data.cta import CTA_HU_WINDOW, RAS_LABELS
from pipeline.data.views import VIEWS, restack_slices, slice_axis, slice_volume
from pipeline.distributed import resolve_device
from pipeline.models import (
    load_run,
    predict_probabilities,
    training_flips,
    tta_flips,
)
from pipeline.networks.pretrained import sha256_file

__all__ = ["ViewModel", "VolumePrediction", "VolumePredictor"]


@dataclass
class ViewModel:
    """A network and how its training images were prepared."""

    model: torch.nn.Module
    weights: CRFWeights | None
    size: int | None
    hu_window: tuple[float, float]
    connectivity: int = 4
    beta: float | None = None
    in_channels: int = 1
    path: str = ""
    sha256: str = ""
    view: str | None = None
    foreground_ml: tuple[float, float] | None = None
    flips: tuple[tuple[int, ...], ...] = ((),)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> ViewModel:
        """Loads a run's checkpoint (weights only), its recorded data settings and, for
        provenance, the file's path and sha256."""
        model, weights, config = load_run(path)
        data = config.get("data") or {}
        window = tuple(data.get("hu_window") or CTA_HU_WINDOW)
        seen = data.get("training_foreground_ml")
        # the built network's own count: a spec without in_channels gets FCN-8s's default
        return cls(model, weights, data.get("size"), window,  # type: ignore[arg-type]
                   config.get("connectivity", 4), config.get("beta"), model.in_channels,
                   os.fspath(path), sha256_file(path), data.get("view"),
                   None if not seen else (float(seen[0]), float(seen[1])),
                   training_flips(config))

    def flips_for(self, tta: bool) -> tuple[tuple[int, ...], ...]:
        """The flips a prediction averages over: none, or with ``tta`` those the model's
        training drew (:func:`pipeline.models.training_flips`).

        Raises:
            ValueError: ``tta`` for a model trained without flips (the message names it).
        """
        return tta_flips(self.flips, self.path, tta)

    def describe(self) -> dict:
        """What a mask made by this model records of it: the checkpoint and its sha256, the
        view it was trained on and the CRF weights (None: CNN only)."""
        return {"checkpoint": self.path, "sha256": self.sha256, "trained_view": self.view,
                "crf_weights": None if self.weights is None
                else [float(v) for v in self.weights.as_array()]}

    def require_grey(self, path: str | os.PathLike, what: str) -> ViewModel:
        """This model, or ValueError naming ``path`` when it does not take 1-channel images
        (``what`` says which inputs need that)."""
        if self.in_channels != 1:
            raise ValueError(f"{path}: the model takes {self.in_channels} input channels; "
                             f"{what} need a model trained on 1-channel (grey) images")
        return self

    def probabilities(self, images: np.ndarray, *, batch_size: int = 16,
                      device: str | torch.device = "cpu", bar=None,
                      tta: bool = False) -> np.ndarray:
        """Foreground probabilities of N×H×W one-channel images: each resized to the training
        size, through the network in batches, and back to H×W.

        ``bar`` (a tqdm bar, optional) advances by the images of each batch; ``tta``
        averages over the flips the model trained with (:meth:`flips_for`).

        Returns:
            N×H×W float32 in [0, 1].
        """
        height, width = images.shape[1:]
        # Resize treats the images of a batch as channels: each is resized on its own
        down = Resize((self.size, self.size), mode="bilinear") if self.size else None
        up = Resize((height, width), mode="bilinear") if self.size else None
        probs = []
        for start in range(0, len(images), batch_size):
            chunk = torch.as_tensor(images[start:start + batch_size], dtype=torch.float32)
            if down is not None:
                chunk = torch.as_tensor(np.asarray(down(chunk)))
            p = predict_probabilities(self.model, chunk[:, None].to(device),
                                      flips=self.flips_for(tta)).cpu()
            if up is not None:
                p = torch.as_tensor(np.asarray(up(p)))
            probs.append(p.numpy())
            if bar is not None:
                bar.update(len(chunk))
        return np.concatenate(probs).clip(0.0, 1.0).astype(np.float32)


def _provenance(models: Mapping[str, ViewModel], views: Sequence[str], crf: str,
                tta: bool) -> dict:
    """What made a predictor's masks, as the batch records it beside each mask."""
    from pipeline import __version__

    return {"models": {view: vm.describe() for view, vm in models.items()},
            "views": list(views), "crf": crf, "mmcrf_version": __version__,
            **({"tta": "flips"} if tta else {})}


class _GraphCutWorkers:
    """Owns an optional pool of graph-cut processes; ``close()`` (or ``with``) stops it."""

    pool: GraphCutPool | None = None

    def close(self) -> None:
        """Stops the graph-cut workers."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _labellings(self, probs: Sequence[np.ndarray], images: Sequence[np.ndarray],
                    vm: ViewModel) -> np.ndarray:
        """N×H×W uint8 CRF masks of (probability, image) pairs with the model's learned CRF
        (which it must have), in the worker processes when there are any."""
        if self.pool is not None:
            masks = self.pool.map_labellings(list(probs), list(images), vm.weights,
                                             connectivity=vm.connectivity, beta=vm.beta)
        else:
            masks = [map_labelling(p, x, vm.weights, connectivity=vm.connectivity,
                                   beta=vm.beta) for p, x in zip(probs, images, strict=True)]
        return np.stack(masks).astype(np.uint8)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class VolumePrediction:
    """Results on the input volume's own grid (same shape and affine).

    ``seconds`` holds ``cnn`` (all views' networks) and ``crf`` (the CRF step, whichever ran);
    with the 3-D graph cut it also holds ``crf_3d``, the seconds of that cut.
    """

    probability: np.ndarray
    cnn: np.ndarray
    crf: np.ndarray | None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """The CRF mask where the model has CRF weights, else the CNN mask."""
        return self.cnn if self.crf is None else self.crf


class VolumePredictor(_GraphCutWorkers):
    """Segments 3-D volumes with 2-D models, slice by slice.

    Args:
        models: one checkpoint for every view, or view → checkpoint.
        views: the views to run; with several, their probabilities are averaged (on the RAS
            grid) before the CRF, which then runs slice by slice along the first view with
            that view's CRF weights. Default: the view each checkpoint records it was trained
            on (``axial`` where it records none); with view → checkpoint, the views given,
            in axial, coronal, sagittal order.
        batch_size: slices per CNN forward pass.
        workers: graph-cut worker processes (0: in this process).
        device: where the CNN runs: ``auto`` (CUDA when available), ``cpu``, ``cuda``,
            ``cuda:N`` or a torch device (:func:`pipeline.distributed.resolve_device`); the
            graph cuts stay on the CPU. Checkpoints load on any device (read on the CPU,
            then moved).
        tta: average the CNN's probabilities over the flips each model trained with before
            the CRF (refused for a model trained without flips).
        crf_3d: where the model has CRF weights, replace the slice-by-slice CRF by one exact
            graph cut over the (fused) probability volume on the RAS working grid, 6-connected
            whatever the run's 2-D connectivity, with the first view's learned weights (see
            :func:`pipeline.crf.volume_map_labelling`: pairwise weights scaled by
            min(spacing)/spacing per axis; β data-driven over the volume unless the run fixed
            one). It is one graph over the box of voxels the network is unsure of (the
            voxels whose unary outweighs their edges are decided without it), at worst the
            whole volume at about 0.3 kB per voxel, and it runs in this process
            (``workers`` only serve the per-slice CRF).
        any_view: allow a checkpoint on slices of another view than the one it was trained
            on (refused by default: the result is silently worse).

    Raises:
        ValueError: unknown view, no model for a requested view, or a model asked to run on
            another view than its own (unless ``any_view``).
    """

    def __init__(self, models: str | os.PathLike | Mapping[str, str | os.PathLike],
                 views: Sequence[str] | None = None, *, batch_size: int = 16,
                 workers: int = 0, device: str | torch.device = "cpu",
                 crf_3d: bool = False, any_view: bool = False, tta: bool = False) -> None:
        self.crf_3d = bool(crf_3d)
        self.tta = bool(tta)
        device = resolve_device(device)
        loaded: dict[str, ViewModel] = {}

        def load(path: str | os.PathLike) -> ViewModel:
            key = os.fspath(path)
            if key not in loaded:
                loaded[key] = ViewModel.from_checkpoint(path).require_grey(path, "CT volumes")
                loaded[key].model.to(device)
            return loaded[key]

        if views is None:  # the view(s) the model(s) were trained on
            if isinstance(models, Mapping):
                views = [v for v in VIEWS if v in models]
            else:
                views = [load(models).view or "axial"]
        self.views = tuple(views)
        for view in self.views:
            if view not in VIEWS:
                raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        if isinstance(models, Mapping):
            missing = [v for v in self.views if v not in models]
            if missing:
                raise ValueError(f"no model given for view(s) {', '.join(missing)}")
            paths = {v: models[v] for v in self.views}
        else:
            paths = dict.fromkeys(self.views, models)
        self.models: dict[str, ViewModel] = {view: load(path) for view, path in paths.items()}
        for vm in self.models.values():
            vm.flips_for(self.tta)  # refuses --tta for a model trained without flips
        for view, vm in self.models.items():
            if not any_view and vm.view is not None and vm.view != view:
                raise ValueError(f"{vm.path}: trained on {vm.view} slices, but asked to segment "
                                 f"{view} slices with it; leave out --view (the model's own "
                                 f"view is the default) or give one model per view")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.pool = GraphCutPool(workers) if workers > 0 else None

    @property
    def crf_method(self) -> str:
        """``none`` (CNN only), ``per-slice graph cut`` or ``3-D graph cut``."""
        first = self.models[self.views[0]]
        return ("none" if first.weights is None
                else "3-D graph cut" if self.crf_3d else "per-slice graph cut")

    def provenance(self) -> dict:
        """What made this predictor's masks: each view's checkpoint (path, sha256, trained
        view, CRF weights), the views fused, the CRF step and the project version."""
        return _provenance(self.models, self.views, self.crf_method, self.tta)

    def _view_slices(self, windowed: np.ndarray, view: str, bar=None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The view's N×H×W slices of the windowed volume and the network's probabilities."""
        slices = slice_volume(windowed[None], view)[:, 0]
        probs = self.models[view].probabilities(slices, batch_size=self.batch_size,
                                                device=self.device, bar=bar, tta=self.tta)
        return slices, probs

    def _crf(self, probability: np.ndarray, windowed: np.ndarray, spacing: np.ndarray,
             stack: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
        """The CRF mask on the RAS grid; ``stack`` holds the first view's (slices,
        probabilities) when they are exactly what slicing ``windowed`` and ``probability``
        would give (one view), which saves slicing both volumes again."""
        view = self.views[0]
        vm = self.models[view]
        if vm.weights is None:
            return None
        if self.crf_3d:
            return volume_map_labelling(probability, windowed, vm.weights, spacing=spacing,
                                        beta=vm.beta)
        if stack is not None:
            images, probs = stack
        else:
            probs = slice_volume(probability[None], view)[:, 0]
            images = slice_volume(windowed[None], view)[:, 0]
        return restack_slices(self._labellings(probs, images, vm)[:, None], view)[0]

    def predict(self, volume: MetaTensor, *, progress: bool = False) -> VolumePrediction:
        """Segments one X×Y×Z volume (HU for CT) carrying its affine; ``progress`` shows a
        bar over the slices (the CNN's of each view, then the CRF's).

        Returns:
            Probability, CNN mask and CRF mask on the input's grid.
        """
        if volume.ndim != 3:
            raise ValueError(f"expected an X×Y×Z volume, got shape {tuple(volume.shape)}")
        original_affine = np.asarray(volume.affine, dtype=np.float64)
        original_shape = tuple(volume.shape)
        ras = Orientation(axcodes="RAS", labels=RAS_LABELS)(
            volume[None])
        ras_affine = np.asarray(ras.affine, dtype=np.float64)
        low, high = self.models[self.views[0]].hu_window
        windowed = np.asarray(ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(ras))[0]
        start = time.perf_counter()
        stack = None  # with one view, its slices and probabilities are kept for the CRF
        volumes = []
        crf_slices = windowed.shape[slice_axis(self.views[0])] if not self.crf_3d else 1
        bar = tqdm(total=sum(windowed.shape[slice_axis(v)] for v in self.views) + crf_slices,
                   desc="slices", unit="slice", disable=not progress, leave=False)
        for view in self.views:
            bar.set_postfix_str(f"CNN {view}")
            slices, probs = self._view_slices(windowed, view, bar)
            volumes.append(restack_slices(probs[:, None], view)[0])
            if len(self.views) == 1:
                stack = (slices, probs)
        probability = np.mean(volumes, axis=0)
        del volumes
        cnn_s = time.perf_counter() - start
        start = time.perf_counter()
        spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)  # mm per voxel along each axis
        bar.set_postfix_str("CRF")
        crf = self._crf(probability, windowed, spacing, stack)
        bar.update(crf_slices)
        bar.close()
        del stack
        crf_s = time.perf_counter() - start
        seconds = {"cnn": cnn_s, "crf": crf_s}
        if self.crf_3d and crf is not None:
            seconds["crf_3d"] = crf_s

        def back(array: np.ndarray, order: int) -> np.ndarray:
            return resample_to_grid(array, ras_affine, original_affine, original_shape,
                                    order=order)

        cnn = (probability > 0.5).astype(np.uint8)
        return VolumePrediction(
            probability=back(probability.astype(np.float32), 1),
            cnn=back(cnn, 0),
            crf=None if crf is None else back(crf.astype(np.uint8), 0),
            seconds=seconds,
        )
