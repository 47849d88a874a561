"""One ignite training path, three modes: CNN only, piecewise CRF, joint max-margin (Alg. 2)."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pipeline import distributed as dist
from pipeline.crf import CRFWeights, GraphCutPool, MarginQP, MaxMarginLoss, learn_weights
from pipeline.crf.graphcut import map_labelling
from pipeline.crf.loss import outline_loss
from pipeline.data.hashing import sha256_file
from pipeline.engines.augment import Augmentation
from pipeline.engines.presets import find_preset
from pipeline.engines.rng import rng_state, set_rng_state
from pipeline.metrics import compute_jaccard
from pipeline.models import (
    MODES,
    build_model,
    load_checkpoint,
    predict_map_arrays,
    save_checkpoint,
)
from pipeline.networks import boundary_outputs, load_network_state, split_boundary
from pipeline.networks.pretrained import load_hed_side_outputs

__all__ = ["MODES", "TrainConfig", "TrainResult", "previous_stage_checkpoint",
           "stage_checkpoint", "train"]

LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def stage_checkpoint(runs_dir: str | os.PathLike, mode: str) -> Path:
    """The best checkpoint of a mode's run in a runs folder: ``<runs_dir>/<mode>/best.pt``."""
    return Path(runs_dir) / mode / "best.pt"


