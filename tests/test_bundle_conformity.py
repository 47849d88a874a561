"""MONAI model-zoo and MONAI Deploy conformity of the bundles: the standard inference keys,
``models/model.pt`` as a state dict of ``network_def``, the zoo's checks (``verify_net_in_out``,
``ckpt_export``), and the contract of MONAI Deploy's bundle inference operator, whose masks
must be ``mmcrf infer``'s voxel for voxel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from PIL import Image

from pipeline.cli import main
from pipeline.data import read_volume, write_cta_phantom
from pipeline.data.phantoms import ensure_demo_data
from pipeline.data.ultrasound import load_ultrasound
from pipeline.inference.frames import FramePredictor
from pipeline.inference.images import predict_image, read_image_array
from pipeline.inference.predictor import TrainedModel
from pipeline.models import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
#: Each bundle's default model file: the one that shares models/model.pt's weights.
DEFAULTS = {"cta_pericardium_crf": "model_axial.pt", "echo_lv_crf": "joint.pt",
            "weizmann_horse_crf": "joint.pt"}
#: The keys the model zoo's contributing guide asks of an inference config (and MONAI
#: Deploy's operator reads: device, inferer, preprocessing, postprocessing).
STANDARD_KEYS = {"bundle_root", "device", "network_def", "inferer", "preprocessing",
                 "postprocessing", "dataset", "evaluator", "output_dir", "handlers"}
#: What MONAI Deploy's MonaiBundleInferenceOperator removes from pre- and postprocessing:
#: it receives images in memory and hands its outputs on.
DISALLOWED = ("LoadImage", "SaveImage")


def _parser(name: str, **overrides) -> ConfigParser:
    bundle = BUNDLES / name
    parser = ConfigParser()
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    parser.parse()
    return parser


def _as_operator(parser: ConfigParser, image, network, *, loaded: bool = True) -> np.ndarray:
    """The bundle run as MONAI Deploy's bundle inference operator runs it: ``device``,
    ``inferer``, ``preprocessing`` and ``postprocessing`` parsed from the config (loading and
    saving transforms removed: ``image`` is already loaded), the first input batched for the
    inferer, the output and the preprocessed inputs (for ``Invertd``) handed to
    postprocessing. ``loaded=False``: ``image`` is a file, which the bundle's own
    ``LoadImaged`` reads (only saving is removed)."""
    device = parser.get_parsed_content("device")
    disallowed = DISALLOWED if loaded else ("SaveImage",)
    stages = []
    for key in ("preprocessing", "postprocessing"):
        compose = parser.get_parsed_content(key)
        compose.transforms = tuple(t for t in compose.transforms
                                   if not any(d in type(t).__name__ for d in disallowed))
        stages.append(compose)
    pre, post = stages
    inputs = pre({"image": image})
    first = inputs.pop("image")
    with torch.no_grad():
        out = parser.get_parsed_content("inferer")(inputs=first[None].to(device),
                                                    network=network)
    inputs["image"] = first
    return np.asarray(post({"pred": out[0], **inputs})["pred"])[0]


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_bundle_has_the_standard_files_and_keys(name):
    bundle = BUNDLES / name
    for rel in ("LICENSE", "configs/metadata.json", "configs/inference.json",
                "docs/data_license.txt", "docs/README.md", "models/model.pt"):
        assert (bundle / rel).is_file(), rel
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert STANDARD_KEYS <= set(config)
    assert any("GraphCutCRFd" in t.get("_target_", "")
               for t in config["postprocessing"]["transforms"])
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    # every required package is one pip can install (mmcrf is installed from this repository)
    assert "mmcrf" not in meta["required_packages_version"]


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_model_pt_is_the_default_models_network_as_a_state_dict(name):
    models = BUNDLES / name / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    network = _parser(name).get_parsed_content("network_def")
    network.load_state_dict(state)  # strict: every key, every shape
    default = torch.load(models / DEFAULTS[name], weights_only=True)
    assert default["model_from"] == "model.pt" and "model" not in default
    shared = load_checkpoint(models / DEFAULTS[name])["model"]
    assert set(shared) == set(state)
    assert all(torch.equal(shared[k], state[k]) for k in state)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_zoo_checks_pass_and_the_torchscript_export_is_the_network(name, tmp_path):
    bundle = BUNDLES / name
    meta, config = bundle / "configs" / "metadata.json", bundle / "configs" / "inference.json"
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config),
                      bundle_root=str(bundle))
    exported = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported),
                ckpt_file=str(bundle / "models" / "model.pt"), meta_file=str(meta),
                config_file=str(config), bundle_root=str(bundle))
    scripted = torch.jit.load(str(exported)).eval()
    network = _parser(name).get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    spec = json.loads(meta.read_text())["network_data_format"]["inputs"]["image"]
    x = torch.rand(2, spec["num_channels"], *spec["spatial_shape"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    return write_cta_phantom(folder, "patient", rng=7, shape=(64, 60, 32))


def test_the_cta_bundle_through_the_deploy_contract_gives_mmcrf_infers_masks(ct_series,
                                                                             tmp_path):
    """On the phantom DICOM series: the phantom model (a mask to compare) with the parsed
    network, and the shipped default model as TorchScript, as MONAI Deploy loads it."""
    bundle = BUNDLES / "cta_pericardium_crf"
    series = ct_series["image"].parent / "dicom"
    volume = read_volume(series)
    phantom = str(bundle / "models" / "phantom_model_{view}.pt")
    cases = [(_parser("cta_pericardium_crf", model_file=phantom), phantom.format(view="axial"),
              None)]
    exported = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported),
                ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"),
                bundle_root=str(bundle))
    cases.append((_parser("cta_pericardium_crf"), str(bundle / "models" / "model_axial.pt"),
                  torch.jit.load(str(exported))))
    for k, (parser, checkpoint, network) in enumerate(cases):
        network = parser.get_parsed_content("network") if network is None else network
        mask = _as_operator(parser, volume, network)
        out = tmp_path / f"infer{k}"
        assert main(["infer", "--model", checkpoint, "--input", str(series), "--output",
                     str(out), "--no-progress"]) == 0
        written = nib.load(next(out.glob("*_mask.nii.gz")))
        assert mask.shape == written.shape == tuple(volume.shape)
        np.testing.assert_array_equal(mask, np.asarray(written.dataobj))
        if k == 0:
            assert 500 < mask.sum() < mask.size // 4  # the phantom model finds the heart


def test_the_standard_evaluator_writes_mmcrf_infers_masks(ct_series, tmp_path):
    """``python -m monai.bundle run evaluating``: MONAI's own evaluator, dataset and
    SaveImaged, on NIfTI inputs; the masks and their grids are ``mmcrf infer``'s."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(ct_series["image"], src / "a.nii.gz")
    write_cta_phantom(tmp_path / "made", "b", rng=8, shape=(48, 44, 24), dicom=False)
    shutil.copy(tmp_path / "made" / "b" / "image.nii.gz", src / "b.nii.gz")
    bundle = BUNDLES / "cta_pericardium_crf"
    phantom = str(bundle / "models" / "phantom_model_{view}.pt")
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "evaluating",
         "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
         "--bundle_root", ".", "--input_dir", str(src), "--output_dir", str(tmp_path / "std"),
         "--model_file", phantom, "--device", "cpu"],
        cwd=bundle, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["infer", "--model", phantom.format(view="axial"), "--input", str(src),
                 "--output", str(tmp_path / "mmcrf"), "--no-progress"]) == 0
    for name in ("a", "b"):
        ours = nib.load(tmp_path / "std" / f"{name}_mask.nii.gz")
        theirs = nib.load(tmp_path / "mmcrf" / f"{name}_mask.nii.gz")
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, nib.load(src / f"{name}.nii.gz").affine,
                                   atol=1e-5)
        assert np.asarray(ours.dataobj).any()


