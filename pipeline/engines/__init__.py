"""Training engines: one ignite path for CNN-only, piecewise and joint max-margin training."""

from __future__ import annotations

from pathlib import Path

from pipeline.engines.checkpoint import load_checkpoint, save_checkpoint
from pipeline.engines.trainer import (
    MODES,
    TrainConfig,
    TrainResult,
    build_model,
    predict_probabilities,
    previous_stage_checkpoint,
    stage_checkpoint,
    train,
)

#: The CPU-sized training preset shipped in ``configs/``.
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "cpu.json")

__all__ = [
    "DEFAULT_CONFIG",
    "MODES",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "load_checkpoint",
    "predict_probabilities",
    "previous_stage_checkpoint",
    "save_checkpoint",
    "stage_checkpoint",
    "train",
]