def previous_stage_checkpoint(runs_dir: str | os.PathLike, mode: str) -> Path | None:
    """The checkpoint a mode starts from: the previous mode's best (None for ``cnn``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    index = MODES.index(mode)
    return None if index == 0 else stage_checkpoint(runs_dir, MODES[index - 1])


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (the paper's defaults; presets: ``pipeline/configs/``).

    Attributes:
        mode: ``cnn`` (pixelwise cross-entropy), ``piecewise`` (CNN frozen, CRF learned by
            Algorithm 1) or ``joint`` (Algorithm 2: γ back-propagated into the CNN).
        epochs: epochs to train (piecewise always uses one pass).
        batch_size: images per optimisation step, over all ranks: under torchrun each of W
            ranks takes ceil(batch_size / W), so an epoch makes as many steps as on one
            process and the training curve does not depend on the process count.
        lr: learning rate (the starting one under a schedule).
        lr_schedule: ``constant``, or ``cosine``: epoch e (1-based) of E trains at
            lr·(1 + cos(π(e − 1)/E))/2, a function of the epoch alone, so a resumed run
            continues the same curve. Early stopping may end it before the tail.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        weight_decay: L2 penalty of the optimiser.
        C: slack penalty of the margin QP (normalised: C_raw = C·P).
        connectivity: 4 or 8.
        beta: contrast β; None for the data-driven per-image choice.
        tol: violation threshold of the cutting plane.
        max_cp_iterations: cap on cutting-plane passes per batch.
        ce_weight: joint mode: weight of an added pixelwise cross-entropy term (0 = paper).
        val_interval: validate every N epochs.
        patience: early stopping after N validations without improvement (None: off).
        augment: False (none), True (random horizontal and vertical flips) or a mapping of
            :class:`~pipeline.engines.augment.Augmentation` settings (flips, zoom, rotation,
            shift, brightness/contrast jitter).
        seed: seed of sampling, augmentation and initialisation.
        graphcut_workers: processes for graph cuts (0: in the training process).
        device: where the CNN trains: ``auto`` (CUDA when available; under torchrun each
            rank its ``LOCAL_RANK`` GPU), ``cpu``, ``cuda`` or ``cuda:N``
            (:func:`pipeline.distributed.resolve_device`); the graph cuts stay on the CPU.
        learned_pairwise: the CRF gets the learned edge feature ψ4 (DESIGN.md; off by
            default): the network gets a boundary head (``network["boundary_head"]``), whose
            map b gives each grid edge the feature 1 − max(b_i, b_j) with a fourth weight
            w4 ≥ 0; in ``joint`` mode the boundary head learns from γ's gradient with the
            unaries. A run with it may start (``init``) from a checkpoint without it: its
            boundary head then starts from its initialisation and w4 from 0.
        boundary_lr: learning rate of the boundary head (None: ``lr``); it follows ``lr``'s
            schedule in proportion. A head added to a trained network starts from scratch
            while the rest is fine-tuned, and Adam moves each weight by about the learning
            rate per step, so at the fine-tuning rate it barely leaves its initialisation.
        boundary_weight: weight of a supervised loss on the boundary head, added to the
            ``cnn`` and ``joint`` modes' losses (0: none, the default): HED's class-balanced
            cross-entropy of b against the ground truth's outline, the pixels on its cut
            edges (:func:`~pipeline.crf.loss.outline_loss`). With it the head learns from the
            CNN stage on (there the unaries' cross-entropy trains the rest of the network),
            so the piecewise stage learns w4 on a map that already follows the outline.
            Needs ``learned_pairwise``.
        network: FCN8s arguments (``preset``: ``lite`` or ``paper``, plus keyword arguments).
        data: how the training images were made (``kind``, ``view``, ``size``, ``hu_window``,
            ...), recorded in checkpoints so inference prepares images the same way.
    """

    mode: str = "cnn"
    epochs: int = 10
    batch_size: int = 10
    lr: float = 1e-4
    lr_schedule: str = "constant"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    C: float = 1.0
    connectivity: int = 4
    beta: float | None = None
    tol: float = 1e-4
    max_cp_iterations: int = 100
    ce_weight: float = 0.0
    val_interval: int = 1
    patience: int | None = None
    augment: bool | dict[str, Any] = False
    seed: int = 0
    graphcut_workers: int = 0
    device: str = "auto"
    learned_pairwise: bool = False
    boundary_lr: float | None = None
    boundary_weight: float = 0.0
    network: dict[str, Any] = field(default_factory=lambda: {"preset": "lite",
                                                              "in_channels": 1})
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        for name in ("epochs", "batch_size", "val_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0 or not self.C > 0:
            raise ValueError("lr and C must be > 0")
        if self.boundary_lr is not None and not self.boundary_lr > 0:
            raise ValueError(f"boundary_lr must be > 0, got {self.boundary_lr!r}")
        if not self.boundary_weight >= 0:
            raise ValueError(f"boundary_weight must be >= 0, got {self.boundary_weight!r}")
        Augmentation.from_config(self.augment)  # a bad setting fails here, not mid-run
        # one switch: the learned edge feature needs the boundary head, and a network with
        # a boundary head (e.g. a resumed run's recorded spec) trains its feature
        self.learned_pairwise = bool(self.learned_pairwise or
                                     self.network.get("boundary_head", False))
        if self.learned_pairwise and not self.network.get("boundary_head", False):
            self.network = {**self.network, "boundary_head": True}
        if self.boundary_weight and not self.learned_pairwise:
            raise ValueError("boundary_weight supervises the boundary head of the learned edge "
                             "feature: set learned_pairwise too")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch`` under :attr:`lr_schedule`."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.epochs))
        return self.lr

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict, refusing unknown keys (typos)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """Reads a preset and applies overrides (None values ignored).

        ``path`` is a JSON file or a packaged preset's name (``cpu``, ``horse_cpu``, ...:
        :func:`~pipeline.engines.presets.find_preset`). A preset may hold a ``modes`` section
        with per-mode settings (e.g. a smaller learning rate for joint fine-tuning); it applies
        to the effective mode, before the overrides.
        """
        p = Path(path)
        try:
            values = json.loads(find_preset(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{p}: cannot read training config ({err})") from None
        overrides = {k: v for k, v in overrides.items() if v is not None}
        per_mode = values.pop("modes", {}) or {}
        mode = overrides.get("mode", values.get("mode", "cnn"))
        values.update(per_mode.get(mode, {}))
        values.update(overrides)
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{p}: {err}") from None


@dataclass
class TrainResult:
    """What a run produced. ``weights`` are the CRF weights of its last epoch (``last.pt``);
    :attr:`best_weights` those of the best epoch (``best.pt``)."""

    run_dir: Path
    weights: CRFWeights | None
    history: list[dict]
    best_metric: float
    best_epoch: int
    last_checkpoint: Path
    best_checkpoint: Path

    @property
    def best_weights(self) -> CRFWeights | None:
        """The CRF weights ``best.pt`` holds: the best epoch's row of :attr:`history` (a
        resumed run's history includes the epochs before the interruption)."""
        for row in self.history:
            if row.get("epoch") == self.best_epoch and "w1" in row:
                return CRFWeights.from_array([row[k] for k in ("w1", "w2", "w3", "w4")
                                              if k in row])
        return None


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Sequence[dict]) -> None:
        self.samples = [{"image": s["image"], "label": s["label"], "id": str(s["id"])}
                        for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


class _LazyEpochSampler(DistributedSampler):
    """A DistributedSampler whose order is drawn at the first index, not at ``iter()``.

    ignite creates the next epoch's iterator before ``EPOCH_STARTED`` handlers run, so a plain
    sampler would shuffle with the previous epoch's seed, and a resumed run with another one
    than an uninterrupted run. Drawing lazily makes epoch k's order depend on k alone.
    """

    def __iter__(self):
        yield from super().__iter__()


class _ShardSampler(Sampler):
    """Rank r's share of a dataset in order, indices r, r + R, r + 2R, … (R ranks), without
    the padding of a DistributedSampler: over all ranks every sample comes exactly once, so
    that a validation mean is the mean over the validation set, not over a set with some
    images twice. (Only for loops without collective calls inside, whose ranks may take
    one batch more or less.)"""

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, n, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader(samples, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    """Training batches (``shuffle``: a DistributedSampler's epoch order, padded to the same
    count on every rank, as DDP's gradient all-reduce needs), or each rank's share of a set
    that every sample must visit once (not ``shuffle``: validation, :class:`_ShardSampler`)."""
    dataset = _ListDataset(samples)
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size,
                          sampler=_ShardSampler(len(dataset), dist.world_size(), dist.rank()))
    sampler = _LazyEpochSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(),
                                 shuffle=shuffle, seed=seed, drop_last=False)
    # under torchrun the per-rank batch is a share of the global one; a last batch of one
    # image would break batch norm, so that image waits for another epoch (shuffled)
    lone = dist.world_size() > 1 and shuffle and len(sampler) > 1 and \
        len(sampler) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=lone)


def _check_samples(samples: Sequence[dict], name: str) -> None:
    if not samples:
        raise ValueError(f"no {name} samples")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"{name} images differ in size {sorted(shapes)[:3]}...; resize them "
                         f"(pipeline.data.samples.to_samples(size=...))")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + dist.rank() * 104_729) % (2**31)


