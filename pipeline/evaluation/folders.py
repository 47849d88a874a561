"""Models scored on whole image folders (Weizmann-style, CAMUS-style), masks written beside."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.data.datasets.horse import (
    GRAY_DIR,
    MASK_DIR,
    RGB_DIR,
    SUFFIX,
    BrokenImageError,
    load_horse,
    scan_horse_folder,
)
from pipeline.data.splits import split_members
from pipeline.data.writers import write_csv, write_png_mask
from pipeline.distributed import resolve_device
from pipeline.evaluation.tables import evaluation_rows, write_eval_table
from pipeline.inference.images import predict_image, read_image_array
from pipeline.inference.predictor import TrainedModel

__all__ = [
    "IMAGE_TABLE_COLUMNS",
    "evaluate_camus_folder",
    "evaluate_image_folder",
]


#: Columns of a folder's ``per_image.csv`` (one row per image and method).
IMAGE_TABLE_COLUMNS: tuple[str, ...] = ("image", "method", "jaccard", "dice", "status",
                                        "error", "mask_file")


def _unscored_rows(loaded: Mapping[str, TrainedModel], root: Path, name: str, colour: str,
                   out: Path, device: str = "cpu", tta: bool = False) -> list[dict]:
    """An image without its mask: segmented (mask written) but not scored, status
    ``unscored``; ``failed`` where the image itself cannot be read."""
    image_file = root / (RGB_DIR if colour == "rgb" else GRAY_DIR) / f"{name}{SUFFIX}"
    why = f"no mask {MASK_DIR}/{name}{SUFFIX}: segmented, not scored"
    try:
        image = read_image_array(image_file, colour)
    except (ValueError, FileNotFoundError) as err:
        return [{"image": name, "method": m, "status": "failed", "error": f"{err}; {why}"}
                for m in loaded]
    rows = []
    for method, vm in loaded.items():
        prob, crf = predict_image(vm, image, device=device, tta=tta)
        mask_file = out / method / f"{name}.png"
        write_png_mask(((prob > 0.5) if crf is None else crf).astype(np.uint8), mask_file)
        rows.append({"image": name, "method": method, "status": "unscored", "error": why,
                     "mask_file": mask_file.relative_to(out).as_posix()})
    return rows


def evaluate_image_folder(models: Mapping[str, str | os.PathLike], images: str | os.PathLike,
                          out_dir: str | os.PathLike, *, colour: str = "rgb",
                          split: str | None = None, progress: bool = True,
                          device: str = "cpu", tta: bool = False) -> list[dict]:
    """Scores models on every image of a folder laid out like the Weizmann Horse set
    (``rgb/``, ``gray/``, ``figure_ground/`` with the same names; no split file needed).

    Writes ``<out>/<method>/<image>.png`` (0/255, the mask's size) and ``<out>/per_image.csv``
    (columns :data:`IMAGE_TABLE_COLUMNS`), and the same scores as an evaluation table
    ``<out>/evaluation.csv`` (view ``2d``) for ``mmcrf report``: paired comparisons with
    bootstrap intervals. A CNN-only checkpoint is scored by thresholding at 0.5, one with CRF
    weights by its graph-cut mask. A broken rgb image is scored on its gray twin (noted in the
    row); an image without a mask is segmented and gets ``unscored`` rows saying so; an
    image that cannot be used at all gets ``failed`` rows with its error, and the others
    carry on.

    Args:
        models: method name → checkpoint.
        images: the folder.
        out_dir: where the masks and tables go.
        colour: ``rgb`` or ``gray`` images.
        split: only the images of this split of the folder's ``split.json`` (default: every
            image with a mask).
        progress: a progress bar.
        device: where the CNN runs (see :func:`pipeline.distributed.resolve_device`).
        tta: average the CNN's probabilities over the flips each model trained with.

    Returns:
        The table's rows.

    Raises:
        ValueError: no usable image, or an unknown split.
        FileNotFoundError: a split is asked and the folder has no ``split.json``.
    """
    root = Path(images)
    device = resolve_device(device)
    scan = scan_horse_folder(root)
    names = scan.usable(colour)  # type: ignore[arg-type]
    unmasked = sorted((scan.rgb if colour == "rgb" else scan.gray) - scan.masks)
    if split is not None:
        wanted = set(split_members(root, split))
        names = [n for n in names if n in wanted]
        unmasked = [n for n in unmasked if n in wanted]
    if not names:
        raise ValueError(f"{root}: no image with a mask in {colour}/ and figure_ground/"
                         + (f" in split {split!r}" if split else ""))
    out = Path(out_dir)
    loaded = {method: TrainedModel.from_checkpoint(path) for method, path in models.items()}
    for vm in loaded.values():
        vm.flips_for(tta)  # refuses --tta for a model trained without flips
    rows: list[dict] = []
    table: list[dict] = []
    # a broken rgb image (e.g. horse318, almost all black) is scored on its gray twin, and
    # the row says so; a broken gray image has no twin and fails its rows
    on_broken = "gray" if colour == "rgb" else "raise"
    for name in tqdm(sorted([*names, *unmasked]), desc="images", disable=not progress):
        if name in unmasked:
            rows.extend(_unscored_rows(loaded, root, name, colour, out, device, tta))
            continue
        try:
            sample = load_horse(root, name, colour=colour,  # type: ignore[arg-type]
                                on_broken=on_broken)  # type: ignore[arg-type]
        except (BrokenImageError, ValueError, FileNotFoundError) as err:
            rows.extend({"image": name, "method": m, "status": "failed", "error": str(err)}
                        for m in loaded)
            continue
        truth = sample.mask[None]
        for method, vm in loaded.items():
            prob, crf = predict_image(vm, sample.image, device=device, tta=tta)
            mask = ((prob > 0.5) if crf is None else crf).astype(np.uint8)[None]
            mask_file = out / method / f"{name}.png"
            write_png_mask(mask[0], mask_file)
            note = (f"{colour} image broken ({sample.defect}); scored on the gray image"
                    if sample.fallback else "")
            scored = evaluation_rows(mask, truth, case=name, view="2d", method=method,
                                     slices=[""], images=[name], surface=False)[0]
            table.append(scored)
            rows.append({"image": name, "method": method, "status": "ok", "error": note,
                         "jaccard": float(scored["jaccard"]), "dice": float(scored["dice"]),
                         "mask_file": mask_file.relative_to(out).as_posix()})
    write_csv(rows, out / "per_image.csv", IMAGE_TABLE_COLUMNS)
    if table:
        write_eval_table(table, out / "evaluation.csv")
    return rows


def evaluate_camus_folder(models: Mapping[str, str | os.PathLike], images: str | os.PathLike,
                          out_dir: str | os.PathLike, *, views: Sequence[str] = ("2CH",),
                          phases: Sequence[str] = ("ED", "ES"),
                          labels: Sequence[int] | None = None, drop_strays: bool = False,
                          split: str | None = None,
                          progress: bool = True, device: str = "cpu",
                          tta: bool = False) -> list[dict]:
    """Scores frame models on every CAMUS image of a folder (``patientNNNN_2CH_ED.nii.gz`` or
    ``.mhd`` with ``_gt`` label maps beside them, at any depth; no manifest needed).

    Each image is segmented as ``mmcrf infer`` segments a frame
    (:class:`~pipeline.inference.frames.FramePredictor`: the CNN at the model's training size,
    the CRF at the image's own). Writes ``<out>/<method>/<image>.nii.gz`` (uint8 0/1 on
    exactly the input image's grid: its shape and affine), ``<out>/per_image.csv``
    (:data:`IMAGE_TABLE_COLUMNS`; ``image`` is the file's stem) and the evaluation table
    ``<out>/evaluation.csv`` (view ``echo``) for ``mmcrf report``. An image without its
    ``_gt`` file is still segmented and gets rows with status ``unscored`` saying so; an
    unreadable one gets ``failed`` rows; the others carry on.

    Args:
        models: method name → checkpoint (trained on 1-channel frames).
        images: the folder.
        out_dir: where the masks and tables go.
        views: CAMUS views to take.
        phases: frames to take.
        labels: foreground label values (default: those the first model was trained on, else
            1, the LV cavity).
        drop_strays: score against the label maps with the stray pixels of the shared
            copy's resizing dropped (:func:`~pipeline.data.datasets.camus.drop_stray_labels`);
            default: as given (whatever the models were trained on).
        split: only the patients of this split of the folder's ``split.json``.
        progress: a progress bar.
        device: where the CNN runs (see :func:`pipeline.distributed.resolve_device`).
        tta: average the CNN's probabilities over the flips each model trained with.

    Returns:
        The per-image rows.

    Raises:
        ValueError: no CAMUS image of the selection, or an unknown split.
    """
    from pipeline.data.datasets.camus import find_camus_images, load_camus
    from pipeline.data.samples import ECHO_VIEW
    from pipeline.inference.frames import FramePredictor, write_frame_masks
    from pipeline.models import load_checkpoint

    root = Path(images)
    patients = None if split is None else split_members(root, split)
    items = find_camus_images(root, views=views, phases=phases, patients=patients)
    if not items:
        raise ValueError(f"{root}: no CAMUS {'/'.join(views)} {'/'.join(phases)} images "
                         f"(patientNNNN_<view>_<phase>.nii.gz / .mhd)")
    if labels is None:
        first = load_checkpoint(next(iter(models.values())))
        trained = ((first.get("config") or {}).get("data") or {}).get("camus") or {}
        labels = tuple(trained.get("labels", (1,)))
    out = Path(out_dir)
    predictors = {m: FramePredictor(path, device=device, tta=tta) for m, path in models.items()}
    rows: list[dict] = []
    table: list[dict] = []
    try:
        for item in tqdm(items, desc="images", disable=not progress):
            try:
                image, truth = load_camus(item, labels, drop_strays=drop_strays)
            except (ValueError, OSError) as err:
                rows.extend({"image": item.name, "method": m, "status": "failed",
                             "error": str(err)} for m in predictors)
                continue
            for method, predictor in predictors.items():
                mask = predictor.predict(image[None]).mask
                mask_file = out / method / f"{item.name}.nii.gz"
                write_frame_masks(mask, item.image, mask_file)
                row = {"image": item.name, "method": method,
                       "mask_file": mask_file.relative_to(out).as_posix()}
                if truth is None:
                    rows.append(row | {"status": "unscored", "error": f"no label file "
                                       f"{item.name}_gt.* beside {item.image}"})
                    continue
                scored = evaluation_rows(mask, truth[None], case=item.patient, view=ECHO_VIEW,
                                         method=method, slices=[item.name],
                                         images=[item.name], surface=False)[0]
                table.append(scored)
                rows.append(row | {"status": "ok", "error": "",
                                   "jaccard": float(scored["jaccard"]),
                                   "dice": float(scored["dice"])})
    finally:
        for predictor in predictors.values():
            predictor.close()
    write_csv(rows, out / "per_image.csv", IMAGE_TABLE_COLUMNS)
    if table:
        write_eval_table(table, out / "evaluation.csv")
    return rows
