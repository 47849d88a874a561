"""``MaxMarginLoss``: the CRF's max-margin objective γ as a differentiable loss of CNN logits;
``outline_loss``: the boundary head's supervised loss on the ground truth's outline."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from pipeline.crf.features import CONNECTIVITIES, CRFWeights, GridCRF, _edge_slices
from pipeline.crf.graphcut import GraphCutPool
from pipeline.crf.learning import (
    DEFAULT_TOL,
    LearningResult,
    boundary_gradient,
    cutting_plane,
    envelope_gradient,
)
from pipeline.crf.qp import MarginQP

__all__ = ["MaxMarginLoss", "label_outline", "outline_loss"]


class _MarginObjective(torch.autograd.Function):
    """γ(a, b) with the precomputed envelope gradients as its backward (b: the boundary maps,
    or an empty tensor without the learned edge feature)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, boundary: torch.Tensor, gamma: torch.Tensor,
                grad: torch.Tensor, grad_boundary: torch.Tensor):
        ctx.save_for_backward(grad, grad_boundary)
        return gamma.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, grad_boundary = ctx.saved_tensors
        return grad_output * grad, grad_output * grad_boundary, None, None, None


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


class MaxMarginLoss(torch.nn.Module):
    """Runs Algorithm 1 on a batch and returns γ, differentiable w.r.t. the CNN's logits.

    The gradient is the envelope-theorem formula of ``DESIGN.md`` (exact where γ is
    differentiable): descent on γ moves the probabilities toward the ground truth. The module
    keeps the learned weights (warm start for the next batch) and, when ``forward`` gets sample
    ids, each sample's working set, which is re-evaluated on the new logits next time.

    Args:
        C: slack penalty on the normalised scale.
        connectivity: 4 or 8.
        beta: contrast β; None for the data-driven choice per image.
        tol: violation threshold ε of the cutting plane.
        max_iterations: cap on cutting-plane passes per batch.
        initial_weights: CRF weights for the first batch.
        solver_options: Clarabel settings.
        workers: graph-cut worker processes, started on the first batch (0: in this process).
        pool: a graph-cut pool owned by the caller (used instead of ``workers``; ``close``
            leaves it running).

    Attributes:
        weights: the CRF weights learned on the last batch.
        working_sets: sample id → list of labellings, for samples seen with ids.
        last_result: the full :class:`LearningResult` of the last batch.
    """

    def __init__(self, C: float = 1.0, *, connectivity: int = 4, beta: float | None = None,
                 tol: float = DEFAULT_TOL, max_iterations: int = 100,
                 initial_weights: CRFWeights | None = None,
                 solver_options: dict | None = None, workers: int = 0,
                 pool: GraphCutPool | None = None) -> None:
        super().__init__()
        if not np.isfinite(C) or C <= 0:
            raise ValueError(f"C must be a positive finite number, got {C!r}")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
        self.C = float(C)
        self.connectivity = connectivity
        self.beta = beta
        self.tol = tol
        self.max_iterations = max_iterations
        self.solver_options = solver_options
        self.weights = initial_weights or CRFWeights()
        self.working_sets: dict[Hashable, list[np.ndarray]] = {}
        self.last_result: LearningResult | None = None
        self._qps: dict[tuple[int, int], MarginQP] = {}
        self.workers = int(workers)
        self._pool: GraphCutPool | None = pool
        self._owns_pool = pool is None

    @staticmethod
    def foreground_logits(logits: torch.Tensor) -> torch.Tensor:
        """B×H×W foreground logits from B×1×H×W, or B×2×H×W (a = l1 − l0, softmax ≡ sigmoid)."""
        if logits.ndim != 4 or logits.shape[1] not in (1, 2):
            raise ValueError(f"logits must be B×1×H×W or B×2×H×W, got shape {tuple(logits.shape)}")
        if logits.shape[1] == 2:
            return logits[:, 1] - logits[:, 0]
        return logits[:, 0]

    def _qp_for(self, n_samples: int, n_features: int = 3) -> MarginQP:
        key = (n_samples, n_features)
        if key not in self._qps:  # one compiled QP per batch size (last batches differ)
            self._qps[key] = MarginQP(n_samples, self.C, solver_options=self.solver_options,
                                      n_features=n_features)
        return self._qps[key]

    def _get_pool(self) -> GraphCutPool | None:
        if self._pool is None and self.workers > 0:
            self._pool = GraphCutPool(self.workers)
        return self._pool

    def close(self) -> None:
        """Stops the graph-cut workers this module started, if any."""
        if self._pool is not None and self._owns_pool:
            self._pool.close()
            self._pool = None

    def forward(self, logits: torch.Tensor, images: torch.Tensor, truths: torch.Tensor,
                ids: Sequence[Hashable] | None = None,
                boundary: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the cutting plane on the batch and returns γ.

        Args:
            logits: B×1×H×W foreground logits or B×2×H×W two-class logits.
            images: B×C×H×W images (contrast term).
            truths: B×1×H×W (or B×H×W) ground truth in {0, 1}.
            ids: optional hashable sample ids; working sets of known ids warm-start the
                cutting plane and are updated afterwards.
            boundary: optional B×H×W (or B×1×H×W) boundary strengths in [0, 1] (e.g. a
                network's boundary head): the CRF then has the learned edge feature ψ4 and
                γ is differentiable with respect to them too
                (:func:`pipeline.crf.learning.boundary_gradient`). Every batch of one loss
                must have it, or none.

        Returns:
            γ as a 0-d tensor of the logits' dtype and device.

        Raises:
            ValueError: empty batch, shape mismatch, non-finite logits, non-binary truths.
        """
        a = self.foreground_logits(logits)
        batch, height, width = a.shape
        if batch == 0:
            raise ValueError("empty batch: MaxMarginLoss needs at least one sample")
        if images.ndim != 4 or images.shape[0] != batch or tuple(images.shape[2:]) != (height,
                                                                                      width):
            raise ValueError(f"images must be B×C×H×W = {batch}×C×{height}×{width}, "
                             f"got shape {tuple(images.shape)}")
        t = truths[:, 0] if truths.ndim == 4 and truths.shape[1] == 1 else truths
        if tuple(t.shape) != (batch, height, width):
            raise ValueError(f"truths must be B×1×H×W = {batch}×1×{height}×{width}, "
                             f"got shape {tuple(truths.shape)}")
        if ids is not None and len(ids) != batch:
            raise ValueError(f"got {len(ids)} ids for a batch of {batch}")
        a_np, img_np, t_np = _to_numpy(a), _to_numpy(images), _to_numpy(t)
        if not np.all((t_np == 0) | (t_np == 1)):
            raise ValueError("truths must be binary (values 0 and 1 only)")
        b_np = None
        if boundary is not None:
            b = boundary[:, 0] if boundary.ndim == 4 and boundary.shape[1] == 1 else boundary
            if tuple(b.shape) != (batch, height, width):
                raise ValueError(f"boundary must be B×H×W = {batch}×{height}×{width}, got "
                                 f"shape {tuple(boundary.shape)}")
            b_np = _to_numpy(b)
        crfs = []
        for n in range(batch):
            try:
                crfs.append(GridCRF.from_logits(
                    a_np[n], img_np[n], connectivity=self.connectivity, beta=self.beta,
                    boundary=None if b_np is None else b_np[n]))
            except ValueError as err:
                raise ValueError(f"batch sample {n}: {err}") from None
        truth_list = [t_np[n].astype(np.uint8) for n in range(batch)]
        warm = None if ids is None else [self.working_sets.get(i, []) for i in ids]
        result = cutting_plane(crfs, truth_list, C=self.C, tol=self.tol,
                               max_iterations=self.max_iterations, initial_weights=self.weights,
                               working_sets=warm, qp=self._qp_for(batch, crfs[0].n_features),
                               pool=self._get_pool())
        self.weights = result.weights
        self.last_result = result
        if ids is not None:
            for i, ws in zip(ids, result.working_sets, strict=True):
                self.working_sets[i] = ws
        grad = np.stack(envelope_gradient(result, truth_list))
        grad_t = torch.as_tensor(grad, dtype=a.dtype, device=a.device)
        gamma = torch.tensor(result.gamma, dtype=a.dtype, device=a.device)
        if b_np is None:
            empty = a.new_zeros(0)
            return _MarginObjective.apply(a, empty, gamma, grad_t, empty)
        grad_b = np.stack(boundary_gradient(result, crfs, truth_list, list(b_np)))
        return _MarginObjective.apply(a, b, gamma, grad_t,
                                      torch.as_tensor(grad_b, dtype=b.dtype, device=b.device))


def label_outline(labels: torch.Tensor, connectivity: int = 4) -> torch.Tensor:
    """The pixels of a labelling that lie on a cut edge of the grid: those with a neighbour
    (under ``connectivity``) of the other label, on both sides of the cut.

    These are exactly the pixels i, j of the edges where the learned edge feature
    ψ4 = [y_i≠y_j]·(1 − max(b_i, b_j)) is paid, so b = 1 on them (and only the cut there is
    free) is the map that makes the ground truth's outline cost nothing.

    Args:
        labels: B×H×W (or H×W) 0/1 labellings.
        connectivity: 4 or 8, the grid's.

    Returns:
        A bool tensor of the labels' shape.

    Raises:
        ValueError: connectivity is not 4 or 8.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    y = labels > 0.5
    outline = torch.zeros_like(y)
    for offset in CONNECTIVITIES[connectivity]:  # the grid's edges, as GridCRF builds them
        src, dst = _edge_slices(tuple(y.shape[-2:]), offset)
        src, dst = (..., *src), (..., *dst)
        cut = y[src] != y[dst]
        outline[src] |= cut
        outline[dst] |= cut
    return outline


def outline_loss(boundary_logits: torch.Tensor, labels: torch.Tensor, *,
                 connectivity: int = 4) -> torch.Tensor:
    """Class-balanced binary cross-entropy of boundary logits against the labels' outline
    (:func:`label_outline`), HED's loss: in each image an outline pixel weighs
    |non-outline| / |all| and any other pixel |outline| / |all|, so the few outline pixels
    are not drowned; an image without an outline (empty or full) adds nothing.

    Args:
        boundary_logits: B×H×W logits of the boundary strength b.
        labels: B×H×W 0/1 ground truth.
        connectivity: 4 or 8, the CRF grid's.

    Returns:
        The mean over the batch's images of each image's weighted sum divided by its pixel
        count (a scalar).

    Raises:
        ValueError: the shapes differ.
    """
    if boundary_logits.shape != labels.shape:
        raise ValueError(f"boundary logits {tuple(boundary_logits.shape)} and labels "
                         f"{tuple(labels.shape)} differ in shape")
    target = label_outline(labels, connectivity).to(boundary_logits.dtype)
    dims = tuple(range(1, target.dim()))
    positive = target.sum(dim=dims, keepdim=True) / target[0].numel()
    weight = torch.where(target > 0, 1.0 - positive, positive)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(boundary_logits, target,
                                                               weight=weight, reduction="none")
    return bce.mean(dim=dims).mean()