def _batch_jaccard(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    pred = (MaxMarginLoss.foreground_logits(logits.detach()) > 0).cpu().numpy().astype(np.uint8)
    return compute_jaccard(pred, labels[:, 0].cpu().numpy().astype(np.uint8)).tolist()


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimiser over the trainable weights; a boundary head with its own
    ``boundary_lr`` gets a parameter group of its own (its ``lr_scale``: boundary_lr / lr)."""
    head = getattr(model, "boundary", None)
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head_params]
    groups: list[dict[str, Any]] = [{"params": rest}]
    if head is not None and any(p.requires_grad for p in head.parameters()):
        scale = 1.0 if config.boundary_lr is None else config.boundary_lr / config.lr
        groups.append({"params": [p for p in head.parameters() if p.requires_grad],
                       "lr": config.lr * scale, "lr_scale": scale})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9,
                           weight_decay=config.weight_decay)


def _gathered(values: list) -> list:
    """Every rank's ``values``, concatenated in rank order (this process's alone without
    torchrun)."""
    return [v for part in dist.all_gather_objects(values) for v in part]


def _in_id_order(parts: Sequence[dict]) -> list:
    """The values of the ranks' per-sample dicts, each sample id once (padded repeats
    collapse), in the order of the ids: the same list whatever the shuffle or the number of
    ranks."""
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return [merged[key] for key in sorted(merged)]


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.any(~np.isnan(arr)) else float("nan")


class _Run:
    """State of one training run (one per process): what every mode shares.

    A subclass per mode (:data:`_RUNS`) says what differs: the iteration (:meth:`step`), what
    an epoch collects (:meth:`_start_epoch`) and the CRF it solves at the epoch's end
    (:meth:`_epoch_gamma`), whether the CNN trains, and the metric that picks ``best.pt``.
    """

    #: Whether the CNN learns in this mode (and is wrapped in DDP under torchrun).
    trains_cnn: bool = True
    #: Whether γ's gradient reaches a boundary head in this mode.
    crf_trains_boundary: bool = False
    #: The validation metric whose best value keeps ``best.pt``.
    selection_metric: str = "val_jaccard_crf"

    def __init__(self, config: TrainConfig, train_samples, val_samples, run_dir: Path,
                 device: torch.device, *, fresh: bool = True) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device
        torch.manual_seed(config.seed)
        self.model = build_model(config.network, pretrained=fresh).to(device)
        if getattr(self.model, "boundary", None) is not None and not self.learns_boundary:
            self.model.boundary.requires_grad_(False)
        self.net = self.model
        if dist.world_size() > 1 and self.trains_cnn:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = _optimizer(self.model, config)
        self.pool = GraphCutPool(config.graphcut_workers) if config.graphcut_workers else None
        self.loss = MaxMarginLoss(config.C, connectivity=config.connectivity, beta=config.beta,
                                  tol=config.tol, max_iterations=config.max_cp_iterations,
                                  pool=self.pool)
        self.weights: CRFWeights | None = None
        self.train_loader = _loader(train_samples,
                                    -(-config.batch_size // dist.world_size()), shuffle=True,
                                    seed=config.seed)
        self.val_loader = (_loader(val_samples, config.batch_size, shuffle=False, seed=0)
                           if val_samples else None)
        self.history: list[dict] = []
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.stale = 0
        self.epoch_stats: dict[str, list] = {}
        self.generator = torch.Generator()
        self.augmentation = Augmentation.from_config(config.augment)
        self._start_epoch()

    @property
    def max_epochs(self) -> int:
        """Epochs this run trains for: the configured ones."""
        return self.config.epochs

    @property
    def learns_boundary(self) -> bool:
        """Whether a boundary head learns in this run: from γ's gradient, or from the
        supervised outline loss in a mode whose network learns. Where it does not, it is
        frozen, so no weight goes without a gradient (DDP would refuse that)."""
        return self.crf_trains_boundary or (self.trains_cnn and self.config.boundary_weight > 0)

    # ----- the per-mode pieces --------------------------------------------------------------
    def step(self, engine: Engine, batch: dict) -> dict:
        """One iteration over ``batch``; returns what :meth:`iteration_completed` collects."""
        raise NotImplementedError

    def _start_epoch(self) -> None:
        """Resets what this mode collects over an epoch."""

    def _epoch_gamma(self) -> float | None:
        """The CRF solved at the epoch's end (sets :attr:`weights`) and its γ; None: no CRF."""
        return None

    # ----- epoch boundaries ---------------------------------------------------------------
    def epoch_started(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        self.train_loader.sampler.set_epoch(epoch)
        seed = _epoch_seed(self.config.seed, epoch)
        torch.manual_seed(seed)
        self.generator.manual_seed(seed)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(epoch) * group.get("lr_scale", 1.0)
        self._start_epoch()
        self.epoch_stats = {"jaccard": [], "loss": [], "boundary_loss": []}
        self.epoch_time = time.perf_counter()

    def iteration_completed(self, engine: Engine) -> None:
        out = engine.state.output or {}
        self.epoch_stats["jaccard"].extend(out.get("jaccard", []))
        for key in ("loss", "boundary_loss"):
            if key in out:
                self.epoch_stats[key].append(out[key])

    def validate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        cnn, crf = [], []
        for batch in self.val_loader:
            images = batch["image"].to(self.device)
            truth = batch["label"][:, 0].numpy().astype(np.uint8)
            probs, edges = predict_map_arrays(self.model, images)
            cnn.extend(compute_jaccard((probs > 0.5).astype(np.uint8), truth).tolist())
            if self.weights is not None:
                refined = np.stack([map_labelling(p, x, self.weights,
                                                  connectivity=self.config.connectivity,
                                                  beta=self.config.beta, boundary=b)
                                    for p, x, b in zip(probs, images.cpu().numpy(), edges,
                                                       strict=True)])
                crf.extend(compute_jaccard(refined, truth).tolist())
        cnn, crf = _gathered(cnn), _gathered(crf)
        out = {"val_jaccard_cnn": _nanmean(cnn)}
        if crf:
            out["val_jaccard_crf"] = _nanmean(crf)
        return out

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        row: dict[str, Any] = {"epoch": epoch, "lr": self.config.lr_at(epoch)}
        gamma = self._epoch_gamma()
        if gamma is not None:
            row["gamma"] = gamma
        jaccards = _gathered(self.epoch_stats["jaccard"])
        losses = _gathered(self.epoch_stats["loss"])
        row["train_loss"] = float(np.mean(losses)) if losses else float("nan")
        outline = _gathered(self.epoch_stats["boundary_loss"])
        if outline:
            row["train_boundary_loss"] = float(np.mean(outline))
        row["train_jaccard"] = _nanmean(jaccards)
        if self.weights is not None:
            row.update(w1=self.weights.w1, w2=self.weights.w2, w3=self.weights.w3)
            if self.config.learned_pairwise:
                row["w4"] = self.weights.w4
        improved = False
        if epoch % self.config.val_interval == 0 or epoch == engine.state.max_epochs:
            row.update(self.validate())
            key = self.selection_metric
            metric = row.get(key, float("nan"))
            if not math.isnan(metric) and metric > self.best_metric:
                self.best_metric, self.best_epoch, self.stale = metric, epoch, 0
                improved = True
            elif key in row:
                self.stale += 1
        row["seconds"] = time.perf_counter() - self.epoch_time
        self.history.append(row)
        if dist.is_main():
            # checkpoint first: a logged epoch always has its checkpoint, so a run killed in
            # between resumes that epoch without logging it twice
            payload = self.checkpoint(engine)
            save_checkpoint(payload, self.run_dir / "last.pt")
            if improved or not (self.run_dir / "best.pt").exists():
                save_checkpoint(payload, self.run_dir / "best.pt")
            self._log(row)
        if self.config.patience is not None and self.stale >= self.config.patience:
            engine.terminate()

    # ----- persistence --------------------------------------------------------------------
    def checkpoint(self, engine: Engine) -> dict[str, Any]:
        # labellings are 0/1: kept as bits (8× smaller), with each set's K×H×W shape
        sets = {k: torch.as_tensor(np.packbits(np.stack(v), axis=None))
                for k, v in self.loss.working_sets.items() if v}
        shapes = {k: list(np.shape(np.stack(v))) for k, v in self.loss.working_sets.items() if v}
        return {
            "mode": self.config.mode,
            "config": asdict(self.config),
            "network": dict(self.config.network),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "crf": None if self.weights is None
            else self.weights.as_array(learned=self.config.learned_pairwise).tolist(),
            "working_sets": sets,
            "working_set_shapes": shapes,
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "history": self.history,
            "best": {"metric": self.best_metric, "epoch": self.best_epoch, "stale": self.stale},
            "rng": rng_state(),
        }

    def restore(self, payload: dict[str, Any], *, grow: bool = False) -> list[str]:
        """Takes a checkpoint's weights, optimiser, CRF and working sets. ``grow``: a network
        with a boundary head may take the same network's weights without one (a run with
        the learned edge feature starting from an earlier stage; not a resumed run, which
        must fit its own checkpoint exactly).

        Returns:
            The boundary head's keys the checkpoint did not have (its head starts from its
            initialisation).

        Raises:
            RuntimeError: the weights do not fit the network.
        """
        if grow:
            grown = load_network_state(self.model, payload["model"])
        else:
            self.model.load_state_dict(payload["model"])
            grown = []
        if payload.get("optimizer") is not None and payload.get("mode") == self.config.mode \
                and not grown:
            self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("crf") is not None:
            self.weights = CRFWeights.from_array(payload["crf"])
            self.loss.weights = self.weights
        shapes = payload.get("working_set_shapes") or {}
        self.loss.working_sets = {
            k: list(np.unpackbits(v.numpy(), count=int(np.prod(shapes[k]))).reshape(shapes[k]))
            for k, v in (payload.get("working_sets") or {}).items()}
        return grown

    def _log(self, row: dict[str, Any]) -> None:
        path = self.run_dir / "log.csv"
        columns = ["epoch", "train_loss", "train_jaccard", "val_jaccard_cnn", "val_jaccard_crf",
                   "gamma", "w1", "w2", "w3", "w4", "train_boundary_loss", "seconds", "lr"]
        new = not path.exists()
        if not new:  # a resumed run appends in the log's own columns (older logs lack some)
            with path.open(newline="") as f:
                columns = next(csv.reader(f), None) or columns
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            return
        with SummaryWriter(str(self.run_dir / "tensorboard")) as tb:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, float) and not math.isnan(value):
                    tb.add_scalar(key, value, row["epoch"])


