"""The binary grid CRF: features, graph-cut inference, max-margin learning and its loss.

This package is the method on its own: it imports neither the data code nor the engines, and
only ``MaxMarginLoss`` needs torch (imported on first use, so graph-cut worker processes stay
light).
"""

from __future__ import annotations

from pipeline.crf.features import (
    CONNECTIVITIES,
    CRFWeights,
    GridCRF,
    data_driven_beta,
    energy,
    hamming_loss,
)
from pipeline.crf.graphcut import (
    GraphCutPool,
    PendingLabellings,
    graph_cut,
    keep_freed_memory,
    loss_augmented_labelling,
    map_labelling,
)
from pipeline.crf.learning import (
    LearningResult,
    boundary_gradient,
    cutting_plane,
    edge_feature_gradient,
    envelope_gradient,
    learn_weights,
)
from pipeline.crf.qp import MarginQP, QPSolution
from pipeline.crf.volume import volume_energy, volume_map_labelling

__all__ = [
    "CONNECTIVITIES",
    "CRFWeights",
    "GraphCutPool",
    "GridCRF",
    "LearningResult",
    "MarginQP",
    "MaxMarginLoss",
    "PendingLabellings",
    "QPSolution",
    "boundary_gradient",
    "cutting_plane",
    "data_driven_beta",
    "edge_feature_gradient",
    "energy",
    "envelope_gradient",
    "graph_cut",
    "hamming_loss",
    "keep_freed_memory",
    "learn_weights",
    "loss_augmented_labelling",
    "map_labelling",
    "volume_energy",
    "volume_map_labelling",
]


def __getattr__(name: str):
    if name == "MaxMarginLoss":
        from pipeline.crf.loss import MaxMarginLoss

        return MaxMarginLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
