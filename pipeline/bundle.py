"""Workflows that MONAI bundle configs call (``"run": ["$pipeline.bundle.train(...)"]``).

Each is a thin layer over the same functions ``mmcrf`` uses: no second implementation.
Run only bundles you trust: bundle configs execute ``$`` expressions (MONAI advisory
GHSA-873f-pvrv-4x83); checkpoints are loaded with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import distributed
from pipeline.crf import keep_freed_memory
from pipeline.data.phantoms import ensure_demo_data
from pipeline.distributed import resolve_device
from pipeline.engines import (
    MODES,
    previous_stage_checkpoint,
    stage_checkpoint,
)
from pipeline.inference import VolumePredictor, find_cases, run_batch, segment_frames
from pipeline.inference.discovery import find_files
from pipeline.inference.images import segment_image_folder
from pipeline.models import load_network_weights
from pipeline.reports import collect_provenance
from pipeline.workflow import (
    data_settings,
    evaluate_and_report,
    stage_config,
    stage_samples,
    train_stage,
)

__all__ = ["ensure_demo_data", "evaluate", "has_boundary_head", "infer", "infer_frames",
           "infer_images", "input_list", "load_network", "train"]


def _prepare_process(*, slice_after_slice: bool = True) -> None:
    """Joins the process group when launched by torchrun; for inference and evaluation
    (``slice_after_slice``) lets this process keep freed memory for that work
    (:func:`pipeline.crf.keep_freed_memory`). Training leaves malloc as it is: its images
    are small, and a long run's heap should not hold freed memory."""
    distributed.init_from_env()
    if slice_after_slice:
        keep_freed_memory()


def _raise_if_failed(rows: list[dict], output_dir: str, key: str) -> list[dict]:
    """The rows, or RuntimeError naming every failed ``key`` (case or image) and its error."""
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} {key}(s) failed, see "
                           f"{output_dir}/summary.csv: " + "; ".join(
                               f"{r[key]}: {r['error']}" for r in failed))
    return rows


def _model_for_view(model_file: str, view: str) -> str:
    """``model_file`` with ``{view}`` filled in; other braces in the path are left alone."""
    return model_file.replace("{view}", view)


def train(*, dataset_dir: str, output_dir: str, mode: str = "cnn", data_kind: str = "demo",
          manifest: str | None = None, view: str = "axial", size: int = 64,
          epochs: int | None = None, preset: str | None = None, init: str | None = None,
          resume: bool = False, in_channels: int | None = None, progress: bool = False,
          weights: str | None = None, device: str = "auto",
          learned_pairwise: bool | None = None, boundary_lr: float | None = None,
          boundary_weight: float | None = None) -> Path:
    """Trains one stage into ``<output_dir>/<mode>/``.

    Piecewise starts from the CNN stage's best checkpoint and joint from the piecewise one,
    unless ``init`` names another checkpoint. ``weights`` is a pretrained VGG16 file for the
    backbone of a fresh CNN stage (``mmcrf weights vgg16``; the ``vgg16`` network preset).
    ``learned_pairwise``, ``boundary_lr`` and ``boundary_weight``: the CRF's learned edge
    feature, its boundary head's learning rate and the weight of the head's supervised
    outline loss (None: the preset's; off in every packaged preset).

    Returns:
        The stage's best checkpoint (also printed, by rank 0 only under torchrun).
    """
    _prepare_process(slice_after_slice=False)
    if init is None:
        previous = previous_stage_checkpoint(output_dir, mode)
        if previous is not None and not previous.is_file():
            raise FileNotFoundError(f"{previous}: train the {previous.parent.name} stage first "
                                    f"(--mode {previous.parent.name}) or give --init")
        init = None if previous is None else str(previous)
    config = stage_config(preset, data=data_settings(data_kind, view=view, size=size),
                          weights=weights, mode=mode, epochs=epochs, device=device,
                          learned_pairwise=learned_pairwise, boundary_lr=boundary_lr,
                          boundary_weight=boundary_weight)
    if in_channels is not None:
        config.network["in_channels"] = in_channels
    result = train_stage(config, Path(output_dir) / mode, root=dataset_dir, manifest=manifest,
                         init=init, resume=resume, progress=progress).result
    if distributed.is_main():  # under torchrun: said once, not once per rank
        print(f"best checkpoint: {result.best_checkpoint}")
    return result.best_checkpoint


