"""Batch inference over many cases: one failure never stops the rest, nothing half-written,
re-runs skip finished cases, torchrun shards cases across ranks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from pipeline import distributed as dist
from pipeline.data.readers import read_volume
from pipeline.data.views import slice_axis
from pipeline.data.writers import atomic_path, atomic_write_text, write_csv, write_nifti
from pipeline.inference.discovery import OUTPUT_MARKER, Case
from pipeline.inference.predictor import VolumePrediction, VolumePredictor

__all__ = ["STATUSES", "SUMMARY_COLUMNS", "NotAScanError", "output_paths", "run_batch", "run_cases"]

#: Columns of ``summary.csv``. ``foreground_ml``: predicted volume; ``foreground_slices``:
#: fraction of the first view's slices holding foreground; ``warning``: e.g. a predicted
#: volume outside the range the model saw in training; ``model_sha256``, ``views``, ``crf``,
#: ``mmcrf_version``: what made the mask (also in its ``_mask.json`` sidecar).
SUMMARY_COLUMNS: tuple[str, ...] = ("case", "input", "output", "status", "error", "warning",
                                    "foreground_ml", "foreground_slices", "seconds",
                                    "series_uid", "shape", "cnn_seconds", "crf_seconds",
                                    "model_sha256", "views", "crf", "mmcrf_version")

#: Statuses of a summary row: done now, done before by the same model, not an image to
#: segment (a label map), or failed (the error says why).
STATUSES: tuple[str, ...] = ("ok", "skipped", "excluded", "failed")

#: How far outside the training range a predicted volume may lie before the row warns.
VOLUME_MARGIN = 0.5


class NotAScanError(ValueError):
    """The input is a label map (a few integer values), not an image to segment."""


def output_paths(case: Case, out_dir: Path) -> dict[str, Path]:
    """Where a case's results go: ``<out>/<relative name>_mask.nii.gz`` and friends
    (``_mask.json``: what made the mask; ``_seg.dcm``, ``_rtstruct.dcm``: the DICOM SEG and
    RT Structure Set of a DICOM series case)."""
    base = out_dir / case.name
    return {"mask": base.with_name(base.name + "_mask.nii.gz"),
            "provenance": base.with_name(base.name + "_mask.json"),
            "cnn": base.with_name(base.name + "_cnn_mask.nii.gz"),
            "probability": base.with_name(base.name + "_prob.nii.gz"),
            "dicom_seg": base.with_name(base.name + "_seg.dcm"),
            "rtstruct": base.with_name(base.name + "_rtstruct.dcm")}


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = atomic_path(out_dir / "write-test")
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{out_dir}: output folder is not writable ({err.strerror})") from None


def _write_table(rows: list[dict], path: Path, columns: Sequence[str]) -> None:
    write_csv(rows, path, columns)
    tmp_json = atomic_path(path.with_suffix(".json"))
    tmp_json.write_text(json.dumps(rows, indent=2) + "\n")
    tmp_json.replace(path.with_suffix(".json"))


def _write_case_seg(volume: MetaTensor, mask: np.ndarray, predictor: VolumePredictor,
                    path: Path) -> None:
    """The DICOM SEG of a DICOM series case, referencing the instances ``volume`` was read
    from; any failure becomes a ValueError naming the SEG (the case then fails)."""
    from pipeline.data.dicom_seg import write_dicom_seg

    try:
        write_dicom_seg(mask, volume.meta["files"], path,
                        affine=np.asarray(volume.affine, dtype=np.float64),
                        algorithm_parameters={"views": ",".join(predictor.views),
                                              "crf": predictor.crf_method})
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"DICOM SEG {path.name} not written: {err}") from None


def _write_case_rtstruct(volume: MetaTensor, mask: np.ndarray, path: Path) -> None:
    """The RT Structure Set of a DICOM series case; any failure becomes a ValueError naming
    the file (the case keeps its NIfTI mask and gets a warning)."""
    from pipeline.data.rtstruct import write_rtstruct

    try:
        write_rtstruct(mask, volume.meta["files"], path,
                       affine=np.asarray(volume.affine, dtype=np.float64))
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"RT Structure Set {path.name} not written: {err}") from None


def _check_is_scan(volume: MetaTensor, path: Path) -> None:
    """NotAScanError when the volume holds only a few integer values (a label map, e.g. a
    heart mask beside its CT), judged on a sample of voxels first and then on all."""
    flat = volume.reshape(-1)
    for sample in (flat[:: max(1, flat.numel() // 100_000)], flat):
        values = torch.unique(sample)
        if len(values) > 8 or not bool(torch.all(values == torch.round(values))):
            return
    shown = ", ".join(f"{v:g}" for v in values.tolist())
    raise NotAScanError(f"{path}: a label map (only the values {shown}), not an image to "
                        f"segment; not segmented (--exclude it to leave it out)")


def _slice_fraction(mask: np.ndarray, affine: np.ndarray, view: str) -> float:
    """Fraction of the view's slices (along the voxel axis closest to the view's world axis)
    that hold foreground."""
    axis = int(np.argmax(np.abs(affine[slice_axis(view), :3])))
    other = tuple(a for a in range(3) if a != axis)
    return round(float(np.asarray(mask).any(axis=other).mean()), 4)


def _volume_warning(ml: float, predictor: VolumePredictor) -> str:
    seen = predictor.models[predictor.views[0]].foreground_ml
    if seen is None:
        return ""
    low, high = seen[0] * (1 - VOLUME_MARGIN), seen[1] * (1 + VOLUME_MARGIN)
    if low <= ml <= high:
        return ""
    return (f"predicted volume {ml:.0f} mL is outside the range the model saw in training "
            f"({seen[0]:.0f}-{seen[1]:.0f} mL, ±{VOLUME_MARGIN:.0%}): check the mask")


def _run_case(case: Case, predictor: VolumePredictor, out_dir: Path, *, write_cnn: bool,
              write_probability: bool, write_dicom_seg: bool = False,
              write_rtstruct: bool = False,
              progress: bool = False) -> dict | Callable[[], dict]:
    """Reads and segments one case; with a pipelined predictor it returns once the network
    has run, as a callable that waits for the graph cuts and writes the results."""
    volume = read_volume(case.path, series_uid=case.series_uid)
    _check_is_scan(volume, case.path)
    pending = predictor.start(volume, progress=progress)

    def finish() -> dict:
        return _write_case(case, volume, pending.result(), predictor, out_dir,
                           write_cnn=write_cnn, write_probability=write_probability,
                           write_dicom_seg=write_dicom_seg, write_rtstruct=write_rtstruct)

    return finish if predictor.pipelined else finish()


def _write_case(case: Case, volume: MetaTensor, result: VolumePrediction,
                predictor: VolumePredictor, out_dir: Path, *, write_cnn: bool,
                write_probability: bool, write_dicom_seg: bool,
                write_rtstruct: bool = False) -> dict:
    """Writes a case's results (the mask last: it marks the case done); its row's values."""
    paths = output_paths(case, out_dir)
    affine = np.asarray(volume.affine, dtype=np.float64)
    if write_probability:
        write_nifti(result.probability.astype(np.float32), affine, paths["probability"])
    if write_cnn and result.crf is not None:
        write_nifti(result.cnn, affine, paths["cnn"], dtype=np.uint8)
    warnings = []
    if write_dicom_seg and case.kind == "dicom":  # NIfTI inputs: no SEG, nothing to reference
        try:
            _write_case_seg(volume, result.mask, predictor, paths["dicom_seg"])
        except ValueError as err:  # e.g. empty UIDs: the NIfTI mask is still worth having
            warnings.append(f"{err}; the NIfTI mask is written")
    if write_rtstruct and case.kind == "dicom":
        try:
            _write_case_rtstruct(volume, result.mask, paths["rtstruct"])
        except ValueError as err:  # e.g. an empty mask: nothing to outline
            warnings.append(f"{err}; the NIfTI mask is written")
    write_nifti(result.mask, affine, paths["mask"], dtype=np.uint8)  # last: marks the case done
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    ml = float(result.mask.sum()) * voxel_ml
    return {"output": str(paths["mask"]), "shape": "x".join(map(str, volume.shape)),
            "foreground_ml": round(ml, 3),
            "foreground_slices": _slice_fraction(result.mask, affine, predictor.views[0]),
            "warning": "; ".join(w for w in (*warnings, _volume_warning(ml, predictor)) if w),
            "cnn_seconds": round(result.seconds["cnn"], 3),
            "crf_seconds": round(result.seconds["crf"], 3)}


def run_batch(cases: Sequence[Case], out_dir: str | os.PathLike, predictor: VolumePredictor,
              *, overwrite: bool = False, write_cnn: bool = False,
              write_probability: bool = False, write_dicom_seg: bool = False,
              write_rtstruct: bool = False, progress: bool = True) -> list[dict]:
    """Segments every case, writing masks on each input's own grid and a summary.

    Each case is written to temporary names and renamed, the mask last, so an interrupted
    run leaves no half-written mask; each mask gets a ``_mask.json`` sidecar saying what
    made it (:meth:`VolumePredictor.provenance` and the input's path), and a re-run skips a
    case only when the same model made its mask from the same input; another model's mask is
    refused (status ``failed``) unless ``overwrite``. A failing case is recorded with its
    error and the others go on; a label map found among the inputs gets ``excluded``.
    With graph-cut workers the cases run as a pipeline: a case's cuts run in the workers
    while the next case is read and its network runs (:meth:`VolumePredictor.start`), so at
    most two cases are held in memory at once; the masks are the serial run's.
    ``summary.csv``/``summary.json`` are rewritten after every case. Under torchrun, cases
    are sharded across ranks and rank 0 merges one summary at the end.

    Args:
        cases: the cases (see :func:`pipeline.inference.find_cases`).
        out_dir: output folder.
        predictor: the loaded model(s).
        overwrite: redo cases whose mask already exists.
        write_cnn: also write the CNN-only mask where the CRF is used.
        write_probability: also write the foreground probability.
        write_dicom_seg: for DICOM series inputs, also write ``<name>_seg.dcm``, a binary
            DICOM SEG whose frames reference the series' instances (see
            :func:`pipeline.data.dicom_seg.write_dicom_seg`); NIfTI inputs have no instances
            to reference and get none (their case is still ``ok``). A SEG that cannot be
            written (e.g. a series whose UIDs are empty) leaves the NIfTI mask and a
            ``warning`` saying why.
        write_rtstruct: for DICOM series inputs, also write ``<name>_rtstruct.dcm``, a DICOM
            RT Structure Set with the mask's contours on the series' slices (rt-utils, see
            :func:`pipeline.data.rtstruct.write_rtstruct`); NIfTI inputs get none, and a
            structure set that cannot be written (e.g. an empty mask) leaves a ``warning``.
        progress: progress bar over cases (over the slices for a single case).

    Returns:
        One summary row per case (this rank's cases merged with the others' on rank 0).

    Raises:
        ValueError: the output folder cannot be written.
    """
    single = len(cases) == 1  # one volume: a bar over its slices instead of over cases

    def run_case(case: Case, out: Path) -> dict | Callable[[], dict]:
        return _run_case(case, predictor, out, write_cnn=write_cnn,
                         write_probability=write_probability, write_dicom_seg=write_dicom_seg,
                         write_rtstruct=write_rtstruct,
                         progress=progress and single and dist.is_main())

    return run_cases(cases, out_dir, run_case, overwrite=overwrite,
                     progress=progress and not single, provenance=predictor.provenance())


def _fingerprint(provenance: Mapping) -> dict:
    """The part of a provenance record that says which model made a mask (not where its
    files were)."""
    return {"views": list(provenance.get("views") or []), "crf": provenance.get("crf"),
            "tta": provenance.get("tta"),
            "sha256": {v: m.get("sha256") for v, m in (provenance.get("models") or {}).items()}}


def _provenance_columns(provenance: Mapping | None) -> dict:
    if provenance is None:
        return {}
    models = provenance.get("models") or {}
    return {"model_sha256": ";".join(f"{v}={m.get('sha256', '')}" for v, m in models.items()),
            "views": ",".join(provenance.get("views") or []), "crf": provenance.get("crf", ""),
            "mmcrf_version": provenance.get("mmcrf_version", "")}


def _made_here(case: Case, sidecar: Path, provenance: Mapping) -> str | None:
    """None when the mask beside ``sidecar`` was made from this case's input by this model,
    else why not."""
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return (f"{sidecar.name} is missing or unreadable, so which model made the mask is "
                f"unknown")
    if record.get("input") != str(Path(case.path).resolve()):
        return f"the mask was made from another input, {record.get('input')}"
    theirs = _fingerprint(record)
    if theirs != _fingerprint(provenance):
        return (f"the mask was made by another model (sha256 "
                f"{', '.join(str(v)[:12] for v in theirs['sha256'].values())}, views "
                f"{','.join(theirs['views'])}, crf {theirs['crf']})")
    return None


def _remove_stale_temporaries(out: Path) -> None:
    """Removes the temporary files (``.<name>.<pid>.tmp``) of runs that were killed."""
    for path in out.rglob(".*.tmp*"):  # also the older ``.x.nii.gz.<pid>.tmp.nii.gz``
        pids = [int(p) for p in path.name.split(".") if p.isdigit()]
        if pids and pids[-1] != os.getpid() and _alive(pids[-1]):
            continue  # a running process's file
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_output(out: Path) -> None:
    """Creates the output folder, marks it as one (so it is never taken as input), and
    clears the temporaries of killed runs; under torchrun rank 0 does it, the others wait."""
    _check_writable(out)
    if dist.is_main():
        marker = out / OUTPUT_MARKER
        if not marker.exists():
            marker.write_text("mmcrf batch output: never read as input\n")
        _remove_stale_temporaries(out)
    dist.barrier()


def _attempt(row: dict, case: Case, paths: dict[str, Path], step: Callable[[], object]):
    """Runs one step of a case; its dict result goes into the row (status ``ok``), any other
    result is returned. A failure is recorded in the row (``failed``, or ``excluded`` for a
    label map) and removes the case's sidecar; None is returned then."""
    try:
        outcome = step()
        if isinstance(outcome, Mapping):
            row.update(outcome)
            row["status"] = "ok"
            return None
        return outcome
    except NotAScanError as err:
        row.update(status="excluded", error=str(err))
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        row.update(status="failed", error=str(err))
    except Exception as err:  # one odd input must not stop a batch
        row.update(status="failed", error=f"{case.path}: unexpected {type(err).__name__} "
                                          f"({err}); please report it with this input")
    paths["provenance"].unlink(missing_ok=True)
    return None


