"""Data entry: phantoms now; readers, label alignment, view slicing and manifests to come."""

from __future__ import annotations

from pipeline.data.phantoms import NoisyBlocks, noisy_blocks

__all__ = ["NoisyBlocks", "noisy_blocks"]
