"""Networks from settings and trained models from their files, for training and inference."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.crf import CRFWeights, MaxMarginLoss
from pipeline.data.views import VIEWS
from pipeline.models.checkpoints import load_checkpoint
from pipeline.models.modes import METHODS, MODES
from pipeline.networks import (
    FCN8s,
    boundary_outputs,
    load_vgg16_weights,
    split_boundary,
)
from pipeline.networks.pretrained import load_pretrained_backbone

__all__ = [
    "TTA_FLIPS",
    "autocast",
    "build_model",
    "inference_models",
    "load_run",
    "model_files",
    "network_of",
    "predict_map_arrays",
    "predict_maps",
    "predict_probabilities",
]


def build_model(network: dict[str, Any], *, pretrained: bool = False) -> FCN8s:
    """An FCN8s from a ``network`` setting: ``{"preset": "lite"|"paper"|"vgg16"|"custom",
    ...kwargs}``.

    ``weights`` (a VGG16 weights file, see ``mmcrf weights``) and ``pretrained_path`` (a
    torchvision VGG16 state dict) initialise the backbone only with ``pretrained=True``: a
    fresh training run. Rebuilding a trained network from its checkpoint (whose weights
    replace all of them) needs neither file; ``weights_sha256`` is a record, not an argument.
    """
    args = dict(network)
    preset = args.pop("preset", "lite")
    weights = args.pop("weights", None)
    args.pop("weights_sha256", None)
    torchvision_file = args.pop("pretrained_path", None)
    if preset == "lite":
        model = FCN8s.lite(**args)
    elif preset == "paper":
        model = FCN8s.paper(**args)
    elif preset == "vgg16":
        model = FCN8s.vgg16(**args)
    elif preset == "custom":
        model = FCN8s(**args)
    else:
        raise ValueError(f"network preset must be 'lite', 'paper', 'vgg16' or 'custom', "
                         f"got {preset!r}")
    if pretrained and torchvision_file is not None:
        load_vgg16_weights(model, torchvision_file)
    if pretrained and weights is not None:
        load_pretrained_backbone(model, weights)
    return model


#: The flips of test-time augmentation: none, left-right, up-down, both.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def training_flips(config: Mapping[str, Any] | None) -> tuple[tuple[int, ...], ...]:
    """The flips a run's training augmentation drew (its ``augment`` ``hflip``/``vflip``),
    with the identity first: what test-time flips may average over, since a flip the model
    never saw shows it images unlike its training ones (measured: an up-down flip costs the
    horse models 4 Jaccard points and the CAMUS models 22–28, docs/RESULTS.md)."""
    augment = (config or {}).get("augment") or {}
    if not isinstance(augment, Mapping):
        return ((),)
    h = float(augment.get("hflip", 0) or 0) > 0
    v = float(augment.get("vflip", 0) or 0) > 0
    return tuple(f for f in TTA_FLIPS if (-1 not in f or h) and (-2 not in f or v))


def tta_flips(flips: Sequence[tuple[int, ...]], checkpoint: str | os.PathLike,
                    tta: bool) -> tuple[tuple[int, ...], ...]:
    """The flips a prediction averages over: none, or with ``tta`` the model's training
    flips (:func:`training_flips`).

    Raises:
        ValueError: ``tta`` for a model trained without flips (the message names it).
    """
    if not tta:
        return ((),)
    if len(flips) == 1:
        raise ValueError(f"{checkpoint}: trained without flips (augment hflip = vflip = 0), so "
                         f"test-time flips would show it images unlike any it trained on; "
                         f"--tta needs a model trained with flips")
    return tuple(flips)


def autocast(device: str | torch.device, enabled: bool = True) -> torch.autocast:
    """The mixed-precision context for a network's forward pass on ``device``: float16 on
    CUDA (tensor cores; the sigmoid and everything after it run in float32), bfloat16 on the
    CPU (float16 matrix products are not offered there). ``enabled=False``: full precision.
    """
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, enabled=enabled,
                          dtype=torch.float16 if kind == "cuda" else torch.bfloat16)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: torch.Tensor, *,
                          flips: Sequence[tuple[int, ...]] = ((),)) -> torch.Tensor:
    """Foreground probabilities B×H×W of a batch (eval mode, no gradient), on the images'
    device.

    ``flips`` (test-time augmentation): the probabilities of the images flipped along each
    entry's dims (``()``: as they are) are flipped back and averaged.
    """
    return predict_maps(model, images, flips=flips, boundary=False)[0]


@torch.no_grad()
def predict_maps(model: torch.nn.Module, images: torch.Tensor, *,
                 flips: Sequence[tuple[int, ...]] = ((),),
                 boundary: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Foreground probabilities and boundary strengths (B×H×W each) of a batch, as
    :func:`predict_probabilities`; the boundary map (the sigmoid of a boundary head's
    logits, averaged over the same flips) is None for a network without a boundary head or
    with ``boundary=False``."""
    # a model an application wraps (e.g. MONAI Deploy's TorchScriptModel) is only callable
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    total, edges = None, None
    context = boundary_outputs(model) if boundary else contextlib.nullcontext(False)
    with context as with_boundary:
        for dims in flips:
            x = torch.flip(images, dims) if dims else images
            logits, b = split_boundary(model(x), with_boundary)
            p = torch.sigmoid(MaxMarginLoss.foreground_logits(logits).float())
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
            if b is not None:
                b = torch.sigmoid(b.float())
                b = torch.flip(b, dims) if dims else b
                edges = b if edges is None else edges + b
    if was_training is not None:
        model.train(was_training)
    if len(flips) > 1:
        total = total / len(flips)
        edges = None if edges is None else edges / len(flips)
    return total, edges


