"""Batch inference over many cases: one failure never stops the rest, nothing half-written,
re-runs skip finished cases, torchrun shards cases across ranks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from monai.data import MetaTensor
from tqdm.auto import tqdm

from pipeline import distributed as dist
from pipeline.data.readers import read_volume
from pipeline.data.writers import atomic_path, write_csv, write_nifti
from pipeline.inference.discovery import Case
from pipeline.inference.predictor import VolumePredictor

__all__ = ["SUMMARY_COLUMNS", "output_paths", "run_batch", "run_cases"]

SUMMARY_COLUMNS: tuple[str, ...] = ("case", "input", "output", "status", "error",
                                    "foreground_ml", "seconds", "series_uid", "shape",
                                    "cnn_seconds", "crf_seconds")


def output_paths(case: Case, out_dir: Path) -> dict[str, Path]:
    """Where a case's results go: ``<out>/<relative name>_mask.nii.gz`` and friends
    (``_seg.dcm``: the DICOM SEG of a DICOM series case)."""
    base = out_dir / case.name
    return {"mask": base.with_name(base.name + "_mask.nii.gz"),
            "cnn": base.with_name(base.name + "_cnn_mask.nii.gz"),
            "probability": base.with_name(base.name + "_prob.nii.gz"),
            "dicom_seg": base.with_name(base.name + "_seg.dcm")}


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

    first = predictor.models[predictor.views[0]]
    crf = ("none" if first.weights is None
           else "3-D graph cut" if predictor.crf_3d else "per-slice graph cut")
    try:
        write_dicom_seg(mask, volume.meta["files"], path,
                        affine=np.asarray(volume.affine, dtype=np.float64),
                        algorithm_parameters={"views": ",".join(predictor.views), "crf": crf})
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"DICOM SEG {path.name} not written: {err}") from None


def _run_case(case: Case, predictor: VolumePredictor, out_dir: Path, *, write_cnn: bool,
              write_probability: bool, write_dicom_seg: bool = False) -> dict:
    paths = output_paths(case, out_dir)
    volume = read_volume(case.path, series_uid=case.series_uid)
    result = predictor.predict(volume)
    affine = np.asarray(volume.affine, dtype=np.float64)
    if write_probability:
        write_nifti(result.probability.astype(np.float32), affine, paths["probability"])
    if write_cnn and result.crf is not None:
        write_nifti(result.cnn, affine, paths["cnn"], dtype=np.uint8)
    if write_dicom_seg and case.kind == "dicom":  # NIfTI inputs: no SEG, nothing to reference
        _write_case_seg(volume, result.mask, predictor, paths["dicom_seg"])
    write_nifti(result.mask, affine, paths["mask"], dtype=np.uint8)  # last: marks the case done
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    return {"output": str(paths["mask"]), "shape": "x".join(map(str, volume.shape)),
            "foreground_ml": round(float(result.mask.sum()) * voxel_ml, 3),
            "cnn_seconds": round(result.seconds["cnn"], 3),
            "crf_seconds": round(result.seconds["crf"], 3)}


def run_batch(cases: Sequence[Case], out_dir: str | os.PathLike, predictor: VolumePredictor,
              *, overwrite: bool = False, write_cnn: bool = False,
              write_probability: bool = False, write_dicom_seg: bool = False,
              progress: bool = True) -> list[dict]:
    """Segments every case, writing masks on each input's own grid and a summary.

    Each case is written to temporary names and renamed, the mask last, so an interrupted
    run leaves no half-written mask; a re-run skips cases whose mask exists (unless
    ``overwrite``). A failing case is recorded with its error and the others go on.
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
            written fails its case (no mask either).
        progress: progress bar over cases.

    Returns:
        One summary row per case (this rank's cases merged with the others' on rank 0).

    Raises:
        ValueError: the output folder cannot be written.
    """
    def run_case(case: Case, out: Path) -> dict:
        return _run_case(case, predictor, out, write_cnn=write_cnn,
                         write_probability=write_probability, write_dicom_seg=write_dicom_seg)

    return run_cases(cases, out_dir, run_case, overwrite=overwrite, progress=progress)


def run_cases(cases: Sequence[Case], out_dir: str | os.PathLike,
              run_case: Callable[[Case, Path], dict], *,
              columns: Sequence[str] = SUMMARY_COLUMNS, overwrite: bool = False,
              progress: bool = True) -> list[dict]:
    """The batch loop that volumes (:func:`run_batch`) and ultrasound frames share.

    A case is done when its mask (``output_paths(case, out_dir)["mask"]``) exists: it is
    skipped unless ``overwrite``. ``run_case(case, out_dir)`` writes the case's outputs
    (atomically, the mask last) and returns the row's other values. Failing cases (ValueError,
    FileNotFoundError, OSError, RuntimeError) get status ``failed`` and the error; the others
    go on. ``summary.csv``/``summary.json`` (``columns``) are rewritten after every case;
    under torchrun, cases are sharded across ranks and rank 0 merges one summary at the end.

    Args:
        cases: the cases.
        out_dir: output folder.
        run_case: segments one case into the output folder; returns its row values.
        columns: the summary's columns (every row holds each, empty where unknown).
        overwrite: redo cases whose mask already exists.
        progress: progress bar over cases.

    Returns:
        One summary row per case (this rank's cases merged with the others' on rank 0).

    Raises:
        ValueError: the output folder cannot be written.
    """
    out = Path(out_dir)
    _check_writable(out)
    mine = list(cases)[dist.rank()::dist.world_size()]
    summary_path = out / ("summary.csv" if dist.world_size() == 1
                          else f"summary.rank{dist.rank()}.csv")
    rows: list[dict] = []
    for case in tqdm(mine, desc="cases", unit="case", disable=not progress):
        row = {**dict.fromkeys(columns, ""), "case": case.name, "input": str(case.path)}
        if "series_uid" in columns:
            row["series_uid"] = case.series_uid or ""
        mask_path = output_paths(case, out)["mask"]
        start = time.perf_counter()
        if mask_path.exists() and not overwrite:
            row.update(status="skipped", output=str(mask_path),
                       error="output exists (use --overwrite to redo)")
        else:
            try:
                row.update(run_case(case, out))
                row["status"] = "ok"
            except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
                row.update(status="failed", error=str(err))
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
        _write_table(rows, summary_path, columns)
    if dist.world_size() > 1:
        gathered = dist.all_gather_objects(rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["case"])
        if dist.is_main():
            _write_table(rows, out / "summary.csv", columns)
    return rows
