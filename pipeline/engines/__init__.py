"""Training engines: one ignite path for CNN-only, piecewise and joint max-margin training."""

from __future__ import annotations

from pipeline.engines.checkpoint import load_checkpoint, save_checkpoint
from pipeline.engines.trainer import (
    MODES,
    TrainConfig,
    TrainResult,
    build_model,
    predict_probabilities,
    train,
)

__all__ = [
    "MODES",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "load_checkpoint",
    "predict_probabilities",
    "save_checkpoint",
    "train",
]
