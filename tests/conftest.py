"""Shared fixtures: seeded generators and small CRF problems."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


def block_problem(rng: np.random.Generator, batch: int = 3, size: int = 6, strength: float = 1.0):
    """Logits that favour a square's mask under noise, a noisy image of it, and the mask."""
    truth = np.zeros((batch, size, size), dtype=np.uint8)
    for n in range(batch):
        r, c = rng.integers(0, size // 2, size=2)
        truth[n, r:r + size // 2, c:c + size // 2] = 1
    logits = rng.normal(0.0, 1.5, truth.shape) + strength * (2.0 * truth - 1.0)
    images = truth[:, None] + 0.3 * rng.random((batch, 1, size, size))
    return logits, images, truth


@pytest.fixture
def graph_sizes(monkeypatch) -> list[int]:
    """The node count of every graph the graph cuts build while the test runs."""
    from pipeline.crf import graphcut

    sizes: list[int] = []
    build = graphcut._empty_graph

    def recording(n_nodes: int, n_edges: int):
        sizes.append(n_nodes)
        return build(n_nodes, n_edges)

    monkeypatch.setattr(graphcut, "_empty_graph", recording)
    return sizes


@pytest.fixture
def no_persistency(monkeypatch):
    """Returns a switch that turns persistency off: after calling it, every graph cut takes
    the whole grid, the oracle that cuts reduced by persistency must equal."""
    from pipeline.crf import graphcut

    def switch() -> None:
        monkeypatch.setattr(graphcut, "_undecided_box",
                            lambda undecided: tuple(slice(0, n) for n in undecided.shape))

    return switch


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $MMCRF_SHARED_DATA); skips with a message
    where it is absent, since a fresh clone has no shared data."""
    root = Path(os.environ.get("MMCRF_SHARED_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set MMCRF_SHARED_DATA)")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run fastest, and steadiest on a shared two-core machine, on one thread
    (ten times slower with two under load); use with ``pytest.mark.usefixtures``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cta_model_three_views(tmp_path_factory) -> Path:
    """One tiny CNN + piecewise CRF trained on the three views of 40×36×24 phantom volumes
    (32×32 slices), shared by the inference test modules (trained once per session)."""
    from tests._tiny_models import tiny_cta_model

    return tiny_cta_model(tmp_path_factory.mktemp("cta_model"), (40, 36, 24),
                          ("axial", "coronal", "sagittal"))
