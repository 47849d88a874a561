"""FCN-8s (Long, Shelhamer & Darrell) on a VGG16 backbone, at any width, in plain torch."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "BOUNDARY_HEADS",
    "MIN_INPUT_SIZE",
    "FCN8s",
    "bilinear_kernel",
    "boundary_outputs",
    "count_parameters",
    "load_network_state",
    "load_vgg16_weights",
    "min_padding",
    "split_boundary",
]

#: Smallest input height and width accepted: one cell of the network's stride-32 output grid.
MIN_INPUT_SIZE = 32

#: Input normalisations the network can apply itself (see :class:`FCN8s`).
INPUT_NORMS: tuple[str | None, ...] = (None, "vgg_bgr")
#: The Caffe VGG16 mean (BGR, 0–255 scale) that pretrained VGG16 and HED weights expect.
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)

#: Kinds of boundary head (see :class:`FCN8s`): FCN-8s's decoder again, or HED's side outputs.
BOUNDARY_HEADS = ("fcn", "hed")

#: The paper's first-convolution padding (the "pad 100" trick of the Caffe reference model).
PAPER_PADDING = 100

_VGG16_CHANNELS = (64, 128, 256, 512, 512)
_VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
_VGG16_FC_CHANNELS = 4096
#: Indices of the 13 convolutions inside torchvision's ``vgg16().features``.
_VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _scaled(channels: int, width: float) -> int:
    """Channel count ``channels·width`` rounded half up, at least 1."""
    return max(1, math.floor(channels * width + 0.5))


def min_padding(fc_kernel: int) -> int:
    """Smallest first-convolution padding for which every input of at least 32×32 works.

    With ``fc_kernel`` = 2e+1 the last crop offset is ``padding + 27 − 32e``, so the padding must
    be at least 32e − 27; 32e − 14 also leaves the upsampled map large enough to cover every
    input size (checked exhaustively for sizes 32 to 3000, and periodic beyond).

    Args:
        fc_kernel: odd spatial size (≥ 3) of the fc6 convolution.

    Returns:
        16·(fc_kernel − 1) − 14, e.g. 18 for fc_kernel 3 and 82 for fc_kernel 7.

    Raises:
        ValueError: fc_kernel is even or smaller than 3.
    """
    _check_fc_kernel(fc_kernel)
    return 16 * (fc_kernel - 1) - 14


def _check_fc_kernel(fc_kernel: int) -> None:
    if fc_kernel < 3 or fc_kernel % 2 == 0:
        raise ValueError(f"fc_kernel must be odd and at least 3, got {fc_kernel}")


def _crop_offsets(padding: int, fc_kernel: int) -> tuple[int, int, int]:
    """Crop offsets of score_pool4, score_pool3 and the final output, from the geometry.

    Index j of a feature map of stride s sits at input coordinate ``s·j + origin`` (the centre of
    its receptive field). A 3×3 convolution with padding 1 keeps the origin, a 2×2 stride-2 pool
    moves it by s/2, the unpadded fc6 by s·(fc_kernel − 1)/2, and a bilinear ConvTranspose2d of
    kernel 2f and stride f maps output index i to input index (i − (2f − 1)/2)/f. Each offset is
    the whole number of cells between the origin of the upsampled map and that of its partner.

    Args:
        padding: padding of the first 3×3 convolution.
        fc_kernel: spatial size of fc6.

    Returns:
        (pool4 offset, pool3 offset, output offset), all ≥ 0.

    Raises:
        ValueError: the padding is too small for the crops to be defined.
    """
    stride, origin = 1, 1.0 - padding  # conv1_1: 3×3 with the big padding
    pool_origins = []
    for _ in range(5):  # pool1..pool5, each 2×2 stride 2
        origin += 0.5 * stride
        stride *= 2
        pool_origins.append(origin)
    origin += stride * (fc_kernel - 1) / 2  # fc6, unpadded; fc7 and score_fr are 1×1

    offsets = []
    # The skip maps are cropped to the upsampled map (partner index = own index + offset); the
    # last upsampled map is cropped to the input (own index = input index + offset).
    for factor, partner, sign in ((2, pool_origins[3], 1), (2, pool_origins[2], 1), (8, 0.0, -1)):
        origin -= stride * (2 * factor - 1) / (2 * factor)
        stride //= factor
        cells = sign * (origin - partner) / stride
        if cells < 0 or cells != int(cells):
            raise ValueError(f"padding {padding} is too small for fc_kernel {fc_kernel} "
                             f"(at least {min_padding(fc_kernel)})")
        offsets.append(int(cells))
    return offsets[0], offsets[1], offsets[2]


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """ConvTranspose2d weight that upsamples each channel by bilinear interpolation.

    Args:
        channels: number of input (= output) channels; channels are not mixed.
        kernel_size: spatial size, twice the upsampling factor.

    Returns:
        channels×channels×kernel_size×kernel_size float tensor, diagonal over channels.
    """
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1.0 - (torch.arange(kernel_size, dtype=torch.float64) - centre).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = torch.outer(taps, taps)
    return weight.float()


def _conv_block(in_ch: int, out_ch: int, kernel: int, padding: int,
                batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=padding)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _min_size(a: int, b: int) -> int:
    """min(a, b) as arithmetic, which torch.jit.trace records instead of baking in."""
    return (a + b - abs(a - b)) // 2


def _fuse(upsampled: Tensor, skip: Tensor, offset: int) -> Tensor:
    """Sum an upsampled score map and a skip score map cropped from ``offset``.

    Where pooling in ceil mode gave the upsampled map cells beyond the skip map's end, those
    (which lie outside the padded input) are dropped, so both maps share one aligned extent.
    """
    h = _min_size(upsampled.shape[2], skip.shape[2] - offset)
    w = _min_size(upsampled.shape[3], skip.shape[3] - offset)
    return upsampled[:, :, :h, :w] + skip[:, :, offset:offset + h, offset:offset + w]


class _VGGBlock(nn.Sequential):
    """A VGG block: its convolutions (with BatchNorm and ReLU), then its 2×2 pooling."""

    def tapped(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the last convolution's output, which HED's side outputs read; the pooled one)."""
        tap = x
        for layer in self:
            tap = x
            x = layer(x)
        return tap, x


