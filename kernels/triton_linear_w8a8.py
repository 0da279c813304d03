"""Triton implementation of ``qcompile::linear_w8a8`` (CUDA, or CPU under TRITON_INTERPRET=1).

Two launches: the activation codes and scales come from the Triton per-token quantization
(:mod:`qcompile.kernels.triton_quantize_per_token`; its static mode when ``act_scale`` is
given), then a tiled GEMM multiplies the int8 codes ``[M, K]`` by the int8 weight ``[N, K]``
with ``tl.dot`` accumulating in int32 (int8 tensor cores on GPUs) and applies the epilogue
in float32 in the order of :func:`qcompile.kernels.linear_w8a8.w8a8_epilogue`:
``float32(acc) * xscale[m] * wscale[n] + bias[n]``, then the cast to x's dtype (round to
nearest even).

Bit-identical to :func:`linear_w8a8_reference`: int32 accumulation is exact for
K <= :data:`qcompile.kernels.linear_w8a8.INT_MM_MAX_K` (the wrapper refuses larger K; the
CUDA implementation sends those calls to the reference), and every epilogue operation is a
single correctly rounded float32 operation. The kernel is launched with
``enable_fp_fusion=False``: by default Triton lets the NVIDIA backend contract
``y * wscale + bias`` into one fused multiply-add, which rounds once instead of twice.
(On sm_90 the int8 dot compiles to ``wgmma ... .s32.s8.s8`` or, for 16-row tiles,
``mma.sync ... .satfinite.s32.s8.s8.s32``, which saturates instead of wrapping; within
INT_MM_MAX_K nothing reaches either limit.) A bfloat16 output is rounded by
:func:`qcompile.kernels.triton_quantize_per_token.round_to_bfloat16`, as torch rounds.

Tiles: ``GROUP_M`` row-blocks are walked together (grouped ordering) so consecutive programs
reuse weight tiles from L2. Autotuning is keyed on ``(N, K, M bucket)``; configs whose tiles
exceed the problem or the shared memory are pruned (:func:`prune_w8a8_configs`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qcompile.kernels._triton_common import (
    check_kernel_device,
    interpreter_active,
    keep_or_smallest,
    m_bucket,
    next_power_of_2,
    shared_memory_bytes,
)
from qcompile.kernels._triton_gemm import gemm_configs_within, grouped_tile, tile_config, tile_volume
from qcompile.kernels.linear_w8a8 import INT_MM_MAX_K, OP_NAME, check_w8a8_inputs
from qcompile.kernels.triton_quantize_per_token import cast_output, quantize_rows, static_scale_of

__all__ = ["triton_linear_w8a8", "int8_gemm_epilogue", "prune_w8a8_configs", "INTERPRETED", "GPU_CONFIGS",
           "INTERPRETER_CONFIGS"]

INTERPRETED = interpreter_active()
OUT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): decode (M <= 16), mid-size and large tiles.
GPU_CONFIGS = [
    tile_config(16, 64, 128, 4, 4), tile_config(16, 128, 128, 4, 4), tile_config(16, 64, 256, 4, 3),
    tile_config(32, 64, 128, 4, 4), tile_config(64, 64, 128, 4, 4), tile_config(64, 128, 128, 4, 3),
    tile_config(128, 64, 128, 4, 3), tile_config(128, 128, 64, 4, 4), tile_config(128, 128, 128, 8, 3),
    tile_config(128, 256, 128, 8, 3), tile_config(256, 128, 128, 8, 3),
]
# One small config under the interpreter (it runs each program in Python): tiles that
# leave partial blocks in every direction on the tests' shapes.
INTERPRETER_CONFIGS = [tile_config(16, 32, 32, 4, 1)]


def prune_w8a8_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles exceed the problem (BLOCK_M beyond the M bucket, BLOCK_N /
    BLOCK_K beyond N / K rounded up to a power of two; 16 and 32 are the smallest int8 dot
    tiles) or whose pipelined tiles exceed the device's shared memory."""
    args = {**named_args, **kwargs}
    k_limit = max(32, next_power_of_2(args["K"]))
    smem = shared_memory_bytes(args["a_ptr"].device)
    kept = gemm_configs_within(configs, args["M_BUCKET"], args["N"], k_limit, smem, a_bytes=1)  # int8 codes
    return keep_or_smallest(configs, kept, tile_volume)


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS, key=["N", "K", "M_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_w8a8_configs})
@triton.jit
def _w8a8_gemm_kernel(
    a_ptr, b_ptr, xscale_ptr, wscale_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET, stride_am, stride_bn, stride_ym, stride_xscale,
    HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # Epilogue in the order of w8a8_epilogue: float32(acc) * xscale * wscale + bias.
    xscale = tl.load(xscale_ptr + offs_m * stride_xscale, mask=m_mask, other=1.0)
    wscale = tl.load(wscale_ptr + offs_n, mask=n_mask, other=1.0)
    y = acc.to(tl.float32) * xscale[:, None]
    y = y * wscale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_output(y, OUT_DTYPE), mask=m_mask[:, None] & n_mask[None, :])


def int8_gemm_epilogue(
    codes: torch.Tensor,
    xscales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``w8a8_epilogue(codes @ qweight.T, xscales, wscales, bias, out_dtype)`` in one kernel.

    ``codes`` int8 ``[M, K]``, ``qweight`` int8 ``[N, K]``, ``xscales`` float32 ``[M, 1]``
    (per token) or ``[1, 1]`` (per tensor), ``wscales`` float32 ``[N]``, ``bias`` ``[N]`` or
    None. Inputs are not validated here (see :func:`triton_linear_w8a8`).
    """
    m, k = codes.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=codes.device)
    if m == 0 or n == 0:
        return y
    codes = codes if codes.stride(1) == 1 else codes.contiguous()
    qweight = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    xscales = xscales.contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    stride_xscale = 0 if xscales.numel() == 1 else 1

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _w8a8_gemm_kernel[grid](
        codes, qweight, xscales, wscales.contiguous(), bias32 if bias32 is not None else wscales, y,
        m, n, k, m_bucket(m), codes.stride(0), qweight.stride(0), y.stride(0), stride_xscale,
        HAS_BIAS=bias32 is not None, OUT_DTYPE=OUT_DTYPES[out_dtype], enable_fp_fusion=False,
    )
    return y


def triton_linear_w8a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """The op on CUDA tensors (CPU tensors under TRITON_INTERPRET=1), bit-identical to
    :func:`qcompile.kernels.linear_w8a8.linear_w8a8_reference`.

    Raises TypeError / ValueError for wrong dtypes, shapes or devices, and ValueError for
    K > INT_MM_MAX_K (an int32 accumulator could overflow), naming the op.
    """
    n = check_w8a8_inputs(OP_NAME, x, qweight, wscales, bias, smooth, act_scale)
    k = x.shape[-1]
    if k > INT_MM_MAX_K:
        raise ValueError(
            f"{OP_NAME}: K={k} exceeds {INT_MM_MAX_K}, beyond which int32 accumulation could overflow; "
            "use linear_w8a8_reference"
        )
    check_kernel_device(OP_NAME, INTERPRETED, x=x, qweight=qweight, wscales=wscales, bias=bias,
                        smooth=smooth, act_scale=act_scale)
    x2 = x.reshape(-1, k)
    static = None if act_scale is None else static_scale_of(act_scale)
    codes, xscales = quantize_rows(x2, smooth, 8, "int", static_scale=static)
    y = int8_gemm_epilogue(codes, xscales, qweight, wscales, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)
