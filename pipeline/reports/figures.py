"""Report figures as PNG bytes: training curves (paper Fig. 3) and qualitative outlines."""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from pipeline.metrics import compute_jaccard
from pipeline.reports.logs import read_training_log

__all__ = ["ReportFigure", "plot_qualitative", "plot_qualitative_grid",
           "plot_training_curves"]

#: Training-log columns drawn as Jaccard curves (fractions in the log, plotted in %).
_CURVES = (("train_jaccard", "train (CNN)", "tab:blue", "-"),
           ("val_jaccard_cnn", "validation, CNN only", "tab:orange", "--"),
           ("val_jaccard_crf", "validation, CNN + CRF", "tab:red", "-"))
_METHOD_COLOURS = {"cnn": "tab:orange", "piecewise": "tab:blue", "joint": "tab:red"}
_OTHER_COLOURS = ("tab:purple", "tab:cyan", "tab:olive", "tab:brown", "tab:pink")
_TRUTH_COLOUR = "lime"


@dataclass(frozen=True)
class ReportFigure:
    """A PNG for the report: ``name`` is the file stem, ``title`` the heading."""

    title: str
    png: bytes
    caption: str = ""
    name: str = ""

    @property
    def stem(self) -> str:
        """A file-name-safe stem (``name``, else derived from the title)."""
        base = self.name or self.title
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_").lower() or "figure"


