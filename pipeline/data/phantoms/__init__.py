"""Synthetic data with known masks: the embedded default for the demo and the tests."""

from __future__ import annotations

from pipeline.data.phantoms.blocks import NoisyBlocks, noisy_blocks
from pipeline.data.phantoms.cta import (
    DEMO_COHORT,
    CTAPhantom,
    cta_phantom,
    demo_cohort_manifest,
    write_cta_cohort,
    write_cta_phantom,
)
from pipeline.data.phantoms.echo import (
    EchoPhantom,
    echo_phantom,
    write_echo_cine,
    write_echo_phantom,
)
from pipeline.data.phantoms.horse_like import write_horse_like_set

__all__ = [
    "DEMO_COHORT",
    "CTAPhantom",
    "EchoPhantom",
    "NoisyBlocks",
    "cta_phantom",
    "demo_cohort_manifest",
    "echo_phantom",
    "noisy_blocks",
    "write_cta_cohort",
    "write_cta_phantom",
    "write_echo_cine",
    "write_echo_phantom",
    "write_horse_like_set",
]
