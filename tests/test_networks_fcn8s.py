"""FCN-8s: output geometry and alignment, initialisation, export, VGG16 weight loading."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.networks import (
    FCN8s,
    bilinear_kernel,
    count_parameters,
    load_vgg16_weights,
    min_padding,
)
from pipeline.networks.fcn8s import _load_vgg16_state_dict

TINY = 1 / 64  # VGG widths 1/2/4/8/8, fc 64: the geometry of the real network, at no cost
SMALL = 1 / 16  # 4/8/16/32/32, fc 256

_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _blocks(model: FCN8s) -> list[nn.Sequential]:
    return [model.block1, model.block2, model.block3, model.block4, model.block5]


def _vgg16_shapes(width: float = 1.0) -> dict[str, tuple[int, ...]]:
    """torchvision ``vgg16().state_dict()`` names and shapes, channels scaled by ``width``."""
    chans = [3] + [max(1, round(c * width)) for c in _VGG_CHANNELS]
    fc = max(1, round(4096 * width))
    shapes: dict[str, tuple[int, ...]] = {}
    for n, index in enumerate(_CONV_INDICES):
        shapes[f"features.{index}.weight"] = (chans[n + 1], chans[n], 3, 3)
        shapes[f"features.{index}.bias"] = (chans[n + 1],)
    shapes |= {
        "classifier.0.weight": (fc, chans[-1] * 7 * 7), "classifier.0.bias": (fc,),
        "classifier.3.weight": (fc, fc), "classifier.3.bias": (fc,),
        "classifier.6.weight": (1000, fc), "classifier.6.bias": (1000,),
    }
    return shapes


@pytest.fixture(scope="module")
def paper_vgg16_file(tmp_path_factory) -> tuple:
    """A full-size torchvision VGG16 state dict whose tensors are stride-0 expansions of one
    distinct value each: the real names and shapes in a 10 kB file."""
    shapes = _vgg16_shapes()
    state = {k: torch.full((), float(n)).expand(s) for n, (k, s) in enumerate(shapes.items())}
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path, state


def _linearise(model: FCN8s) -> FCN8s:
    """Make every layer pass a linear ramp through unchanged, so the output shows the geometry:
    centre-tap convolutions averaging the input channels, average instead of max pooling (same
    2×2, stride 2, ceil mode), score layers likewise; the upsamplers stay bilinear."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
                c = m.kernel_size[0] // 2
                m.weight[:, :, c, c] = 1.0 / m.in_channels
    for block in _blocks(model):
        assert isinstance(block[-1], nn.MaxPool2d)
        block[-1] = nn.AvgPool2d(2, stride=2, ceil_mode=True)
    return model.eval()


