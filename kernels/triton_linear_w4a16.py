"""Triton implementation of ``qcompile::linear_w4a16`` (CUDA, or CPU under TRITON_INTERPRET=1).

``y = x @ W.T + bias`` with ``W`` in the :class:`qcompile.quantizers.QuantizedWeight` 4-bit
layout, dequantized in registers inside the GEMM loop: each ``[BLOCK_K, BLOCK_N]`` weight
tile is read as packed bytes (``qweight[n, k // 2]``, low nibble for even k, high nibble for
odd k), its codes become ``(code - zero) * scale`` in float32 (zero point 8 when ``zeros`` is
None), exactly the reference's float32 dequantization, and the tile meets the activation
tile in ``tl.dot`` with float32 accumulation. When ``group_size`` is a multiple of
``BLOCK_K`` (the pruning prefers such tiles) a tile lies in one group and loads one scale
(and zero) per column; otherwise each element loads its group's.

Numerics ("a16"): with float16 / bfloat16 activations the dequantized weight is rounded to
x's dtype (to nearest even) and the dot runs on tensor cores; their products are exact in
float32, so the result differs from the float32 reference (:func:`linear_w4a16_reference`)
by that rounding of the weight, relative 2**-8 at most (float16: 2**-11), and the order of the
float32 sums. Float32 activations use an IEEE float32 dot (``input_precision="ieee"``, not
TF32). The output is rounded to x's dtype, to nearest even.

Paths: M > 16 rows use M-tiled programs (``SPLIT_K = 1``) that add the bias and store x's
dtype. Decode shapes, M <= 16, would leave most of the GPU idle with one program per
``BLOCK_N`` columns, so they split K as well (:func:`choose_split_k`): each of ``SPLIT_K``
programs per tile writes a float32 partial sum to ``[SPLIT_K, M, N]`` and the wrapper sums
them with ``torch.sum`` (a fixed order, so the result is deterministic, unlike atomics),
adds the bias and casts.

Under Triton's interpreter (3.9), ``tl.dot`` on bfloat16 operands multiplies their raw
16-bit patterns, and float32 -> bfloat16 casts truncate; so there a bfloat16 dot runs on
float32 copies of the operands, with the weight rounded to bfloat16 by
:func:`qcompile.kernels.triton_quantize_per_token.round_to_bfloat16`. This computes the
same products (exact in float32) as the GPU's bfloat16 dot.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qcompile.kernels._common import check_linear_inputs
from qcompile.kernels._triton_common import (
    check_kernel_device,
    interpreter_active,
    keep_or_smallest,
    m_bucket,
    next_power_of_2,
    shared_memory_bytes,
    sm_count,
)
from qcompile.kernels._triton_gemm import gemm_configs_within, grouped_tile, tile_config, tile_volume
from qcompile.kernels.linear_w4a16 import BITS, OP_NAME
from qcompile.kernels.triton_quantize_per_token import cast_output, round_to_bfloat16

__all__ = ["triton_linear_w4a16", "choose_split_k", "prune_w4a16_configs", "MAX_SPLIT_K", "INTERPRETED", "GPU_CONFIGS",
           "INTERPRETER_CONFIGS"]

INTERPRETED = interpreter_active()
_INTERPRETED = tl.constexpr(INTERPRETED)
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Rows up to which K is split, the largest split, and the least K per split.
SPLIT_K_MAX_ROWS = 16
MAX_SPLIT_K = 16
MIN_K_PER_SPLIT = 256
# Nominal tile width used to count output tiles when choosing the split.
_NOMINAL_BLOCK_N = 64


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): decode tiles (BLOCK_M 16), then GEMM tiles.
GPU_CONFIGS = [
    tile_config(16, 32, 128, 4, 4), tile_config(16, 64, 128, 4, 4), tile_config(16, 128, 128, 4, 3),
    tile_config(16, 64, 64, 4, 4), tile_config(16, 64, 256, 4, 3), tile_config(16, 128, 32, 4, 4),
    tile_config(32, 64, 128, 4, 4), tile_config(64, 64, 64, 4, 4), tile_config(64, 128, 64, 4, 3),
    tile_config(64, 64, 32, 4, 4), tile_config(128, 128, 32, 4, 4), tile_config(128, 128, 64, 8, 3),
    tile_config(128, 256, 64, 8, 3),
]
INTERPRETER_CONFIGS = [tile_config(16, 32, 32, 4, 1)]


def prune_w4a16_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles exceed the problem (BLOCK_M beyond the M bucket, BLOCK_N
    beyond N, BLOCK_K beyond one split's share of K, each rounded up to a power of two, 16
    at least) or whose pipelined tiles exceed the device's shared memory; among the rest
    prefer those with ``group_size % BLOCK_K == 0`` (one scale per column per tile)."""
    args = {**named_args, **kwargs}
    k_limit = max(16, next_power_of_2(triton.cdiv(args["K"], args["SPLIT_K"])))
    x = args["x_ptr"]
    kept = gemm_configs_within(configs, args["M_BUCKET"], args["N"], k_limit, shared_memory_bytes(x.device),
                               a_bytes=x.element_size())
    aligned = [c for c in kept if args["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0]
    return keep_or_smallest(configs, aligned or kept, tile_volume)


@triton.jit
def _dot_a16(x, w, acc, X_DTYPE: tl.constexpr):
    """acc + x @ w for a float32 dequantized weight tile ``w``, in x's precision."""
    if X_DTYPE == tl.float32:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    elif _INTERPRETED and X_DTYPE == tl.bfloat16:
        acc = tl.dot(x.to(tl.float32), round_to_bfloat16(w).to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w.to(X_DTYPE), acc)
    return acc


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS,
                 key=["N", "K", "M_BUCKET", "SPLIT_K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": prune_w4a16_configs})
@triton.jit
def _w4a16_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET, stride_xm, stride_qn, stride_sn, stride_ym, stride_ysplit,
    GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_cols = qweight_ptr + offs_n.to(tl.int64)[None, :] * stride_qn
    s_cols = scales_ptr + offs_n.to(tl.int64) * stride_sn
    z_cols = zeros_ptr + offs_n.to(tl.int64) * stride_sn

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_tile = pid_k * tiles_per_split
    last_tile = min(first_tile + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(first_tile, last_tile):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wk_mask = k_mask[:, None] & n_mask[None, :]
        packed = tl.load(q_cols + (offs_k // 2)[:, None], mask=wk_mask, other=0)
        codes = ((packed >> ((offs_k % 2) * 4).to(tl.uint8)[:, None]) & 0xF).to(tl.float32)
        if GROUP_SIZE % BLOCK_K == 0:
            group_index = tile * BLOCK_K // GROUP_SIZE
            scale = tl.load(s_cols + group_index, mask=n_mask, other=0.0)[None, :]
            if HAS_ZEROS:
                zero = tl.load(z_cols + group_index, mask=n_mask, other=0.0)[None, :]
            else:
                zero = 8.0
        else:
            group_index = (offs_k // GROUP_SIZE)[:, None]
            scale = tl.load(s_cols[None, :] + group_index, mask=wk_mask, other=0.0)
            if HAS_ZEROS:
                zero = tl.load(z_cols[None, :] + group_index, mask=wk_mask, other=0.0)
            else:
                zero = 8.0
        acc = _dot_a16(x, (codes - zero) * scale, acc, X_DTYPE)

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, cast_output(acc, X_DTYPE), mask=m_mask[:, None] & n_mask[None, :])
    else:
        y_ptrs = y_ptr + pid_k.to(tl.int64) * stride_ysplit + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """K splits for ``[m, k] @ [k, n]``: 1 above 16 rows; else the largest power of two up
    to 16 that keeps about two programs per SM (counting ``n / 64`` tiles) and at least
    256 values of K per split."""
    if m > SPLIT_K_MAX_ROWS:
        return 1
    tiles = triton.cdiv(n, _NOMINAL_BLOCK_N)
    target = 2 * sm_count(device)
    split = 1
    while split * 2 <= MAX_SPLIT_K and split * 2 * tiles <= target and k // (split * 2) >= MIN_K_PER_SPLIT:
        split *= 2
    return split


def triton_linear_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group_size: int,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """The op on CUDA tensors (CPU tensors under TRITON_INTERPRET=1): ``[..., N]`` in x's dtype.

    ``split_k`` overrides :func:`choose_split_k` (any value from 1 to :data:`MAX_SPLIT_K`).
    Raises TypeError / ValueError for wrong dtypes, shapes, devices or ``split_k``, naming the op.
    """
    n = check_linear_inputs(OP_NAME, BITS, x, qweight, scales, zeros, bias, group_size)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int)
                                or not 1 <= split_k <= MAX_SPLIT_K):
        raise ValueError(f"{OP_NAME}: split_k must be an int from 1 to {MAX_SPLIT_K}, got {split_k!r}")
    device = check_kernel_device(OP_NAME, INTERPRETED, x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if split_k is None:
        split_k = choose_split_k(m, n, k, device)
    if m == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    qweight = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    scales = scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    if split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=device)
        stride_ysplit = 0
    else:
        y = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
        stride_ysplit = y.stride(0)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    _w4a16_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias32 if bias32 is not None else scales, y,
        m, n, k, m_bucket(m), x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(-2), stride_ysplit,
        GROUP_SIZE=group_size, SPLIT_K=split_k, HAS_ZEROS=zeros is not None, HAS_BIAS=bias32 is not None,
        X_DTYPE=TL_DTYPES[x.dtype], enable_fp_fusion=False,
    )
    if split_k > 1:
        y = y.sum(dim=0)
        if bias32 is not None:
            y = y + bias32
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
