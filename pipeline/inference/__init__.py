"""Inference: 2-D models over 3-D volumes and folders of NIfTI files / DICOM series."""

from __future__ import annotations

from pipeline.inference.batch import SUMMARY_COLUMNS, output_paths, run_batch
from pipeline.inference.discovery import Case, find_cases
from pipeline.inference.predictor import ViewModel, VolumePrediction, VolumePredictor

__all__ = [
    "SUMMARY_COLUMNS",
    "Case",
    "ViewModel",
    "VolumePrediction",
    "VolumePredictor",
    "find_cases",
    "output_paths",
    "run_batch",
]
