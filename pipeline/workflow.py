"""The workflows the CLI, the bundles and the demo share: train a stage, evaluate and report."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import distributed
from pipeline.data.cta import CTA_HU_WINDOW
from pipeline.data.phantoms import GENERATED_KINDS, ensure_demo_data
from pipeline.data.samples import training_foreground_ml, training_sets
from pipeline.engines import DEFAULT_CONFIG, TrainConfig, TrainResult, train

__all__ = ["StageRun", "data_settings", "evaluate_and_report", "input_channels",
           "stage_config", "stage_samples", "train_stage"]


def input_channels(kind: str, colour: str = "rgb") -> int:
    """Channels of a data kind's images: 3 for colour horse photographs, else 1."""
    return 3 if kind in ("horse", "horse_demo") and colour == "rgb" else 1


def data_settings(kind: str, *, view: str = "axial", size: int = 64, colour: str = "rgb",
                  camus: Mapping[str, Sequence] | None = None) -> dict[str, Any]:
    """The ``data`` block a checkpoint records, so inference prepares images the same way.

    Args:
        kind: the data kind (:data:`pipeline.data.samples.DATA_KINDS`).
        view: the CTA view (``echo`` for the echo phantoms).
        size: side of the square training images.
        colour: horse images in ``rgb`` or ``gray``.
        camus: the CAMUS selection (``views``, ``phases``, ``labels``[, ``drop_strays``]),
            for ``camus``.

    Returns:
        ``{"kind", "view", "size", "colour", "hu_window"[, "camus"]}``.
    """
    data = {"kind": kind, "view": view, "size": size, "colour": colour,
            "hu_window": list(CTA_HU_WINDOW)}
    if camus is not None:
        data["camus"] = {k: list(v) if isinstance(v, (list, tuple)) else v
                         for k, v in camus.items()}
    return data


