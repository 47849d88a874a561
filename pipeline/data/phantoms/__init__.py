"""Synthetic data with known masks: the embedded default for the demo and the tests."""

from __future__ import annotations

import os
from pathlib import Path

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
    ECHO_DEMO_COHORT,
    EchoPhantom,
    echo_phantom,
    echo_samples,
    write_echo_cine,
    write_echo_cohort,
    write_echo_phantom,
)
from pipeline.data.phantoms.horse_like import write_horse_like_set

#: The data kinds that are generated on first use (see :func:`ensure_demo_data`).
GENERATED_KINDS: tuple[str, ...] = ("demo", "echo_demo", "horse_demo")


def ensure_demo_data(kind: str, folder: str | os.PathLike) -> str:
    """Writes a generated data set to ``folder`` where it is missing and returns the folder.

    Args:
        kind: ``demo`` (the CTA phantom cohort), ``echo_demo`` (the echo phantom cohort) or
            ``horse_demo`` (the horse-like image set).
        folder: where the data goes.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "demo":
        demo_cohort_manifest(folder)
    elif kind == "echo_demo":
        write_echo_cohort(folder)
    elif kind == "horse_demo":
        if not (Path(folder) / "split.json").exists():
            write_horse_like_set(folder)
    else:
        raise ValueError(f"no generated data for data kind {kind!r}; generated kinds: demo, "
                         f"echo_demo, horse_demo")
    return str(folder)


__all__ = [
    "DEMO_COHORT",
    "ECHO_DEMO_COHORT",
    "GENERATED_KINDS",
    "CTAPhantom",
    "EchoPhantom",
    "NoisyBlocks",
    "cta_phantom",
    "demo_cohort_manifest",
    "echo_phantom",
    "echo_samples",
    "ensure_demo_data",
    "noisy_blocks",
    "write_cta_cohort",
    "write_cta_phantom",
    "write_echo_cine",
    "write_echo_cohort",
    "write_echo_phantom",
    "write_horse_like_set",
]
