"""Saved predictions (mask files) scored against labels, no model needed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation
from tqdm.auto import tqdm

from pipeline.data.alignment import align_label_to_image
from pipeline.data.cta import (
    CTA_HU_WINDOW,
    RAS_LABELS,
    SliceSplit,
    cta_volume_transforms,
    run_transforms,
)
from pipeline.data.datasets.horse import MASK_THRESHOLD
from pipeline.data.pictures import read_picture
from pipeline.data.readers import is_nifti, read_volume
from pipeline.data.views import VIEWS, slice_affine, slice_volume
from pipeline.evaluation.tables import evaluation_rows

__all__ = [
    "IMAGE_SUFFIXES",
    "evaluate_predictions",
    "evaluate_predictions_with_examples",
    "prediction_candidates",
]


#: File types read as 2-D label/prediction images (anything else is read as a volume).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


#: What a saved prediction's name may add to its case's name, in the order looked for
#: (``mmcrf infer`` writes ``<name>_mask.nii.gz``).
_VOLUME_SUFFIXES = ("_mask.nii.gz", ".nii.gz", "_mask.nii", ".nii")


_IMAGE_PRED_SUFFIXES = ("_mask.png", ".png")




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
        img = read_picture(path)
    except ValueError as err:
        raise ValueError(f"{path}: unreadable {what} image ({err})") from None
    if img.mode in ("1", "L", "I", "I;16", "F"):
        return np.asarray(img)
    arr = np.asarray(img.convert("RGB"))
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
              surface: bool, label_value: int | None,
              kept: tuple[list, list] | None = None) -> list[dict]:
    """Rows of a volume's slices per view; with ``kept`` = (samples, masks), also appends
    each scored slice's image (HU windowed to [0, 1]), label and mask for example figures."""
    # image and label exactly as for training: label on the image grid, oriented to RAS
    ref_path = pair.image if pair.image is not None else pair.label
    volume = run_transforms(cta_volume_transforms(hu_window=None, label_value=label_value),
                            {"image": str(ref_path), "label": str(pair.label)})
    ref, label = volume["image"], volume["label"]
    raw = read_volume(pred_path)
    meta = {k: v for k, v in raw.meta.items() if k != "affine"}
    pred = MetaTensor(torch.as_tensor(_binary_prediction(np.asarray(raw), pred_path)[None]),
                      affine=raw.affine, meta=meta)
    pred = Orientation(axcodes="RAS", labels=RAS_LABELS)(pred)
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
        if kept is not None:
            if pair.image is None:
                raise ValueError(f"{pair.label}: example figures of saved predictions need "
                                 f"the images (give the manifest's entries, not --labels)")
            low, high = CTA_HU_WINDOW
            images = slice_volume(np.clip((np.asarray(ref) - low) / (high - low), 0, 1),
                                  view)
            for k in keep:
                kept[0].append({"image": images[k], "label": truth[k][None],
                                "source": pair.case, "view": view, "slice": k,
                                "id": f"{pair.case}:{view}:{k}"})
                kept[1].append(masks[k].astype(np.uint8))
    return rows


def evaluate_predictions(predictions: str | os.PathLike,
                         labels: str | os.PathLike | Sequence[Mapping], *, method: str,
                         views: Sequence[str] = VIEWS, view: str = "2d",
                         label_suffix: str = "", label_value: int | None = None,
                         empty: str = "exclude_empty_truth", surface: bool = False,
                         progress: bool = False,
                         _kept: tuple[list, list] | None = None) -> list[dict]:
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
    kept = _kept  # (samples, masks) kept for example figures, see the _with_examples variant
    rows: list[dict] = []
    for pair, pred_path in tqdm(list(zip(pairs, found, strict=True)), desc="score",
                                disable=not progress):
        if _is_image(pair.label):
            if kept is not None:
                raise ValueError(f"{pair.label}: example figures of saved predictions are "
                                 f"made for volumes; 2-D images are not kept")
            rows.extend(_score_2d(pair, pred_path, method=method, view=view, empty=empty,
                                  surface=surface, predictions=pred_root))
        else:
            rows.extend(_score_3d(pair, pred_path, method=method, views=views, empty=empty,
                                  surface=surface, label_value=label_value, kept=kept))
    return rows


def evaluate_predictions_with_examples(predictions: str | os.PathLike,
                                       labels: str | os.PathLike | Sequence[Mapping], *,
                                       method: str, **kwargs):
    """:func:`evaluate_predictions` of volumes whose images are known (manifest entries),
    also picking the best, median and worst slice per view by this method's Jaccard for the
    report's qualitative figures (as ``mmcrf evaluate --run ... --examples`` does).

    Returns:
        An :class:`~pipeline.evaluation.runs.Evaluation` (``rows``, ``examples``).

    Raises:
        ValueError: as :func:`evaluate_predictions`, or labels without their images.
    """
    from pipeline.evaluation.runs import Evaluation, collect_examples

    samples: list[dict] = []
    masks: list[np.ndarray] = []
    rows = evaluate_predictions(predictions, labels, method=method, _kept=(samples, masks),
                                **kwargs)
    return Evaluation(rows, collect_examples(rows, samples, {method: masks}, method=method))
