"""``qcompile::linear_w4a8`` and ``qcompile::linear_w4a4``: linears with 4-bit group-wise
weights AND per-token integer activations (8-bit or 4-bit), the activations quantized
inside the op.

    linear_w4a8(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias,
                Tensor? smooth, int group_size) -> Tensor
    linear_w4a4(...same...) -> Tensor

Both compute ``F.linear(x, W, bias)`` for ``x [..., K]`` (float32, bfloat16 or float16)
into ``[..., N]`` in x's dtype, where

* the weight is in the 4-bit layout of :class:`qcompile.quantizers.QuantizedWeight`:
  ``qweight`` uint8 ``[N, ceil(K / 2)]`` (two codes 0..15 per byte, low nibble first),
  ``scales`` float32 ``[N, G]`` and ``zeros`` float32 ``[N, G]`` (integer zero points in
  0..15; ``None`` means 8, the symmetric grid), ``G = K / group_size`` (``group_size = K``
  is per-channel);
* x is first divided by the optional smoothing vector ``smooth [K]`` (online smoothing, as
  in ``qcompile::linear_w8a8``) and quantized per token, symmetrically, by the numerics of
  ``qcompile::quantize_per_token``: ``linear_w4a8`` to int8 codes in [-127, 127]
  (``xscale = absmax / 127``), ``linear_w4a4`` to int4 codes in [-7, 7] (``absmax / 7``,
  stored in int8);
* each group's dot product is accumulated exactly in integers:
  ``acc[g, m, n] = Σ_{k in group g} a[m, k] * (code[n, k] - zero[n, g])``
  (``|a| <= 127`` and ``|code - zero| <= 15``, so int32 holds it for every group size up
  to :data:`W4AX_INT32_MAX_GROUP`);
* the epilogue is float32, in this order (:func:`w4ax_epilogue`): ``y = acc[0] * scales[:, 0]``,
  then ``y = y + acc[g] * scales[:, g]`` for g = 1 .. G-1 in turn (each ``acc`` converted to
  the nearest float32, each product and sum rounded to float32), then ``y * xscale[m]``,
  then ``+ bias``, then the cast to x's dtype. Fixing the order is what lets every
  implementation give the same bits.

No online Hadamard argument: a rotated linear gets a ``qcompile::hadamard`` node in front
of this op. (On CPU fusing it would save nothing, since the Hadamard op's CPU path is
already the vectorized reference; a fused Triton kernel would be the reason to add one.)

Implementations:

* references (:func:`linear_w4a8_reference`, :func:`linear_w4a4_reference`), pure torch:
  per-token quantization by :func:`qcompile.act_quant.quantize_activation_per_token`, group
  accumulation in float64 (:func:`group_matmul_reference`; exact, every partial sum is an
  integer below 2**53), the epilogue above. They run on any device.
* CPU fast path (:func:`linear_w4ax_cpu`, taken for CPU tensors where
  :func:`int_mm_path_applies`): the activation codes from the in-place CPU quantization of
  ``qcompile::quantize_per_token`` (bit-identical to the reference), then per group one
  ``torch._int_mm`` (int8 x int8 -> int32) against a cached int8 copy of ``code - zero``
  laid out ``[G, group_size, N]`` (built once per weight, :class:`KernelLayoutCache`; it
  costs K * N bytes), and the same epilogue, so the result is bit-identical to the
  reference. Per-channel weights take one ``torch._int_mm`` for the whole K. With groups,
  rows are processed in blocks of :func:`rows_per_block` so that the float32 accumulator
  of a block stays in cache while the G products are added into it. Needs
  ``group_size >= 2`` (``torch._int_mm`` on CPU returns garbage for an inner dimension of
  1; see :mod:`qcompile.kernels.linear_w8a8`) and ``group_size <= W4AX_INT32_MAX_GROUP``;
  other CPU calls take the reference.
  Cost (``benchmarks/w4ax_ops.py``; M = 4096 rows, K x N = 384 x 384 and 1536 x 384, the
  whole op with quantization, smoothing and bias against fp32 ``F.linear`` with bias;
  1 thread, as the 2 shared cores were busy with other jobs): per-channel 2.1-2.6x faster
  (one int8 GEMM), g128 1.6-1.9x, g32 0.86-0.97x; the float64 reference 0.07-0.41x. With
  groups the G unfused epilogue passes (convert, multiply, add over ``[rows, N]`` per
  group) and the small-K GEMMs (``torch._int_mm`` with K = 32 runs several times below its
  large-K rate; merging groups into block-diagonal GEMMs measured slower) dominate: a fused
  kernel (Triton on GPU) is what removes that cost.
* on CUDA, when triton is installed, the Triton kernel of
  :mod:`qcompile.kernels.triton_linear_w4ax` (per-token quantization, then a GEMM that
  unpacks the 4-bit weight in registers, ``tl.dot`` int8 x int8 -> int32 per group and this
  epilogue fused; bit-identical to the reference), registered by
  :mod:`qcompile.kernels._triton_common`; ``QCOMPILE_TRITON=0``, or
  ``group_size > W4AX_INT32_MAX_GROUP``, sends CUDA calls to the reference. Other devices:
  the reference.
* fake implementations, so torch.export and torch.compile can trace the ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from qcompile.act_quant import FP8_DTYPE, quantize_activation_per_token
from qcompile.kernels._common import KernelLayoutCache, all_on_cpu
from qcompile.kernels.linear_w8a8 import INT_MM_CPU_MIN_K
from qcompile.kernels.quantize_per_token import (
    check_activation_and_smooth,
    check_same_device,
    quantize_rows_fast,
)
from qcompile.quantizers import INT4_DEFAULT_ZERO_POINT, check_quantized_layout, unpack_int4

__all__ = [
    "linear_w4a8",
    "linear_w4a4",
    "linear_w4a8_reference",
    "linear_w4a4_reference",
    "linear_w4ax_reference",
    "linear_w4ax_cpu",
    "check_w4ax_inputs",
    "centered_weight_codes",
    "group_matmul_reference",
    "w4ax_epilogue",
    "int_mm_path_applies",
    "rows_per_block",
    "W4AX_OP_NAMES",
    "W4AX_SCHEMA",
    "W4AX_INT32_MAX_GROUP",
    "W4AX_ACT_BITS",
]

WEIGHT_BITS = 4
W4AX_ACT_BITS = (8, 4)
W4AX_OP_NAMES = {8: "qcompile::linear_w4a8", 4: "qcompile::linear_w4a4"}
W4AX_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, Tensor? smooth, "
    "int group_size) -> Tensor"
)
# |a| <= 127 (int8 activations; 7 for int4) and |code - zero| <= 15, so a group's integer
# accumulator is at most 1905 * group_size in magnitude: int32 holds it up to this size.
_MAX_PRODUCT = 127 * 15
W4AX_INT32_MAX_GROUP = (2**31 - 1) // _MAX_PRODUCT
# Float32 accumulator bytes per row block of the grouped CPU path: small enough to stay in
# the L2 cache while the G group products are added into it.
_BLOCK_BYTES = 512 * 1024


def check_w4ax_inputs(
    op: str,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    group_size: int,
) -> int:
    """Validate the inputs of ``linear_w4a8`` / ``linear_w4a4``; return N.

    Only shapes, dtypes and devices (never values), so it also runs on fake tensors.
    Raises TypeError for a wrong dtype and ValueError for a wrong shape or device, naming
    ``op`` and the shapes involved.
    """
    k = check_activation_and_smooth(op, x, smooth)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    check_same_device(op, x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    try:
        n = check_quantized_layout(
            qweight, scales, zeros, bits=WEIGHT_BITS, group_size=group_size, in_features=k
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{op} with x of shape {tuple(x.shape)}: {exc}") from exc
    if bias is not None:
        if not bias.is_floating_point() or bias.dtype == FP8_DTYPE:
            raise TypeError(f"{op}: bias must be float32, bfloat16, float16 or float64, got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    return n


def centered_weight_codes(
    op: str, qweight: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int, in_features: int
) -> torch.Tensor:
    """``code - zero`` as int8 ``[N, K]`` (values in [-15, 15]).

    Raises ValueError naming ``op`` if ``zeros`` holds anything but integers in 0..15 (the
    only zero points a 4-bit grid has; the integer accumulation depends on it).
    """
    codes = unpack_int4(qweight, in_features).to(torch.int8)
    n = codes.shape[0]
    if zeros is None:
        return codes - INT4_DEFAULT_ZERO_POINT
    bad = (zeros != torch.round(zeros)) | (zeros < 0) | (zeros > 15)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{op}: zeros must hold integer zero points in 0..15 (4-bit codes); "
            f"zeros{list(first)} = {float(zeros[first])}"
        )
    grouped = codes.reshape(n, in_features // group_size, group_size)
    return (grouped - zeros.to(torch.int8).unsqueeze(-1)).reshape(n, in_features)


def group_matmul_reference(a: torch.Tensor, wc: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group products ``acc[g] = a[:, group g] @ wc[:, group g].T`` of integer tensors
    ``a [M, K]`` and ``wc [N, K]``, exactly, as float64 ``[G, M, N]`` holding integers.

    Exact in float64: every product and partial sum is an integer below 2**53.
    """
    m, k = a.shape
    n = wc.shape[0]
    groups = k // group_size
    a3 = a.to(torch.float64).reshape(m, groups, group_size).transpose(0, 1)
    w3 = wc.to(torch.float64).reshape(n, groups, group_size).permute(1, 2, 0)
    return torch.bmm(a3, w3)


