"""The embedded default jobs: CNN → piecewise → joint on CTA and echo phantoms, and a CRF demo."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.crf import learn_weights, map_labelling
from pipeline.data import noisy_blocks
from pipeline.data.writers import atomic_write_text
from pipeline.metrics import compute_jaccard

__all__ = ["DEMO_SETS", "CRFDemoResult", "DemoResult", "run_crf_demo", "run_demo"]


@dataclass
class CRFDemoResult:
    """What the CRF demo measured (Jaccard on held-out generated images)."""

    weights: dict[str, float]
    gamma: float
    iterations: int
    converged: bool
    C: float
    size: int
    n_train: int
    n_test: int
    jaccard_threshold: float
    jaccard_crf: float
    improved_images: int
    seconds: float


def run_crf_demo(*, size: int = 96, n_train: int = 8, n_test: int = 8, C: float = 10.0,
                 seed: int = 0, output_dir: str | os.PathLike | None = None) -> CRFDemoResult:
    """Learns CRF weights on noisy-block images, then compares CRF MAP with thresholding.

    Args:
        size: side of the square images.
        n_train: images the weights are learned on.
        n_test: held-out images the Jaccard is measured on.
        C: slack penalty (normalised scale).
        seed: seed of the generator (training images use seed.., test images seed+10000..).
        output_dir: if given, ``crf_demo.json`` is written there (atomically).

    Returns:
        The measured result.
    """
    start = time.perf_counter()
    train = [noisy_blocks((size, size), rng=seed + i) for i in range(n_train)]
    test = [noisy_blocks((size, size), rng=seed + 10_000 + i) for i in range(n_test)]
    result = learn_weights([s.prob for s in train], [s.image for s in train],
                           [s.truth for s in train], C=C)
    truth = np.stack([s.truth for s in test])
    thresholded = np.stack([(s.prob > 0.5).astype(np.uint8) for s in test])
    refined = np.stack([map_labelling(s.prob, s.image, result.weights) for s in test])
    j_thr = compute_jaccard(thresholded, truth)
    j_crf = compute_jaccard(refined, truth)
    demo = CRFDemoResult(
        weights=result.weights.to_dict(),
        gamma=result.gamma, iterations=result.iterations, converged=result.converged, C=C,
        size=size, n_train=n_train, n_test=n_test,
        jaccard_threshold=float(np.nanmean(j_thr)), jaccard_crf=float(np.nanmean(j_crf)),
        improved_images=int(np.sum(j_crf > j_thr)), seconds=time.perf_counter() - start)
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "crf_demo.json",
                          json.dumps(asdict(demo), indent=2) + "\n")
    return demo


@dataclass
class DemoResult:
    """What the full demo produced: per-view, per-method mean validation Jaccard and paths.

    Attributes:
        mean_jaccard: view (``axial``, ``coronal``, ``sagittal``, ``echo``) → method → mean
            validation Jaccard (empty ground truth excluded).
        scored: view → images scored.
        excluded: view → images with empty ground truth, excluded.
        runs: ``<view>/<mode>`` → best checkpoint.
        table: the evaluation table (CSV).
        report: ``html`` / ``md`` / ``json`` → report file.
        seconds: wall time.
    """

    mean_jaccard: dict[str, dict[str, float]]
    scored: dict[str, int]
    excluded: dict[str, int]
    runs: dict[str, str]
    table: str
    report: dict[str, str]
    seconds: float


#: The demo's data sets: the three views of the CTA phantom cohort and the echo cohort.
DEMO_SETS: tuple[str, ...] = ("axial", "coronal", "sagittal", "echo")


def run_demo(output_dir: str | os.PathLike = "demo_output", *, size: int = 64,
             cnn_epochs: int | None = None, joint_epochs: int | None = None,
             config: str | os.PathLike | None = None, sets: Sequence[str] = DEMO_SETS,
             progress: bool = False, device: str = "auto", log=print) -> DemoResult:
    """The main job on the embedded default: CTA phantoms sliced into axial, coronal and
    sagittal images, and echo phantom cine loops → per data set, CNN-only, piecewise and
    joint training (one model per view, as in the paper) → per-image evaluation on the
    validation cases → one report, per view and per method.

    Args:
        output_dir: where the phantoms (``demo_data/cta``, ``demo_data/echo``), runs
            (``runs/<view>/<mode>/``), the evaluation table and the report (``report/``) go.
        size: side of the training images.
        cnn_epochs: epochs of CNN pre-training (default: the preset's).
        joint_epochs: epochs of joint training (default: the preset's).
        config: training preset, a file or a packaged preset's name (default ``cpu``).
        sets: which of :data:`DEMO_SETS` to run.
        progress: progress bars.
        device: where the CNN trains (:func:`pipeline.distributed.resolve_device`).
        log: where progress lines go.

    Returns:
        The result, with the per-view, per-method mean Jaccard on the validation cases.

    Raises:
        ValueError: an unknown data set.
    """
    from pipeline.data.samples import training_sets
    from pipeline.engines import DEFAULT_CONFIG, MODES, TrainConfig, previous_stage_checkpoint
    from pipeline.reports import collect_provenance
    from pipeline.workflow import data_settings, evaluate_and_report, stage_config, train_stage

    unknown = [s for s in sets if s not in DEMO_SETS]
    if unknown or not sets:
        raise ValueError(f"demo sets must be a non-empty subset of {DEMO_SETS}, got {sets}")
    start = time.perf_counter()
    out = Path(output_dir)
    preset = config or DEFAULT_CONFIG
    runs: dict[str, str] = {}
    groups: list = []
    epochs_of = {"cnn": cnn_epochs, "piecewise": None, "joint": joint_epochs}
    for name in sets:
        kind = "echo_demo" if name == "echo" else "demo"
        root = out / "demo_data" / ("echo" if name == "echo" else "cta")
        samples = training_sets(kind, root=root, view=name, size=size)
        what = ("frames of the echo phantom cohort" if name == "echo"
                else f"{name} slices of the CTA phantom cohort")
        log(f"[{name}] {len(samples[0])} training / {len(samples[1])} validation {what} "
            f"({size}x{size})")
        view_runs: dict[str, str] = {}
        for mode in MODES:
            cfg = stage_config(preset, data=data_settings(kind, view=name, size=size),
                               mode=mode, epochs=epochs_of[mode], device=device)
            init = previous_stage_checkpoint(out / "runs" / name, mode)
            result = train_stage(cfg, out / "runs" / name / mode, init=init, samples=samples,
                                 progress=progress).result
            view_runs[mode] = runs[f"{name}/{mode}"] = str(result.best_checkpoint)
            best = result.best_weights
            log(f"  {mode:9s} best validation Jaccard {result.best_metric:.4f} "
                f"(epoch {result.best_epoch})" + ("" if best is None else
                                                  f", CRF weights {best}"))
        groups.append((view_runs, samples[1]))
    done = evaluate_and_report(
        groups, out, training_log=out / "runs" / sets[0] / "joint" / "log.csv",
        provenance=collect_provenance(asdict(TrainConfig.from_json(preset))),
        title="mmcrf demo: CTA phantoms (three views) and echo phantoms", examples=True,
        progress=progress)
    table, report = done["table"], done["report"]
    paths = {k: v for k, v in done.items() if isinstance(v, Path) and k != "table"}
    means: dict[str, dict[str, float]] = {}
    scored: dict[str, int] = {}
    excluded: dict[str, int] = {}
    for summary in report.summaries:
        means.setdefault(summary.view, {})[summary.method] = summary.mean_jaccard
        scored[summary.view] = summary.n_scored
        excluded[summary.view] = summary.n_excluded
    return DemoResult(mean_jaccard=means, scored=scored, excluded=excluded, runs=runs,
                      table=str(table), report={k: str(v) for k, v in paths.items()},
                      seconds=time.perf_counter() - start)
