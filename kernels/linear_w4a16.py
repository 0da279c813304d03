"""``qcompile::linear_w4a16``: linear with 4-bit weights and 16-bit activations.

    linear_w4a16(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias,
                 int group_size) -> Tensor

computes ``F.linear(x, W, bias)`` for ``x [..., K]`` (float32, bfloat16 or float16) into
``[..., N]`` in x's dtype, where ``W = (code - zeros) * scales`` per group of
``group_size`` input channels (``qcompile.quantizers.QuantizedWeight`` layout: qweight
uint8 [N, ceil(K / 2)] holding two codes 0..15 per byte, low nibble first; scales and
zeros float32 [N, K / group_size]; ``zeros=None`` means zero point 8).

Implementations:

* :func:`linear_w4a16_reference`: pure torch, dequantize then linear in float32.
* CPU fast path (:func:`linear_w4a16_cpu`), taken automatically when
  :func:`cpu_fast_path_applies`: ``aten._weight_int4pack_mm_for_cpu`` with bfloat16
  activations. The kernel computes ``w = (q - 8) * scale + offset`` from an opaque packed
  weight and a bfloat16 ``[K / group_size, N, 2]`` tensor of (scale, offset), so the
  zero point becomes ``offset = (8 - zero) * scale``. Both are built once per weight and
  cached (:class:`qcompile.kernels._common.KernelLayoutCache`). Numerics: x, the scales,
  the offsets and the output are rounded to bfloat16 ("a16"); with float32 or float16
  activations the kernel is ~40-100x slower, so x is cast to bfloat16 and back.
* on CUDA, when triton is installed, the Triton kernel of
  :mod:`qcompile.kernels.triton_linear_w4a16` (int4 weights dequantized in registers inside
  the GEMM loop, split-K for M <= 16), registered by :mod:`qcompile.kernels._triton_common`;
  ``QCOMPILE_TRITON=0`` sends CUDA calls to the reference instead.
* fake implementation, so torch.export and torch.compile can trace the op.
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
from qcompile.quantizers import INT4_DEFAULT_ZERO_POINT, unpack_int4

__all__ = [
    "linear_w4a16",
    "linear_w4a16_reference",
    "linear_w4a16_cpu",
    "cpu_fast_path_applies",
    "INT4PACK_GROUP_SIZES",
    "INT4PACK_N_MULTIPLE",
]

OP_NAME = "qcompile::linear_w4a16"
BITS = 4
# Conditions of aten._convert_weight_to_int4pack_for_cpu / _weight_int4pack_mm_for_cpu
# (measured on torch 2.13: "expect N to be dividable by 16", "expect qGroupSize to be 32,
# 64, 128 or 256"; K must be a multiple of the group size, which the layout already implies).
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
INT4PACK_N_MULTIPLE = 16
# The CPU kernel's implicit zero point: it computes (q - 8) * scale + offset.
_KERNEL_ZERO_POINT = 8


def linear_w4a16_reference(
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
    """Whether ``aten._weight_int4pack_mm_for_cpu`` computes this call: CPU tensors,
    N a multiple of 16, group_size in (32, 64, 128, 256) dividing K."""
    return (
        all_on_cpu(x, qweight, scales, zeros)
        and qweight.shape[0] % INT4PACK_N_MULTIPLE == 0
        and group_size in INT4PACK_GROUP_SIZES
        and x.shape[-1] % group_size == 0
    )


def linear_w4a16_cpu(
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
            f"{OP_NAME}: the CPU int4pack kernel needs CPU tensors, N % {INT4PACK_N_MULTIPLE} == 0 "
            f"and group_size in {INT4PACK_GROUP_SIZES}; got device {x.device}, N={qweight.shape[0]}, "
            f"group_size={group_size}"
        )
    return _run_int4pack(x, qweight, scales, zeros, bias, group_size)


def _int4pack_layout(qweight, scales, zeros, group_size) -> tuple[torch.Tensor, torch.Tensor]:
    """(opaque packed weight, bfloat16 [K / group_size, N, 2] scales and offsets)."""
    in_features = scales.shape[1] * group_size
    codes = unpack_int4(qweight, in_features).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    zero_points = torch.full_like(scales, INT4_DEFAULT_ZERO_POINT) if zeros is None else zeros
    offsets = (_KERNEL_ZERO_POINT - zero_points) * scales
    scales_and_offsets = torch.stack((scales.t(), offsets.t()), dim=-1)
    return packed, scales_and_offsets.to(torch.bfloat16).contiguous()


_LAYOUT_CACHE = KernelLayoutCache(_int4pack_layout)


def _run_int4pack(x, qweight, scales, zeros, bias, group_size) -> torch.Tensor:
    packed, scales_and_offsets = _LAYOUT_CACHE.get(qweight, scales, zeros, group_size)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        rows_as_bfloat16(x), packed, group_size, scales_and_offsets
    )
    return restore_output(y, x, bias)


linear_w4a16 = define_weight_only_linear(
    "linear_w4a16", BITS, CpuFastPath(applies=cpu_fast_path_applies, run=_run_int4pack)
)