class _GradientRun(_Run):
    """The modes whose CNN learns: one optimiser step per batch on :meth:`_loss`."""

    def step(self, engine: Engine, batch: dict) -> dict:
        images = batch["image"].to(self.device)
        labels = batch["label"].to(self.device)
        if self.augmentation is not None:
            images, labels = self.augmentation(images, labels, self.generator)
        self.net.train()
        self.optimizer.zero_grad()
        if self.learns_boundary:
            with boundary_outputs(self.net) as with_boundary:
                outputs = self.net(images)
        else:  # the head is frozen and idle here
            outputs, with_boundary = self.net(images), False
        logits, edge_logits = split_boundary(outputs, with_boundary)
        ce = F.binary_cross_entropy_with_logits(MaxMarginLoss.foreground_logits(logits),
                                                labels[:, 0])
        out = {"jaccard": _batch_jaccard(logits, labels), "ce": ce.item()}
        loss = self._loss(logits, images, labels, batch, ce, out, edge_logits)
        if self.config.boundary_weight and edge_logits is not None:
            outline = outline_loss(edge_logits, labels[:, 0],
                                   connectivity=self.config.connectivity)
            loss = loss + self.config.boundary_weight * outline
            out["boundary_loss"] = outline.item()
        loss.backward()
        self.optimizer.step()
        out["loss"] = loss.item()
        return out

    def _loss(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
              batch: dict, ce: torch.Tensor, out: dict,
              edge_logits: torch.Tensor | None) -> torch.Tensor:
        """The batch's training loss from the network's ``logits`` (and boundary logits, None
        without a boundary head) and its cross-entropy ``ce``; may add entries to the step's
        ``out``."""
        raise NotImplementedError


