"""Synthetic data with known masks: the embedded default for the demo and the tests."""

from __future__ import annotations

from pipeline.data.phantoms.blocks import NoisyBlocks, noisy_blocks

__all__ = ["NoisyBlocks", "noisy_blocks"]
