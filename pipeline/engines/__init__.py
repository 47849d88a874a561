"""Training engines: one ignite path for CNN-only, piecewise and joint max-margin training."""

from __future__ import annotations

from pathlib import Path

from pipeline.engines.trainer import (
    MODES,
    TrainConfig,
    TrainResult,
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
    "previous_stage_checkpoint",
    "stage_checkpoint",
    "train",
]
