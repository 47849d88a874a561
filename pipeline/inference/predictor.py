"""A trained 2-D model over a 3-D volume: per view, fused across views, CRF per slice (or one
3-D graph cut over the volume), and the result put back on the input's own voxel grid."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ScaleIntensityRange
from tqdm.auto import tqdm

from pipeline.crf import (
    CRFWeights,
    GraphCutPool,
    PendingLabellings,
    map_labelling,
    volume_map_labelling,
)
from pipeline.data.alignment import resample_to_grid
from pipeline.data.cta import CTA_HU_WINDOW, RAS_LABELS
from pipeline.data.hashing import sha256_file
from pipeline.data.views import VIEWS, restack_slices, slice_axis, slice_volume
from pipeline.distributed import resolve_device
from pipeline.models import (
    load_run,
    training_flips,
    tta_flips,
)
from pipeline.models.prediction import resized_maps

__all__ = ["PendingPrediction", "TrainedModel", "VolumePrediction", "VolumePredictor"]


@dataclass
class TrainedModel:
    """A trained network read from its checkpoint, and how its training images were prepared.

    One class for every kind of input: a CT view's model, a photograph's, an echo frame's
    (``view`` is what the checkpoint recorded, None where it has none).
    """

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
    def from_checkpoint(cls, path: str | os.PathLike) -> TrainedModel:
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

    @property
    def learned_pairwise(self) -> bool:
        """Whether the CRF has the learned edge feature: CRF weights and a network with a
        boundary head, whose map the graph cuts need."""
        return self.weights is not None and bool(getattr(self.model, "boundary_head", False))

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
                else [float(v) for v in self.weights.as_array(self.learned_pairwise)]}

    def require_grey(self, path: str | os.PathLike, what: str) -> TrainedModel:
        """This model, or ValueError naming ``path`` when it does not take 1-channel images
        (``what`` says which inputs need that)."""
        if self.in_channels != 1:
            raise ValueError(f"{path}: the model takes {self.in_channels} input channels; "
                             f"{what} need a model trained on 1-channel (grey) images")
        return self

    def probabilities(self, images: np.ndarray, *, batch_size: int = 16,
                      device: str | torch.device = "cpu", bar=None, tta: bool = False,
                      amp: bool = False) -> np.ndarray:
        """Foreground probabilities of N×H×W one-channel images: each resized to the training
        size, through the network in batches, and back to H×W (:meth:`iter_probabilities`).

        Returns:
            N×H×W float32 in [0, 1].
        """
        return np.concatenate([p for _, p in self.iter_probabilities(
            images, batch_size=batch_size, device=device, bar=bar, tta=tta, amp=amp)])

    def maps(self, images: np.ndarray, *, batch_size: int = 16,
             device: str | torch.device = "cpu", tta: bool = False,
             amp: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`probabilities` and, for a CRF with the learned edge feature, the boundary
        map of the network's boundary head (N×H×W float32 in [0, 1], resized as the
        probabilities are; None otherwise)."""
        probs, edges = [], []
        for _, p, b in self.iter_maps(images, batch_size=batch_size, device=device, tta=tta,
                                      amp=amp):
            probs.append(p)
            edges.append(b)
        return np.concatenate(probs), (None if edges[0] is None else np.concatenate(edges))

    def iter_maps(self, images: np.ndarray, *, batch_size: int = 16,
                  device: str | torch.device = "cpu", bar=None, tta: bool = False,
                  amp: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """:meth:`iter_probabilities` with each batch's boundary maps (None unless the CRF
        has the learned edge feature, :attr:`learned_pairwise`)."""
        yield from self.iter_image_maps(np.asarray(images, dtype=np.float32)[:, None],
                                        batch_size=batch_size, device=device, bar=bar,
                                        tta=tta, amp=amp)

    def iter_image_maps(self, images: np.ndarray | torch.Tensor, *, batch_size: int = 16,
                        device: str | torch.device = "cpu", bar=None, tta: bool = False,
                        amp: bool = False
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """:meth:`iter_maps` of N×C×H×W images (C: the model's input channels): the one
        place a trained model's probabilities are made, so that every path (volumes, frames,
        photographs) gets the same ones, with the flips it asks for and, for a CRF with the
        learned edge feature, the boundary maps the cuts need."""
        yield from resized_maps(self.model, images, self.size, batch_size=batch_size,
                                device=device, flips=self.flips_for(tta), amp=amp, bar=bar,
                                boundary=self.learned_pairwise)

    def iter_probabilities(self, images: np.ndarray, *, batch_size: int = 16,
                           device: str | torch.device = "cpu", bar=None, tta: bool = False,
                           amp: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """The foreground probabilities of N×H×W one-channel images, batch by batch, so that a
        caller can start on a batch (e.g. its graph cuts) while the next one runs.

        Args:
            images: N×H×W, the model's intensity scale.
            batch_size: images per forward pass.
            device: where the network runs (it must already be there).
            bar: a tqdm bar (optional), advanced by the images of each batch.
            tta: average over the flips the model trained with (:meth:`flips_for`).
            amp: mixed precision (:func:`pipeline.models.autocast`): float16 on CUDA,
                bfloat16 on the CPU; the probabilities are float32 either way.

        Yields:
            (index of the batch's first image, its B×H×W float32 probabilities in [0, 1]).
        """
        for first, probs, _ in self.iter_maps(images, batch_size=batch_size, device=device,
                                               bar=bar, tta=tta, amp=amp):
            yield first, probs


def _provenance(models: Mapping[str, TrainedModel], views: Sequence[str], crf: str,
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
                    vm: TrainedModel,
                    boundaries: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """N×H×W uint8 CRF masks of (probability, image[, boundary map]) pairs with the
        model's learned CRF (which it must have), in the worker processes when there are
        any."""
        if self.pool is not None:
            masks = self.pool.map_labellings(list(probs), list(images), vm.weights,
                                             connectivity=vm.connectivity, beta=vm.beta,
                                             boundaries=boundaries)
        else:
            bounds = [None] * len(probs) if boundaries is None else boundaries
            masks = [map_labelling(p, x, vm.weights, connectivity=vm.connectivity,
                                   beta=vm.beta, boundary=b)
                     for p, x, b in zip(probs, images, bounds, strict=True)]
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
            that view's CRF weights. When that CRF has the learned edge feature, the views'
            boundary maps are averaged the same way (every view's model then needs one).
            Default: the view each checkpoint records it was trained on (``axial`` where it
            records none); with view → checkpoint, the views given, in axial, coronal,
            sagittal order.
        batch_size: slices per CNN forward pass.
        workers: graph-cut worker processes (0: in this process). With workers, the
            per-slice graph cuts can run in them while the network goes on (``pipeline``,
            :meth:`start`); the masks are the serial run's either way.
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
            one; with the learned edge feature, every edge gets w4·(1 − max(b_i, b_j)) of
            the boundary volume, the view's maps stacked or the views' fused). It is one
            graph over the box of voxels the network is unsure of (the
            voxels whose unary outweighs their edges are decided without it), at worst the
            whole volume at about 0.3 kB per voxel, and it runs in this process
            (``workers`` only serve the per-slice CRF).
        any_view: allow a checkpoint on slices of another view than the one it was trained
            on (refused by default: the result is silently worse).
        amp: run the network in mixed precision (float16 on CUDA, bfloat16 on the CPU;
            :func:`pipeline.models.autocast`). The probabilities differ from full precision
            by rounding (on the order of 1e-3), so a few boundary voxels may change.
        pipeline: with workers, cut while the network goes on (True), or let the network
            finish first and then the workers cut (False: one case in memory at a time).
            Default (None): the pipeline where the network runs on a GPU, whose cores the
            cuts do not compete for. Measured on 2 CPU cores (``benchmarks/bench_infer.py``),
            the pipeline is 1.01–1.15× slower than cutting after the network, confident or
            unsure network alike: the network's threads and the cut workers share the cores.

    Raises:
        ValueError: unknown view, no model for a requested view, a model asked to run on
            another view than its own (unless ``any_view``), or views fused under a CRF with
            the learned edge feature where one view's model has no boundary head.
    """

    def __init__(self, models: str | os.PathLike | Mapping[str, str | os.PathLike],
                 views: Sequence[str] | None = None, *, batch_size: int = 16,
                 workers: int = 0, device: str | torch.device = "cpu",
                 crf_3d: bool = False, any_view: bool = False, tta: bool = False,
                 amp: bool = False, pipeline: bool | None = None) -> None:
        self.crf_3d = bool(crf_3d)
        self.tta = bool(tta)
        self.amp = bool(amp)
        device = resolve_device(device)
        loaded: dict[str, TrainedModel] = {}

        def load(path: str | os.PathLike) -> TrainedModel:
            key = os.fspath(path)
            if key not in loaded:
                loaded[key] = TrainedModel.from_checkpoint(path).require_grey(path, "CT volumes")
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
        self.models: dict[str, TrainedModel] = {view: load(path) for view, path in paths.items()}
        for vm in self.models.values():
            vm.flips_for(self.tta)  # refuses --tta for a model trained without flips
        if self.models[self.views[0]].learned_pairwise:  # the CRF's model: every view's map
            for view, vm in self.models.items():
                if not vm.learned_pairwise:
                    raise ValueError(
                        f"{vm.path}: the CRF ({self.models[self.views[0]].path}, the "
                        f"{self.views[0]} model) has the learned edge feature, whose boundary "
                        f"map is fused over the views, but the {view} model has no boundary "
                        f"head with CRF weights: give every view a model trained with "
                        f"learned_pairwise, or run that model on one view")
        for view, vm in self.models.items():
            if not any_view and vm.view is not None and vm.view != view:
                raise ValueError(f"{vm.path}: trained on {vm.view} slices, but asked to segment "
                                 f"{view} slices with it; leave out --view (the model's own "
                                 f"view is the default) or give one model per view")
        self.device = torch.device(device)
        self.pipeline = self.device.type == "cuda" if pipeline is None else bool(pipeline)
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

    def _cut_async(self, probs: np.ndarray, images: np.ndarray,
                   boundaries: np.ndarray | None = None) -> PendingLabellings:
        """Starts the first view's per-slice CRF of (probability, image[, boundary map])
        slices in the workers."""
        vm = self.models[self.views[0]]
        return self.pool.submit_map_labellings(
            list(probs), list(images), vm.weights, connectivity=vm.connectivity, beta=vm.beta,
            boundaries=None if boundaries is None else list(boundaries))

    def _crf(self, probability: np.ndarray, windowed: np.ndarray, spacing: np.ndarray,
             stack: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None,
             boundary: np.ndarray | None = None) -> np.ndarray | None:
        """The CRF mask on the RAS grid, in this process (or the workers, waited for);
        ``stack`` holds the first view's (slices, probabilities, boundary maps or None) when
        they are exactly what slicing ``windowed`` and ``probability`` would give (one view),
        which saves slicing both volumes again; otherwise ``boundary`` is the (fused)
        boundary volume of a CRF with the learned edge feature."""
        view = self.views[0]
        vm = self.models[view]
        if vm.weights is None:
            return None
        if self.crf_3d:
            return volume_map_labelling(probability, windowed, vm.weights, spacing=spacing,
                                        beta=vm.beta, boundary=boundary)
        edges = None
        if stack is not None:
            images, probs, edges = stack
        else:
            probs = slice_volume(probability[None], view)[:, 0]
            images = slice_volume(windowed[None], view)[:, 0]
            if boundary is not None:
                edges = slice_volume(boundary[None], view)[:, 0]
        return restack_slices(self._labellings(probs, images, vm, edges)[:, None], view)[0]

    @property
    def pipelined(self) -> bool:
        """Whether the per-slice CRF runs in the workers while the network goes on: with
        workers, CRF weights and the per-slice CRF (the 3-D cut runs in this process), unless
        made with ``pipeline=False``."""
        return (self.pipeline and self.pool is not None and not self.crf_3d
                and self.models[self.views[0]].weights is not None)

    def predict(self, volume: MetaTensor, *, progress: bool = False) -> VolumePrediction:
        """Segments one X×Y×Z volume (HU for CT) carrying its affine; ``progress`` shows a
        bar over the slices (the CNN's of each view, then the CRF's).

        Returns:
            Probability, CNN mask and CRF mask on the input's grid.
        """
        return self.start(volume, progress=progress).result()

    def start(self, volume: MetaTensor, *, progress: bool = False) -> PendingPrediction:
        """Runs the network over one volume and starts its CRF; :meth:`PendingPrediction.result`
        finishes it. With workers (:attr:`pipelined`), the graph cuts run in them while this
        process goes on: with one view, each batch of slices is cut while the network runs
        the next batch; with several, the fused volume's slices are cut while the caller
        starts the next volume (as :func:`pipeline.inference.run_batch` does). The masks are
        those of the serial run, bit for bit on the CPU.

        Raises:
            ValueError: not a 3-D volume.
        """
        if volume.ndim != 3:
            raise ValueError(f"expected an X×Y×Z volume, got shape {tuple(volume.shape)}")
        ras = Orientation(axcodes="RAS", labels=RAS_LABELS)(volume[None])
        low, high = self.models[self.views[0]].hu_window
        windowed = np.asarray(ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(ras))[0]
        begun = time.perf_counter()
        one_view = len(self.views) == 1
        crf_slices = windowed.shape[slice_axis(self.views[0])] if not self.crf_3d else 1
        bar = tqdm(total=sum(windowed.shape[slice_axis(v)] for v in self.views) + crf_slices,
                   desc="slices", unit="slice", disable=not progress, leave=False)
        volumes, cuts, boundaries = [], [], []
        stack = None  # with one view, its slices and probabilities are kept for the CRF
        # the CRF's learned edge feature takes the views' boundary maps, fused as the
        # probabilities are, on the volume (3-D cut, several views); one view slice by slice
        # takes its own maps as they come
        fuse_boundary = (self.models[self.views[0]].learned_pairwise
                         and (self.crf_3d or not one_view))
        for view in self.views:
            bar.set_postfix_str(f"CNN {view}")
            slices = slice_volume(windowed[None], view)[:, 0]
            chunks, edge_chunks = [], []
            # a model with the learned edge feature runs on one view (checked on loading)
            for first, probs, edges in self.models[view].iter_maps(
                    slices, batch_size=self.batch_size, device=self.device, bar=bar,
                    tta=self.tta, amp=self.amp):
                chunks.append(probs)
                edge_chunks.append(edges)
                if self.pipelined and one_view:  # cut this batch while the next one runs
                    cuts.append(self._cut_async(probs, slices[first:first + len(probs)],
                                                edges))
            probs = np.concatenate(chunks)
            volumes.append(restack_slices(probs[:, None], view)[0])
            edges = None if edge_chunks[0] is None else np.concatenate(edge_chunks)
            if fuse_boundary:
                boundaries.append(restack_slices(edges[:, None], view)[0])
            if one_view:
                stack = (slices, probs, edges)
        probability = np.mean(volumes, axis=0)
        boundary = np.mean(boundaries, axis=0) if boundaries else None
        del volumes, boundaries
        if self.pipelined and not one_view:  # the fused slices, cut while the caller goes on
            view = self.views[0]
            cuts.append(self._cut_async(
                slice_volume(probability[None], view)[:, 0],
                slice_volume(windowed[None], view)[:, 0],
                None if boundary is None else slice_volume(boundary[None], view)[:, 0]))
            stack = None
        return PendingPrediction(self, ras, np.asarray(volume.affine, dtype=np.float64),
                                 tuple(volume.shape), windowed, probability, stack, cuts,
                                 bar, crf_slices, time.perf_counter() - begun, boundary)


class PendingPrediction:
    """A volume whose network has run and whose CRF may still be cutting in the workers
    (:meth:`VolumePredictor.start`); :meth:`result` finishes it."""

    def __init__(self, predictor: VolumePredictor, ras: MetaTensor, affine: np.ndarray,
                 shape: tuple[int, ...], windowed: np.ndarray, probability: np.ndarray,
                 stack: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None,
                 cuts: Sequence[PendingLabellings], bar, crf_slices: int,
                 cnn_seconds: float, boundary: np.ndarray | None = None) -> None:
        self._predictor, self._ras, self._affine, self._shape = predictor, ras, affine, shape
        self._windowed, self._probability, self._stack = windowed, probability, stack
        self._cuts, self._bar, self._crf_slices = list(cuts), bar, crf_slices
        self._cnn_seconds, self._boundary = cnn_seconds, boundary

    @property
    def cut_batches(self) -> int:
        """How many batches of slices were sent to the workers (0: the CRF runs in
        :meth:`result`, in this process)."""
        return len(self._cuts)

    def result(self) -> VolumePrediction:
        """Waits for the graph cuts (or runs the CRF here, without workers) and puts the
        results back on the input's grid.

        Returns:
            Probability, CNN mask and CRF mask on the input's grid; ``seconds["crf"]`` is
            the CRF time not hidden behind the network (with workers, the wait for the
            cuts still running).
        """
        predictor, bar = self._predictor, self._bar
        start = time.perf_counter()
        ras_affine = np.asarray(self._ras.affine, dtype=np.float64)
        bar.set_postfix_str("CRF")
        if self._cuts:
            view = predictor.views[0]
            masks = np.stack([m for pending in self._cuts for m in pending.result()])
            crf = restack_slices(masks.astype(np.uint8)[:, None], view)[0]
        else:
            spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)  # mm per voxel per axis
            crf = predictor._crf(self._probability, self._windowed, spacing, self._stack,
                                 self._boundary)
        bar.update(self._crf_slices)
        bar.close()
        crf_s = time.perf_counter() - start
        seconds = {"cnn": self._cnn_seconds, "crf": crf_s}
        if predictor.crf_3d and crf is not None:
            seconds["crf_3d"] = crf_s

        def back(array: np.ndarray, order: int) -> np.ndarray:
            return resample_to_grid(array, ras_affine, self._affine, self._shape, order=order)

        probability = self._probability
        cnn = (probability > 0.5).astype(np.uint8)
        return VolumePrediction(
            probability=back(probability.astype(np.float32), 1),
            cnn=back(cnn, 0),
            crf=None if crf is None else back(crf.astype(np.uint8), 0),
            seconds=seconds,
        )
