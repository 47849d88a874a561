"""The embedded default jobs: the full CNN → piecewise → joint pipeline on CTA phantoms, and a
CRF-only demo on noisy blocks."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.crf import learn_weights, map_labelling
from pipeline.data import noisy_blocks
from pipeline.metrics import compute_jaccard

__all__ = ["CRFDemoResult", "DemoResult", "run_crf_demo", "run_demo"]


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
        weights={k: float(v) for k, v in asdict(result.weights).items()},
        gamma=result.gamma, iterations=result.iterations, converged=result.converged, C=C,
        size=size, n_train=n_train, n_test=n_test,
        jaccard_threshold=float(np.nanmean(j_thr)), jaccard_crf=float(np.nanmean(j_crf)),
        improved_images=int(np.sum(j_crf > j_thr)), seconds=time.perf_counter() - start)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "crf_demo.json.tmp"
        tmp.write_text(json.dumps(asdict(demo), indent=2) + "\n")
        tmp.replace(out / "crf_demo.json")
    return demo


@dataclass
class DemoResult:
    """What the full demo produced: per-method mean validation Jaccard and the file paths."""

    mean_jaccard: dict[str, float]
    scored: int
    excluded: int
    runs: dict[str, str]
    table: str
    report: dict[str, str]
    seconds: float


def run_demo(output_dir: str | os.PathLike = "demo_output", *, size: int = 64,
             cnn_epochs: int | None = None, joint_epochs: int | None = None,
             config: str | os.PathLike | None = None, progress: bool = False,
             log=print) -> DemoResult:
    """The main job on the embedded default: CTA phantoms → axial slices → CNN-only,
    piecewise and joint training → per-image evaluation → per-view report.

    Args:
        output_dir: where the phantoms (``demo_data/``), runs (``runs/<mode>/``), the
            evaluation table and the report (``report/``) go.
        size: side of the training images.
        cnn_epochs: epochs of CNN pre-training (default: the preset's).
        joint_epochs: epochs of joint training (default: the preset's).
        config: training preset (default ``configs/cpu.json``).
        progress: progress bars.
        log: where progress lines go.

    Returns:
        The result, with the per-method mean Jaccard on the validation phantoms.
    """
    from pipeline.data.samples import training_sets
    from pipeline.engines import (
        DEFAULT_CONFIG,
        MODES,
        TrainConfig,
        previous_stage_checkpoint,
        train,
    )
    from pipeline.engines.evaluate import evaluate_runs_with_examples
    from pipeline.reports import (
        build_report,
        collect_provenance,
        qualitative_figures,
        write_eval_table,
        write_report,
    )

    start = time.perf_counter()
    out = Path(output_dir)
    preset = config or DEFAULT_CONFIG
    train_set, val_set = training_sets("demo", root=out / "demo_data", size=size)
    log(f"demo data: {len(train_set)} training / {len(val_set)} validation axial slices "
        f"({size}x{size}) of the CTA phantom cohort in {out / 'demo_data'}")
    runs: dict[str, str] = {}
    epochs_of = {"cnn": cnn_epochs, "piecewise": None, "joint": joint_epochs}
    for mode in MODES:
        cfg = TrainConfig.from_json(preset, mode=mode, epochs=epochs_of[mode])
        init = previous_stage_checkpoint(out / "runs", mode)
        log(f"training {mode} ({cfg.epochs if mode != 'piecewise' else 1} epoch(s)) ...")
        result = train(cfg, train_set, val_set, out / "runs" / mode, init=init,
                       progress=progress)
        runs[mode] = str(result.best_checkpoint)
        log(f"  {mode}: best validation Jaccard {result.best_metric:.4f} "
            f"(epoch {result.best_epoch})" + ("" if result.weights is None else
                                              f", CRF weights {result.weights}"))
    evaluation = evaluate_runs_with_examples(runs, val_set, progress=progress)
    table = write_eval_table(evaluation.rows, out / "evaluation.csv")
    evaluation.examples.save(out / "examples.npz")
    report = build_report([table], training_log=out / "runs" / "joint" / "log.csv",
                          figures=qualitative_figures(evaluation.examples),
                          provenance=collect_provenance(asdict(TrainConfig.from_json(preset))),
                          title="mmcrf demo: CTA phantoms, axial view")
    paths = write_report(report, out / "report")
    summary = {s.method: s for s in report.summaries if s.view == "axial"}
    means = {m: s.mean_jaccard for m, s in summary.items()}
    any_summary = next(iter(summary.values()))
    return DemoResult(mean_jaccard=means, scored=any_summary.n_scored,
                      excluded=any_summary.n_excluded, runs=runs, table=str(table),
                      report={k: str(v) for k, v in paths.items()},
                      seconds=time.perf_counter() - start)
