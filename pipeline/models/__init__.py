"""Model files: networks built from settings, checkpoints, trained models loaded for use."""

from __future__ import annotations

from pipeline.models.checkpoints import (
    CHECKPOINT_FORMAT,
    export_model,
    export_state_dict,
    has_learned_pairwise,
    load_checkpoint,
    load_network_weights,
    save_checkpoint,
)
from pipeline.models.loading import (
    TTA_FLIPS,
    autocast,
    build_model,
    inference_models,
    load_run,
    model_files,
    predict_map_arrays,
    predict_maps,
    predict_probabilities,
    training_flips,
    tta_flips,
)
from pipeline.models.modes import METHODS, MODES

__all__ = [
    "CHECKPOINT_FORMAT",
    "METHODS",
    "MODES",
    "TTA_FLIPS",
    "autocast",
    "build_model",
    "export_model",
    "export_state_dict",
    "has_learned_pairwise",
    "inference_models",
    "load_checkpoint",
    "load_network_weights",
    "load_run",
    "model_files",
    "predict_map_arrays",
    "predict_maps",
    "predict_probabilities",
    "save_checkpoint",
    "training_flips",
    "tta_flips",
]
