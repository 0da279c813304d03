"""A measured latency table: each linear's time in each candidate format, on this machine.

The roofline of :mod:`qcompile.cost_model` is a model; ``Budget(latency_ms=...,
device="measured")`` budgets against measurements instead. For every distinct linear shape
(tokens ``M``, out ``N``, in ``K``, float dtype) and every candidate format, the op that
``passes/lower_to_kernels.py`` would insert (``qcompile::linear_w4a16`` / ``linear_w8a16``,
``linear_w8a8``, ``linear_w4a8`` / ``linear_w4a4``, or ``F.linear`` for float) runs on
random data of that shape; the formats of one shape are timed interleaved and each is
summarized by its median (``qcompile.timing``). Layers of the same shape share one
measurement. Timings are noisy on shared machines, so a budget near the boundary between
two assignments may choose differently from run to run; the roofline does not.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .act_quant import quantize_weight_per_channel_int8
from .cost_model import LinearCost
from .kernels import ACTIVATION_QUANT_LINEAR_OPS, W4_ACT_QUANT_LINEAR_OPS, WEIGHT_ONLY_LINEAR_OPS
from .quantizers import quantize_weight_rtn
from .timing import time_interleaved
from .weight_formats import WeightFormat, effective_group

__all__ = ["format_linear", "measure_latency_table"]


def format_linear(fmt: WeightFormat, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> y``: the linear ``weight`` as the op of ``fmt`` computes it (RTN-rounded weight,
    no bias), what a lowered graph runs for that layer."""
    if fmt.is_float:
        return lambda x: F.linear(x, weight)
    if fmt.grid_bits == 8 and fmt.quantizes_activations:
        codes, scales = quantize_weight_per_channel_int8(weight)
        op = ACTIVATION_QUANT_LINEAR_OPS["int8"]
        return lambda x: op(x, codes, scales, None, None, None)
    if fmt.grid_bits == 8:
        qw = quantize_weight_rtn(weight, 8, None, True)
        op = WEIGHT_ONLY_LINEAR_OPS[8]
        return lambda x: op(x, qw.qweight, qw.scales, qw.zeros, None, qw.group_size)
    group = effective_group(fmt, weight.shape[1])
    qw = quantize_weight_rtn(weight, 4, group, fmt.symmetric, grid_bits=fmt.grid_bits)
    if fmt.quantizes_activations:
        op = W4_ACT_QUANT_LINEAR_OPS[fmt.act_bits]
        return lambda x: op(x, qw.qweight, qw.scales, qw.zeros, None, None, qw.group_size)
    op = WEIGHT_ONLY_LINEAR_OPS[4]
    return lambda x: op(x, qw.qweight, qw.scales, qw.zeros, None, qw.group_size)


def _dtype(float_bits: int) -> torch.dtype:
    return {32: torch.float32, 16: torch.bfloat16, 64: torch.float64}[float_bits]


def measure_latency_table(costs: list[LinearCost], formats: list[WeightFormat], sizes: dict[str, int], *,
                          allowed: np.ndarray | None = None, repeat: int = 5, seed: int = 0,
                          progress: bool = True) -> np.ndarray:
    """Milliseconds ``[layers, formats]`` of each linear in each format at ``sizes`` (0 where
    ``allowed`` is False: not measured, never chosen)."""
    allowed = np.ones((len(costs), len(formats)), dtype=bool) if allowed is None else allowed
    shapes: dict[tuple, list[int]] = {}
    for i, c in enumerate(costs):
        key = (int(c.evaluate(c.tokens, sizes)), c.out_features, c.in_features, c.float_bits)
        shapes.setdefault(key, []).append(i)
    table = np.zeros((len(costs), len(formats)))
    gen = torch.Generator().manual_seed(seed)
    for (m, n, k, bits), rows in tqdm(shapes.items(), desc="measuring linear latencies", unit="shape",
                                     disable=not progress, leave=False):
        dtype = _dtype(bits)
        weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
        x = torch.randn(m, k, generator=gen).to(dtype)
        columns = [j for j in range(len(formats)) if allowed[rows].any(axis=0)[j]]
        timings = time_interleaved({formats[j].name: (lambda f=format_linear(formats[j], weight): f(x))
                                    for j in columns}, repeat=repeat)
        for j in columns:
            table[rows, j] = timings[formats[j].name].median_s * 1e3
    return table
