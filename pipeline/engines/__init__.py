"""Training engines: one ignite path for CNN-only, piecewise and joint max-margin training."""

from __future__ import annotations

from pipeline.engines.presets import DEFAULT_CONFIG, find_preset, preset_names
from pipeline.engines.trainer import (
    MODES,
    TrainConfig,
    TrainResult,
    previous_stage_checkpoint,
    stage_checkpoint,
    train,
)

__all__ = [
    "DEFAULT_CONFIG",
    "MODES",
    "TrainConfig",
    "TrainResult",
    "find_preset",
    "preset_names",
    "previous_stage_checkpoint",
    "stage_checkpoint",
    "train",
]
