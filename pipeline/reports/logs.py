"""Training logs (``log.csv`` of a run), read and validated for the curves."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

__all__ = [
    "TRAINING_LOG_COLUMNS",
    "read_training_log",
]


#: Columns of the training log (``epoch`` required, the others optional and may be empty).
TRAINING_LOG_COLUMNS: tuple[str, ...] = (
    "epoch", "train_jaccard", "val_jaccard_cnn", "val_jaccard_crf", "gamma",
)


def read_training_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a training log CSV (:data:`TRAINING_LOG_COLUMNS`; only ``epoch`` is required).

    Args:
        path: the CSV file.

    Returns:
        ``{column: float64 array}`` for ``epoch`` and every other numeric column present;
        empty cells are NaN. Rows are sorted by epoch.

    Raises:
        ValueError: no ``epoch`` column, or a cell that is neither a number nor empty
            (the message names the file, the line and the column).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    if "epoch" not in header:
        raise ValueError(f"{path}: missing column 'epoch' (a training log needs epoch and any of "
                         f"{', '.join(TRAINING_LOG_COLUMNS[1:])})")
    log: dict[str, np.ndarray] = {}
    for column in header:
        values = []
        for i, row in enumerate(rows):
            text = (row.get(column) or "").strip()
            try:
                values.append(float(text) if text and text.lower() != "nan" else math.nan)
            except ValueError:
                if column in TRAINING_LOG_COLUMNS:
                    raise ValueError(f"{path}, line {i + 2}: column {column!r} must be a number "
                                     f"or empty, got {text!r}") from None
                values = None
                break
        if values is not None:
            log[column] = np.asarray(values, dtype=np.float64)
    if np.isnan(log["epoch"]).any():
        raise ValueError(f"{path}: column 'epoch' has empty cells")
    order = np.argsort(log["epoch"], kind="stable")
    return {k: v[order] for k, v in log.items()}
