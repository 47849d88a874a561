"""Random flips, affine warps and intensity jitter of training batches (image and label alike)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """What a training batch is randomly changed by, each draw independent per image.

    Geometric changes move image and label together (bilinear image, nearest label, reflected
    borders, so the two stay consistent at the edges); intensity changes touch the image only.
    The CRF's contrast term sees the augmented image, as the CNN does.

    Attributes:
        hflip: probability of a left-right flip.
        vflip: probability of an up-down flip (0 for photographs: horses do not stand on
            their heads).
        scale: (low, high) zoom factor range; (1, 1) for none.
        rotate: maximum rotation in degrees (uniform in ±rotate).
        translate: maximum shift as a fraction of the image side (uniform in ±translate).
        brightness: maximum additive shift of the intensities, as a fraction of the image's
            intensity range.
        contrast: maximum relative change of the contrast about the image's mean.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    scale: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment: {name} is a probability in [0, 1], got "
                                 f"{getattr(self, name)!r}")
        low, high = (float(s) for s in self.scale)
        if not 0.0 < low <= high:
            raise ValueError(f"augment: scale must be (low, high) with 0 < low <= high, "
                             f"got {self.scale!r}")
        object.__setattr__(self, "scale", (low, high))
        for name in ("rotate", "translate", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment: {name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, value: bool | Mapping[str, Any] | None) -> Augmentation | None:
        """The augmentation a training config's ``augment`` asks for.

        Args:
            value: False/None (none), True (random horizontal and vertical flips, the
                original behaviour) or a mapping of this class's fields.

        Returns:
            The augmentation, or None for none.

        Raises:
            ValueError: an unknown field or a value out of range.
        """
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise ValueError(f"augment must be true, false or a mapping, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"augment: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if k == "scale" else float(v)) for k, v in value.items()})

    @property
    def warps(self) -> bool:
        """Whether a geometric warp beyond flips is drawn."""
        return self.scale != (1.0, 1.0) or self.rotate > 0 or self.translate > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments a batch.

        Args:
            images: B×C×H×W float images.
            labels: B×1×H×W {0, 1} float labels.
            generator: the run's random generator (CPU), so runs are reproducible.

        Returns:
            (images, labels), new tensors of the same shapes.
        """
        n = images.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

        sx = torch.where(uniform(0, 1) < self.hflip, -1.0, 1.0)
        sy = torch.where(uniform(0, 1) < self.vflip, -1.0, 1.0)
        if self.warps:
            zoom = uniform(*self.scale)
            angle = uniform(-self.rotate, self.rotate) * (math.pi / 180.0)
            shift = [uniform(-self.translate, self.translate) * 2.0 for _ in range(2)]
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            # output → input sampling coordinates (normalised to [-1, 1]): flip, rotate, zoom
            theta = torch.stack([torch.stack([cos * sx, -sin * sy, shift[0]], -1),
                                 torch.stack([sin * sx, cos * sy, shift[1]], -1)], 1)
            grid = F.affine_grid(theta.to(images.dtype).to(images.device), list(images.shape),
                                 align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                                   align_corners=False)
            labels = F.grid_sample(labels, grid.to(labels.dtype), mode="nearest",
                                   padding_mode="reflection", align_corners=False)
        else:  # exact flips, no resampling
            images, labels = images.clone(), labels.clone()
            for i in range(n):
                dims = [d for d, s in ((-1, sx[i]), (-2, sy[i])) if s < 0]
                if dims:
                    images[i], labels[i] = images[i].flip(dims), labels[i].flip(dims)
        if self.brightness > 0 or self.contrast > 0:
            flat = images.reshape(n, -1)
            low, high = flat.min(1).values, flat.max(1).values
            mean = flat.mean(1)
            gain = (1.0 + uniform(-self.contrast, self.contrast)).to(images)
            offset = uniform(-self.brightness, self.brightness).to(images) * (high - low)
            view = (n,) + (1,) * (images.ndim - 1)
            images = ((images - mean.view(view)) * gain.view(view) + mean.view(view)
                      + offset.view(view))
        return images, labels