class _CNNRun(_GradientRun):
    """``cnn``: pixelwise cross-entropy alone, best.pt picked by the CNN's own Jaccard."""

    selection_metric = "val_jaccard_cnn"

    def _loss(self, logits, images, labels, batch, ce, out, edge_logits) -> torch.Tensor:
        return ce


class _JointRun(_GradientRun):
    """``joint`` (Algorithm 2): γ of each batch back-propagated into the CNN, its constraints
    kept for the global QP that gives w at the epoch's end."""

    crf_trains_boundary = True

    def _start_epoch(self) -> None:
        self.epoch_constraints: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _loss(self, logits, images, labels, batch, ce, out, edge_logits) -> torch.Tensor:
        # the boundary head learns from γ's gradient through b = sigmoid(its logits)
        boundary = None if edge_logits is None else torch.sigmoid(edge_logits)
        gamma = self.loss(logits, images, labels, ids=list(batch["id"]), boundary=boundary)
        loss = gamma + self.config.ce_weight * ce if self.config.ce_weight else gamma
        result = self.loss.last_result
        for sample_id, dpsi, losses in zip(batch["id"], result.dpsi, result.losses,
                                           strict=True):
            self.epoch_constraints[str(sample_id)] = (dpsi, losses)
        out["gamma_batch"] = gamma.item()
        return loss

    def _epoch_gamma(self) -> float:
        """Algorithm 2's epoch end: the QP over every rank's working sets gives w and γ."""
        gathered = dist.all_gather_objects(self.epoch_constraints)
        solution = None
        if dist.is_main():
            constraints = _in_id_order(gathered)  # (Δψ, Δ) per sample
            qp = MarginQP(len(constraints), self.config.C,
                          n_features=constraints[0][0].shape[1])
            solution = qp.solve([dpsi for dpsi, _ in constraints],
                                [losses for _, losses in constraints])
            solution = (solution.w.tolist(), solution.gamma)
        w, gamma = dist.broadcast_object(solution)
        self.weights = CRFWeights.from_array(w)
        self.loss.weights = self.weights
        return float(gamma)


