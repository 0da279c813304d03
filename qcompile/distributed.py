"""Calibration across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank calibrates on its own share of the batches (:func:`shard_batches`); the
per-linear statistics are then reduced in place (:func:`all_reduce_stats`): abs-max by
MAX, token counts and the float64 sums (Σ|x|, Σx², Hessians Σ x xᵀ) by SUM. After the
reduction every rank holds the statistics of all batches, so every rank rounds the same
weights (rounding is deterministic); rank 0 writes the result.

MAX and integer sums are exact, so abs-max and token counts equal a single process's
bit for bit. The float64 sums are added in another order (per rank, then across ranks)
and agree with a single process's to float64 rounding (relative ~1e-15).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .calibration import CalibrationStats

__all__ = ["shard_batches", "all_reduce_stats", "rank_and_world"]


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_batches(batches: list[Any], group: Any = None) -> list[Any]:
    """This rank's calibration batches: every ``world``-th one, starting at ``rank``."""
    rank, world = rank_and_world(group)
    return list(batches[rank::world])


def _device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_stats(stats: CalibrationStats, group: Any = None, *, hessian: bool = False) -> None:
    """Reduce every layer's statistics over ``group`` in place (see the module docstring).

    Layers are reduced in sorted name order, so every rank issues the same collectives. A
    rank with no batches contributes zeros.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_stats needs torch.distributed to be initialized")
    device = _device(group)

    def reduce(t: torch.Tensor, op) -> torch.Tensor:
        moved = t.to(device)
        dist.all_reduce(moved, op=op, group=group)
        return moved.to(t.device)

    counts = torch.tensor([stats.batches], dtype=torch.int64)
    stats.batches = int(reduce(counts, dist.ReduceOp.SUM)[0])
    for name in sorted(stats.layers):
        s = stats.layers[name]
        k = s.absmax.numel()
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        s.absmax = reduce(s.absmax, dist.ReduceOp.MAX)
        s.tokens = int(reduce(torch.tensor([s.tokens], dtype=torch.int64), dist.ReduceOp.SUM)[0])
        s.abs_sum = reduce(zeros(k) if s.abs_sum is None else s.abs_sum, dist.ReduceOp.SUM)
        s.sq_sum = reduce(zeros(k) if s.sq_sum is None else s.sq_sum, dist.ReduceOp.SUM)
        if hessian:
            s.hessian = reduce(zeros(k, k) if s.hessian is None else s.hessian, dist.ReduceOp.SUM)
