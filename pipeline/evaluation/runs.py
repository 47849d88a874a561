"""Trained runs scored image by image, and example images collected for figures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.crf import CRFWeights
from pipeline.crf.graphcut import map_labelling
from pipeline.distributed import resolve_device
from pipeline.evaluation.examples import PICKS, QualitativeCase, QualitativeCases
from pipeline.evaluation.tables import EvalTable, evaluation_rows, select_cases
from pipeline.models import load_run, predict_map_arrays, training_flips, tta_flips

__all__ = [
    "Evaluation",
    "Masks",
    "collect_examples",
    "evaluate_runs",
    "evaluate_runs_with_examples",
    "predict_samples",
]


#: Masks of several samples: an N×H×W array, or a list of H×W arrays of different sizes.
Masks = np.ndarray | list[np.ndarray]


def _batches(samples: Sequence[Mapping], batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive samples of one image size, at most ``batch_size`` each."""
    out, start = [], 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or i - start == batch_size or \
                tuple(np.shape(samples[i]["image"])) != tuple(np.shape(samples[start]["image"])):
            out.append((start, i))
            start = i
    return out


def predict_samples(model: torch.nn.Module, weights: CRFWeights | None,
                    samples: Sequence[Mapping], *, batch_size: int = 10,
                    connectivity: int = 4, beta: float | None = None,
                    progress: bool = False, device: str | torch.device = "cpu",
                    flips: Sequence[tuple[int, ...]] = ((),)) -> tuple[Masks, Masks | None]:
    """CNN masks (probability > 0.5) and, with CRF weights, graph-cut masks of 2-D samples;
    the CNN runs on ``device`` (averaged over ``flips``), the graph cuts on the CPU.

    Samples may differ in size (e.g. the views of a volume): a batch holds consecutive samples
    of one size.

    Returns:
        (CNN masks, CRF masks or None): N×H×W uint8 arrays when all samples have one size,
        else lists of N H×W uint8 masks (index ``[i]`` works either way).
    """
    cnn: list[np.ndarray] = []
    crf: list[np.ndarray] = []
    for start, stop in tqdm(_batches(samples, batch_size), desc="predict",
                            disable=not progress):
        batch = samples[start:stop]
        images = torch.stack([torch.as_tensor(s["image"]) for s in batch])
        probs, edges = predict_map_arrays(model.to(device), images.to(device), flips=flips,
                                          boundary=weights is not None)
        cnn.extend((probs > 0.5).astype(np.uint8))
        if weights is not None:
            crf.extend(map_labelling(p, x, weights, connectivity=connectivity, beta=beta,
                                     boundary=b)
                       for p, x, b in zip(probs, images.numpy(), edges, strict=True))
    if len({m.shape for m in cnn}) == 1:
        return np.stack(cnn), (np.stack(crf) if weights is not None else None)
    return cnn, (crf if weights is not None else None)


