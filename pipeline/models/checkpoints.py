"""Model and checkpoint files: written atomically, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.data.hashing import sha256_file
from pipeline.data.writers import atomic_write
from pipeline.networks.pretrained import load_weights_only

__all__ = ["CHECKPOINT_FORMAT", "export_model", "export_state_dict", "load_checkpoint",
           "load_network_weights", "save_checkpoint"]

#: What a shipped model keeps of a training checkpoint (no optimiser, working sets or RNG).
_MODEL_KEYS = ("mode", "config", "network", "model", "crf", "epoch", "history", "best")

CHECKPOINT_FORMAT = "mmcrf-checkpoint-1"


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes a checkpoint atomically (temporary file in the same folder, then rename).

    Args:
        payload: tensors, state dicts and plain Python values only.
        path: destination.

    Returns:
        The path written.
    """
    return atomic_write(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **payload},
                                                     tmp))


def _read(p: Path) -> dict[str, Any]:
    payload = load_weights_only(p, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: not an mmcrf checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True`` (nothing is unpickled).

    A model file that shares its network with a sibling (``model_from``, see
    :func:`export_model`) gets the sibling's network weights, after their sha256 is checked.
    Weights stored in half precision stay so here; ``load_state_dict`` restores the network's
    own dtype.

    Raises:
        FileNotFoundError: no such file, or its ``model_from`` sibling is missing.
        ValueError: not an mmcrf checkpoint (or one refused by weights-only loading),
            unreadable, without a network spec or weights, or a ``model_from`` that is not a
            plain file name beside it, has another hash or shares in turn.
    """
    p = Path(path)
    payload = _read(p)
    source = payload.get("model_from")
    if source is None:
        return _complete(payload, p)
    if not isinstance(source, str) or Path(source).name != source or source in ("", ".", ".."):
        raise ValueError(f"{p}: model_from must name a file beside it, got {source!r}")
    sibling = p.parent / source
    if not sibling.is_file():
        raise FileNotFoundError(f"{p}: its network weights are in {sibling}, which is missing")
    digest = sha256_file(sibling)
    if digest != payload.get("model_sha256"):
        raise ValueError(f"{p}: {sibling.name} has sha256 {digest}, not the "
                         f"{payload.get('model_sha256')} it was exported against")
    return _complete({**payload, "model": _shared_weights(sibling, p)}, p)


def _is_state_dict(payload: Any) -> bool:
    return isinstance(payload, dict) and bool(payload) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items())


def _shared_weights(sibling: Path, owner: Path) -> dict[str, torch.Tensor]:
    """The network weights a ``model_from`` file holds: a plain state dict (a bundle's
    ``models/model.pt``) or an mmcrf checkpoint's own ``model``."""
    payload = load_weights_only(sibling, "checkpoint")
    if _is_state_dict(payload):
        return payload
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{owner}: {sibling.name} is neither a state dict nor an mmcrf "
                         f"checkpoint")
    if "model" not in payload:
        raise ValueError(f"{owner}: {sibling.name} holds no network weights of its own")
    return payload["model"]


def load_network_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network state dict of a model file: a plain state dict (``models/model.pt``, as
    MONAI's model zoo expects it) or an mmcrf checkpoint's network weights (following
    ``model_from``). Loaded weights-only.

    Raises:
        FileNotFoundError: no such file.
        ValueError: neither a state dict nor an mmcrf checkpoint (naming the file).
    """
    p = Path(path)
    payload = load_weights_only(p, "checkpoint")
    if _is_state_dict(payload):
        return payload
    return load_checkpoint(p)["model"]


def has_learned_pairwise(checkpoint: str | os.PathLike | Mapping[str, Any]) -> bool:
    """Whether a checkpoint's CRF has the learned edge feature: CRF weights and a network
    with a boundary head, whose map the cuts need (``TrainedModel.learned_pairwise`` of the
    loaded model). ``checkpoint``: a path, or a payload :func:`load_checkpoint` returned
    (so that a caller holding it does not read the file again)."""
    payload = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    return (payload.get("crf") is not None
            and bool((payload.get("network") or {}).get("boundary_head")))


def export_state_dict(checkpoint: str | os.PathLike, path: str | os.PathLike, *,
                      half: bool = False) -> Path:
    """Writes a checkpoint's network weights as a plain state dict (a bundle's
    ``models/model.pt``, which MONAI's ``ckpt_export`` and model-zoo checks load into
    ``network_def``); the CRF weights and settings stay in the mmcrf checkpoint, which can
    then share these weights (:func:`export_model` with ``share_network_with``).

    Args:
        checkpoint: an mmcrf checkpoint or exported model.
        path: the state-dict file to write.
        half: store floating-point weights in half precision.

    Returns:
        The written path.
    """
    weights = load_checkpoint(checkpoint)["model"]
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    return atomic_write(path, lambda tmp: torch.save(dict(weights), tmp))


def _complete(payload: dict[str, Any], p: Path) -> dict[str, Any]:
    """The payload, or ValueError naming the file when it lacks what every checkpoint has:
    a ``network`` spec (a dict) and ``model`` weights (name → tensor)."""
    for key in ("network", "model"):
        if key not in payload:
            raise ValueError(f"{p}: not a complete mmcrf checkpoint (no {key!r})")
    if not isinstance(payload["network"], dict):
        raise ValueError(f"{p}: its 'network' must be a dict of settings, got "
                         f"{type(payload['network']).__name__}")
    model = payload["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in model.values()):
        raise ValueError(f"{p}: its 'model' must map parameter names to tensors")
    return payload


def export_model(checkpoint: str | os.PathLike, path: str | os.PathLike, *,
                 half: bool = False, share_network_with: str | os.PathLike | None = None
                 ) -> Path:
    """Writes the slim model file a bundle ships (``models/model.pt``): network weights, CRF
    weights and the run's settings, without optimiser state, working sets or RNG states.

    Args:
        checkpoint: a training checkpoint (or an exported model).
        path: the model file to write.
        half: store floating-point network weights in half precision (half the size; the
            network runs in its own precision after loading).
        share_network_with: an exported model file in the same folder whose network weights
            are exactly this one's (e.g. the CNN-only model beside a piecewise one, whose CNN
            is frozen): the weights are not stored again; the file names it (``model_from``)
            with its sha256.

    Returns:
        The written path.

    Raises:
        ValueError: the checkpoint is not a loadable model (see :func:`load_checkpoint`; its
            network spec must fit its weights), or the shared file is in another folder or
            holds other network weights.
    """
    from pipeline.models.loading import network_of  # loading builds on this module

    payload = load_checkpoint(checkpoint)
    network_of(payload, checkpoint)  # a model file that cannot be loaded is not written
    out = {k: payload[k] for k in _MODEL_KEYS if k in payload}
    if half:
        out["model"] = {k: v.half() if v.is_floating_point() else v
                        for k, v in out["model"].items()}
        out["model_dtype"] = "float16"
    if share_network_with is not None:
        shared = Path(share_network_with)
        if shared.resolve().parent != Path(path).resolve().parent:
            raise ValueError(f"{shared}: a shared network file must be beside {path}")
        theirs = _shared_weights(shared, Path(path))
        ours = out["model"]
        same = set(theirs) == set(ours) and all(
            torch.equal(theirs[k].to(ours[k].dtype), ours[k]) for k in ours)
        if not same:
            raise ValueError(f"{checkpoint}: its network weights differ from {shared}'s; "
                             "only a model whose network is exactly the other's can share it")
        del out["model"]
        out["model_from"] = shared.name
        out["model_sha256"] = sha256_file(shared)
    return save_checkpoint(out, path)
