"""torchrun/DDP helpers: process-group set-up from the environment, gather and broadcast."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DEVICE_CHOICES", "all_gather_objects", "barrier", "broadcast_object",
           "init_from_env", "is_main", "main_rank_first", "rank", "resolve_device", "shutdown",
           "world_size"]

#: What ``--device`` takes (``cuda:N`` for a given GPU as well).
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device of a ``--device`` setting.

    ``auto`` (or None): CUDA when available, else the CPU. ``cuda``: this process's GPU:
    ``LOCAL_RANK`` under torchrun (each rank its own), else GPU 0. ``cuda:N``: that GPU.
    ``cpu``: the CPU.

    Raises:
        ValueError: an unknown setting, or a GPU asked for where CUDA is not available (or
            that GPU does not exist).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = local if text == "cuda" else text.split(":", 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise ValueError(f"device {spec!r}: the GPU index must be a number") from None
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu or auto")
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0: the only rank that writes checkpoints and logs."""
    return rank() == 0


def init_from_env() -> bool:
    """Initialises the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    NCCL when CUDA is available, gloo on CPU. Returns True when distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Destroys this rank's process group (no-op when not distributed).

    Call it once at the end of a torchrun job on every rank, error or not. A rank that exits
    with its gloo group alive while a peer is still working (rank 0 writing the last
    checkpoint) can be aborted by the C++ runtime ("terminate called without an active
    exception"). It does not wait for the other ranks: those with nothing left to do (the
    evaluation runs on rank 0 alone) would otherwise sit in a barrier that times out.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Waits for every rank (no-op when not distributed)."""
    if world_size() > 1:
        dist.barrier()


def main_rank_first(fn: Callable[..., Any], *args: Any) -> None:
    """Under torchrun, runs ``fn(*args)`` on rank 0 while the other ranks wait (e.g. writing
    generated data once); does nothing when not distributed."""
    if world_size() > 1:
        if is_main():
            fn(*args)
        barrier()