def _slice_text(value) -> str:
    """A slice index as the evaluation table stores it (``5``, or ``""`` for none)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if isinstance(value, int | np.integer) or (isinstance(value, float | np.floating)
                                                and float(value).is_integer()):
        return str(int(value))
    return str(value).strip()


def _sample_keys(samples: Sequence[Mapping]) -> tuple[list[str], list[str], list, list[str]]:
    """(case, view, slice, image id) of each sample, as written into the table.

    Slices of volumes keep their index; a 2-D image that is not a slice (no ``slice``) gets an
    empty slice, so its row pairs with the row of a saved prediction of the same image.

    Raises:
        ValueError: two samples have the same (case, view, slice).
    """
    cases = [str(s.get("source", s.get("id", i))) for i, s in enumerate(samples)]
    views = [str(s.get("view", "2d")) for s in samples]
    slices = [s.get("slice", "") for s in samples]
    ids = [str(s.get("id", i)) for i, s in enumerate(samples)]
    seen: dict[tuple[str, str, str], int] = {}
    for i, key in enumerate(zip(cases, views, map(_slice_text, slices), strict=True)):
        if key in seen:
            raise ValueError(f"samples {seen[key]} and {i} have the same (case, view, slice) "
                             f"= {key}; give every sample a unique id or source/view/slice")
        seen[key] = i
    return cases, views, slices, ids


@dataclass
class Evaluation:
    """Rows of the evaluation table and the example images kept for figures."""

    rows: list[dict]
    examples: QualitativeCases | None = None


def _ranking_method(runs: Mapping, method: str | None) -> str:
    if method is None:
        return "joint" if "joint" in runs else list(runs)[-1]
    if method not in runs:
        raise ValueError(f"examples are ranked by method {method!r}, which is not evaluated "
                         f"(methods: {', '.join(runs)})")
    return method


def _picks(rows: list[dict], method: str, views: Sequence[str] | None,
           which: Sequence[str]) -> dict[tuple[str, str], int]:
    """(view, pick) → index into ``rows`` of the best/median/worst scored image per view."""
    table = EvalTable.from_rows(rows, source=f"<rows of {method}>")
    index = {key: i for i, key in enumerate(zip(table["case"], table["view"], table["slice"],
                                                strict=True))}
    out = {}
    for view, picks in select_cases(table, method, which=which, views=views).items():
        for pick, row in picks.items():
            out[(view, pick)] = index[(row["case"], row["view"], row["slice"])]
    return out


def _examples(method: str, picks: Mapping[tuple[str, str], int], rows: Sequence[Mapping],
              samples: Sequence[Mapping], masks: Mapping[str, Mapping[int, np.ndarray]],
              jaccards: Mapping[str, Mapping[int, float]]) -> QualitativeCases:
    cases = []
    for (view, pick), i in picks.items():
        row, sample = rows[i], samples[i]
        cases.append(QualitativeCase(
            view=view, pick=pick, case=str(row["case"]), slice=_slice_text(row["slice"]),
            image=np.asarray(sample["image"], dtype=np.float32),
            truth=(np.asarray(sample["label"])[0] > 0).astype(np.uint8),
            predictions={m: np.asarray(masks[m][i], dtype=np.uint8) for m in masks},
            jaccards={m: float(jaccards[m][i]) for m in masks},
            image_id=str(row.get("image", ""))))
    return QualitativeCases(method=method, cases=cases)


def _evaluate(runs: Mapping[str, str | os.PathLike], samples: Sequence[Mapping], *,
              empty: str, batch_size: int, progress: bool, examples: bool,
              device: str = "cpu", tta: bool = False,
              method: str | None = None, views: Sequence[str] | None = None,
              which: Sequence[str] = PICKS) -> Evaluation:
    if not runs:
        raise ValueError("no runs to evaluate")
    if not samples:
        raise ValueError("no samples to evaluate")
    if any("label" not in s for s in samples):
        raise ValueError("every evaluated sample needs a label")
    truth = [(np.asarray(s["label"])[0] > 0).astype(np.uint8) for s in samples]
    cases, view_names, slices, ids = _sample_keys(samples)
    ranking = _ranking_method(runs, method) if examples else None
    order = ([ranking] if ranking else []) + [m for m in runs if m != ranking]
    rows: dict[str, list[dict]] = {}
    picks: dict[tuple[str, str], int] = {}
    kept: dict[str, dict[int, np.ndarray]] = {}
    for name in order:
        model, weights, config = load_run(runs[name])
        flips = tta_flips(training_flips(config), runs[name], tta)
        cnn, crf = predict_samples(model, weights, samples, batch_size=batch_size,
                                   connectivity=config.get("connectivity", 4),
                                   beta=config.get("beta"), progress=progress,
                                   device=resolve_device(device), flips=flips)
        pred = cnn if crf is None else crf
        rows[name] = []
        for start, stop in _batches(samples, len(samples)):  # one call per image size
            rows[name].extend(evaluation_rows(
                np.stack(pred[start:stop]), np.stack(truth[start:stop]),
                case=cases[start:stop], view=view_names[start:stop], method=name,
                slices=slices[start:stop], images=ids[start:stop], empty=empty,
                surface=False))
        if examples:
            if name == ranking:
                picks = _picks(rows[name], name, views, which)
            kept[name] = {i: pred[i] for i in set(picks.values())}
        del pred, cnn, crf
    table_rows = [row for name in runs for row in rows[name]]
    if not examples:
        return Evaluation(table_rows)
    jaccards = {m: {i: rows[m][i]["jaccard"] for i in kept[m]} for m in runs}
    ordered_kept = {m: kept[m] for m in runs}
    return Evaluation(table_rows, _examples(ranking, picks, rows[ranking], samples,
                                            ordered_kept, jaccards))


def evaluate_runs(runs: Mapping[str, str | os.PathLike], samples: Sequence[Mapping], *,
                  empty: str = "exclude_empty_truth", batch_size: int = 10,
                  progress: bool = False, device: str = "cpu",
                  tta: bool = False) -> list[dict]:
    """Per-image evaluation rows of several runs on the same 2-D samples (the CNN on
    ``device``, averaged over flips with ``tta``).

    Args:
        runs: method name → checkpoint. A CNN-only checkpoint scores thresholded
            probabilities; a checkpoint with CRF weights scores the graph-cut masks.
        samples: 2-D samples with ``image``, ``label`` and ``source``/``view``/``slice``
            (or ``id``), e.g. from :func:`multiview_samples` for several views at once.
            Samples may differ in size.
        empty: empty-truth policy of the Jaccard.
        batch_size: images per forward pass.
        progress: show progress bars.

    Returns:
        Rows of the evaluation table (see :mod:`pipeline.reports.tables`), method by method
        in the order of ``runs``. ``case`` is the sample's ``source`` (else its ``id``),
        ``view`` its view (``2d`` if none), ``slice`` its slice index (empty if none).

    Raises:
        ValueError: no runs or samples, a sample without a label, or two samples with the
            same (case, view, slice).
    """
    return _evaluate(runs, samples, empty=empty, batch_size=batch_size, progress=progress,
                     examples=False, device=device, tta=tta).rows


def evaluate_runs_with_examples(runs: Mapping[str, str | os.PathLike],
                                samples: Sequence[Mapping], *, method: str | None = None,
                                views: Sequence[str] | None = None,
                                which: Sequence[str] = PICKS,
                                empty: str = "exclude_empty_truth", batch_size: int = 10,
                                progress: bool = False, device: str = "cpu",
                                tta: bool = False) -> Evaluation:
    """:func:`evaluate_runs`, also keeping the images needed for qualitative figures.

    The ranking method is evaluated first; its best, median and worst scored image per view
    (:func:`pipeline.reports.select_cases`) are picked, and of every method only the masks of
    those images are kept (at most 3 per view), so memory does not grow with the data.

    Args:
        runs: method name → checkpoint (see :func:`evaluate_runs`).
        samples: the 2-D samples.
        method: the method whose Jaccard ranks the images (default ``joint`` when evaluated,
            else the last of ``runs``).
        views: views to pick from (default: every view of the samples).
        which: any of ``best``, ``median``, ``worst``.
        empty: empty-truth policy of the Jaccard.
        batch_size: images per forward pass.
        progress: show progress bars.

    Returns:
        The :class:`Evaluation`: ``rows`` exactly as :func:`evaluate_runs` returns them and
        ``examples`` for :func:`pipeline.reports.qualitative_figures` (``.save()`` writes
        them to an ``.npz``).

    Raises:
        ValueError: as :func:`evaluate_runs`, or a ranking method that is not in ``runs``.
    """
    return _evaluate(runs, samples, empty=empty, batch_size=batch_size, progress=progress,
                     examples=True, method=method, views=views, which=which, device=device,
                     tta=tta)


def collect_examples(rows: Sequence[Mapping] | EvalTable, samples: Sequence[Mapping],
                     predictions: Mapping[str, Sequence[np.ndarray]], *, method: str,
                     views: Sequence[str] | None = None,
                     which: Sequence[str] = PICKS) -> QualitativeCases:
    """Example images from predictions already in memory (one mask per sample per method).

    Args:
        rows: the evaluation table (rows or :class:`~pipeline.reports.EvalTable`) holding a
            row of every method of ``predictions`` for every sample.
        samples: the 2-D samples the predictions belong to (``image``, ``label`` and the keys
            :func:`evaluate_runs` uses).
        predictions: method → one H×W mask per sample, in the order of ``samples``.
        method: the method whose Jaccard ranks the images.
        views: views to pick from (default: all).
        which: any of ``best``, ``median``, ``worst``.

    Returns:
        The picked images with every method's mask and its Jaccard from the table.

    Raises:
        ValueError: ``method`` is not in ``predictions``, a prediction list does not match
            the samples, or the table has no row for a picked image of some method.
    """
    if method not in predictions:
        raise ValueError(f"ranking method {method!r} has no predictions "
                         f"(methods: {', '.join(predictions)})")
    for name, masks in predictions.items():
        if len(masks) != len(samples):
            raise ValueError(f"{len(masks)} masks of {name!r} for {len(samples)} samples")
    table = rows if isinstance(rows, EvalTable) else EvalTable.from_rows(rows)
    cases, view_names, slices, ids = _sample_keys(samples)
    keys = list(zip(cases, view_names, map(_slice_text, slices), strict=True))
    position = {key: i for i, key in enumerate(keys)}
    found: dict[str, dict[tuple, float]] = {m: {} for m in predictions}
    for row in table.rows():
        if row["method"] in found:
            found[row["method"]][(row["case"], row["view"], row["slice"])] = row["jaccard"]
    picks: dict[tuple[str, str], int] = {}
    for view, chosen in select_cases(table, method, which=which, views=views).items():
        for pick, row in chosen.items():
            key = (row["case"], row["view"], row["slice"])
            if key not in position:
                raise ValueError(f"the table's {pick} {view} image {key} is not among the "
                                 f"samples")
            picks[(view, pick)] = position[key]
    jaccards: dict[str, dict[int, float]] = {m: {} for m in predictions}
    for m in predictions:
        for i in set(picks.values()):
            if keys[i] not in found[m]:
                raise ValueError(f"the table has no row of method {m!r} for {keys[i]}")
            jaccards[m][i] = found[m][keys[i]]
    kept = {m: {i: predictions[m][i] for i in set(picks.values())} for m in predictions}
    pseudo_rows = [{"case": keys[i][0], "slice": keys[i][2], "image": ids[i]}
                   for i in range(len(samples))]
    return _examples(method, picks, pseudo_rows, samples, kept, jaccards)


# ---------------------------------------------------------------------------------------------
# Which samples: several views of CTA volumes, or the images of a data kind's split
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Saved predictions: score mask files against labels, no model needed
# ---------------------------------------------------------------------------------------------


