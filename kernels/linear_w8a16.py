"""``qcompile::linear_w8a16``: linear with 8-bit weights and 16-bit activations.

    linear_w8a16(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias,
                 int group_size) -> Tensor

computes ``F.linear(x, W, bias)`` for ``x [..., K]`` (float32, bfloat16 or float16) into
``[..., N]`` in x's dtype, where ``W = (qweight - zeros) * scales`` per group of
``group_size`` input channels (``qcompile.quantizers.QuantizedWeight`` layout: qweight
int8 [N, K], scales float32 [N, K / group_size], zeros None for symmetric weights).

Implementations:

* :func:`linear_w8a16_reference`: pure torch, dequantize then linear in float32.
* CPU fast path (:func:`linear_w8a16_cpu`), taken automatically when
  :func:`cpu_fast_path_applies`: ``aten._weight_int8pack_mm`` with bfloat16 activations.
  "a16" means 16-bit activations, so the bfloat16 rounding of x, of the scales and of
  the output are the intended numerics (with float32 activations the kernel is ~40x
  slower, so x is cast to bfloat16 and the result cast back).
* fake implementation, so torch.export and torch.compile can trace the op.

The Triton implementation is added by the kernels issue.
"""
from __future__ import annotations

from typing import Optional

import torch

from qcompile.kernels._common import (
    CpuFastPath,
    KernelLayoutCache,
    all_on_cpu,
    check_linear_inputs,
    define_weight_only_linear,
    reference_linear,
    restore_output,
    rows_as_bfloat16,
)

__all__ = [
    "linear_w8a16",
    "linear_w8a16_reference",
    "linear_w8a16_cpu",
    "cpu_fast_path_applies",
    "INT8PACK_K_MULTIPLE",
]

OP_NAME = "qcompile::linear_w8a16"
BITS = 8
# aten._weight_int8pack_mm on torch 2.13 returns garbage or crashes (segfault) when K is
# not a multiple of 16 (measured: K = 1, 3, 7, 33, 100); multiples of 16 are exact.
INT8PACK_K_MULTIPLE = 16


def linear_w8a16_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """The op's meaning in pure torch: dequantize the weight, then linear, in float32."""
    check_linear_inputs(OP_NAME, BITS, x, qweight, scales, zeros, bias, group_size)
    return reference_linear(BITS, x, qweight, scales, zeros, bias, group_size)


def cpu_fast_path_applies(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group_size: int,
) -> bool:
    """Whether ``aten._weight_int8pack_mm`` computes this call: CPU tensors, symmetric
    (``zeros is None``) per-channel (``group_size == K``) weights, K a multiple of 16."""
    k = qweight.shape[1]
    return (
        all_on_cpu(x, qweight, scales)
        and zeros is None
        and group_size == k
        and k % INT8PACK_K_MULTIPLE == 0
    )


def linear_w8a16_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """The CPU fast path called directly; raises ValueError where it does not apply."""
    check_linear_inputs(OP_NAME, BITS, x, qweight, scales, zeros, bias, group_size)
    if not cpu_fast_path_applies(x, qweight, scales, zeros, group_size):
        raise ValueError(
            f"{OP_NAME}: the CPU int8pack kernel needs CPU tensors, symmetric (zeros=None) "
            f"per-channel weights and K % {INT8PACK_K_MULTIPLE} == 0; got device {x.device}, "
            f"zeros {'None' if zeros is None else 'present'}, group_size={group_size}, K={qweight.shape[1]}"
        )
    return _run_int8pack(x, qweight, scales, zeros, bias, group_size)


def _bfloat16_channel_scales(qweight, scales, zeros, group_size) -> torch.Tensor:
    return scales.reshape(-1).to(torch.bfloat16).contiguous()


# The kernel reads the int8 weight as stored; only its scales need converting. Cached so a
# call costs no conversion (and so this op follows the same rule as the int4 op).
_SCALES_CACHE = KernelLayoutCache(_bfloat16_channel_scales)


def _run_int8pack(x, qweight, scales, zeros, bias, group_size) -> torch.Tensor:
    scales_bf16 = _SCALES_CACHE.get(qweight, scales, zeros, group_size)
    y = torch.ops.aten._weight_int8pack_mm(rows_as_bfloat16(x), qweight.contiguous(), scales_bf16)
    return restore_output(y, x, bias)


linear_w8a16 = define_weight_only_linear(
    "linear_w8a16", BITS, CpuFastPath(applies=cpu_fast_path_applies, run=_run_int8pack)
)
