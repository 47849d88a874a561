"""Tiny CNN + piecewise-CRF checkpoints trained in seconds on phantom volumes, for tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.data.manifests import build_manifest, manifest_entries
from pipeline.data.phantoms import write_cta_cohort
from pipeline.data.samples import cta_samples
from pipeline.engines import TrainConfig, train
from pipeline.models import load_checkpoint, save_checkpoint
from tests.test_engines_training import TINY_NET


def tiny_cta_model(root: Path, shape: Sequence[int], views: Sequence[str] = ("axial",)) -> Path:
    """Trains a tiny CNN (6 epochs) and its piecewise CRF on 32×32 slices of the given views
    of the phantom cohort written under ``root``; returns the CRF run's checkpoint."""
    write_cta_cohort(root / "data", shape=tuple(shape))
    manifest = build_manifest(root / "data", fractions=(1, 0, 0))
    entries = manifest_entries(manifest, root / "data", ["training"])
    samples = [s for view in views for s in cta_samples(entries, view, size=32)]
    data = {"kind": "cta", "size": 32, "hu_window": [-200.0, 800.0]}
    cnn = train(TrainConfig(mode="cnn", epochs=6, batch_size=8, lr=1e-2, network=TINY_NET,
                            data=data), samples, [], root / "cnn")
    crf = train(TrainConfig(mode="piecewise", C=10.0, network=TINY_NET, data=data),
                samples[::4], [], root / "piecewise", init=cnn.last_checkpoint)
    return crf.last_checkpoint


def with_config(checkpoint: Path, path: Path, **changes: dict) -> Path:
    """A copy of a checkpoint whose config's data/network dicts are updated."""
    payload = load_checkpoint(checkpoint)
    config = dict(payload["config"])
    for key, value in changes.items():
        config[key] = {**(config.get(key) or {}), **value}
    return save_checkpoint({k: v for k, v in payload.items() if k != "format"} |
                           {"config": config}, path)


def colour_checkpoint(model: Path, path: Path, **network: object) -> Path:
    """An untrained tiny FCN-8s with ``model``'s config, built from TINY_NET without its
    ``in_channels`` (so FCN-8s's default, 3 colour channels) updated by ``network``."""
    from pipeline.models import build_model

    spec = {k: v for k, v in TINY_NET.items() if k != "in_channels"} | network
    payload = load_checkpoint(model)
    return save_checkpoint({k: v for k, v in payload.items() if k not in ("format", "crf")} |
                           {"network": spec, "model": build_model(spec).state_dict(),
                            "crf": None}, path)


def tiny_horse_bundle(tmp_path_factory) -> Path:
    """A folder with models/cnn.pt and models/joint.pt trained in seconds on a tiny
    horse-like set (3-channel images, 32×32)."""
    import json

    from pipeline.data.samples import horse_samples
    from pipeline.models import export_model
    from tests.test_data_horse import SPLIT, _make_horse

    rgb_net = {**TINY_NET, "in_channels": 3}
    root = tmp_path_factory.mktemp("horse") / "train"
    for seed, name in enumerate([*SPLIT["training"], *SPLIT["validation"]], start=1):
        _make_horse(root, name, seed)
    (root / "split.json").write_text(json.dumps(SPLIT))
    samples = horse_samples(root, "training", size=32)
    data = {"kind": "horse", "size": 32}
    runs = tmp_path_factory.mktemp("runs")
    cnn = train(TrainConfig(mode="cnn", epochs=8, batch_size=2, lr=1e-2, network=rgb_net,
                            data=data), samples, [], runs / "cnn")
    pw = train(TrainConfig(mode="piecewise", C=10.0, network=rgb_net, data=data), samples,
               [], runs / "piecewise", init=cnn.last_checkpoint)
    joint = train(TrainConfig(mode="joint", epochs=1, batch_size=2, network=rgb_net,
                              data=data), samples, [], runs / "joint", init=pw.last_checkpoint)
    folder = tmp_path_factory.mktemp("bundle")
    export_model(cnn.last_checkpoint, folder / "models" / "cnn.pt")
    export_model(joint.last_checkpoint, folder / "models" / "joint.pt")
    return folder
