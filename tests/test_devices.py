"""Where the CNN runs: --device parsing (CUDA paths exercised on CPU by faking the GPUs),
checkpoints loaded on the CPU first, and test-time flips."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.cli import main
from pipeline.data import write_cta_phantom
from pipeline.distributed import resolve_device
from pipeline.models import TTA_FLIPS, build_model, predict_probabilities, training_flips
from tests._tiny_models import with_config
from tests.test_engines_training import TINY_NET

SHAPE = (40, 36, 24)


def test_device_settings_resolve_here_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            resolve_device(spec)
    for spec, message in (("gpu", "must be auto, cpu, cuda or cuda:N"),
                          ("cuda:x", "GPU index must be a number")):
        with pytest.raises(ValueError, match=message):
            resolve_device(spec)


def test_each_torchrun_rank_takes_its_local_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="this machine has 2 GPU"):
        resolve_device("cuda:2")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_test_time_flips_average_the_flipped_predictions():
    torch.manual_seed(0)
    model = build_model(TINY_NET).eval()
    images = torch.rand(3, 1, 32, 32)
    plain = predict_probabilities(model, images)
    averaged = predict_probabilities(model, images, flips=TTA_FLIPS)
    oracle = torch.zeros_like(plain)
    for dims in TTA_FLIPS:  # by hand: flip, predict, flip back
        x = torch.flip(images, dims) if dims else images
        p = predict_probabilities(model, x)
        oracle += torch.flip(p, dims) if dims else p
    torch.testing.assert_close(averaged, oracle / len(TTA_FLIPS))
    assert not torch.allclose(averaged, plain)  # the flips do change the average


def test_test_time_flips_are_those_of_the_training_augmentation():
    assert training_flips({"augment": {"hflip": 0.5, "vflip": 0.0}}) == ((), (-1,))
    assert training_flips({"augment": {"hflip": 0.0, "vflip": 0.2}}) == ((), (-2,))
    assert training_flips({"augment": {"hflip": 0.5, "vflip": 0.5}}) == TTA_FLIPS
    assert training_flips({"augment": False}) == training_flips({}) == ((),)


@pytest.fixture(scope="module")
def model(cta_model_three_views):
    return cta_model_three_views


def test_infer_takes_device_and_flips_and_records_them(model, tmp_path, capsys):
    case = write_cta_phantom(tmp_path / "src", "p", rng=3, shape=SHAPE, dicom=False)
    (tmp_path / "in").mkdir()
    shutil.copy(case["image"], tmp_path / "in" / "ct.nii.gz")
    args = ["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--model", str(model), "--no-progress"]
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main([*args, "--tta"]) == 2  # trained without flips: refused, naming the model
    assert "trained without flips" in capsys.readouterr().err
    flipped = with_config(model, tmp_path / "flipped.pt", augment={"hflip": 0.5})
    args[args.index(str(model))] = str(flipped)
    assert main([*args, "--device", "cpu", "--tta"]) == 0
    sidecar = (tmp_path / "out" / "ct_mask.json").read_text()
    assert '"tta": "flips"' in sidecar
    # masks made with flips are not taken for masks made without them
    assert main(args) == 1
    assert "made by another model" in capsys.readouterr().err
