"""2-D image inference (photographs such as the Weizmann Horse set): CNN at its training
size, CRF at the image's own resolution, masks written as 0/255 PNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.crf.graphcut import map_labelling
from pipeline.data.pictures import read_picture
from pipeline.data.writers import write_csv, write_png_mask
from pipeline.distributed import resolve_device
from pipeline.inference.predictor import TrainedModel

__all__ = ["IMAGE_SUMMARY_COLUMNS", "predict_image", "read_image_array", "segment_image_folder"]

IMAGE_SUMMARY_COLUMNS: tuple[str, ...] = ("image", "output", "status", "error",
                                          "foreground_fraction", "seconds")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def predict_image(vm: TrainedModel, image: np.ndarray, *, device: str | torch.device = "cpu",
                  tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Foreground probability and CRF mask (None without CRF weights) of one C×H×W image.

    The CNN sees the image resized to its training size; its probability is resized back to
    H×W, where the CRF runs with the image's own contrast. A grey image given to a colour
    model is replicated to its channels (as the training's grey fallback is). ``device``:
    where the CNN runs; ``tta``: average its probabilities over the flips the model trained
    with (:meth:`TrainedModel.flips_for`).

    Raises:
        ValueError: a colour image for a model trained on grey images.
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if x.shape[0] == 1 and vm.in_channels > 1:
        x = x.expand(vm.in_channels, -1, -1)
    elif x.shape[0] != vm.in_channels:
        raise ValueError(f"a {x.shape[0]}-channel image for a model trained on "
                         f"{vm.in_channels}-channel images (use --colour gray?)")
    vm.model.to(device)
    _, probs, edges = next(vm.iter_image_maps(x[None], device=device, tta=tta))
    if vm.weights is None:
        return probs[0], None
    return probs[0], map_labelling(probs[0], np.asarray(image), vm.weights,
                                   connectivity=vm.connectivity, beta=vm.beta,
                                   boundary=None if edges is None else edges[0])


def read_image_array(path: str | os.PathLike, colour: str) -> np.ndarray:
    """A picture file as float32 C×H×W in [0, 1]: 3 channels for ``rgb``, 1 for ``gray``."""
    arr = np.asarray(read_picture(path, "RGB" if colour == "rgb" else "L"), dtype=np.float32)
    arr = arr / 255.0
    return arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]


def segment_image_folder(model: str | os.PathLike, images: str | os.PathLike,
                         out_dir: str | os.PathLike, *, colour: str = "rgb",
                         overwrite: bool = False, progress: bool = True,
                         device: str = "cpu", tta: bool = False) -> list[dict]:
    """Segments every JPEG/PNG image under ``images`` (its ``rgb/`` or ``gray/`` sub-folder
    for a Weizmann-style folder) into ``<out>/<relative name>.png`` (0/255, the image's size).

    Outputs are written under temporary names and renamed; existing masks are skipped unless
    ``overwrite``; an unreadable image is reported in ``summary.csv`` and the others carry on.
    The CNN runs on ``device`` (``tta``: averaged over flips).

    Returns:
        One summary row per image.
    """
    import time

    root = Path(images)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such image folder")
    source = root / colour if (root / colour).is_dir() else root
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{source}: no .jpg/.png images found")
    vm = TrainedModel.from_checkpoint(model)
    vm.flips_for(tta)  # refuses --tta for a model trained without flips
    device = resolve_device(device)
    out = Path(out_dir)
    rows = []
    for path in tqdm(files, desc="images", disable=not progress):
        rel = path.relative_to(source).with_suffix(".png")
        target = out / rel
        row = {"image": str(path), "output": str(target), "status": "", "error": ""}
        start = time.perf_counter()
        if target.exists() and not overwrite:
            row.update(status="skipped", error="output exists (use overwrite to redo)")
        else:
            try:
                prob, crf = predict_image(vm, read_image_array(path, colour), device=device,
                                          tta=tta)
                mask = (prob > 0.5) if crf is None else crf
                write_png_mask(mask, target)
                row.update(status="ok", foreground_fraction=round(float(mask.mean()), 4))
            except (ValueError, OSError) as err:
                row.update(status="failed", error=str(err))
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
    write_csv(rows, out / "summary.csv", IMAGE_SUMMARY_COLUMNS)
    return rows