def stage_config(preset: str | os.PathLike | None, *, data: Mapping[str, Any],
                 weights: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A stage's settings: a preset (a JSON file or a packaged preset's name, default ``cpu``)
    with overrides, the input channels of the data kind, an optional pretrained VGG16 file and
    the data block.

    Raises:
        ValueError: an unreadable preset or a bad setting.
    """
    config = TrainConfig.from_json(preset or DEFAULT_CONFIG, **overrides)
    config.network = {**config.network,
                      "in_channels": input_channels(data["kind"], data.get("colour", "rgb"))}
    if weights is not None:
        config.network["weights"] = str(Path(weights).resolve())
    config.data = dict(data)
    return config


def stage_samples(data: Mapping[str, Any], *, root: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None) -> tuple[list[dict], list[dict]]:
    """(training, validation) samples of a ``data`` block (:func:`data_settings`); generated
    kinds are written to ``root`` first (rank 0 writes, the others wait)."""
    if data["kind"] in GENERATED_KINDS:
        distributed.main_rank_first(ensure_demo_data, data["kind"], root)
    return training_sets(data["kind"], root=root, manifest=manifest,
                         view=data.get("view", "axial"), size=data.get("size", 64),
                         colour=data.get("colour", "rgb"), camus=data.get("camus"))


@dataclass
class StageRun:
    """A trained stage and the sizes of the sets it saw."""

    result: TrainResult
    n_train: int
    n_val: int


def train_stage(config: TrainConfig, out: str | os.PathLike, *,
                root: str | os.PathLike | None = None,
                manifest: str | os.PathLike | None = None,
                init: str | os.PathLike | None = None, resume: bool = False,
                progress: bool = False,
                samples: tuple[list[dict], list[dict]] | None = None,
                log=None) -> StageRun:
    """Trains one stage on the data its config's ``data`` block names.

    Generated kinds are written to ``root`` first (rank 0 writes, the others wait).

    Args:
        config: the stage's settings (see :func:`stage_config`).
        out: the run folder.
        root: data root.
        manifest: manifest of volumes (``cta``).
        init: checkpoint to start from.
        resume: continue from ``out/last.pt``.
        progress: progress bar.
        samples: (training, validation) samples already made (the demo reuses them).
        log: called with a line saying what trains on what (rank 0 only).

    Returns:
        The stage's result and set sizes.
    """
    data = config.data
    if samples is None:
        samples = stage_samples(data, root=root, manifest=manifest)
    if manifest is not None and "manifest" not in data:  # what the model was trained on
        from pipeline.data.manifests import manifest_hash

        data = {**data, "manifest": Path(manifest).name,
                "manifest_sha256": manifest_hash(manifest)}
    if "training_foreground_ml" not in data:  # recorded for inference's volume warning
        seen = training_foreground_ml(data["kind"], root=root, manifest=manifest)
        if seen is not None:
            data = {**data, "training_foreground_ml": seen}
    config.data = data
    train_set, val_set = samples
    if log is not None and distributed.is_main():
        log(f"{config.mode} on {len(train_set)} training / {len(val_set)} validation images "
            f"({data['kind']}, {data.get('size')}x{data.get('size')}) -> {out}")
    result = train(config, train_set, val_set, out, init=init, resume=resume,
                   progress=progress)
    return StageRun(result, len(train_set), len(val_set))


def evaluate_and_report(groups: Sequence[tuple[Mapping[str, str | os.PathLike],
                                               Sequence[Mapping]]],
                        out_dir: str | os.PathLike, *, training_log=None,
                        provenance: Mapping[str, Any] | None = None, title: str,
                        examples: bool = False, progress: bool = False,
                        device: str = "cpu") -> dict[str, Any]:
    """Scores runs image by image into one ``<out_dir>/evaluation.csv`` and writes one
    report (``<out_dir>/report/``), with qualitative figures (and ``examples.npz``) when
    ``examples``.

    Args:
        groups: (method → checkpoint, samples) pairs, e.g. one per view, each with its own
            models.
        out_dir: where the table, the examples and the report go.
        training_log: a run's ``log.csv`` for the curves (skipped where missing).
        provenance: settings recorded in the report.
        title: the report's title.
        examples: pick best/median/worst images by the joint (else last) method.
        progress: progress bars.
        device: where the CNN runs (:func:`pipeline.distributed.resolve_device`).

    Returns:
        ``{"table": path, "report": Report, "examples": QualitativeCases | None, **paths}``.
    """
    from pipeline.evaluation.examples import QualitativeCases
    from pipeline.evaluation.runs import evaluate_runs, evaluate_runs_with_examples
    from pipeline.evaluation.tables import (
        read_table_provenance,
        write_eval_table,
        write_table_provenance,
    )
    from pipeline.reports import build_report, qualitative_figures, write_report

    out = Path(out_dir)
    rows: list[dict] = []
    picked: list = []
    for runs, samples in groups:
        if examples:
            evaluation = evaluate_runs_with_examples(runs, samples, progress=progress,
                                                     device=device)
            rows.extend(evaluation.rows)
            picked.extend(evaluation.examples.cases)
        else:
            rows.extend(evaluate_runs(runs, samples, progress=progress, device=device))
    table = write_eval_table(rows, out / "evaluation.csv")
    cases = None
    if examples:
        methods = list(groups[0][0]) if groups else []
        cases = QualitativeCases(method="joint" if "joint" in methods else methods[-1],
                                 cases=picked)
        cases.save(out / "examples.npz")
    log = Path(training_log) if training_log is not None else None
    write_table_provenance(table, {m: p for runs, _ in groups for m, p in runs.items()})
    report = build_report([table], training_log=log if log is not None and log.is_file()
                          else None, figures=qualitative_figures(cases) if cases else [],
                          provenance={**(provenance or {}), **read_table_provenance([table])},
                          title=title)
    return {"table": table, "report": report, "examples": cases,
            **write_report(report, out / "report")}
