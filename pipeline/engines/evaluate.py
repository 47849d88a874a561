"""Score trained runs (CNN-only, piecewise, joint) image by image into the evaluation table."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.crf import CRFWeights
from pipeline.crf.inference import map_labelling
from pipeline.engines.checkpoint import load_checkpoint
from pipeline.engines.trainer import build_model, predict_probabilities
from pipeline.reports.tables import evaluation_rows

__all__ = ["evaluate_runs", "load_run", "predict_samples"]


def load_run(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, CRFWeights | None, dict]:
    """The network (eval mode), CRF weights (None for a CNN-only run) and config of a
    checkpoint."""
    payload = load_checkpoint(checkpoint)
    model = build_model(payload["network"])
    model.load_state_dict(payload["model"])
    model.eval()
    crf = None if payload.get("crf") is None else CRFWeights.from_array(payload["crf"])
    return model, crf, payload.get("config", {})


def predict_samples(model: torch.nn.Module, weights: CRFWeights | None,
                    samples: Sequence[Mapping], *, batch_size: int = 10,
                    connectivity: int = 4, beta: float | None = None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """CNN masks (probability > 0.5) and, with CRF weights, graph-cut masks of 2-D samples.

    Returns:
        (N×H×W uint8 CNN masks, N×H×W uint8 CRF masks or None).
    """
    cnn, crf = [], []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="predict", disable=not progress):
        batch = samples[start:start + batch_size]
        images = torch.stack([torch.as_tensor(s["image"]) for s in batch])
        probs = predict_probabilities(model, images).numpy()
        cnn.append((probs > 0.5).astype(np.uint8))
        if weights is not None:
            crf.append(np.stack([map_labelling(p, x, weights, connectivity=connectivity,
                                               beta=beta)
                                 for p, x in zip(probs, images.numpy(), strict=True)]))
    return np.concatenate(cnn), (np.concatenate(crf) if weights is not None else None)


def evaluate_runs(runs: Mapping[str, str | os.PathLike], samples: Sequence[Mapping], *,
                  empty: str = "exclude_empty_truth", batch_size: int = 10,
                  progress: bool = False) -> list[dict]:
    """Per-image evaluation rows of several runs on the same 2-D samples.

    Args:
        runs: method name → checkpoint. A CNN-only checkpoint scores thresholded
            probabilities; a checkpoint with CRF weights scores the graph-cut masks.
        samples: 2-D samples with ``image``, ``label`` and ``source``/``view``/``slice``
            (or ``id``).
        empty: empty-truth policy of the Jaccard.
        batch_size: images per forward pass.
        progress: show progress bars.

    Returns:
        Rows of the evaluation table (see :mod:`pipeline.reports.tables`).

    Raises:
        ValueError: no samples, or a sample without a label.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    if any("label" not in s for s in samples):
        raise ValueError("every evaluated sample needs a label")
    truth = np.stack([np.asarray(s["label"])[0] > 0 for s in samples]).astype(np.uint8)
    cases = [str(s.get("source", s.get("id"))) for s in samples]
    views = [str(s.get("view", "2d")) for s in samples]
    slices = [s.get("slice", i) for i, s in enumerate(samples)]
    ids = [str(s.get("id", i)) for i, s in enumerate(samples)]
    rows: list[dict] = []
    for method, checkpoint in runs.items():
        model, weights, config = load_run(checkpoint)
        cnn, crf = predict_samples(model, weights, samples, batch_size=batch_size,
                                   connectivity=config.get("connectivity", 4),
                                   beta=config.get("beta"), progress=progress)
        pred = cnn if crf is None else crf
        rows.extend(evaluation_rows(pred, truth, case=cases, view=views, method=method,
                                    slices=slices, images=ids, empty=empty, surface=False))
    return rows
