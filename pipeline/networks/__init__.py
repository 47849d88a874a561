"""Segmentation networks: FCN-8s on a VGG16 backbone, at any width."""

from __future__ import annotations

from pipeline.networks.fcn8s import (
    MIN_INPUT_SIZE,
    FCN8s,
    bilinear_kernel,
    count_parameters,
    load_vgg16_weights,
    min_padding,
)

__all__ = [
    "MIN_INPUT_SIZE",
    "FCN8s",
    "bilinear_kernel",
    "count_parameters",
    "load_vgg16_weights",
    "min_padding",
]