def evaluate(*, dataset_dir: str, output_dir: str, data_kind: str = "demo",
             manifest: str | None = None, view: str = "axial", size: int = 64,
             model_file: str | None = None, progress: bool = False,
             device: str = "auto") -> dict[str, Path]:
    """Scores every trained stage in ``output_dir`` (or the bundle's model) on the validation
    split and writes ``evaluation.csv`` and the report in ``<output_dir>/report/``."""
    _prepare_process()
    runs = {m: str(stage_checkpoint(output_dir, m)) for m in MODES
            if stage_checkpoint(output_dir, m).is_file()}
    if model_file is not None:
        model_file = _model_for_view(model_file, view)
    if not runs and model_file is not None and Path(model_file).is_file():
        runs = {"model": model_file}
    if not runs:
        raise FileNotFoundError(f"{output_dir}: no trained stage to evaluate (cnn/best.pt ...)")
    _, val_set = stage_samples(data_settings(data_kind, view=view, size=size),
                               root=dataset_dir, manifest=manifest)
    if not distributed.is_main():
        return {}
    done = evaluate_and_report([(runs, val_set)], output_dir,
                               training_log=Path(output_dir) / "joint" / "log.csv",
                               provenance=collect_provenance({"view": view, "size": size},
                                                             manifest),
                               title=f"mmcrf evaluation ({view} view)", progress=progress,
                               device=device)
    return {k: v for k, v in done.items() if isinstance(v, Path)}


def infer(*, input_dir: str, output_dir: str, model_file: str, view: str = "axial",
          workers: int = 0, overwrite: bool = False, write_cnn: bool = False,
          write_probability: bool = False, exclude: list[str] | None = None,
          crf_3d: bool = False, write_dicom_seg: bool = False, write_rtstruct: bool = False,
          device: str = "auto") -> list[dict]:
    """Segments every NIfTI file / DICOM series under ``input_dir`` into ``output_dir``
    (masks on each input's own grid, ``summary.csv``). With ``crf_3d``, one 6-connected 3-D
    graph cut over the volume replaces the slice-by-slice CRF (``mmcrf infer --crf-3d``).
    With ``write_dicom_seg``, each DICOM series also gets ``<name>_seg.dcm``, a DICOM SEG
    referencing its instances (NIfTI inputs get none; ``mmcrf infer --dicom-seg``); with
    ``write_rtstruct``, ``<name>_rtstruct.dcm``, an RT Structure Set (``--rtstruct``).

    ``model_file`` may hold ``{view}``: one model per view (``models/model_{view}.pt``), so
    ``view="all"`` fuses the three views' own models.

    Raises:
        RuntimeError: some cases failed (the summary says which and why).
    """
    _prepare_process()
    views = ["axial", "coronal", "sagittal"] if view == "all" else [view]
    models = ({v: _model_for_view(model_file, v) for v in views} if "{view}" in model_file
              else model_file)
    predictor = VolumePredictor(models, views, workers=workers, crf_3d=crf_3d, device=device)
    try:
        rows = run_batch(find_cases(input_dir, exclude=exclude or (), output=output_dir),
                         output_dir, predictor,
                         overwrite=overwrite, write_cnn=write_cnn,
                         write_probability=write_probability, write_dicom_seg=write_dicom_seg,
                         write_rtstruct=write_rtstruct,
                         progress=distributed.is_main())
    finally:
        predictor.close()
    return _raise_if_failed(rows, output_dir, "case")


