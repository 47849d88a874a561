"""Score trained runs (CNN-only, piecewise, joint) or saved predictions image by image into
the evaluation table, over one or several views, keeping example images for figures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation
from PIL import Image
from tqdm.auto import tqdm

from pipeline.crf import CRFWeights
from pipeline.crf.inference import map_labelling
from pipeline.data.alignment import align_label_to_image
from pipeline.data.cta import SliceSplit, cta_volume_transforms, run_transforms
from pipeline.data.horse import MASK_THRESHOLD
from pipeline.data.readers import is_nifti, read_volume
from pipeline.data.samples import (
    TWO_D_KINDS,
    cta_samples,
    generated_base_kind,
    split_samples,
)
from pipeline.data.views import VIEWS, slice_affine, slice_volume
from pipeline.models import load_run, predict_probabilities
from pipeline.reports.examples import PICKS, QualitativeCase, QualitativeCases
from pipeline.reports.stats import select_cases
from pipeline.reports.tables import EvalTable, evaluation_rows

__all__ = [
    "IMAGE_SUFFIXES",
    "Evaluation",
    "collect_examples",
    "evaluate_predictions",
    "evaluate_runs",
    "evaluate_runs_with_examples",
    "evaluation_entries",
    "evaluation_samples",
    "multiview_samples",
    "predict_samples",
    "prediction_candidates",
]

#: File types read as 2-D label/prediction images (anything else is read as a volume).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
#: What a saved prediction's name may add to its case's name, in the order looked for
#: (``mmcrf infer`` writes ``<name>_mask.nii.gz``).
_VOLUME_SUFFIXES = ("_mask.nii.gz", ".nii.gz", "_mask.nii", ".nii")
_IMAGE_PRED_SUFFIXES = ("_mask.png", ".png")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # as in pipeline.data.cta
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
                    progress: bool = False) -> tuple[Masks, Masks | None]:
    """CNN masks (probability > 0.5) and, with CRF weights, graph-cut masks of 2-D samples.

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
        probs = predict_probabilities(model, images).numpy()
        cnn.extend((probs > 0.5).astype(np.uint8))
        if weights is not None:
            crf.extend(map_labelling(p, x, weights, connectivity=connectivity, beta=beta)
                       for p, x in zip(probs, images.numpy(), strict=True))
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
        cnn, crf = predict_samples(model, weights, samples, batch_size=batch_size,
                                   connectivity=config.get("connectivity", 4),
                                   beta=config.get("beta"), progress=progress)
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
                  progress: bool = False) -> list[dict]:
    """Per-image evaluation rows of several runs on the same 2-D samples.

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
                     examples=False).rows


def evaluate_runs_with_examples(runs: Mapping[str, str | os.PathLike],
                                samples: Sequence[Mapping], *, method: str | None = None,
                                views: Sequence[str] | None = None,
                                which: Sequence[str] = PICKS,
                                empty: str = "exclude_empty_truth", batch_size: int = 10,
                                progress: bool = False) -> Evaluation:
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
                     examples=True, method=method, views=views, which=which)


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

def multiview_samples(datalist: Sequence[Mapping], views: Sequence[str] = VIEWS, *,
                      size: int | None = None, **transform_kwargs) -> list[dict]:
    """2-D samples of several views of CTA volumes, made exactly as for training
    (:func:`pipeline.data.samples.cta_samples`, view by view).

    Args:
        datalist: volume entries ``{"image": path, "label": path, "source": ...}`` (e.g.
            :func:`pipeline.data.manifests.manifest_entries`).
        views: any of ``axial``, ``coronal``, ``sagittal``.
        size: side of the square images (as in training), or None for the native size.
        **transform_kwargs: passed to :func:`pipeline.data.cta_volume_transforms`.

    Returns:
        The samples, volume by volume, then view by view, slice by slice; each carries
        ``source``, ``view`` and ``slice``.

    Raises:
        ValueError: an unknown view, no view, or a problem with a volume (names the file).
    """
    views = list(views)
    if not views:
        raise ValueError("give at least one view")
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    out: list[dict] = []
    for entry in datalist:  # volume by volume: only one volume's slices at full size at once
        for view in views:
            out.extend(cta_samples([entry], view, size=size, **transform_kwargs))
    return out


def evaluation_entries(kind: str, *, root: str | os.PathLike | None = None,
                       manifest: str | os.PathLike | None = None,
                       split: str = "validation") -> list[dict]:
    """The volume entries of one split, chosen as :func:`pipeline.data.samples.training_sets`
    chooses them.

    Args:
        kind: ``demo`` (the phantom cohort under ``root``, written if absent, split 4:1:1 with
            seed 0 like training) or ``cta`` (``manifest`` with paths under ``root``).
        root: data root.
        manifest: manifest path (``cta``).
        split: ``training``, ``validation`` or ``test``.

    Returns:
        Entries with ``image``, ``label`` and ``source``.

    Raises:
        ValueError: unknown kind, missing arguments, or an empty split.
    """
    from pipeline.data.manifests import load_manifest, manifest_entries
    from pipeline.data.phantoms import demo_cohort_manifest

    if kind == "demo":
        if root is None:
            raise ValueError("demo data needs a root folder to write the phantoms to")
        spec = demo_cohort_manifest(root)
        where = f"the demo cohort in {root}"
    elif kind == "cta":
        if root is None or manifest is None:
            raise ValueError("cta data needs --manifest and --root")
        spec = load_manifest(manifest)
        where = str(manifest)
    else:
        raise ValueError(f"volume data kind must be 'demo' or 'cta', got {kind!r}")
    entries = manifest_entries(spec, root, [split])
    if not entries:
        raise ValueError(f"{where}: the {split!r} split is empty")
    return entries


def evaluation_samples(kind: str, *, root: str | os.PathLike | None = None,
                       manifest: str | os.PathLike | None = None, split: str = "validation",
                       views: Sequence[str] = ("axial",), size: int | None = 64,
                       colour: str = "rgb", camus: Mapping[str, Sequence] | None = None
                       ) -> list[dict]:
    """The 2-D samples to evaluate: one split of a data kind, in one or several views.

    Args:
        kind: ``demo``, ``cta`` (volumes, sliced along each of ``views``), or a 2-D kind
            (``horse``, ``horse_demo``, ``echo``, ``echo_demo``, ``camus``: see
            :func:`pipeline.data.samples.split_samples`); ``views`` is ignored for the 2-D
            kinds. The generated kinds are written to ``root`` where absent.
        root: data root.
        manifest: manifest path (``cta``).
        split: the split to evaluate.
        views: CTA views.
        size: side of the square images (as in training), or None for the native size.
        colour: horse images in ``rgb`` or ``gray``.
        camus: the CAMUS selection (``views``, ``phases``, ``labels``).

    Returns:
        The samples (for :func:`evaluate_runs`).
    """
    kind = generated_base_kind(kind, root)
    if kind in TWO_D_KINDS:
        return split_samples(kind, split, root=root, size=size, colour=colour, camus=camus)
    entries = evaluation_entries(kind, root=root, manifest=manifest, split=split)
    return multiview_samples(entries, views, size=size)


# ---------------------------------------------------------------------------------------------
# Saved predictions: score mask files against labels, no model needed
# ---------------------------------------------------------------------------------------------

def _strip(name: str, suffixes: Sequence[str]) -> str:
    lower = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _stem_path(path: str | os.PathLike) -> str:
    """A path without its volume/image extension, as posix text."""
    p = Path(os.fspath(path))
    return (p.parent / _strip(p.name, (".nii.gz", ".nii", *IMAGE_SUFFIXES))).as_posix()


def prediction_candidates(predictions: str | os.PathLike, name: str, *, two_d: bool
                          ) -> list[Path]:
    """Where the saved prediction of a case named ``name`` may be, in the order looked for:
    ``<predictions>/<name>_mask.nii.gz`` (what ``mmcrf infer`` writes), ``<name>.nii.gz``,
    ``<name>_mask.nii``, ``<name>.nii``; for 2-D images ``<name>_mask.png``, ``<name>.png``."""
    base = Path(predictions)
    return [base / f"{name}{suffix}"
            for suffix in (_IMAGE_PRED_SUFFIXES if two_d else _VOLUME_SUFFIXES)]


@dataclass(frozen=True)
class _Pair:
    label: Path
    image: Path | None
    case: str
    names: tuple[str, ...]  # candidate names of the prediction, in order
    slice_split: Mapping | None = None  # leave-slices-out: score only this part's slices
    slice_part: str | None = None


def _pairs_from_folder(labels: Path, label_suffix: str) -> list[_Pair]:
    if not labels.is_dir():
        raise FileNotFoundError(f"{labels}: no such folder of labels")
    pairs = []
    for path in sorted(p for p in labels.rglob("*") if p.is_file()):
        if not (_is_image(path) or is_nifti(path)):
            continue
        stem = _stem_path(path.relative_to(labels))
        if label_suffix:
            if not stem.endswith(label_suffix):
                continue  # an image beside its labels (e.g. mmcrf slices output)
            stem = stem[: -len(label_suffix)]
        pairs.append(_Pair(path, None, stem, (stem,)))
    if not pairs:
        raise ValueError(f"{labels}: no label files found (NIfTI volumes or "
                         f"{'/'.join(IMAGE_SUFFIXES)} images"
                         + (f" named *{label_suffix}.*" if label_suffix else "") + ")")
    return pairs


def _pairs_from_entries(entries: Sequence[Mapping]) -> list[_Pair]:
    pairs = []
    for i, entry in enumerate(entries):
        if "label" not in entry:
            raise ValueError(f"entry {i} ({entry.get('source', entry.get('image'))}) has no "
                             f"label to score its prediction against")
        image = entry.get("image")
        case = str(entry.get("source", image if image is not None else entry["label"]))
        stem = _stem_path(case)
        names = [Path(stem).name if Path(stem).is_absolute() else stem]
        if entry.get("id") and str(entry["id"]) not in names:
            names.append(str(entry["id"]))
        pairs.append(_Pair(Path(entry["label"]), None if image is None else Path(image), case,
                           tuple(names), entry.get("slice_split"), entry.get("slice_part")))
    if not pairs:
        raise ValueError("no entries to evaluate")
    return pairs


def _find_prediction(predictions: Path, pair: _Pair) -> Path | list[Path]:
    """The prediction file of a pair, or the candidates looked for when there is none."""
    two_d = _is_image(pair.label)
    tried = [p for name in pair.names
             for p in prediction_candidates(predictions, name, two_d=two_d)]
    found = [p for p in tried if p.is_file()]
    if len(found) > 1:
        raise ValueError(f"several predictions match {pair.label}: "
                         f"{', '.join(map(str, found))}; keep one")
    return found[0] if found else tried


def _binary_prediction(array: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(array)
    if np.all(np.isin(values, (0, 1))):
        return array.astype(np.uint8)
    if np.all(np.isin(values, (0, 255))):
        return (array == 255).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (" ..." if len(values) > 6 else "")
    raise ValueError(f"{path}: prediction is not a binary mask (values {shown}); save masks "
                     f"as 0/1 or 0/255, not probabilities")


def _read_image(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("1", "L", "I", "I;16", "F"):
                return np.asarray(img)
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable {what} image ({err})") from None
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0],
                                                                         arr[..., 2])):
        raise ValueError(f"{path}: {what} is a colour image; a mask must be grey")
    return arr[..., 0]


def _score_2d(pair: _Pair, pred_path: Path, *, method: str, view: str, empty: str,
              surface: bool, predictions: Path) -> list[dict]:
    pred = _binary_prediction(_read_image(pred_path, "prediction"), pred_path)
    label = _read_image(pair.label, "label")
    label = label.astype(np.uint8) if np.all(np.isin(np.unique(label), (0, 1))) \
        else (label >= MASK_THRESHOLD).astype(np.uint8)
    if pred.shape != label.shape:
        raise ValueError(f"{pred_path}: prediction is {pred.shape[0]}×{pred.shape[1]} pixels, "
                         f"its label {pair.label} is {label.shape[0]}×{label.shape[1]}; save "
                         f"predictions on the label's grid")
    return evaluation_rows(pred[None], label[None], case=pair.case, view=view, method=method,
                           slices=[""], images=[pred_path.relative_to(predictions).as_posix()],
                           empty=empty, surface=surface)


def _score_3d(pair: _Pair, pred_path: Path, *, method: str, views: Sequence[str], empty: str,
              surface: bool, label_value: int | None) -> list[dict]:
    # image and label exactly as for training: label on the image grid, oriented to RAS
    ref_path = pair.image if pair.image is not None else pair.label
    volume = run_transforms(cta_volume_transforms(hu_window=None, label_value=label_value),
                            {"image": str(ref_path), "label": str(pair.label)})
    ref, label = volume["image"], volume["label"]
    raw = read_volume(pred_path)
    meta = {k: v for k, v in raw.meta.items() if k != "affine"}
    pred = MetaTensor(torch.as_tensor(_binary_prediction(np.asarray(raw), pred_path)[None]),
                      affine=raw.affine, meta=meta)
    pred = Orientation(axcodes="RAS", labels=_RAS_LABELS)(pred)
    try:
        pred = align_label_to_image(pred, ref)  # no-op when it is on the image's grid
    except ValueError as err:
        raise ValueError(f"{pred_path}: prediction is not on the grid of {ref_path} and cannot "
                         f"be put on it ({err})") from None
    affine = np.asarray(ref.affine, dtype=np.float64)
    shape = tuple(ref.shape[-3:])
    rows = []
    for view in views:
        truth = slice_volume(np.asarray(label), view)[:, 0]
        masks = slice_volume(np.asarray(pred), view)[:, 0]
        step = slice_affine(affine, shape, view, 0)[:3, :2]
        spacing = tuple(float(s) for s in np.linalg.norm(step, axis=0))
        keep = list(range(len(truth)))
        if pair.slice_part is not None and pair.slice_split is not None:
            keep = SliceSplit.from_spec(pair.slice_split, where=pair.case).indices(
                view, len(truth), pair.slice_part, where=pair.case)
        rows.extend(evaluation_rows(masks[keep], truth[keep], case=pair.case, view=view,
                                    method=method, slices=keep,
                                    images=[f"{pair.case}:{view}:{k}" for k in keep],
                                    spacing=spacing, empty=empty, surface=surface))
    return rows


def evaluate_predictions(predictions: str | os.PathLike,
                         labels: str | os.PathLike | Sequence[Mapping], *, method: str,
                         views: Sequence[str] = VIEWS, view: str = "2d",
                         label_suffix: str = "", label_value: int | None = None,
                         empty: str = "exclude_empty_truth", surface: bool = False,
                         progress: bool = False) -> list[dict]:
    """Score saved predicted masks against their labels, without a model.

    Matching: every label needs a prediction under ``predictions`` (see
    :func:`prediction_candidates`; extra prediction files are ignored).

    * ``labels`` a folder: every label file under it (recursively; NIfTI volumes and
      PNG/JPEG/... images; with ``label_suffix`` only files named ``*<label_suffix>.*``) is
      matched by its path relative to the folder, without extension and ``label_suffix``:
      ``labels/a/b.nii.gz`` ↔ ``predictions/a/b_mask.nii.gz`` (or ``a/b.nii.gz``). The case
      is that relative name.
    * ``labels`` a list of volume entries (e.g. :func:`evaluation_entries`, or
      :func:`pipeline.data.manifests.manifest_entries`): an entry's prediction is named after
      its ``source`` without extension (as ``mmcrf infer`` names it when run on the data
      root) or its ``id``; the case is its ``source``, so the rows pair with the rows of
      :func:`evaluate_runs` on the same entries at native size (``size=None``).

    2-D (images): the prediction must be a grey 0/1 or 0/255 mask of the label's size; a label
    is foreground where it is 1 (0/1 labels) or >= 128 (0–255, e.g. JPEG masks). One row per
    image, view ``view``, empty slice.

    3-D (volumes): the label is put on its image's grid (the entry's ``image``; the label's
    own grid without one) and oriented to RAS exactly as for training; the prediction (0/1
    or 0/255) is oriented to RAS and must lie on that grid or be resampled onto it through
    the affines (nearest neighbour; losing predicted foreground or missing the grid is an
    error). Then each of ``views`` is sliced as for training: one row per slice.

    Args:
        predictions: folder of predicted masks.
        labels: folder of labels, or volume entries with ``label`` (and ``image``).
        method: the method name written in the table (e.g. ``joint``, ``nnunet``).
        views: views of 3-D cases.
        view: the view name of 2-D images.
        label_suffix: what label file names add to their prediction's name (e.g. ``_label``
            for ``mmcrf slices`` output); folders only.
        label_value: foreground value of multi-label label volumes (None: binary labels).
        empty: empty-truth policy of the Jaccard.
        surface: also compute precision, recall and HD95 (mm, in-plane spacing of the view).
        progress: show a progress bar.

    Returns:
        Rows of the evaluation table, case by case (then view by view, slice by slice).

    Raises:
        FileNotFoundError: the folders do not exist, or a label has no prediction (the message
            lists every such label and the files looked for).
        ValueError: no labels; an unknown view; a prediction that is not binary, does not match
            its label's size (2-D) or cannot be put on its grid (3-D); several predictions for
            one label. Messages name the files.
    """
    pred_root = Path(predictions)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"{pred_root}: no such folder of predictions")
    if not method:
        raise ValueError("give the method name of the predictions")
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {v!r}")
    if isinstance(labels, str | os.PathLike):
        pairs = _pairs_from_folder(Path(labels), label_suffix)
    else:
        pairs = _pairs_from_entries(labels)
    found: list[Path] = []
    missing: list[str] = []
    for pair in pairs:
        hit = _find_prediction(pred_root, pair)
        if isinstance(hit, Path):
            found.append(hit)
        else:
            missing.append(f"{pair.label} (looked for {', '.join(map(str, hit))})")
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more"
                                          if len(missing) > 5 else "")
        raise FileNotFoundError(f"no prediction in {pred_root} for {len(missing)} of "
                                f"{len(pairs)} label(s): {shown}")
    rows: list[dict] = []
    for pair, pred_path in tqdm(list(zip(pairs, found, strict=True)), desc="score",
                                disable=not progress):
        if _is_image(pair.label):
            rows.extend(_score_2d(pair, pred_path, method=method, view=view, empty=empty,
                                  surface=surface, predictions=pred_root))
        else:
            rows.extend(_score_3d(pair, pred_path, method=method, views=views, empty=empty,
                                  surface=surface, label_value=label_value))
    return rows