@pytest.mark.parametrize("size", [(32, 32), (33, 33), (47, 61), (61, 47), (100, 100), (32, 97)])
@pytest.mark.parametrize("fc_kernel", [3, 7])
def test_output_has_the_input_size(size, fc_kernel):
    model = FCN8s(3, 1, width=SMALL, fc_kernel=fc_kernel).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("in_channels", "out_channels"), [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_channels(in_channels, out_channels):
    model = FCN8s.lite(in_channels, out_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(1, in_channels, 47, 61))
    assert out.shape == (1, out_channels, 47, 61)


@pytest.mark.parametrize("fc_kernel", [3, 7])
def test_every_size_from_32_to_96(fc_kernel):
    model = FCN8s(1, 1, width=TINY, fc_kernel=fc_kernel, padding=min_padding(fc_kernel)).eval()
    with torch.no_grad():
        for h in range(32, 97):
            w = 32 + (7 * h) % 65  # the widths cover 32..96 too, in another order
            assert model(torch.zeros(1, 1, h, w)).shape == (1, 1, h, w)


@pytest.mark.parametrize("size", [(31, 64), (64, 31), (8, 8)])
def test_small_inputs_are_rejected(size):
    model = FCN8s.lite(1)
    with pytest.raises(ValueError, match=r"at least 32×32 pixels.*got \d+×\d+"):
        model(torch.zeros(1, 1, *size))


@pytest.mark.parametrize("fc_kernel", [3, 7])
def test_output_pixels_lie_over_their_input_pixels(fc_kernel):
    # With the network linearised, a ramp along W (or H) comes out as exactly 3× the ramp (the
    # fc7, pool4 and pool3 paths each carry it once) wherever zero padding does not reach. Any
    # misaligned crop would shift one of the three copies by its stride and break the equality.
    model = _linearise(FCN8s(1, 1, width=TINY, fc_kernel=fc_kernel, dropout=0.0))
    h, w = 167, 229
    ramp_w = torch.arange(w, dtype=torch.float32).expand(1, 1, h, w)
    ramp_h = torch.arange(h, dtype=torch.float32)[:, None].expand(1, 1, h, w)
    inner = (slice(None), slice(None), slice(64, -64), slice(64, -64))
    with torch.no_grad():
        for ramp in (ramp_w, ramp_h):
            torch.testing.assert_close(model(ramp)[inner], 3 * ramp[inner], atol=1e-3, rtol=0)
        # negative controls: one cell off at any crop is detected
        for name in ("offset_out", "offset_pool3", "offset_pool4"):
            setattr(model, name, getattr(model, name) + 1)
            assert (model(ramp_w)[inner] - 3 * ramp_w[inner]).abs().max() >= 1.0, name
            setattr(model, name, getattr(model, name) - 1)


@pytest.mark.parametrize("fc_kernel", [3, 7])
def test_boundary_head_pixels_lie_over_their_input_pixels(fc_kernel):
    # The boundary head's five paths (fc7, pool4, pool3 as the decoder's, plus the pool2 and
    # pool1 side outputs) each carry a linearised ramp once: 5× the ramp, and one cell off at
    # any of its crops breaks the equality.
    from pipeline.networks import boundary_outputs

    model = _linearise(FCN8s(1, 1, width=TINY, fc_kernel=fc_kernel, dropout=0.0,
                             boundary_head=True))
    h, w = 167, 229
    ramp_w = torch.arange(w, dtype=torch.float32).expand(1, 1, h, w)
    ramp_h = torch.arange(h, dtype=torch.float32)[:, None].expand(1, 1, h, w)
    inner = (slice(None), slice(None), slice(64, -64), slice(64, -64))
    head = model.boundary
    with torch.no_grad(), boundary_outputs(model):
        for ramp in (ramp_w, ramp_h):
            out = model(ramp)
            torch.testing.assert_close(out[:, :1][inner], 3 * ramp[inner], atol=1e-3, rtol=0)
            torch.testing.assert_close(out[:, 1:][inner], 5 * ramp[inner], atol=1e-3, rtol=0)
        for name in ("offset_out", "offset_pool3", "offset_pool4", "offset_side1",
                     "offset_side2"):
            setattr(head, name, getattr(head, name) + 1)
            assert (model(ramp_w)[:, 1:][inner] - 5 * ramp_w[inner]).abs().max() >= 1.0, name
            setattr(head, name, getattr(head, name) - 1)


def test_gradients_reach_the_first_convolution():
    model = FCN8s.lite(3).train()
    target = (torch.rand(2, 1, 40, 52) > 0.5).float()
    loss = F.binary_cross_entropy_with_logits(model(torch.randn(2, 3, 40, 52)), target)
    loss.backward()
    for param in (model.block1[0].weight, model.upscore8.weight, model.score_pool3.weight):
        assert param.grad is not None
        assert torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0


def test_upsamplers_start_bilinear():
    torch.testing.assert_close(
        bilinear_kernel(1, 4)[0, 0],
        torch.outer(*[torch.tensor([0.25, 0.75, 0.75, 0.25])] * 2))
    model = FCN8s(3, 2, width=TINY)
    with torch.no_grad():
        for up, factor in ((model.upscore2, 2), (model.upscore_pool4, 2), (model.upscore8, 8)):
            assert up.bias is None
            const = torch.ones(1, 2, 6, 5)
            const[:, 1] = -3.0  # channels are not mixed
            out = up(const)
            interior = out[:, :, factor:-factor, factor:-factor]
            assert interior.shape[-2:] == (5 * factor, 4 * factor)  # covered by two taps
            torch.testing.assert_close(interior[:, 0], torch.ones_like(interior[:, 0]))
            torch.testing.assert_close(interior[:, 1], torch.full_like(interior[:, 1], -3.0))
    assert model.upscore8.weight.requires_grad  # learned, not fixed


@pytest.mark.parametrize("head", [False, "fcn", "hed"])
def test_trace_and_script_match_eager(head):
    model = FCN8s.lite(1, boundary_head=head).eval()
    model.emit_boundary = bool(head)
    example, other = torch.randn(2, 1, 64, 80), torch.randn(1, 1, 97, 41)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing shape-specific baked in
        traced = torch.jit.trace(model, example)
        scripted = torch.jit.script(model)
        for x in (example, other):  # the traced graph also serves other input sizes
            eager = model(x)
            torch.testing.assert_close(traced(x), eager, rtol=0, atol=0)
            torch.testing.assert_close(scripted(x), eager, rtol=1e-6, atol=1e-6)
    with pytest.raises(torch.jit.Error, match="at least 32×32"):
        scripted(torch.zeros(1, 1, 20, 40))


def test_presets_and_parameter_counts():
    lite = FCN8s.lite(3)
    convs = [m for b in _blocks(lite) for m in b if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16] * 2 + [32] * 2 + [64] * 3 + [128] * 6
    assert lite.fc6[0].weight.shape == (256, 128, 3, 3)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in lite.modules()) == 15
    assert count_parameters(lite) == 1_285_619
    with torch.device("meta"):  # shapes only, no memory
        paper = FCN8s.paper(3)
    assert paper.padding == 100 and paper.fc_kernel == 7
    assert (paper.offset_pool4, paper.offset_pool3, paper.offset_out) == (5, 9, 31)  # as Caffe
    assert paper.fc6[0].weight.shape == (4096, 512, 7, 7)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paper.modules())
    assert count_parameters(paper) == 134_265_699
    lite.block1[0].weight.requires_grad_(False)
    assert count_parameters(lite, trainable_only=True) == 1_285_619 - 16 * 3 * 9