def test_the_photo_and_frame_bundles_through_the_contract_match_mmcrf(tmp_path):
    parser = _parser("weizmann_horse_crf")
    ensure_demo_data("horse_demo", tmp_path / "horse")
    model = TrainedModel.from_checkpoint(BUNDLES / "weizmann_horse_crf" / "models" / "joint.pt")
    photos = sorted((tmp_path / "horse").rglob("rgb/*.jpg"))[:2]
    assert photos
    for photo in photos:
        mask = _as_operator(parser, str(photo), parser.get_parsed_content("network"),
                            loaded=False)
        _, oracle = predict_image(model, read_image_array(photo, "rgb"))
        np.testing.assert_array_equal(mask.T, oracle)  # MONAI's spatial order is (x, y)
    # one 2-D 8-bit NIfTI echo frame (CAMUS stores its frames so), i = column, j = row
    parser = _parser("echo_lv_crf", model_file=str(BUNDLES / "echo_lv_crf" / "models"
                                                   / "phantom_joint.pt"))
    ensure_demo_data("echo_demo", tmp_path / "echo")
    cine = sorted((tmp_path / "echo").rglob("cine.dcm"))[0]
    frame = load_ultrasound(cine)[3].image.astype(np.uint8)  # an 8-bit grey frame, H×W
    path = tmp_path / "frame.nii.gz"
    nib.save(nib.Nifti1Image(frame.T.copy(), np.eye(4)), path)
    mask = _as_operator(parser, str(path), parser.get_parsed_content("network"), loaded=False)
    with FramePredictor(BUNDLES / "echo_lv_crf" / "models" / "phantom_joint.pt") as frames:
        oracle = frames.predict((frame[None] / 255.0).astype(np.float32)).mask[0]
    np.testing.assert_array_equal(mask.T, oracle)
    assert oracle.any()