class _BoundaryHead(nn.Module):
    """Boundary logits at the input's resolution: FCN-8s's decoder once more (stride 32, 16
    and 8 scores fused), plus side outputs of pool1 and pool2 (strides 2 and 4) for the detail
    a boundary needs, as HED's side outputs give it; the maps are summed.

    A bilinear ConvTranspose2d of kernel 2f and stride f puts output index i at input
    coordinate o + i − (2f − 1)/2 for a map of stride f whose index 0 sits at o (see
    :func:`_crop_offsets`); pool1 (o = 1.5 − p, stride 2) and pool2 (o = 2.5 − p, stride 4)
    are therefore upsampled to stride 1 and cropped from p and p + 1, p being the first
    convolution's padding.
    """

    def __init__(self, fc_channels: int, pool4_channels: int, pool3_channels: int,
                 pool2_channels: int, pool1_channels: int, padding: int,
                 offset_pool4: int, offset_pool3: int, offset_out: int) -> None:
        super().__init__()
        self.score_fr = nn.Conv2d(fc_channels, 1, 1)
        self.score_pool4 = nn.Conv2d(pool4_channels, 1, 1)
        self.score_pool3 = nn.Conv2d(pool3_channels, 1, 1)
        self.score_pool2 = nn.Conv2d(pool2_channels, 1, 1)
        self.score_pool1 = nn.Conv2d(pool1_channels, 1, 1)
        self.upscore2 = nn.ConvTranspose2d(1, 1, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(1, 1, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(1, 1, 16, stride=8, bias=False)
        self.upscore_pool2 = nn.ConvTranspose2d(1, 1, 8, stride=4, bias=False)
        self.upscore_pool1 = nn.ConvTranspose2d(1, 1, 4, stride=2, bias=False)
        self.offset_pool4, self.offset_pool3, self.offset_out = (offset_pool4, offset_pool3,
                                                                 offset_out)
        self.offset_side2, self.offset_side1 = padding + 1, padding

    def forward(self, features: list[Tensor], taps: list[Tensor], h: int, w: int) -> Tensor:
        """B×1×H×W boundary logits from the backbone's features (fc7, pool4, pool3, pool2,
        pool1; ``taps``, the blocks' last convolutions, are not used)."""
        fc7, pool4, pool3, pool2, pool1 = (features[0], features[1], features[2], features[3],
                                           features[4])
        scores = _fuse(self.upscore2(self.score_fr(fc7)), self.score_pool4(pool4),
                       self.offset_pool4)
        scores = _fuse(self.upscore_pool4(scores), self.score_pool3(pool3), self.offset_pool3)
        scores = self.upscore8(scores)
        o, o2, o1 = self.offset_out, self.offset_side2, self.offset_side1
        side2 = self.upscore_pool2(self.score_pool2(pool2))
        side1 = self.upscore_pool1(self.score_pool1(pool1))
        return (scores[:, :, o:o + h, o:o + w] + side2[:, :, o2:o2 + h, o2:o2 + w]
                + side1[:, :, o1:o1 + h, o1:o1 + w])


class _HEDBoundaryHead(nn.Module):
    """Boundary logits at the input's resolution, laid out as HED (Xie & Tu): a 1×1 side
    output on the last convolution of each VGG block (before its pooling), each upsampled to
    stride 1 and fused by a 1×1 convolution of the five maps. Its layers have the shapes of
    the HED file's ``dsn1``–``dsn5`` and ``fuse``, so with them (and the backbone's VGG16
    convolutions) b starts as HED's edge probability (:func:`load_hed_side_outputs`).

    Block k's last convolution has stride f = 2^(k−1), and its index 0 sits at input
    coordinate 1 − p for k = 1 and 2^(k−2) + ½ − p after the pooling (p: the first
    convolution's padding). A bilinear ConvTranspose2d of kernel 2f and stride f puts output
    index i at o + i − (2f − 1)/2 (see :func:`_crop_offsets`), so block k's map is cropped
    from p − 1 (k = 1, not upsampled) or from p + f/2 − 1.
    """

    def __init__(self, tap_channels: tuple[int, ...], padding: int) -> None:
        super().__init__()
        self.dsn = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in tap_channels)
        strides = [2 ** k for k in range(len(tap_channels))]
        self.up = nn.ModuleList(nn.ConvTranspose2d(1, 1, 2 * f, stride=f, bias=False)
                                for f in strides[1:])
        self.fuse = nn.Conv2d(len(tap_channels), 1, 1)
        self.crops = [padding - 1] + [padding + f // 2 - 1 for f in strides[1:]]

    def forward(self, features: list[Tensor], taps: list[Tensor], h: int, w: int) -> Tensor:
        """B×1×H×W boundary logits from the blocks' last convolutions ``taps`` (the
        ``features`` after pooling are not used)."""
        sides: list[Tensor] = []
        for k, dsn in enumerate(self.dsn):
            side = dsn(taps[k])
            for j, up in enumerate(self.up):  # TorchScript: modules indexed by a loop only
                if j == k - 1:
                    side = up(side)
            c = self.crops[k]
            sides.append(side[:, :, c:c + h, c:c + w])
        return self.fuse(torch.cat(sides, dim=1))


def _boundary_kind(value: bool | str | None) -> str | None:
    """The head kind a ``boundary_head`` argument names (True: the original ``"fcn"``)."""
    if value is None or value is False:
        return None
    if value is True:
        return "fcn"
    if value not in BOUNDARY_HEADS:
        raise ValueError(f"boundary_head must be False, True or one of {BOUNDARY_HEADS}, "
                         f"got {value!r}")
    return str(value)


class FCN8s(nn.Module):
    """FCN-8s: VGG16 features, fc6/fc7 as convolutions, skips from pool3 and pool4.

    Pooling uses ceil mode and the first convolution is padded by ``padding`` (the paper's
    "pad 100" trick), fc6 is unpadded, and every score map is cropped at an offset computed from
    the receptive-field geometry, so an output pixel lies exactly over its input pixel for any
    height and width of at least 32 (odd or even, independently).

    Args:
        in_channels: image channels (1 for grey/medical images, 3 for RGB).
        out_channels: score channels; 1 (default) is a single foreground logit, as the CRF
            consumes, 2 gives two-class logits.
        width: multiplier of the VGG16 channel counts (1.0 is the paper's network); each count
            is rounded half up and kept at least 1.
        batch_norm: add BatchNorm after every convolution of the backbone and fc6/fc7.
        fc_kernel: odd spatial size of fc6 (7 in the paper; 3 suits small inputs).
        dropout: dropout probability after fc6 and after fc7.
        fc_channels: channels of fc6/fc7; default 4096·width.
        padding: padding of the first convolution; default 100 (the paper's) for fc_kernel 7,
            else :func:`min_padding` (18 for fc_kernel 3).
        pretrained_path: optional local torchvision VGG16 state-dict file to initialise the
            backbone and fc6/fc7 from (see :func:`load_vgg16_weights`); never downloaded.
        input_norm: None (images go in as given), or ``"vgg_bgr"``: images in [0, 1] (RGB, or
            grey, which is replicated to three channels) become BGR on the 0–255 scale minus
            the Caffe VGG16 mean inside the model, as pretrained VGG16 weights expect; the first
            convolution then always has three input channels.
        freeze_blocks: the first N (0–5) VGG blocks get ``requires_grad=False``.
        boundary_head: add a boundary head giving one boundary logit per pixel (its sigmoid
            is the boundary strength b of the CRF's learned edge feature). True or ``"fcn"``:
            score layers of its own on the same fc7, pool4 and pool3 features, fused and
            upsampled as the segmentation scores are, plus side outputs of pool1 and pool2
            for detail. ``"hed"``: HED's side outputs on each block's last convolution and
            their fusion, which the HED weights file initialises (pretrained edges from the
            first step; :func:`load_hed_side_outputs`). The network returns it as an extra
            last channel only while :attr:`emit_boundary` is set (:func:`boundary_outputs`),
            so every consumer of the segmentation logits works unchanged.

    Attributes:
        emit_boundary: whether :meth:`forward` appends the boundary logits (False on
            construction; only meaningful with a boundary head).

    Raises:
        ValueError: an argument is out of range, or the pretrained file does not fit.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        width: float = 1.0,
        batch_norm: bool = False,
        fc_kernel: int = 7,
        dropout: float = 0.5,
        fc_channels: int | None = None,
        padding: int | None = None,
        pretrained_path: str | os.PathLike | None = None,
        input_norm: str | None = None,
        freeze_blocks: int = 0,
        boundary_head: bool | str = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be ≥ 1, "
                             f"got {in_channels} and {out_channels}")
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_fc_kernel(fc_kernel)
        if padding is None:
            padding = PAPER_PADDING if fc_kernel == 7 else min_padding(fc_kernel)
        if padding < min_padding(fc_kernel):
            raise ValueError(f"padding {padding} leaves some inputs ≥ {MIN_INPUT_SIZE} without a "
                             f"well-defined crop; use at least {min_padding(fc_kernel)} for "
                             f"fc_kernel {fc_kernel}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        if not 0 <= freeze_blocks <= 5:
            raise ValueError(f"freeze_blocks must be in 0..5, got {freeze_blocks}")
        kind = _boundary_kind(boundary_head)
        fc_channels = _scaled(_VGG16_FC_CHANNELS, width) if fc_channels is None else fc_channels
        if fc_channels < 1:
            raise ValueError(f"fc_channels must be ≥ 1, got {fc_channels}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.width = float(width)
        self.batch_norm = batch_norm
        self.fc_kernel = fc_kernel
        self.fc_channels = fc_channels
        self.padding = padding
        self.min_input_size = MIN_INPUT_SIZE
        self.input_norm = input_norm
        self.vgg_input = input_norm == "vgg_bgr"  # a bool for TorchScript
        self.freeze_blocks = freeze_blocks
        self.register_buffer("_bgr_mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.offset_pool4, self.offset_pool3, self.offset_out = _crop_offsets(padding, fc_kernel)

        blocks: list[_VGGBlock] = []
        ch = 3 if input_norm == "vgg_bgr" else in_channels
        for i, (base, n_convs) in enumerate(zip(_VGG16_CHANNELS, _VGG16_CONVS_PER_BLOCK,
                                                strict=True)):
            out = _scaled(base, width)
            layers: list[nn.Module] = []
            for j in range(n_convs):
                pad = padding if i == 0 and j == 0 else 1
                layers += _conv_block(ch, out, 3, pad, batch_norm)
                ch = out
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            blocks.append(_VGGBlock(*layers))
        self.block1, self.block2, self.block3, self.block4, self.block5 = blocks
        pool3_ch, pool4_ch = _scaled(_VGG16_CHANNELS[2], width), _scaled(_VGG16_CHANNELS[3], width)

        self.fc6 = nn.Sequential(*_conv_block(ch, fc_channels, fc_kernel, 0, batch_norm),
                                 nn.Dropout(dropout))
        self.fc7 = nn.Sequential(*_conv_block(fc_channels, fc_channels, 1, 0, batch_norm),
                                 nn.Dropout(dropout))
        self.score_fr = nn.Conv2d(fc_channels, out_channels, 1)
        self.score_pool4 = nn.Conv2d(pool4_ch, out_channels, 1)
        self.score_pool3 = nn.Conv2d(pool3_ch, out_channels, 1)
        self.upscore2 = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2,
                                                bias=False)
        self.upscore8 = nn.ConvTranspose2d(out_channels, out_channels, 16, stride=8, bias=False)
        self.boundary_head = kind is not None
        self.boundary_kind = kind or ""
        self.emit_boundary = False
        self.boundary: nn.Module | None = None
        if kind == "fcn":
            self.boundary = _BoundaryHead(fc_channels, pool4_ch, pool3_ch,
                                          _scaled(_VGG16_CHANNELS[1], width),
                                          _scaled(_VGG16_CHANNELS[0], width), padding,
                                          self.offset_pool4, self.offset_pool3,
                                          self.offset_out)
        elif kind == "hed":
            self.boundary = _HEDBoundaryHead(tuple(_scaled(c, width) for c in _VGG16_CHANNELS),
                                             padding)
        self._init_weights()
        if pretrained_path is not None:
            load_vgg16_weights(self, pretrained_path)
        for block in blocks[:freeze_blocks]:
            block.requires_grad_(False)

    @classmethod
    def paper(cls, in_channels: int = 3, out_channels: int = 1, **kwargs) -> FCN8s:
        """The paper's network: full VGG16 widths, fc6 7×7×4096, pad 100, dropout 0.5 (134M).

        Args:
            in_channels: image channels.
            out_channels: score channels.
            **kwargs: other constructor arguments (e.g. ``pretrained_path``, ``dropout``).

        Returns:
            The model.
        """
        kwargs = {"width": 1.0, "batch_norm": False, "fc_kernel": 7, "dropout": 0.5,
                  "padding": PAPER_PADDING, **kwargs}
        return cls(in_channels, out_channels, **kwargs)

    @classmethod
    def lite(cls, in_channels: int = 3, out_channels: int = 1, **kwargs) -> FCN8s:
        """The CPU calibration network: widths 16/32/64/128/128 + BatchNorm, fc6 3×3×256 (1.3M).

        Args:
            in_channels: image channels.
            out_channels: score channels.
            **kwargs: other constructor arguments (``dropout`` defaults to 0 here).

        Returns:
            The model.
        """
        kwargs = {"width": 0.25, "batch_norm": True, "fc_kernel": 3, "fc_channels": 256,
                  "dropout": 0.0, **kwargs}
        return cls(in_channels, out_channels, **kwargs)

    @classmethod
    def vgg16(cls, in_channels: int = 3, out_channels: int = 1, **kwargs) -> FCN8s:
        """FCN-8s for a pretrained VGG16 backbone: VGG16's conv1–conv5 at full width, no
        BatchNorm, VGG input normalisation inside the model, and a small head (fc6 3×3×512,
        fc7 1×1×512, dropout 0.5; 17.3M parameters, 14.7M of them pretrained).

        The paper's 7×7×4096 fc6/fc7 (120M parameters) only pays with ImageNet's fc weights,
        which the HED file does not have; trained from scratch on 150–800 images it would be
        most of the model and learn least. Load the backbone with
        :func:`pipeline.networks.pretrained.load_pretrained_backbone`.

        Args:
            in_channels: 3 (RGB) or 1 (grey, replicated to three channels inside the model).
            out_channels: score channels.
            **kwargs: other constructor arguments (e.g. ``freeze_blocks``, ``fc_channels``).

        Returns:
            The model.
        """
        kwargs = {"width": 1.0, "batch_norm": False, "fc_kernel": 3, "fc_channels": 512,
                  "dropout": 0.5, "input_norm": "vgg_bgr", **kwargs}
        return cls(in_channels, out_channels, **kwargs)

    def _init_weights(self) -> None:
        """He initialisation for the backbone and fc6/fc7, small normal for the score layers
        (not zero as in Caffe, so gradients reach the backbone from the first step), bilinear
        for the upsampling layers."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        heads = [((self.score_fr, self.score_pool4, self.score_pool3),
                  (self.upscore2, self.upscore_pool4, self.upscore8))]
        b = self.boundary
        if isinstance(b, _BoundaryHead):
            heads.append(((b.score_fr, b.score_pool4, b.score_pool3, b.score_pool2,
                           b.score_pool1),
                          (b.upscore2, b.upscore_pool4, b.upscore8, b.upscore_pool2,
                           b.upscore_pool1)))
        elif isinstance(b, _HEDBoundaryHead):
            heads.append((tuple(b.dsn), tuple(b.up)))
            with torch.no_grad():  # the fusion starts as the side outputs' mean
                b.fuse.weight.fill_(1.0 / len(b.dsn))
        for scores, ups in heads:
            for score in scores:
                nn.init.normal_(score.weight, std=0.01)
            with torch.no_grad():
                for up in ups:
                    up.weight.copy_(bilinear_kernel(up.in_channels, up.kernel_size[0]))

    def forward(self, x: Tensor) -> Tensor:
        """Score every pixel.

        Args:
            x: B×in_channels×H×W images, H and W at least 32.

        Returns:
            B×out_channels×H×W logits, spatially aligned with ``x``; while
            :attr:`emit_boundary` is set, B×(out_channels + 1)×H×W with the boundary logits
            last.

        Raises:
            ValueError: the input is not 4-D or smaller than 32×32.
        """
        if not torch.jit.is_tracing():
            if x.dim() != 4:
                raise ValueError(f"FCN8s expects B×C×H×W input, got {x.dim()} dimensions")
            least = self.min_input_size
            if x.shape[2] < least or x.shape[3] < least:
                raise ValueError(f"FCN8s needs inputs of at least {least}×{least} pixels "
                                 f"(one stride-32 cell), got {x.shape[2]}×{x.shape[3]}")
        h, w = x.shape[2], x.shape[3]
        if self.vgg_input:
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = x.flip(1) * 255.0 - self._bgr_mean
        tap1, pool1 = self.block1.tapped(x)
        tap2, pool2 = self.block2.tapped(pool1)
        tap3, pool3 = self.block3.tapped(pool2)
        tap4, pool4 = self.block4.tapped(pool3)
        tap5, pool5 = self.block5.tapped(pool4)
        fc7 = self.fc7(self.fc6(pool5))
        scores = _fuse(self.upscore2(self.score_fr(fc7)), self.score_pool4(pool4),
                       self.offset_pool4)
        scores = _fuse(self.upscore_pool4(scores), self.score_pool3(pool3), self.offset_pool3)
        scores = self.upscore8(scores)
        o = self.offset_out
        scores = scores[:, :, o:o + h, o:o + w]
        if self.boundary is not None and self.emit_boundary:
            features = [fc7, pool4, pool3, pool2, pool1]
            taps = [tap1, tap2, tap3, tap4, tap5]
            scores = torch.cat([scores, self.boundary(features, taps, h, w)], dim=1)
        return scores

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"width={self.width}, batch_norm={self.batch_norm}, fc_kernel={self.fc_kernel}, "
                f"fc_channels={self.fc_channels}, padding={self.padding}, "
                f"input_norm={self.input_norm}, freeze_blocks={self.freeze_blocks}, "
                f"boundary_head={self.boundary_kind or False}")