class _PiecewiseRun(_Run):
    """``piecewise`` (Algorithm 1): the CNN frozen, one pass collecting its probabilities, the
    CRF learned on all of them at the end."""

    trains_cnn = False

    @property
    def max_epochs(self) -> int:
        """One pass: the CNN does not change, so more would see the same probabilities."""
        return 1

    def _start_epoch(self) -> None:
        # by sample id: under torchrun the training sampler pads the ranks' shares to the
        # same length with repeated samples, which must not weigh twice in the QP
        self.piecewise_data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray,
                                             np.ndarray | None]] = {}

    def step(self, engine: Engine, batch: dict) -> dict:
        images = batch["image"].to(self.device)
        labels = batch["label"].to(self.device)
        probs, edges = predict_map_arrays(self.model, images)
        for i, p, x, y, b in zip(batch["id"], probs, images.cpu().numpy(),
                                 labels[:, 0].cpu().numpy(), edges, strict=True):
            self.piecewise_data[str(i)] = (p, x, y.astype(np.uint8), b)
        return {}

    def _epoch_gamma(self) -> float:
        gathered = dist.all_gather_objects(self.piecewise_data)
        solution = None
        if dist.is_main():
            # each sample once, in the order of their ids: the cutting plane's optimum (to
            # within its tolerance) does not depend on the shuffle or the number of ranks
            data = _in_id_order(gathered)
            result = learn_weights([d[0] for d in data], [d[1] for d in data],
                                   [d[2] for d in data], C=self.config.C,
                                   connectivity=self.config.connectivity,
                                   beta=self.config.beta, tol=self.config.tol,
                                   max_iterations=self.config.max_cp_iterations,
                                   workers=self.config.graphcut_workers,
                                   boundaries=([d[3] for d in data]
                                               if self.config.learned_pairwise else None))
            solution = (result.weights.as_array(self.config.learned_pairwise).tolist(),
                        result.gamma)
        w, gamma = dist.broadcast_object(solution)
        self.weights = CRFWeights.from_array(w)
        return float(gamma)


