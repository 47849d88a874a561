"""Batch segmentation of ultrasound frames and cine loops with a 2-D model, frame by frame."""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.crf import GraphCutPool
from pipeline.data.ultrasound import (
    SUPPORTED_SUFFIXES,
    _kind_of,
    load_ultrasound,
    normalise_frames,
)
from pipeline.data.writers import write_nifti
from pipeline.distributed import resolve_device
from pipeline.inference.batch import output_paths, run_cases
from pipeline.inference.discovery import Case
from pipeline.inference.predictor import (
    TrainedModel,
    VolumePrediction,
    _GraphCutWorkers,
    _provenance,
)
from pipeline.models import load_checkpoint

__all__ = [
    "DEFAULT_FRAME_EXCLUDE",
    "FRAME_DATA_KINDS",
    "FRAME_SUMMARY_COLUMNS",
    "FramePredictor",
    "find_frame_cases",
    "frame_grid",
    "is_frame_model",
    "run_frames",
    "segment_frames",
    "write_frame_masks",
]

#: Data kinds (a checkpoint's ``config["data"]["kind"]``) of models trained on ultrasound frames.
FRAME_DATA_KINDS: tuple[str, ...] = ("echo", "echo_demo", "camus")

#: Glob patterns of files that are masks, not images, skipped by :func:`find_frame_cases`
#: (matched case-insensitively against the file name and the path relative to the input
#: folder): ``*_mask*`` (``cine_mask.nii.gz``, ``echo_mask_000.png``, this module's own
#: outputs) and ``*_gt.*`` / ``*_gt_*`` (CAMUS ground truth, ``patient0001_2CH_ED_gt.mhd``).
DEFAULT_FRAME_EXCLUDE: tuple[str, ...] = ("*_mask*", "*_gt.*", "*_gt_*")

#: Columns of the frame summary. ``frames``: frame count; ``shape``: ``HxW`` of a frame;
#: ``foreground_px``: mean foreground pixels per frame; ``foreground_mm2``: mean foreground
#: area per frame in mm² (empty where the file carries no pixel spacing, e.g. PNG);
#: ``foreground_ml`` stays empty (a 2-D frame has no volume) so the summary keeps the columns
#: of the volume summary; ``model_sha256``, ``views`` (``frame``), ``crf``, ``mmcrf_version``:
#: what made the mask, as in the volume summary.
FRAME_SUMMARY_COLUMNS: tuple[str, ...] = ("case", "input", "output", "status", "error",
                                          "frames", "foreground_ml", "foreground_px",
                                          "foreground_mm2", "seconds", "shape", "cnn_seconds",
                                          "crf_seconds", "model_sha256", "views", "crf",
                                          "mmcrf_version")