def _run_evaluating(name: str, *overrides: str, cwd_tmp: Path) -> None:
    """The documented standard command, on a copy of the bundle (nothing written into it)."""
    bundle = cwd_tmp / name
    shutil.copytree(BUNDLES / name, bundle, ignore=shutil.ignore_patterns("demo_data", "eval"))
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
         "configs/inference.json", "--meta_file", "configs/metadata.json", "--device", "cpu",
         *overrides], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_standard_workflow_runs_the_learned_pairwise_model_as_the_default_run_does(
        tmp_path):
    """``run evaluating --model_file models/joint_lp.pt``: network_def takes the boundary
    head, the inferer passes its map on, GraphCutCRFd cuts with it: mmcrf's masks."""
    _run_evaluating("weizmann_horse_crf", "--model_file", "models/joint_lp.pt",
                    "--output_dir", str(tmp_path / "lp"), cwd_tmp=tmp_path)
    bundle = tmp_path / "weizmann_horse_crf"
    photos = sorted((bundle / "demo_data" / "rgb").glob("*.jpg"))
    assert len(list((tmp_path / "lp" / "rgb").glob("*_mask.png"))) == len(photos)
    lp = TrainedModel.from_checkpoint(bundle / "models" / "joint_lp.pt")
    joint = TrainedModel.from_checkpoint(bundle / "models" / "joint.pt")
    assert lp.learned_pairwise
    differs = 0
    for photo in photos[:4]:
        written = np.asarray(Image.open(tmp_path / "lp" / "rgb" / f"{photo.stem}_mask.png"))
        image = read_image_array(photo, "rgb")
        _, oracle = predict_image(lp, image)
        np.testing.assert_array_equal(written, oracle.astype(np.uint8) * 255)
        differs += not np.array_equal(oracle, predict_image(joint, image)[1])
    assert differs > 0  # another model's masks, not joint.pt's


def test_the_documented_standard_commands_of_the_photo_and_frame_bundles(tmp_path):
    # the horse bundle out of the box: its demo photos (the rgb/ sub-folder), 0/255 PNGs
    _run_evaluating("weizmann_horse_crf", cwd_tmp=tmp_path)
    bundle = tmp_path / "weizmann_horse_crf"
    photos = sorted((bundle / "demo_data" / "rgb").glob("*.jpg"))
    model = TrainedModel.from_checkpoint(bundle / "models" / "joint.pt")
    for photo in photos[:2]:
        written = np.asarray(Image.open(bundle / "eval" / "rgb" / f"{photo.stem}_mask.png"))
        _, oracle = predict_image(model, read_image_array(photo, "rgb"))
        np.testing.assert_array_equal(written, oracle.astype(np.uint8) * 255)
    assert len(list((bundle / "eval" / "rgb").glob("*_mask.png"))) == len(photos)
    # the echo bundle on a folder of 2-D 8-bit frame files
    ensure_demo_data("echo_demo", tmp_path / "echo")
    frames = tmp_path / "frames"
    frames.mkdir()
    cine = sorted((tmp_path / "echo").rglob("cine.dcm"))[0]
    images = [f.image.astype(np.uint8) for f in load_ultrasound(cine)[:2]]
    for k, frame in enumerate(images):
        nib.save(nib.Nifti1Image(frame.T.copy(), np.eye(4)), frames / f"f{k}.nii.gz")
    phantom = str(BUNDLES / "echo_lv_crf" / "models" / "phantom_joint.pt")
    _run_evaluating("echo_lv_crf", "--input_dir", str(frames), "--output_dir",
                    str(tmp_path / "lv"), "--model_file", phantom, cwd_tmp=tmp_path)
    with FramePredictor(phantom) as predictor:
        for k, frame in enumerate(images):
            written = nib.load(tmp_path / "lv" / f"f{k}_mask.nii.gz")
            oracle = predictor.predict((frame[None] / 255.0).astype(np.float32)).mask[0]
            np.testing.assert_array_equal(np.asarray(written.dataobj).T, oracle)
            np.testing.assert_allclose(written.affine, np.eye(4))