@contextlib.contextmanager
def boundary_outputs(model: nn.Module) -> Iterator[bool]:
    """While inside, a network with a boundary head (:class:`FCN8s`, or one wrapped in
    DistributedDataParallel) returns its boundary logits as an extra last channel.

    Yields:
        Whether it does (False for a network without a boundary head: nothing changes).
    """
    net = getattr(model, "module", model)
    if not getattr(net, "boundary_head", False):
        yield False
        return
    before = net.emit_boundary
    net.emit_boundary = True
    try:
        yield True
    finally:
        net.emit_boundary = before


def split_boundary(outputs: Tensor, boundary: bool) -> tuple[Tensor, Tensor | None]:
    """(segmentation logits, B×H×W boundary logits or None) of a network's outputs.

    Args:
        outputs: what the network returned.
        boundary: whether it returned its boundary logits (what :func:`boundary_outputs`
            yielded).
    """
    if not boundary:
        return outputs, None
    return outputs[:, :-1], outputs[:, -1]


def load_network_state(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Loads a state dict into a network; a network with a boundary head also takes the
    weights of the same network without one (its boundary head keeps its initialisation).

    Returns:
        The keys of the boundary head that the state dict did not have (empty when it had
        them all).

    Raises:
        RuntimeError: any other missing, unexpected or mis-shaped key (as ``load_state_dict``).
    """
    if not getattr(model, "boundary_head", False) or any(k.startswith("boundary.")
                                                          for k in state):
        model.load_state_dict(state)
        return []
    result = model.load_state_dict(state, strict=False)
    other = [k for k in result.missing_keys if not k.startswith("boundary.")]
    if other or result.unexpected_keys:
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {other[:6]}, "
                           f"unexpected keys {list(result.unexpected_keys)[:6]}")
    return list(result.missing_keys)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a model.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The total number of scalar parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_vgg16_weights(model: FCN8s, path: str | os.PathLike) -> FCN8s:
    """Initialise the backbone and fc6/fc7 from a local torchvision VGG16 state-dict file.

    The file holds torchvision's keys (``features.{0,2,5,…,28}.weight/bias``,
    ``classifier.0.*`` and ``classifier.3.*``; ``classifier.6.*``, the ImageNet classifier, is
    ignored). fc6 gets ``classifier.0.weight`` reshaped 4096×25088 → 4096×512×7×7, fc7 gets
    ``classifier.3.weight`` as a 1×1 convolution; for a one-channel model the first
    convolution's weights are summed over RGB. The score and upsampling layers keep their
    initialisation. Nothing is downloaded.

    Args:
        model: a paper-shaped FCN8s (width 1.0, no BatchNorm, fc_kernel 7, 4096 fc channels,
            1 or 3 input channels).
        path: the state-dict file, read with ``torch.load(..., weights_only=True)``.

    Returns:
        The same model, updated in place.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the model is not paper-shaped, or the file is unreadable, is not a state
            dict, or has missing, unexpected or mis-shaped keys (the message names the file).
    """
    source = os.fspath(path)
    problems = []
    if model.width != 1.0 or model.fc_channels != _VGG16_FC_CHANNELS:
        problems.append(f"width 1.0 with {_VGG16_FC_CHANNELS} fc channels "
                        f"(got width {model.width}, {model.fc_channels} fc channels)")
    if model.batch_norm:
        problems.append("batch_norm=False")
    if model.fc_kernel != 7:
        problems.append(f"fc_kernel 7 (got {model.fc_kernel})")
    if model.in_channels not in (1, 3):
        problems.append(f"1 or 3 input channels (got {model.in_channels})")
    if problems:
        raise ValueError(f"cannot load VGG16 weights from {source}: the model must have "
                         + "; ".join(problems))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"VGG16 state-dict file not found: {source}")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{source} cannot be read as a torch state dict: {exc}") from exc
    return _load_vgg16_state_dict(model, state, source)


def _load_vgg16_state_dict(model: FCN8s, state: object, source: str) -> FCN8s:
    """Copy a torchvision-layout VGG16 state dict into ``model`` (any width; shapes must fit).

    Expected shapes come from the model itself (3 input channels for the first convolution,
    fc6 flattened as out×(C·k·k)), so this also serves narrower models of the same layout.
    """
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{source} is not a state dict (a mapping of names to tensors)")
    convs = [m for block in (model.block1, model.block2, model.block3, model.block4, model.block5)
             for m in block if isinstance(m, nn.Conv2d)]
    fc6, fc7 = model.fc6[0], model.fc7[0]
    targets: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
    for index, conv in zip(_VGG16_CONV_INDICES, convs, strict=True):
        w_shape = tuple(conv.weight.shape)
        if index == 0:
            w_shape = (w_shape[0], 3, *w_shape[2:])  # torchvision's RGB kernels
        targets[f"features.{index}.weight"] = (conv.weight, w_shape)
        targets[f"features.{index}.bias"] = (conv.bias, tuple(conv.bias.shape))
    for key, conv in (("classifier.0", fc6), ("classifier.3", fc7)):
        targets[f"{key}.weight"] = (conv.weight, (conv.weight.shape[0], conv.weight[0].numel()))
        targets[f"{key}.bias"] = (conv.bias, tuple(conv.bias.shape))

    missing = sorted(set(targets) - set(state))
    unexpected = sorted(k for k in set(state) - set(targets) if not k.startswith("classifier.6."))
    if missing or unexpected:
        raise ValueError(f"{source} is not a torchvision VGG16 state dict: missing keys "
                         f"{missing[:6]}{'…' if len(missing) > 6 else ''}, unexpected keys "
                         f"{unexpected[:6]}{'…' if len(unexpected) > 6 else ''}")
    wrong = [f"{k}: {tuple(state[k].shape)} instead of {shape}"
             for k, (_, shape) in targets.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise ValueError(f"{source} does not fit this model's VGG16 layout: " + "; ".join(wrong))

    with torch.no_grad():
        for key, (param, _) in targets.items():
            value = state[key].to(param.dtype)
            if key == "features.0.weight" and param.shape[1] == 1:
                value = value.sum(dim=1, keepdim=True)
            param.copy_(value.reshape(param.shape))
    return model