def _png(fig: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def plot_training_curves(log: Mapping[str, np.ndarray] | str | os.PathLike, *,
                         title: str = "Training curves", dpi: int = 100) -> bytes:
    """Jaccard per epoch (train, validation CNN only, validation CNN + CRF) and γ, as in the
    paper's Fig. 3. Columns that are missing or entirely empty are skipped; empty cells leave
    gaps in their curve.

    Args:
        log: a training log CSV path or the dict from
            :func:`pipeline.reports.tables.read_training_log` (Jaccard as fractions).
        title: figure title.
        dpi: resolution.

    Returns:
        PNG bytes.
    """
    if not isinstance(log, Mapping):
        log = read_training_log(log)
    epoch = np.asarray(log["epoch"], dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    drawn = 0
    for column, label, colour, style in _CURVES:
        values = np.asarray(log.get(column, []), dtype=np.float64)
        ok = np.isfinite(values) if values.size == epoch.size else np.zeros(epoch.size, bool)
        if ok.any():
            ax.plot(epoch[ok], 100.0 * values[ok], style, color=colour, marker=".", label=label)
            drawn += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean Jaccard (%)")
    handles, labels = ax.get_legend_handles_labels()
    gamma = np.asarray(log.get("gamma", []), dtype=np.float64)
    if gamma.size == epoch.size and np.isfinite(gamma).any():
        ok = np.isfinite(gamma)
        ax2 = ax.twinx()
        line = ax2.plot(epoch[ok], gamma[ok], ":", color="tab:green", marker="x", label="γ")
        ax2.set_ylabel("γ")
        handles += line
        labels += ["γ"]
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "no curve in the training log", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(handles, labels, loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _png(fig, dpi)


def _display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # channel-first → channel-last
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be H×W, H×W×3 or 3×H×W, got shape {np.shape(image)}")
    finite = img[np.isfinite(img)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    img = np.clip((img - low) / (high - low), 0, 1) if high > low else np.zeros_like(img)
    return img, ("gray" if img.ndim == 2 else None)


def _outline(ax, mask: np.ndarray, colour: str, width: float) -> None:
    if mask.min() != mask.max():  # contour of a constant mask is undefined
        ax.contour(mask.astype(np.float64), levels=[0.5], colors=[colour], linewidths=width)


def _draw_row(axes, image, truth, predictions: Mapping[str, np.ndarray],
              jaccards: Mapping[str, float], label: str | None) -> None:
    """One row: the image with the ground-truth outline, then one panel per method."""
    img, cmap = _display(image)
    truth = np.asarray(truth).astype(bool)
    if truth.shape != img.shape[:2]:
        raise ValueError(f"truth shape {truth.shape} differs from the image's {img.shape[:2]}")
    axes[0].imshow(img, cmap=cmap, interpolation="nearest")
    _outline(axes[0], truth, _TRUTH_COLOUR, 1.5)
    axes[0].set_title("ground truth", fontsize="small")
    if label:
        axes[0].text(-0.04, 0.5, label, transform=axes[0].transAxes, rotation=90, ha="right",
                     va="center", fontsize="small")
    others = iter(_OTHER_COLOURS * (1 + len(predictions)))
    for ax, (method, pred) in zip(axes[1:], predictions.items(), strict=True):
        pred = np.asarray(pred).astype(bool)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction of {method!r} has shape {pred.shape}, "
                             f"truth {truth.shape}")
        colour = _METHOD_COLOURS.get(method) or next(others)
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        _outline(ax, truth, _TRUTH_COLOUR, 1.0)
        _outline(ax, pred, colour, 1.5)
        j = jaccards.get(method)
        if j is None:
            j = float(compute_jaccard(pred[None].astype(np.uint8), truth[None].astype(np.uint8))[0])
        text = "J undefined (empty truth)" if math.isnan(j) else f"J = {100.0 * j:.1f}%"
        ax.text(0.02, 0.98, text, transform=ax.transAxes, ha="left", va="top", fontsize="small",
                color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2})
        ax.set_title(method, fontsize="small", color=colour)
    for ax in axes:
        ax.set_axis_off()


def plot_qualitative(image, truth, predictions: Mapping[str, np.ndarray], *,
                     jaccards: Mapping[str, float] | None = None, title: str | None = None,
                     dpi: int = 100) -> bytes:
    """Image with the ground-truth outline, then one panel per method with its outline and its
    Jaccard in the corner.

    Args:
        image: H×W (grey), H×W×3 or 3×H×W (colour) array, any range (scaled for display).
        truth: H×W binary ground truth.
        predictions: ``{method: H×W binary mask}``, drawn in this order.
        jaccards: Jaccard (fraction) per method; computed from the masks where not given.
        title: figure title (e.g. case, view, slice).
        dpi: resolution.

    Returns:
        PNG bytes.

    Raises:
        ValueError: a mask's shape differs from the image's spatial shape.
    """
    return plot_qualitative_grid([image], [truth], [predictions],
                                 jaccards=None if jaccards is None else [jaccards],
                                 title=title, dpi=dpi)


def plot_qualitative_grid(images: Sequence, truths: Sequence,
                          predictions: Sequence[Mapping[str, np.ndarray]], *,
                          jaccards: Sequence[Mapping[str, float]] | None = None,
                          row_labels: Sequence[str] | None = None, title: str | None = None,
                          dpi: int = 100) -> bytes:
    """Several images, one row each, drawn like :func:`plot_qualitative` (e.g. the best,
    median and worst image of a view, as in the paper's Fig. 1–2).

    Args:
        images: one image per row (H×W, H×W×3 or 3×H×W; rows may differ in size).
        truths: one H×W binary ground truth per row.
        predictions: one ``{method: H×W mask}`` per row; every row needs the same methods.
        jaccards: one ``{method: Jaccard}`` per row (computed from the masks where missing).
        row_labels: text written beside each row (e.g. ``"best: case 3, slice 12"``).
        title: figure title.
        dpi: resolution.

    Returns:
        PNG bytes.

    Raises:
        ValueError: no rows, lengths that disagree, rows with different methods, or a mask
            whose shape differs from its image's.
    """
    n_rows = len(images)
    if n_rows == 0:
        raise ValueError("plot_qualitative_grid needs at least one row")
    if not (len(truths) == len(predictions) == n_rows) or (
            jaccards is not None and len(jaccards) != n_rows) or (
            row_labels is not None and len(row_labels) != n_rows):
        raise ValueError(f"images, truths, predictions (and jaccards, row_labels) need one "
                         f"entry per row ({n_rows})")
    methods = list(predictions[0])
    for row in predictions[1:]:
        if list(row) != methods:
            raise ValueError(f"every row needs the methods {methods}, got {list(row)}")
    n_cols = 1 + len(methods)
    fig = Figure(figsize=(3.0 * n_cols, 3.3 * n_rows + (0.4 if title else 0.0)))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        _draw_row(axes[r], images[r], truths[r], predictions[r],
                  dict(jaccards[r]) if jaccards is not None else {},
                  row_labels[r] if row_labels is not None else None)
    if title:
        fig.suptitle(title, fontsize="medium")
    return _png(fig, dpi)
