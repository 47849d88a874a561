"""Checkpoints that resume a run exactly and load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_FORMAT", "export_model", "load_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state"]

#: What a shipped model keeps of a training checkpoint (no optimiser, working sets or RNG).
_MODEL_KEYS = ("mode", "config", "network", "model", "crf", "epoch", "history", "best")

CHECKPOINT_FORMAT = "mmcrf-checkpoint-1"


def rng_state() -> dict[str, Any]:
    """Torch, NumPy and Python RNG states as tensors and plain values (weights-only safe)."""
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG other code uses
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.as_tensor(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes a checkpoint atomically (temporary file in the same folder, then rename).

    Args:
        payload: tensors, state dicts and plain Python values only.
        path: destination.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    tmp.replace(out)
    return out


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True`` (nothing is unpickled).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an mmcrf checkpoint, or unreadable.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{p}: cannot load checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: not an mmcrf checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def export_model(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Writes the slim model file a bundle ships (``models/model.pt``): network weights, CRF
    weights and the run's settings, without optimiser state, working sets or RNG states."""
    payload = load_checkpoint(checkpoint)
    return save_checkpoint({k: payload[k] for k in _MODEL_KEYS if k in payload}, path)