def is_frame_model(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint was trained on ultrasound frames (its data kind is one of
    :data:`FRAME_DATA_KINDS`).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not an mmcrf checkpoint.
    """
    config = load_checkpoint(checkpoint).get("config") or {}
    return (config.get("data") or {}).get("kind") in FRAME_DATA_KINDS


# Discovery -------------------------------------------------------------------------------------

def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _file_kind(path: Path) -> str | None:
    """The ultrasound format of a file (as the loader decides it: suffix or DICOM preamble),
    or None for anything the loader would refuse."""
    try:
        return _kind_of(path)
    except (ValueError, OSError):
        return None


def _excluded(rel: Path, patterns: Sequence[str]) -> bool:
    names = (rel.as_posix().lower(), rel.name.lower())
    return any(fnmatch.fnmatchcase(n, p.lower()) for p in patterns for n in names)


def _case_names(files: Sequence[Path], root: Path) -> list[str]:
    """Output names from relative paths without the suffix; where two files would share a
    name (``echo.dcm`` and ``echo.nii.gz``), each keeps its suffix (``echo_dcm``,
    ``echo_nii``), and a numbered name resolves what is left."""
    rels = [f.relative_to(root) if f != root else Path(f.name) for f in files]
    stems = []
    for rel in rels:
        suffix = _suffix(rel)
        stems.append(rel.as_posix()[: -len(suffix)] if suffix else rel.as_posix())
    names = []
    for rel, stem in zip(rels, stems, strict=True):
        tag = _suffix(rel).removesuffix(".gz").lstrip(".")
        names.append(f"{stem}_{tag}" if stems.count(stem) > 1 and tag else stem)
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        unique.append(name if n == 0 else f"{name}_{n}")
    return unique


def find_frame_cases(source: str | os.PathLike, *,
                     exclude: Sequence[str] | None = DEFAULT_FRAME_EXCLUDE,
                     recursive: bool = True, skip: Sequence[str | os.PathLike] = ()
                     ) -> list[Case]:
    """The ultrasound files under ``source`` (or ``source`` itself), one case per file.

    A file is an ultrasound file by its suffix (:data:`~pipeline.data.ultrasound.
    SUPPORTED_SUFFIXES`: DICOM, NIfTI, MetaImage, PNG/JPEG) or, without a known suffix, by
    the DICOM ``DICM`` preamble; other files (``.raw`` data of MetaImage headers, text, ...)
    and hidden files and folders are left out. A multi-frame DICOM or a NIfTI/MetaImage cine
    is one case; so is each PNG/JPEG frame. Files that match an ``exclude`` pattern (globs,
    case-insensitive, against the file name and the path relative to ``source``; default
    :data:`DEFAULT_FRAME_EXCLUDE`, i.e. masks) are skipped, as is everything under a
    ``skip`` folder (e.g. the output folder when it lies inside the input). A file given as
    ``source`` is always a case. Case names are the relative paths without the suffix
    (``p1/cine``), kept unique.

    Args:
        source: a folder (searched recursively unless ``recursive`` is False) or one file.
        exclude: glob patterns of files to skip; None or empty skips nothing.
        recursive: search sub-folders.
        skip: folders whose files are never cases.

    Returns:
        The cases, sorted by path; ``kind`` is the format (dicom, nifti, metaimage, png, jpeg).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is a file of no supported format, or a folder holding no
            ultrasound file (after exclusion).
    """
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if root.is_file():
        kind = _file_kind(root)
        if kind is None:
            raise ValueError(f"{root}: unsupported input; expected an ultrasound file "
                             f"({', '.join(SUPPORTED_SUFFIXES)} or DICOM without a suffix) or "
                             "a folder of them")
        return [Case(_case_names([root], root.parent)[0], root, kind)]
    skipped = [Path(s).resolve() for s in skip]
    files: list[tuple[Path, str]] = []
    for path in sorted(root.rglob("*") if recursive else root.iterdir()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if any(path.resolve().is_relative_to(s) for s in skipped):
            continue
        if exclude and _excluded(rel, exclude):
            continue
        kind = _file_kind(path)
        if kind is not None:
            files.append((path, kind))
    if not files:
        raise ValueError(f"{root}: no ultrasound files ({', '.join(SUPPORTED_SUFFIXES)} or "
                         "DICOM without a suffix) found"
                         + (f" (after excluding {', '.join(exclude)})" if exclude else ""))
    names = _case_names([f for f, _ in files], root)
    return [Case(name, path, kind) for name, (path, kind) in zip(names, files, strict=True)]


# Prediction ------------------------------------------------------------------------------------

class FramePredictor(_GraphCutWorkers):
    """Segments the frames of ultrasound files with a 2-D model trained on 1-channel frames.

    Each frame, normalised by :func:`~pipeline.data.ultrasound.normalise_frames` as the
    training samples were, is resized to the model's training size (bilinear) for the CNN
    (``batch_size`` frames a pass); the probability is resized back to the frame's size,
    where the CRF (the run's weights, connectivity and beta) labels it against the frame's own
    contrast. A CNN-only model gives the mask ``probability > 0.5``.

    Args:
        model: the checkpoint.
        batch_size: frames per CNN forward pass.
        workers: graph-cut worker processes (0: in this process).
        device: where the CNN runs (as for :class:`VolumePredictor`).
        tta: average the CNN's probabilities over the flips the model trained with before
            the CRF (refused for a model trained without flips).
        amp: mixed precision for the network (as for
            :class:`~pipeline.inference.VolumePredictor`).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not an mmcrf checkpoint, or a model taking other than 1 input channel.
    """

    def __init__(self, model: str | os.PathLike, *, batch_size: int = 16, workers: int = 0,
                 device: str | torch.device = "cpu", tta: bool = False,
                 amp: bool = False) -> None:
        self.amp = bool(amp)
        self.model = TrainedModel.from_checkpoint(model).require_grey(model, "ultrasound frames")
        self.device = resolve_device(device)
        self.model.model.to(self.device)
        self.tta = bool(tta)
        self.model.flips_for(self.tta)  # refuses --tta for a model trained without flips
        self.batch_size = batch_size
        self.pool = GraphCutPool(workers) if workers > 0 else None

    def provenance(self) -> dict:
        """What made this predictor's masks (as :meth:`VolumePredictor.provenance`; the one
        model's view is ``frame``)."""
        crf = "none" if self.model.weights is None else "per-frame graph cut"
        return _provenance({"frame": self.model}, ["frame"], crf, self.tta)

    def predict(self, frames: np.ndarray) -> VolumePrediction:
        """Segments T×H×W frames already normalised to [0, 1].

        Returns:
            T×H×W probability, CNN mask and CRF mask (None without CRF weights), with the
            seconds spent in the CNN and the CRF.

        Raises:
            ValueError: not a T×H×W stack.
        """
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != 3:
            raise ValueError(f"expected T×H×W frames, got shape {frames.shape}")
        vm = self.model
        start = time.perf_counter()
        probability, boundary = vm.maps(frames, batch_size=self.batch_size, device=self.device,
                                        tta=self.tta, amp=self.amp)
        cnn_s = time.perf_counter() - start
        start = time.perf_counter()
        crf = None
        if vm.weights is not None:
            crf = self._labellings(probability, frames, vm, boundary)
        return VolumePrediction(probability=probability,
                                cnn=(probability > 0.5).astype(np.uint8), crf=crf,
                                seconds={"cnn": cnn_s, "crf": time.perf_counter() - start})


# Batch -----------------------------------------------------------------------------------------

def frame_grid(path: str | os.PathLike, spacing: tuple[float, float] | None = None,
               n_frames: int = 1) -> tuple[tuple[int, ...] | None, np.ndarray]:
    """The grid of the file frames came from, read from its header once: the NIfTI shape of
    a single-frame NIfTI or MetaImage input (None: the reader's X×Y×1×T cine layout) and the
    affine (a NIfTI input's own in mm units, a MetaImage input's origin, spacing and direction
    turned from LPS into RAS, else ``diag(col spacing, row spacing, 1)``).
    """
    path = Path(path)
    suffix = _suffix(path)
    shape: tuple[int, ...] | None = None
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        img = nib.load(path)
        shape = tuple(img.shape) if n_frames == 1 else None
        if img.header.get_xyzt_units()[0] in ("mm", "unknown"):
            return shape, np.asarray(img.affine, dtype=np.float64)
    elif suffix in (".mhd", ".mha"):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        dim = reader.GetDimension()
        if n_frames == 1:
            shape = tuple(reader.GetSize()[:2])
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)
        lps = np.eye(4)
        n = min(dim, 3)
        lps[:n, :n] = direction[:n, :n] * np.asarray(reader.GetSpacing()[:n])
        lps[:n, 3] = reader.GetOrigin()[:n]
        return shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    row, col = spacing if spacing is not None else (1.0, 1.0)
    return shape, np.diag([col, row, 1.0, 1.0])


def _as_nifti_cine(frames: np.ndarray) -> np.ndarray:
    """T×H×W frames in the ultrasound reader's NIfTI layout: X×Y×1×T (i = column, j = row)."""
    return np.ascontiguousarray(np.asarray(frames).transpose(2, 1, 0)[:, :, None, :])


def write_frame_masks(frames: np.ndarray, source: str | os.PathLike, out: str | os.PathLike,
                      *, spacing: tuple[float, float] | None = None,
                      grid: tuple[tuple[int, ...] | None, np.ndarray] | None = None,
                      dtype=np.uint8) -> Path:
    """Writes T×H×W frames (as the ultrasound reader gives them) as NIfTI on the grid of the
    file they came from (:func:`frame_grid`; pass ``grid`` to reuse one): its affine and, for
    a single frame, its shape (X×Y for a 2-D frame such as CAMUS's); a cine gets the reader's
    X×Y×1×T layout.

    The write is atomic (temporary name, then rename).
    """
    frames = np.asarray(frames)
    shape, affine = grid if grid is not None else frame_grid(source, spacing, len(frames))
    data = _as_nifti_cine(frames)
    if shape is not None and int(np.prod(shape)) == data.size:
        data = data.reshape(shape)
    return write_nifti(data, affine, out, dtype=dtype)


def _run_frame_case(case: Case, predictor: FramePredictor, out_dir: Path, *, write_cnn: bool,
                    write_probability: bool) -> dict:
    paths = output_paths(case, out_dir)
    frames = load_ultrasound(case.path)
    images = normalise_frames(case.path, [f.image for f in frames])
    try:
        result = predictor.predict(images)
    except RuntimeError as err:  # e.g. a frame too small for the network
        raise RuntimeError(f"{case.path}: {err}") from err
    spacing = frames[0].spacing
    grid = frame_grid(case.path, spacing, len(frames))
    if write_probability:
        write_frame_masks(result.probability, case.path, paths["probability"], grid=grid,
                          dtype=np.float32)
    if write_cnn and result.crf is not None:
        write_frame_masks(result.cnn, case.path, paths["cnn"], grid=grid)
    write_frame_masks(result.mask, case.path, paths["mask"], grid=grid)  # last
    pixels = float(result.mask.reshape(len(frames), -1).sum(axis=1).mean())
    return {"output": str(paths["mask"]), "frames": len(frames),
            "shape": "x".join(map(str, images.shape[1:])),
            "foreground_px": round(pixels, 1),
            "foreground_mm2": "" if spacing is None else round(pixels * spacing[0] * spacing[1],
                                                               3),
            "cnn_seconds": round(result.seconds["cnn"], 3),
            "crf_seconds": round(result.seconds["crf"], 3)}


def run_frames(cases: Sequence[Case], out_dir: str | os.PathLike, predictor: FramePredictor,
               *, overwrite: bool = False, write_cnn: bool = False,
               write_probability: bool = False, progress: bool = True) -> list[dict]:
    """Segments every frame of every ultrasound case, one NIfTI mask per case, and a summary.

    The mask of a case holds all its frames, uint8 0/1, in the layout the ultrasound reader
    expects of NIfTI (X×Y×1×T, i = column, j = row; a single-frame NIfTI or MetaImage input
    keeps its own shape, e.g. X×Y), so ``load_ultrasound(mask)`` gives H×W frames aligned
    with the input's, in the input's order. Its affine is a NIfTI input's own, a MetaImage
    input's origin, spacing and direction, else ``diag(col spacing, row spacing, 1)`` from
    the input's pixel spacing (1 mm where the input has none, e.g. PNG). Files go to
    ``<out>/<case name>_mask.nii.gz`` (and ``_cnn_mask``, ``_prob``), written under
    temporary names and renamed, the mask last; the skipping of done cases, per-case
    failures and ``summary.csv``/``summary.json`` (columns :data:`FRAME_SUMMARY_COLUMNS`)
    are those of :func:`~pipeline.inference.batch.run_cases`.

    Args:
        cases: the cases (see :func:`find_frame_cases`).
        out_dir: output folder.
        predictor: the loaded model.
        overwrite: redo cases whose mask already exists.
        write_cnn: also write the CNN-only mask where the CRF is used.
        write_probability: also write the foreground probability (float32).
        progress: progress bar over cases.

    Returns:
        One summary row per case.

    Raises:
        ValueError: the output folder cannot be written.
    """
    def run_case(case: Case, out: Path) -> dict:
        return _run_frame_case(case, predictor, out, write_cnn=write_cnn,
                               write_probability=write_probability)

    return run_cases(cases, out_dir, run_case, columns=FRAME_SUMMARY_COLUMNS,
                     overwrite=overwrite, progress=progress, provenance=predictor.provenance())


def segment_frames(source: str | os.PathLike, out_dir: str | os.PathLike,
                   model: str | os.PathLike, *, exclude: Sequence[str] | None = None,
                   workers: int = 0, batch_size: int = 16, overwrite: bool = False,
                   device: str = "cpu", tta: bool = False, amp: bool = False,
                   write_cnn: bool = False, write_probability: bool = False,
                   progress: bool = True) -> list[dict]:
    """:func:`find_frame_cases` under ``source`` (never inside ``out_dir``), then
    :func:`run_frames` with a :class:`FramePredictor` of ``model``, which is closed after.

    Args:
        exclude: glob patterns of files to skip (None: :data:`DEFAULT_FRAME_EXCLUDE`).
        workers, batch_size, device, tta, amp: as for :class:`FramePredictor`.
        The others: as for :func:`run_frames`.

    Returns:
        One summary row per case.
    """
    cases = find_frame_cases(source, exclude=DEFAULT_FRAME_EXCLUDE if exclude is None
                             else exclude, skip=[out_dir])
    with FramePredictor(model, workers=workers, batch_size=batch_size, device=device,
                        tta=tta, amp=amp) as predictor:
        return run_frames(cases, out_dir, predictor, overwrite=overwrite, write_cnn=write_cnn,
                          write_probability=write_probability, progress=progress)
