"""Triton implementation of ``qcompile::linear_w4a8`` / ``qcompile::linear_w4a4`` (CUDA, or
CPU under TRITON_INTERPRET=1).

Two launches: the activation codes and per-token scales come from the Triton per-token
quantization (:mod:`qcompile.kernels.triton_quantize_per_token`, int8 codes for w4a8, int4
codes stored in int8 for w4a4), then a tiled GEMM reads the packed 4-bit weight
(``qweight[n, k // 2]``, low nibble for even k), turns each ``[BLOCK_K, BLOCK_N]`` tile into
int8 ``code - zero`` in registers (zero point 8 when ``zeros`` is None), and multiplies it
with the int8 activation tile in ``tl.dot`` accumulating in int32. Groups are walked one
after the other: a group's int32 accumulator is exact, then added to the float32 output
tile as ``y = y + float32(acc) * scale[n, g]``; after the last group ``y = y * xscale[m]``,
``+ bias``, and the cast to x's dtype. This is the order of
:func:`qcompile.kernels.linear_w4ax.w4ax_epilogue` (the first group's ``0 + p`` equals
``p``), so the result is bit-identical to the reference: every epilogue operation is one
correctly rounded float32 operation, and the kernel is launched with
``enable_fp_fusion=False`` so that the NVIDIA backend does not contract
``y + acc * scale`` into a fused multiply-add (one rounding instead of two).

Any group size works: a group is covered by ``cdiv(group_size, BLOCK_K)`` tiles whose
columns past the group's end are masked (their activations load as 0). Group sizes that
are multiples of ``BLOCK_K`` waste nothing; the pruning prefers such tiles. Per-channel
weights are one group of K. The wrapper refuses ``group_size > W4AX_INT32_MAX_GROUP``
(int32 overflow); the CUDA implementation sends those calls to the reference.

Autotuning is keyed on ``(N, K, M bucket, GROUP_SIZE)``; configs whose tiles exceed the
problem or the shared memory are pruned (:func:`prune_w4ax_configs`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qcompile.kernels._common import KernelLayoutCache
from qcompile.kernels._triton_common import (
    check_kernel_device,
    interpreter_active,
    keep_or_smallest,
    m_bucket,
    next_power_of_2,
    shared_memory_bytes,
)
from qcompile.kernels._triton_gemm import gemm_configs_within, grouped_tile, tile_config, tile_volume
from qcompile.kernels.linear_w4ax import (
    W4AX_INT32_MAX_GROUP,
    W4AX_OP_NAMES,
    centered_weight_codes,
    check_w4ax_inputs,
)
from qcompile.kernels.triton_quantize_per_token import cast_output, quantize_rows

__all__ = ["triton_linear_w4ax", "w4ax_gemm_epilogue", "prune_w4ax_configs", "INTERPRETED", "GPU_CONFIGS",
           "INTERPRETER_CONFIGS"]

INTERPRETED = interpreter_active()
OUT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): decode (M <= 16), mid-size and large tiles;
# BLOCK_K 32 / 64 / 128 so that g32, g64 and g128 each have aligned tiles.
GPU_CONFIGS = [
    tile_config(16, 64, 128, 4, 4), tile_config(16, 128, 64, 4, 4), tile_config(16, 64, 32, 4, 4),
    tile_config(32, 64, 128, 4, 4), tile_config(64, 64, 64, 4, 4), tile_config(64, 128, 128, 4, 3),
    tile_config(64, 128, 32, 4, 4), tile_config(128, 64, 128, 4, 3), tile_config(128, 128, 64, 4, 4),
    tile_config(128, 128, 128, 8, 3), tile_config(128, 128, 32, 4, 4), tile_config(128, 256, 128, 8, 3),
]
# One small config under the interpreter (it runs each program in Python): tiles that leave
# partial blocks in every direction on the tests' shapes.
INTERPRETER_CONFIGS = [tile_config(16, 32, 32, 4, 1)]


def prune_w4ax_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles exceed the problem (BLOCK_M beyond the M bucket, BLOCK_N
    beyond N, BLOCK_K beyond the group size, each rounded up to a power of two; 16 and 32
    are the smallest int8 dot tiles) or whose pipelined tiles exceed the shared memory;
    among the rest prefer ``GROUP_SIZE % BLOCK_K == 0`` (no masked columns)."""
    args = {**named_args, **kwargs}
    k_limit = max(32, next_power_of_2(args["GROUP_SIZE"]))
    smem = shared_memory_bytes(args["a_ptr"].device)
    kept = gemm_configs_within(configs, args["M_BUCKET"], args["N"], k_limit, smem, a_bytes=1)  # int8 codes
    aligned = [c for c in kept if args["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0]
    return keep_or_smallest(configs, aligned or kept, tile_volume)


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS,
                 key=["N", "K", "M_BUCKET", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": prune_w4ax_configs})
@triton.jit
def _w4ax_gemm_kernel(
    a_ptr, qweight_ptr, scales_ptr, zeros_ptr, xscale_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET, stride_am, stride_qn, stride_sn, stride_ym,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    q_cols = qweight_ptr + offs_n.to(tl.int64)[None, :] * stride_qn
    s_cols = scales_ptr + offs_n.to(tl.int64) * stride_sn
    z_cols = zeros_ptr + offs_n.to(tl.int64) * stride_sn

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP_SIZE):
        if HAS_ZEROS:
            zero = tl.load(z_cols + g, mask=n_mask, other=0.0).to(tl.int8)
        else:
            zero = tl.full((BLOCK_N,), 8, dtype=tl.int8)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kk in range(0, GROUP_SIZE, BLOCK_K):
            in_group = kk + tl.arange(0, BLOCK_K)
            offs_k = g * GROUP_SIZE + in_group
            k_mask = in_group < GROUP_SIZE
            # Masked columns: activations 0, so whatever the weight tile holds there adds 0.
            a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            packed = tl.load(q_cols + (offs_k // 2)[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
            codes = ((packed >> ((offs_k % 2) * 4).to(tl.uint8)[:, None]) & 0xF).to(tl.int8)
            acc = tl.dot(a, codes - zero[None, :], acc, out_dtype=tl.int32)
        scale = tl.load(s_cols + g, mask=n_mask, other=1.0)
        y = y + acc.to(tl.float32) * scale[None, :]

    # Epilogue in the order of w4ax_epilogue: (Σ_g acc_g * scale_g) * xscale + bias.
    xscale = tl.load(xscale_ptr + offs_m, mask=m_mask, other=1.0)
    y = y * xscale[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_output(y, OUT_DTYPE), mask=m_mask[:, None] & n_mask[None, :])


def w4ax_gemm_epilogue(
    codes: torch.Tensor,
    xscales: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``w4ax_epilogue(group sums of codes x (code - zero), xscales, scales, bias)`` in one
    kernel. ``codes`` int8 ``[M, K]``, ``xscales`` float32 ``[M, 1]``, the weight in the
    4-bit layout. Inputs are not validated here (see :func:`triton_linear_w4ax`)."""
    m, k = codes.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=codes.device)
    if m == 0 or n == 0:
        return y
    codes = codes if codes.stride(1) == 1 else codes.contiguous()
    qweight = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    scales = scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _w4ax_gemm_kernel[grid](
        codes, qweight, scales, zeros if zeros is not None else scales, xscales.contiguous(),
        bias32 if bias32 is not None else scales, y,
        m, n, k, m_bucket(m), codes.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias32 is not None,
        OUT_DTYPE=OUT_DTYPES[out_dtype], enable_fp_fusion=False,
    )
    return y


def _zero_point_check(op: str):
    def build(qweight, scales, zeros, group_size):
        centered_weight_codes(op, qweight, zeros, group_size, scales.shape[1] * group_size)
        return True

    return build


# The zero points are checked once per weight (the check reads values, a device sync on CUDA).
_ZERO_POINTS_CHECKED = {bits: KernelLayoutCache(_zero_point_check(op)) for bits, op in W4AX_OP_NAMES.items()}


def triton_linear_w4ax(
    act_bits: int,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """``linear_w4a<act_bits>`` on CUDA tensors (CPU tensors under TRITON_INTERPRET=1),
    bit-identical to :func:`qcompile.kernels.linear_w4ax.linear_w4ax_reference`.

    Raises TypeError / ValueError for wrong dtypes, shapes, devices or zero points, and
    ValueError for ``group_size > W4AX_INT32_MAX_GROUP``, naming the op.
    """
    if act_bits not in W4AX_OP_NAMES:
        raise ValueError(f"act_bits must be one of {tuple(W4AX_OP_NAMES)}, got {act_bits!r}")
    op = W4AX_OP_NAMES[act_bits]
    n = check_w4ax_inputs(op, x, qweight, scales, zeros, bias, smooth, group_size)
    if group_size > W4AX_INT32_MAX_GROUP:
        raise ValueError(
            f"{op}: group_size={group_size} exceeds {W4AX_INT32_MAX_GROUP}, beyond which int32 "
            "accumulation could overflow; use linear_w4ax_reference"
        )
    check_kernel_device(op, INTERPRETED, x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias,
                        smooth=smooth)
    _ZERO_POINTS_CHECKED[act_bits].get(qweight, scales, zeros, group_size)
    k = x.shape[-1]
    codes, xscales = quantize_rows(x.reshape(-1, k), smooth, act_bits, "int")
    y = w4ax_gemm_epilogue(codes, xscales, qweight, scales, zeros, bias, group_size, x.dtype)
    return y.reshape(*x.shape[:-1], n)