def predict_map_arrays(model: torch.nn.Module, images: torch.Tensor, *,
                       flips: Sequence[tuple[int, ...]] = ((),), boundary: bool = True
                       ) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """:func:`predict_maps` as NumPy, for graph cuts image by image: the B×H×W probabilities
    and, per image, its H×W boundary map (None each without one)."""
    probs, edges = predict_maps(model, images, flips=flips, boundary=boundary)
    probs = probs.cpu().numpy()
    return probs, [None] * len(probs) if edges is None else list(edges.cpu().numpy())


def network_of(payload: dict[str, Any], checkpoint: str | os.PathLike) -> FCN8s:
    """The checkpoint's network built from its spec with its weights loaded; ValueError naming
    the file when spec and weights do not fit (e.g. an edited ``in_channels``)."""
    try:
        model = build_model(payload["network"])
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{checkpoint}: its network spec does not fit its weights "
                         f"({first[:300]})") from None
    return model


def load_run(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, CRFWeights | None, dict]:
    """The network (eval mode), CRF weights (None for a CNN-only run) and config of a
    checkpoint."""
    payload = load_checkpoint(checkpoint)
    model = network_of(payload, checkpoint)
    model.eval()
    try:
        crf = None if payload.get("crf") is None else CRFWeights.from_array(payload["crf"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{checkpoint}: bad CRF weights ({err})") from None
    return model, crf, payload.get("config", {})


def model_files(model: str | os.PathLike) -> dict[str, Path]:
    """Method → checkpoint: a checkpoint file itself (method from its file name, e.g.
    ``joint.pt``; otherwise ``model``), or a bundle folder whose ``models/`` holds
    ``cnn.pt``, ``piecewise.pt``, ``joint.pt``, ``joint_lp.pt`` (:data:`METHODS`, in that
    order) and/or ``model.pt``."""
    path = Path(model)
    if path.is_file():
        return {path.stem if path.stem in METHODS else "model": path}
    folder = path / "models" if (path / "models").is_dir() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such model file or bundle folder")
    found = {p.stem: p for p in sorted(folder.glob("*.pt"))}
    runs = {m: found[m] for m in METHODS if m in found}
    if not runs and "model" in found:
        runs = {"model": found["model"]}
    if not runs:
        raise FileNotFoundError(f"{folder}: no cnn.pt, piecewise.pt, joint.pt or model.pt")
    return runs



def inference_models(model: str | os.PathLike) -> tuple[Path | dict[str, Path], str | None]:
    """What ``mmcrf infer --model`` runs: a checkpoint file itself, or from a bundle folder
    its per-view models (``models/model_{view}.pt`` → view → file) or else its best method
    (joint, then piecewise, cnn, model). The second value is the bundle's default view
    (``view`` of its ``configs/inference.json``; None for a file or where it sets none).

    Raises:
        FileNotFoundError: neither a file nor a bundle folder with models.
    """
    path = Path(model)
    if path.is_file():
        return path, None
    folder = path / "models" if (path / "models").is_dir() else path
    per_view = {v: folder / f"model_{v}.pt" for v in VIEWS
                if (folder / f"model_{v}.pt").is_file()}
    config = path / "configs" / "inference.json"
    view = None
    if config.is_file():
        try:
            view = json.loads(config.read_text()).get("view")
        except ValueError:
            view = None
    if per_view:
        return per_view, view if isinstance(view, str) else None
    runs = model_files(path)
    best = next(m for m in (*reversed(MODES), "model") if m in runs)
    return runs[best], None
