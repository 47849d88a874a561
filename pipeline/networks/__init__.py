"""Segmentation networks: FCN-8s on a VGG16 backbone, at any width."""

from __future__ import annotations

from pipeline.networks.fcn8s import (
    MIN_INPUT_SIZE,
    FCN8s,
    bilinear_kernel,
    boundary_outputs,
    count_parameters,
    load_network_state,
    load_vgg16_weights,
    min_padding,
    split_boundary,
)

__all__ = [
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