#: The run of each training mode.
_RUNS: dict[str, type[_Run]] = {"cnn": _CNNRun, "piecewise": _PiecewiseRun,
                                "joint": _JointRun}


def train(config: TrainConfig, train_samples: Sequence[dict], val_samples: Sequence[dict],
          run_dir: str | os.PathLike, *, init: str | os.PathLike | None = None,
          resume: bool = False, progress: bool = False) -> TrainResult:
    """Trains one mode; resumable; works alone or under torchrun (DDP).

    Args:
        config: the run's settings.
        train_samples: fixed-size 2-D samples ``{"image", "label", "id"}``.
        val_samples: validation samples (may be empty: no validation).
        run_dir: folder for ``last.pt``, ``best.pt``, ``log.csv``, ``tensorboard/``,
            ``config.json``.
        init: checkpoint whose network (and CRF) weights start this run, e.g. the CNN run's
            ``best.pt`` for piecewise/joint training.
        resume: continue from ``run_dir/last.pt`` if it exists.
        progress: show a tqdm progress bar (rank 0).

    Returns:
        The run's result.

    Raises:
        ValueError: bad samples or settings; a checkpoint of another network.
    """
    _check_samples(train_samples, "training")
    if val_samples:
        _check_samples(val_samples, "validation")
    run = Path(run_dir)
    fresh = init is None and not (resume and (run / "last.pt").exists())
    weights = config.network.get("weights")
    if fresh and weights is not None and "weights_sha256" not in config.network:
        config.network = {**config.network, "weights_sha256": sha256_file(weights)}
    if dist.is_main():
        run.mkdir(parents=True, exist_ok=True)
    device = dist.resolve_device(config.device)
    state = _RUNS[config.mode](config, train_samples, val_samples, run, device, fresh=fresh)
    engine = Engine(state.step)
    engine.add_event_handler(Events.EPOCH_STARTED, state.epoch_started)
    engine.add_event_handler(Events.ITERATION_COMPLETED, state.iteration_completed)
    engine.add_event_handler(Events.EPOCH_COMPLETED, state.epoch_completed)
    max_epochs = state.max_epochs
    start_epoch = 0
    last = run / "last.pt"
    if dist.is_main():
        for stale in run.glob(".*.tmp"):  # a killed run's half-written checkpoint
            stale.unlink(missing_ok=True)
        if not (resume and last.exists()):
            (run / "log.csv").unlink(missing_ok=True)  # a fresh run starts a fresh log
    last = run / "last.pt"
    if resume and last.exists():
        payload = load_checkpoint(last)
        try:
            state.restore(payload)
        except RuntimeError as err:
            raise ValueError(f"{last}: its weights do not fit this run's network "
                             f"({str(err).strip().splitlines()[0][:300]}); resume with the "
                             f"settings it was trained with") from None
        state.history = list(payload["history"])
        best = payload["best"]
        state.best_metric, state.best_epoch, state.stale = (best["metric"], best["epoch"],
                                                            best["stale"])
        start_epoch = int(payload["epoch"])
        set_rng_state(payload["rng"])
    elif init is not None:
        try:
            grown = state.restore(load_checkpoint(init), grow=True)
        except RuntimeError as err:  # load_state_dict: missing keys or size mismatch
            raise ValueError(f"{init}: its weights do not fit this run's network "
                             f"({str(err).strip().splitlines()[0][:300]}); start from a "
                             f"checkpoint of the same network settings") from None
        if grown and weights is not None and state.model.boundary_kind == "hed":
            # a head added to a trained CNN: HED's pretrained side outputs, not noise
            load_hed_side_outputs(state.model, weights)
            config.network = {**config.network, "weights_sha256": sha256_file(weights)}
    if dist.is_main():  # once the checkpoints fit: a refused resume leaves the run as it was
        (run / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    if progress and dist.is_main():
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(persist=False).attach(engine)
    try:
        if start_epoch < max_epochs:
            engine.load_state_dict({"epoch": start_epoch, "max_epochs": max_epochs,
                                    "epoch_length": len(state.train_loader)})
            engine.run(state.train_loader)
    finally:
        if state.pool is not None:
            state.pool.close()
    return TrainResult(run, state.weights, state.history, state.best_metric, state.best_epoch,
                       last, run / "best.pt")
