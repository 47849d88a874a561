"""Inference: 2-D models over 3-D volumes, ultrasound cine loops and folders of them."""

from __future__ import annotations

from pipeline.inference.batch import SUMMARY_COLUMNS, output_paths, run_batch, run_cases
from pipeline.inference.discovery import Case, find_cases
from pipeline.inference.frames import (
    DEFAULT_FRAME_EXCLUDE,
    FRAME_DATA_KINDS,
    FRAME_SUMMARY_COLUMNS,
    FramePredictor,
    find_frame_cases,
    is_frame_model,
    run_frames,
    segment_frames,
)
from pipeline.inference.predictor import TrainedModel, VolumePrediction, VolumePredictor

__all__ = [
    "DEFAULT_FRAME_EXCLUDE",
    "FRAME_DATA_KINDS",
    "FRAME_SUMMARY_COLUMNS",
    "SUMMARY_COLUMNS",
    "Case",
    "FramePredictor",
    "TrainedModel",
    "VolumePrediction",
    "VolumePredictor",
    "find_cases",
    "find_frame_cases",
    "is_frame_model",
    "output_paths",
    "run_batch",
    "run_cases",
    "run_frames",
    "segment_frames",
]