def _finish(row: dict, case: Case, paths: dict[str, Path], finish: Callable[[], dict],
            elapsed: float) -> dict:
    """The second half of a started case: its row, completed (or failed)."""
    start = time.perf_counter()
    _attempt(row, case, paths, finish)
    row["seconds"] = round(elapsed + time.perf_counter() - start, 3)
    return row


def run_cases(cases: Sequence[Case], out_dir: str | os.PathLike,
              run_case: Callable[[Case, Path], dict], *,
              columns: Sequence[str] = SUMMARY_COLUMNS, overwrite: bool = False,
              progress: bool = True, provenance: Mapping | None = None) -> list[dict]:
    """The batch loop that volumes (:func:`run_batch`) and ultrasound frames share.

    ``run_case(case, out_dir)`` writes the case's outputs (atomically, the mask last) and
    returns the row's other values; or it starts the case and returns a callable that
    finishes it (writes and returns the values), which is called once the next case has
    been started, so that the case's graph cuts run in the workers while the next case's
    network runs (a pipeline; the rows stay in the cases' order, and each row's
    ``seconds`` counts its own two halves). With ``provenance`` (what makes the masks, e.g.
    :meth:`VolumePredictor.provenance`), each case first gets a sidecar
    ``<name>_mask.json`` with it and the input's path, and a case whose mask exists is
    skipped only when its sidecar says this input and this model made it; a mask made by
    another model or from another input (or without a sidecar) is refused, status
    ``failed``, unless ``overwrite``: it is never silently kept nor silently replaced.
    Without ``provenance`` an existing mask means done. A failing case gets status
    ``failed`` and the error (an unexpected exception type is named as such, never a bare
    traceback), a label map (:class:`NotAScanError`) status ``excluded``; the others go on.
    ``summary.csv``/``summary.json`` (``columns``) are rewritten after every case; under
    torchrun, cases are sharded across ranks and rank 0 merges one summary at the end. The
    output folder gets :data:`~pipeline.inference.discovery.OUTPUT_MARKER`, and temporary
    files left by a killed run are removed first.

    Args:
        cases: the cases.
        out_dir: output folder.
        run_case: segments one case into the output folder; returns its row values.
        columns: the summary's columns (every row holds each, empty where unknown).
        overwrite: redo cases whose mask already exists.
        progress: progress bar over cases.
        provenance: what makes the masks (JSON-serialisable), recorded per case.

    Returns:
        One summary row per case (this rank's cases merged with the others' on rank 0).

    Raises:
        ValueError: the output folder cannot be written.
    """
    out = Path(out_dir)
    _prepare_output(out)
    mine = list(cases)[dist.rank()::dist.world_size()]
    summary_path = out / ("summary.csv" if dist.world_size() == 1
                          else f"summary.rank{dist.rank()}.csv")
    rows: list[dict] = []

    def done(row: dict) -> None:
        rows.append(row)
        _write_table(rows, summary_path, columns)

    pending: tuple[dict, Case, dict[str, Path], Callable[[], dict], float] | None = None
    for case in tqdm(mine, desc="cases", unit="case", disable=not progress):
        row = {**dict.fromkeys(columns, ""), "case": case.name, "input": str(case.path),
               **{k: v for k, v in _provenance_columns(provenance).items() if k in columns}}
        if "series_uid" in columns:
            row["series_uid"] = case.series_uid or ""
        paths = output_paths(case, out)
        start = time.perf_counter()
        finish = None
        if case.problem is not None:
            row.update(status="failed", error=case.problem)
        elif paths["mask"].exists() and not overwrite:
            why = None if provenance is None else _made_here(case, paths["provenance"],
                                                             provenance)
            if why is None:
                row.update(status="skipped", output=str(paths["mask"]),
                           error="output exists (use --overwrite to redo)")
            else:
                row.update(status="failed", error=f"{paths['mask']} exists and is kept: {why}; "
                                                  f"use --overwrite to replace it, or another "
                                                  f"--output")
        else:
            def begin(case: Case = case, paths: dict = paths):
                if provenance is not None:
                    atomic_write_text(paths["provenance"], json.dumps(
                        {**provenance, "input": str(Path(case.path).resolve()),
                         "case": case.name}, indent=2) + "\n")
                return run_case(case, out)

            outcome = _attempt(row, case, paths, begin)
            if callable(outcome):  # started: its second half runs once the next case starts
                finish = outcome
        elapsed = time.perf_counter() - start
        if pending is not None:  # the previous case's second half, while this one's cuts run
            done(_finish(*pending))
            pending = None
        if finish is not None:
            pending = (row, case, paths, finish, elapsed)
        else:
            row["seconds"] = round(elapsed, 3)
            done(row)
    if pending is not None:
        done(_finish(*pending))
    if dist.world_size() > 1:
        gathered = dist.all_gather_objects(rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["case"])
        if dist.is_main():
            _write_table(rows, out / "summary.csv", columns)
    return rows
