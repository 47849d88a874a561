"""MONAI bundles: metadata against the spec's mandatory keys, and every documented command
run for real (MONAI's bundle runner, torchrun, ckpt_export, verify_metadata) on tiny data."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from pipeline.models import load_checkpoint, load_network_weights

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))
SCHEMA = REPO / "bundles" / "schema" / "metadata_schema.json"
MANDATORY = {"version": str, "changelog": dict, "monai_version": str, "pytorch_version": str,
             "numpy_version": str, "required_packages_version": dict, "task": str,
             "description": str, "authors": str, "copyright": str, "network_data_format": dict}
TENSOR_KEYS = {"type": str, "format": str, "num_channels": int, "spatial_shape": list,
               "dtype": str, "value_range": list, "is_patch_data": bool, "channel_def": dict}


def test_there_are_bundles_to_check():
    names = {b.name for b in BUNDLES}
    assert names == {"cta_pericardium_crf", "echo_lv_crf", "weizmann_horse_crf"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_has_the_specs_mandatory_keys_and_types(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key, kind in MANDATORY.items():
        assert isinstance(meta.get(key), kind), f"{bundle.name}: {key} must be a {kind.__name__}"
    for side in ("inputs", "outputs"):
        tensors = meta["network_data_format"][side]
        assert tensors, f"{bundle.name}: network_data_format.{side} is empty"
        for name, spec in tensors.items():
            for key, kind in TENSOR_KEYS.items():
                assert isinstance(spec.get(key), kind), f"{bundle.name}: {side}.{name}.{key}"
    assert "not for clinical use" in meta["description"].lower()
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    for name in ("LICENSE", "docs/README.md", "configs/train.json", "configs/evaluate.json",
                 "configs/inference.json", "configs/multi_gpu_train.json",
                 "configs/multi_gpu_evaluate.json", "configs/logging.conf"):
        assert (bundle / name).is_file(), f"{bundle.name} lacks {name}"
    assert (bundle / "docs" / "data_license.txt").is_file(), f"{bundle.name}: data licence"
    models = list((bundle / "models").glob("*.pt"))
    assert models, f"{bundle.name} ships no model"
    large = _large_files(bundle)
    for model in models:  # the model zoo's limit, and loadable without unpickling
        rel = model.relative_to(bundle).as_posix()
        if model.stat().st_size > 25 * 2**20:  # only listed, hashed, half-precision files
            assert model.stat().st_size <= 40 * 2**20, rel
            assert large.get(rel) == hashlib.sha256(model.read_bytes()).hexdigest(), rel
        if model.name == "model.pt":  # the zoo's file: network_def's state dict alone
            assert load_network_weights(model), rel
            continue
        payload = load_checkpoint(model)  # weights only; a shared network is resolved
        assert "model" in payload, rel
    for rel in large:
        assert (bundle / rel).is_file(), f"{bundle.name}: large_files.yml lists {rel}"


def _large_files(bundle: Path) -> dict[str, str]:
    """path → sha256 of a bundle's ``large_files.yml`` (the model zoo's layout)."""
    path = bundle / "large_files.yml"
    if not path.is_file():
        return {}
    entries = yaml.safe_load(path.read_text())["large_files"]
    assert all(e["hash_type"] == "sha256" for e in entries)
    return {e["path"]: e["hash_val"] for e in entries}


def _monai_bundle(bundle_dir: Path, *args: str, torchrun: bool = False):
    python = Path(sys.executable)
    cmd = ([str(python.parent / "torchrun"), "--standalone", "--nnodes=1", "--nproc_per_node=2"]
           if torchrun else [str(python)]) + ["-m", "monai.bundle", *args]
    proc = subprocess.run(cmd, cwd=bundle_dir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (" ".join(cmd)) + "\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _copy(name: str, tmp_path_factory) -> Path:
    """A working copy of a bundle (commands write runs/, demo_data/ beside configs)."""
    dst = tmp_path_factory.mktemp("bundle") / name
    shutil.copytree(REPO / "bundles" / name, dst,
                    ignore=shutil.ignore_patterns("runs*", "demo_data", "eval", "*.ts"))
    return dst


@pytest.fixture(scope="module")
def cta_bundle(tmp_path_factory):
    return _copy("cta_pericardium_crf", tmp_path_factory)


@pytest.fixture(scope="module")
def echo_bundle(tmp_path_factory):
    return _copy("echo_lv_crf", tmp_path_factory)


@pytest.mark.slow
def test_train_all_stages_then_evaluate(cta_bundle):
    tiny = ("--size", "32", "--epochs", "1")
    _monai_bundle(cta_bundle, "run", "--config_file", "configs/train.json", *tiny)
    assert (cta_bundle / "runs" / "cnn" / "best.pt").is_file()
    _monai_bundle(cta_bundle, "run", "--config_file", "configs/train.json", "--mode",
                  "piecewise", "--size", "32")
    _monai_bundle(cta_bundle, "run", "--config_file", "configs/train.json", "--mode", "joint",
                  *tiny)
    payload = torch.load(cta_bundle / "runs" / "joint" / "last.pt", weights_only=True)
    assert payload["crf"] is not None and payload["mode"] == "joint"
    _monai_bundle(cta_bundle, "run", "--config_file",
                  "['configs/train.json','configs/evaluate.json']", "--size", "32")
    table = (cta_bundle / "runs" / "evaluation.csv").read_text()
    assert all(f",{m}," in table for m in ("cnn", "piecewise", "joint"))
    assert "data:image/png;base64," in (cta_bundle / "runs" / "report" / "report.html"
                                        ).read_text()
    # under torchrun rank 0 evaluates alone while rank 1 leaves at once: same table, no abort
    (cta_bundle / "runs" / "evaluation.csv").unlink()
    _monai_bundle(cta_bundle, "run", "--config_file",
                  "['configs/train.json','configs/evaluate.json',"
                  "'configs/multi_gpu_evaluate.json']", "--size", "32", torchrun=True)
    assert (cta_bundle / "runs" / "evaluation.csv").read_text() == table


@pytest.mark.slow
def test_multi_gpu_config_trains_with_two_gloo_processes(cta_bundle):
    proc = _monai_bundle(cta_bundle, "run", "--config_file",
                         "['configs/train.json','configs/multi_gpu_train.json']", "--size", "32",
                         "--epochs", "6", "--output_dir", "runs_ddp", torchrun=True)
    assert proc.stdout.count("best checkpoint:") == 1  # said by rank 0 only
    log = list(csv.DictReader((cta_bundle / "runs_ddp" / "cnn" / "log.csv").open()))
    assert len(log) == 6  # six epochs, logged once (rank 0 only)
    # the batch is global (each rank takes half), so two processes learn as fast per epoch
    # as one does; with per-rank batches the curve stayed near 0 for these six epochs
    assert max(float(r["val_jaccard_cnn"]) for r in log) > 0.1


def test_inference_writes_masks_on_the_inputs_grid(cta_bundle, tmp_path):
    from pipeline.data import write_cta_phantom

    for folder in ("a", "b"):  # same file name in two folders: no collision
        write_cta_phantom(tmp_path / "in", folder, rng=3, dicom=False)
    proc = _monai_bundle(cta_bundle, "run", "--config_file", "configs/inference.json",
                         "--input_dir", str(tmp_path / "in"), "--output_dir",
                         str(tmp_path / "out"))
    assert "cases: 2" in proc.stdout  # the label files are excluded by default
    for folder in ("a", "b"):
        out = nib.load(tmp_path / "out" / folder / "image_mask.nii.gz")
        ref = nib.load(tmp_path / "in" / folder / "image.nii.gz")
        assert out.shape == ref.shape
        assert abs(out.affine - ref.affine).max() < 1e-5
        assert out.get_fdata().sum() > 0
    # the three views' phantom-trained models (models/phantom_model_{view}.pt, kept for the
    # phantoms: the default models are trained on real CT), fused, then one 3-D graph cut
    proc = _monai_bundle(cta_bundle, "run", "--config_file", "configs/inference.json",
                         "--input_dir", str(tmp_path / "in" / "a"), "--output_dir",
                         str(tmp_path / "out3d"), "--view", "all", "--crf_3d", "True",
                         "--model_file", "$@bundle_root + '/models/phantom_model_{view}.pt'")
    assert "cases: 1" in proc.stdout
    out = nib.load(tmp_path / "out3d" / "image_mask.nii.gz")
    ref = nib.load(tmp_path / "in" / "a" / "image.nii.gz")
    assert out.shape == ref.shape and abs(out.affine - ref.affine).max() < 1e-5
    truth = nib.load(tmp_path / "in" / "a" / "label.nii.gz").get_fdata() > 0
    mask = out.get_fdata() > 0
    assert (mask & truth).sum() / (mask | truth).sum() > 0.5  # the phantom models find it


def test_the_cta_models_are_trained_on_real_ct_and_say_so(cta_bundle):
    """The default models (models/model_{view}.pt) record the real heart CT they were
    trained on, the range of heart volumes they saw, and the metadata their held-out scores."""
    from pipeline.models import load_checkpoint

    meta = json.loads((cta_bundle / "configs" / "metadata.json").read_text())
    for view in ("axial", "coronal", "sagittal"):
        config = load_checkpoint(cta_bundle / "models" / f"model_{view}.pt")["config"]
        assert config["data"]["kind"] == "cta" and config["data"]["view"] == view
        assert config["data"]["manifest"].endswith("ct_heart.json")
        low, high = config["data"]["training_foreground_ml"]
        assert 600 < low <= high < 750  # the one heart, 669 mL
        score = meta["eval_metrics"][f"mean_jaccard_{view}_heart_ct_heldout_piecewise"]
        assert 0.6 < score < 0.9
        phantom = load_checkpoint(cta_bundle / "models" / f"phantom_model_{view}.pt")
        assert phantom["config"]["data"]["kind"] == "demo"
    assert "one patient" in meta["data_source"] and "TotalSegmentator" in meta["data_source"]


@pytest.mark.parametrize(("name", "variant", "shape"), [
    ("cta_pericardium_crf", "model_coronal", "[1, 1, 96, 96]"),
    ("echo_lv_crf", "cnn", "[1, 1, 160, 160]"),
    ("weizmann_horse_crf", "piecewise", "[1, 3, 192, 192]")])
def test_checkpoint_exports_to_torchscript(name, variant, shape, tmp_path):
    """The documented export of another variant than the default: an mmcrf checkpoint whose
    weights sit under its ``model`` key (traced). The horse bundle runs the documented
    command line; the others call MONAI's ``ckpt_export`` in this process (same arguments,
    without a Python start-up each). The default model's export (models/model.pt, scripted)
    runs in tests/test_bundle_conformity.py."""
    from monai.bundle import ckpt_export

    bundle = REPO / "bundles" / name
    exported = tmp_path / f"{variant}.ts"
    args = {"filepath": str(exported), "ckpt_file": str(bundle / "models" / f"{variant}.pt"),
            "meta_file": str(bundle / "configs" / "metadata.json"),
            "config_file": str(bundle / "configs" / "inference.json"), "key_in_ckpt": "model"}
    if name == "weizmann_horse_crf":
        _monai_bundle(bundle, "ckpt_export", "network_def",
                      *(x for k, v in args.items() for x in (f"--{k}", v)),
                      "--use_trace", "True", "--input_shape", shape)
    else:
        ckpt_export(net_id="network_def", use_trace=True, input_shape=json.loads(shape),
                    bundle_root=str(bundle), **args)
    x = torch.rand(*json.loads(shape))
    scripted = torch.jit.load(exported)
    assert scripted(x).shape == (1, 1, *x.shape[2:])
    assert (name in ("cta_pericardium_crf", "echo_lv_crf")) == (x.shape[1] == 1)


@pytest.mark.parametrize("name", [b.name for b in BUNDLES])
def test_verify_metadata_with_the_schema_on_disk(name, tmp_path):
    """MONAI's verify_metadata against the schema on disk, in this process; a metadata file
    the schema refuses fails the command line (checked once: the refusal is the schema's, the
    same for every bundle)."""
    from monai.bundle import verify_metadata

    meta = REPO / "bundles" / name / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(SCHEMA))  # raises on any error
    if name != "cta_pericardium_crf":
        return
    bad = json.loads(meta.read_text())
    del bad["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    python = Path(sys.executable)
    proc = subprocess.run([str(python), "-m", "monai.bundle", "verify_metadata", "--meta_file",
                           str(tmp_path / "bad.json"), "--filepath", str(SCHEMA)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "num_channels" in proc.stdout + proc.stderr
    with pytest.raises(Exception, match="num_channels"):
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(SCHEMA))


def test_echo_bundle_segments_its_demo_cine_loops_out_of_the_box(echo_bundle):
    from pipeline.data.ultrasound import load_ultrasound

    proc = _monai_bundle(echo_bundle, "run", "--config_file", "configs/inference.json")
    assert "cases: 8" in proc.stdout  # 8 cine loops; their *_mask files are skipped
    ious = []
    for case in sorted((echo_bundle / "demo_data").glob("echo_*")):
        frames = load_ultrasound(case / "cine.dcm", case / "cine_mask.nii.gz")
        predicted = load_ultrasound(echo_bundle / "eval" / case.name / "cine_mask.nii.gz")
        assert len(predicted) == len(frames) == 12
        for truth, pred in zip(frames, predicted, strict=True):
            assert pred.image.shape == truth.mask.shape == (96, 96)
            inter = np.logical_and(pred.image > 0, truth.mask > 0).sum()
            ious.append(inter / np.logical_or(pred.image > 0, truth.mask > 0).sum())
    assert np.mean(ious) > 0.6  # the shipped weights find the cavity, frame by frame


@pytest.mark.slow
def test_echo_bundle_trains_all_stages_then_evaluates(echo_bundle):
    tiny = ("--size", "32", "--epochs", "1")
    for mode in ("cnn", "piecewise", "joint"):
        _monai_bundle(echo_bundle, "run", "--config_file", "configs/train.json", "--mode",
                      mode, *tiny)
    payload = torch.load(echo_bundle / "runs" / "joint" / "last.pt", weights_only=True)
    assert payload["crf"] is not None and payload["config"]["data"]["kind"] == "echo_demo"
    _monai_bundle(echo_bundle, "run", "--config_file",
                  "['configs/train.json','configs/evaluate.json']", "--size", "32")
    with (echo_bundle / "runs" / "evaluation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["view"] for r in rows} == {"echo"}
    assert len(rows) == 3 * 24  # three methods x 2 validation loops x 12 frames


@pytest.mark.slow
def test_echo_multi_gpu_config_trains_with_two_gloo_processes(echo_bundle):
    _monai_bundle(echo_bundle, "run", "--config_file",
                  "['configs/train.json','configs/multi_gpu_train.json']", "--size", "32",
                  "--epochs", "1", "--output_dir", "runs_ddp", torchrun=True)
    log = (echo_bundle / "runs_ddp" / "cnn" / "log.csv").read_text().splitlines()
    assert len(log) == 2


@pytest.fixture(scope="module")
def horse_bundle(tmp_path_factory):
    return _copy("weizmann_horse_crf", tmp_path_factory)


@pytest.mark.slow
def test_horse_bundle_runs_out_of_the_box(horse_bundle):
    proc = _monai_bundle(horse_bundle, "run", "--config_file", "configs/inference.json")
    assert "images: 16" in proc.stdout
    masks = sorted((horse_bundle / "eval").glob("*.png"))
    assert len(masks) == 16
    tiny = ("--size", "32", "--epochs", "1")
    for mode in ("cnn", "piecewise", "joint"):
        # the joint stage with the bundle's learned-pairwise setting (the echo bundle's test
        # trains the plain one): the boundary head grows onto the piecewise network
        extra = ("--learned_pairwise", "True", "--boundary_lr", "0.01", "--boundary_weight",
                 "0.5") if mode == "joint" else ()
        _monai_bundle(horse_bundle, "run", "--config_file", "configs/train.json", "--mode",
                      mode, *tiny, *extra)
    payload = torch.load(horse_bundle / "runs" / "joint" / "last.pt", weights_only=True)
    assert payload["network"]["in_channels"] == 3 and payload["crf"] is not None
    assert payload["network"]["boundary_head"] is True and len(payload["crf"]) == 4
    assert payload["config"]["boundary_lr"] == 0.01
    assert payload["config"]["boundary_weight"] == 0.5
    _monai_bundle(horse_bundle, "run", "--config_file",
                  "['configs/train.json','configs/evaluate.json']", "--size", "32")
    with (horse_bundle / "runs" / "evaluation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"cnn", "piecewise", "joint"}


def test_horse_bundle_segments_with_its_learned_pairwise_model_on_request(horse_bundle,
                                                                        tmp_path):
    """models/joint_lp.pt through the bundle's default run: masks of every demo image, and
    not joint.pt's masks (another network, with the boundary map in the cut)."""
    from PIL import Image

    outputs = {}
    for name in ("joint", "joint_lp"):
        out = tmp_path / name
        proc = _monai_bundle(horse_bundle, "run", "--config_file", "configs/inference.json",
                             "--model_file", f"models/{name}.pt", "--output_dir", str(out))
        assert "images: 16" in proc.stdout
        outputs[name] = {m.name: np.asarray(Image.open(m)) for m in sorted(out.glob("*.png"))}
    assert len(outputs["joint_lp"]) == 16 and outputs["joint_lp"].keys() == outputs["joint"].keys()
    for mask in outputs["joint_lp"].values():
        assert set(np.unique(mask)) <= {0, 255}
    assert any(not np.array_equal(outputs["joint"][k], m) for k, m in outputs["joint_lp"].items())


def test_horse_models_score_any_weizmann_style_folder(horse_bundle, tmp_path):
    from pipeline.data.phantoms import write_horse_like_set

    images = write_horse_like_set(tmp_path / "photos", n_training=3, n_validation=1, seed=9)
    exe = Path(sys.executable).parent / "mmcrf"
    proc = subprocess.run([str(exe), "evaluate", "--model", str(horse_bundle), "--images",
                           str(images), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "out" / "per_image.csv").read_text().splitlines()
    assert table[0].startswith("image,method,jaccard")
    assert len(table) == 1 + 4 * 4  # four images x cnn, piecewise, joint, joint_lp
    for method in ("cnn", "piecewise", "joint", "joint_lp"):
        assert len(list((tmp_path / "out" / method).glob("*.png"))) == 4


def test_model_file_view_template_leaves_other_braces_alone():
    from pipeline.bundle import _model_for_view

    assert _model_for_view("models/model_{view}.pt", "coronal") == "models/model_coronal.pt"
    # str.format would fail (KeyError) or mangle these paths
    assert _model_for_view("/data/{site}/model_{view}.pt", "axial") == \
        "/data/{site}/model_axial.pt"
    assert _model_for_view("/data/{}/model.pt", "axial") == "/data/{}/model.pt"