def infer_images(*, input_dir: str, output_dir: str, model_file: str, colour: str = "rgb",
                 overwrite: bool = False, device: str = "auto") -> list[dict]:
    """Segments every JPEG/PNG image under ``input_dir`` (its ``rgb/`` sub-folder for a
    Weizmann-style folder) into 0/255 PNG masks of each image's size, plus ``summary.csv``.

    Raises:
        RuntimeError: some images failed (the summary says which and why).
    """
    rows = segment_image_folder(model_file, input_dir, output_dir, colour=colour,
                                overwrite=overwrite, device=device)
    return _raise_if_failed(rows, output_dir, "image")


def infer_frames(*, input_dir: str, output_dir: str, model_file: str, overwrite: bool = False,
                 exclude: list[str] | None = None, device: str = "auto") -> list[dict]:
    """Segments every frame of every ultrasound file under ``input_dir`` (or the one file it
    names: DICOM cine or frame, NIfTI, MetaImage, PNG/JPEG) with a model trained on frames,
    one NIfTI mask per file in ``output_dir``, plus ``summary.csv``.

    ``exclude`` holds glob patterns of files to skip (default: masks, see
    :data:`pipeline.inference.DEFAULT_FRAME_EXCLUDE`).

    Raises:
        RuntimeError: some cases failed (the summary says which and why).
    """
    _prepare_process()
    rows = segment_frames(input_dir, output_dir, model_file, exclude=exclude,
                          overwrite=overwrite, progress=distributed.is_main(), device=device)
    return _raise_if_failed(rows, output_dir, "case")


def has_boundary_head(model_file: str) -> bool | str:
    """Which boundary head a model file's network has (the learned edge feature's map):
    False, True (FCN-8s's decoder again) or ``"hed"`` (HED's side outputs); what
    ``network_def``'s ``boundary_head`` reads, so that the standard workflow builds the
    network ``--model_file`` names (``models/joint_lp.pt`` as well as ``models/joint.pt``).

    Raises:
        ValueError: neither a state dict nor an mmcrf checkpoint (naming the file).
    """
    keys = [key for key in load_network_weights(model_file) if key.startswith("boundary.")]
    if any(key.startswith("boundary.dsn.") for key in keys):
        return "hed"
    return bool(keys)


def load_network(network: torch.nn.Module, checkpoint: str, device: str | torch.device = "cpu"
                 ) -> torch.nn.Module:
    """The bundle's ``network_def`` with a checkpoint's network weights (an mmcrf checkpoint,
    read weights-only, or a plain state dict such as ``models/model.pt``), in eval mode on
    ``device``: the ``network`` of the standard inference workflow.

    Raises:
        ValueError: the weights do not fit the network (naming the checkpoint).
    """
    state = load_network_weights(checkpoint)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: its weights do not fit the bundle's network_def "
                         f"({str(err).splitlines()[0]})") from None
    return network.to(resolve_device(device)).eval()


def input_list(input_dir: str, exclude: list[str] | None = None,
               suffixes: tuple[str, ...] | None = None,
               subfolder: str | None = None) -> list[dict[str, str]]:
    """``[{"image": path}, ...]``: the ``dataset`` of the standard inference workflow.

    Without ``suffixes``, the NIfTI cases ``mmcrf infer`` finds under ``input_dir``
    (:func:`pipeline.inference.find_cases`, ``exclude`` patterns left out; its ``LoadImaged``
    reads NIfTI, while DICOM series go through ``run`` or a MONAI Deploy application's own
    DICOM loader). With ``suffixes`` (e.g. ``(".png", ".jpg")``), every file under
    ``input_dir`` ending so, sorted, hidden ones, earlier output folders and names matching
    ``exclude`` patterns left out; with ``subfolder`` (e.g. ``rgb`` of a Weizmann-style
    folder), only that sub-folder where it exists.
    """
    if suffixes is None:
        return [{"image": str(c.path)} for c in find_cases(input_dir, exclude=exclude or ())
                if c.kind == "nifti" and c.problem is None]
    root = Path(input_dir)
    if subfolder and (root / subfolder).is_dir():
        root = root / subfolder
    return [{"image": str(path)} for path in find_files(root, suffixes, exclude=exclude or ())]