@pytest.mark.parametrize("kwargs", [
    {"fc_kernel": 4}, {"fc_kernel": 1}, {"fc_kernel": 3, "padding": 17}, {"width": 0.0},
    {"dropout": 1.0}, {"in_channels": 0},
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        FCN8s(**{"width": TINY, **kwargs})


@pytest.mark.parametrize("in_channels", [1, 3])
def test_vgg16_values_land_in_the_right_layers(in_channels):
    # the paper's layout at 1/16 width: same key mapping, reshape and RGB summing as full size
    model = FCN8s(in_channels, 1, width=SMALL, fc_kernel=7)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in _vgg16_shapes(SMALL).items()}
    _load_vgg16_state_dict(model, state, "scaled.pth")
    convs = [m for b in _blocks(model) for m in b if isinstance(m, nn.Conv2d)]
    first = state["features.0.weight"]
    expected = first.sum(dim=1, keepdim=True) if in_channels == 1 else first
    torch.testing.assert_close(convs[0].weight, expected)
    for index, conv in zip(_CONV_INDICES[1:], convs[1:], strict=True):
        torch.testing.assert_close(conv.weight, state[f"features.{index}.weight"])
        torch.testing.assert_close(conv.bias, state[f"features.{index}.bias"])
    # fc6 as a 7×7 convolution on a pool5 map equals torchvision's Linear on the flattened map
    pool5 = torch.randn(2, convs[-1].out_channels, 7, 7, generator=gen)
    fc6, fc7 = model.fc6[0], model.fc7[0]
    torch.testing.assert_close(
        fc6(pool5).flatten(1),
        F.linear(pool5.flatten(1), state["classifier.0.weight"], state["classifier.0.bias"]),
        rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fc7.weight[:, :, 0, 0], state["classifier.3.weight"])
    torch.testing.assert_close(fc7.bias, state["classifier.3.bias"])


@pytest.mark.parametrize("in_channels", [1, 3])
def test_vgg16_file_loads_into_the_paper_network(paper_vgg16_file, in_channels):
    path, _ = paper_vgg16_file
    with torch.device("meta"):  # the real 134M-parameter layout, without allocating it
        model = FCN8s.paper(in_channels, pretrained_path=path)
        assert load_vgg16_weights(model, str(path)) is model


def _save(tmp_path, obj, name="vgg16.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_vgg16_loading_errors_name_the_file(paper_vgg16_file, tmp_path):
    path, state = paper_vgg16_file
    for model in (FCN8s(3, width=0.5, fc_kernel=7), FCN8s.lite(3),
                  FCN8s(3, width=SMALL, batch_norm=True)):
        with pytest.raises(ValueError, match=re.escape(path.name) + r".*must have.*width 1\.0"):
            load_vgg16_weights(model, path)
    with torch.device("meta"):
        paper = FCN8s.paper(3)
        bn_paper = FCN8s.paper(3, batch_norm=True)
        k3_paper = FCN8s.paper(3, fc_kernel=3, padding=None)
    with pytest.raises(ValueError, match="batch_norm=False"):
        load_vgg16_weights(bn_paper, path)
    with pytest.raises(ValueError, match="fc_kernel 7"):
        load_vgg16_weights(k3_paper, path)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth cannot be read"):
        load_vgg16_weights(paper, garbage)
    with pytest.raises(ValueError, match=r"tensor\.pth is not a state dict"):
        load_vgg16_weights(paper, _save(tmp_path, torch.zeros(3), "tensor.pth"))
    missing = {k: v for k, v in state.items() if k != "features.10.bias"}
    with pytest.raises(ValueError, match=r"missing\.pth is not a torchvision VGG16.*features\.10"):
        load_vgg16_weights(paper, _save(tmp_path, missing, "missing.pth"))
    extra = {**state, "features.1.running_mean": torch.zeros(64)}  # a vgg16_bn-like key
    with pytest.raises(ValueError, match=r"extra\.pth .*unexpected keys \['features\.1\."):
        load_vgg16_weights(paper, _save(tmp_path, extra, "extra.pth"))
    wrong = {**state, "classifier.0.weight": torch.zeros(()).expand(4096, 4608)}
    with pytest.raises(ValueError, match=r"wrong\.pth does not fit.*classifier\.0\.weight"):
        load_vgg16_weights(paper, _save(tmp_path, wrong, "wrong.pth"))
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        load_vgg16_weights(paper, tmp_path / "absent.pth")