def w4ax_epilogue(
    acc: torch.Tensor,
    xscales: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(Σ_g acc[g] * scales[:, g]) * xscales + bias`` in float32, in the module's fixed
    order (groups summed from first to last), as ``out_dtype``.

    ``acc [G, M, N]`` holds integers (int32, int64 or float64); each is converted to the
    nearest float32, so equal accumulators give equal outputs. ``xscales [M, 1]``,
    ``scales [N, G]``.
    """
    scales_t = scales.to(torch.float32).t()
    y = torch.mul(acc[0].to(torch.float32), scales_t[0])
    for g in range(1, acc.shape[0]):
        y.add_(torch.mul(acc[g].to(torch.float32), scales_t[g]))
    y.mul_(xscales.to(torch.float32))
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(out_dtype)


def linear_w4ax_reference(
    act_bits: int,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """The meaning of ``linear_w4a<act_bits>`` in pure torch: per-token quantization, exact
    group accumulation (float64), the float32 epilogue of :func:`w4ax_epilogue`."""
    op = _op_name(act_bits)
    n = check_w4ax_inputs(op, x, qweight, scales, zeros, bias, smooth, group_size)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    codes, xscales = quantize_activation_per_token(x2, smooth, act_bits, "int")
    wc = centered_weight_codes(op, qweight, zeros, group_size, k)
    y = w4ax_epilogue(group_matmul_reference(codes, wc, group_size), xscales, scales, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def linear_w4a8_reference(x, qweight, scales, zeros, bias, smooth, group_size) -> torch.Tensor:
    """Reference of ``qcompile::linear_w4a8`` (int8 per-token activations)."""
    return linear_w4ax_reference(8, x, qweight, scales, zeros, bias, smooth, group_size)


def linear_w4a4_reference(x, qweight, scales, zeros, bias, smooth, group_size) -> torch.Tensor:
    """Reference of ``qcompile::linear_w4a4`` (int4 per-token activations)."""
    return linear_w4ax_reference(4, x, qweight, scales, zeros, bias, smooth, group_size)


def int_mm_path_applies(*tensors: Optional[torch.Tensor], group_size: int) -> bool:
    """Whether the CPU ``torch._int_mm`` path computes the op: CPU tensors and
    ``2 <= group_size <= W4AX_INT32_MAX_GROUP``."""
    return all_on_cpu(*tensors) and INT_MM_CPU_MIN_K <= group_size <= W4AX_INT32_MAX_GROUP


def rows_per_block(n: int) -> int:
    """Rows of a block of the grouped CPU path: a float32 ``[rows, N]`` accumulator of
    about 512 KiB, at least 16 rows."""
    return max(16, _BLOCK_BYTES // (4 * max(n, 1)))


def _build_layout(op: str):
    def build(qweight, scales, zeros, group_size):
        n, groups = scales.shape
        k = groups * group_size
        wc = centered_weight_codes(op, qweight, zeros, group_size, k)
        # [N, K] -> [G, group_size, N]: each group's [K_g, N] operand of torch._int_mm, contiguous.
        w_groups = wc.reshape(n, groups, group_size).permute(1, 2, 0).contiguous()
        return w_groups, scales.t().contiguous()

    return build


# One cache per op so that a bad zero point is reported with the op's name; an entry lives
# as long as its weight (see KernelLayoutCache).
_LAYOUT_CACHES = {bits: KernelLayoutCache(_build_layout(W4AX_OP_NAMES[bits])) for bits in W4AX_ACT_BITS}


def _grouped_int_mm(codes: torch.Tensor, w_groups: torch.Tensor, scales_t: torch.Tensor) -> torch.Tensor:
    """``Σ_g fl(acc[g]) * scales_t[g]`` (the first step of :func:`w4ax_epilogue`) with the
    int32 group accumulators from ``torch._int_mm``, block of rows by block of rows."""
    m = codes.shape[0]
    groups, group_size, n = w_groups.shape
    if groups == 1:
        return torch.mul(torch._int_mm(codes, w_groups[0]), scales_t[0])
    a_groups = codes.reshape(m, groups, group_size).transpose(0, 1).contiguous()
    y = torch.empty((m, n), dtype=torch.float32, device=codes.device)
    step = rows_per_block(n)
    for r0 in range(0, m, step):
        block = y[r0:r0 + step]
        # int32 * float32 converts the accumulator to float32 first: the same value as .to().
        torch.mul(torch._int_mm(a_groups[0, r0:r0 + step], w_groups[0]), scales_t[0], out=block)
        for g in range(1, groups):
            block.add_(torch.mul(torch._int_mm(a_groups[g, r0:r0 + step], w_groups[g]), scales_t[g]))
    return y


def _linear_cpu(act_bits, x, qweight, scales, zeros, bias, smooth, group_size, n) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    codes, xscales = quantize_rows_fast(x2, smooth, act_bits, "int")
    w_groups, scales_t = _LAYOUT_CACHES[act_bits].get(qweight, scales, zeros, group_size)
    y = _grouped_int_mm(codes, w_groups, scales_t)
    y.mul_(xscales)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def linear_w4ax_cpu(
    act_bits: int,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """The CPU fast path of ``linear_w4a<act_bits>`` called directly (bit-identical to the
    reference); raises ValueError where it does not apply (:func:`int_mm_path_applies`)."""
    op = _op_name(act_bits)
    n = check_w4ax_inputs(op, x, qweight, scales, zeros, bias, smooth, group_size)
    if not int_mm_path_applies(x, qweight, scales, zeros, bias, smooth, group_size=group_size):
        raise ValueError(
            f"{op}: the CPU int_mm path needs CPU tensors and {INT_MM_CPU_MIN_K} <= group_size <= "
            f"{W4AX_INT32_MAX_GROUP}; got x on {x.device}, group_size={group_size}"
        )
    return _linear_cpu(act_bits, x, qweight, scales, zeros, bias, smooth, group_size, n)


def _op_name(act_bits: int) -> str:
    if act_bits not in W4AX_OP_NAMES:
        raise ValueError(f"act_bits must be one of {W4AX_ACT_BITS}, got {act_bits!r}")
    return W4AX_OP_NAMES[act_bits]


def _define(act_bits: int):
    op = W4AX_OP_NAMES[act_bits]

    def implementation(x, qweight, scales, zeros, bias, smooth, group_size):
        n = check_w4ax_inputs(op, x, qweight, scales, zeros, bias, smooth, group_size)
        if int_mm_path_applies(x, qweight, scales, zeros, bias, smooth, group_size=group_size):
            return _linear_cpu(act_bits, x, qweight, scales, zeros, bias, smooth, group_size, n)
        return linear_w4ax_reference(act_bits, x, qweight, scales, zeros, bias, smooth, group_size)

    def fake(x, qweight, scales, zeros, bias, smooth, group_size):
        n = check_w4ax_inputs(op, x, qweight, scales, zeros, bias, smooth, group_size)
        return x.new_empty((*x.shape[:-1], n))

    custom = torch.library.custom_op(op, implementation, mutates_args=(), schema=W4AX_SCHEMA)
    custom.register_fake(fake)
    return custom


linear_w4a8 = _define(8)
linear_w4a4 = _define(4)
