"""Fused block Hadamard rotation and dynamic per-token quantization in one Triton kernel
(CUDA, or CPU under TRITON_INTERPRET=1).

    triton_quantize_rotated(x, small, signs, block, bits, format) -> (codes [..., n], scales [..., 1] float32)

computes :func:`qcompile.kernels.quantize_rotated.quantize_rotated_reference`, i.e.
``quantize_per_token(hadamard(x, small, signs, block), None, bits, format)``, reading x once
and writing the codes and scales once (no rotated activation in memory). ``signs [n]`` may
carry a per-channel factor besides the +-1 signs (``signs / smooth`` fuses online smoothing
``x / smooth``; the factor multiplies).

One program per tile of ``ROWS`` rows (a power of two; several rows only when a row is
short). The whole row is held in registers as a float32 tile ``[ROWS, NB_PAD, M_PAD, P]``:
``NB_PAD`` = next_power_of_2(n / block) diagonal blocks, each ``block = m * P`` (P = 2**k)
as ``[M_PAD, P]`` with ``M_PAD`` = next_power_of_2(m); padding is masked on load (zeros)
and on store. Steps, as in :mod:`qcompile.kernels.triton_hadamard`:

1. the small factor while loading: ``acc[:, :, a, :] += H[i, a] * (x * signs)[segment i of
   each block]`` for i = 0 .. m-1 (each row element loaded once; products with +-1 exact);
2. log2(P) constant-geometry butterfly stages along P (:func:`qcompile.hadamard.fwht`);
3. the scale ``1 / sqrt(block)`` (float32);
4. per-token quantization of the float32 tile, with the operations of
   :mod:`qcompile.kernels.triton_quantize_per_token`: absmax over the row, ``scale =
   div_rn(absmax, qmax)``, scale 1.0 below the smallest normal float32, codes by its
   ``quantize_codes`` (correctly rounded division, round half to even / e4m3 rounding in float32,
   clamp), launched with ``enable_fp_fusion=False``.

Differences from composing the ops ``qcompile::hadamard`` then ``qcompile::quantize_per_token``:
the rotation is never rounded to x's dtype (for bfloat16 / float16 inputs the composed ops
would round it; the reference here does not either), and the rotation's float32 sums run in
another order than the reference's (small factor first, then butterflies; the reference
does the butterflies first). Each rotated value is within ``(m + log2 P + 3) 2**-24
sum|x_i s_i| / sqrt(block)`` of the exact one on both sides (so within twice that of each
other), which moves a scale by at most that over qmax and a code only where ``x / scale``
lies that close to a rounding boundary (then by one step); the tests assert exactly this.

Limits: the padded tile ``NB_PAD * M_PAD * P`` of one row must be at most
:data:`MAX_ROW_TILE` float32 values (32768: 64 registers per thread over 16 warps, as
:data:`qcompile.kernels.triton_hadamard.MAX_TILE`); e.g. n = 4096, 11008 (= 344 * 32),
14336 (= 28 * 512) fit, n = 65536 does not. A longer row raises ValueError naming the limit
(:func:`kernel_applies` tells beforehand): composing the two ops is then the way, and the
choice is the caller's (no silent fallback with other numerics).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from qcompile.act_quant import act_qmax, codes_dtype
from qcompile.kernels._triton_common import (
    check_kernel_device,
    interpreter_active,
    keep_or_smallest,
    m_bucket,
    next_power_of_2,
)
from qcompile.kernels.quantize_rotated import check_quantize_rotated_inputs
from qcompile.kernels.triton_hadamard import rows_per_program
from qcompile.kernels.triton_quantize_per_token import guarded_scale, quantize_codes

__all__ = [
    "triton_quantize_rotated",
    "quantize_rotated_rows",
    "kernel_applies",
    "row_tile",
    "prune_quantize_rotated_configs",
    "MAX_ROW_TILE",
    "INTERPRETED",
    "GPU_CONFIGS",
    "INTERPRETER_CONFIGS",
]

NAME = "triton_quantize_rotated"
INTERPRETED = interpreter_active()
# Largest padded row tile NB_PAD * M_PAD * P (float32 elements) held in registers.
MAX_ROW_TILE = 32768

GPU_CONFIGS = [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]
INTERPRETER_CONFIGS = [triton.Config({}, num_warps=4)]


def prune_quantize_rotated_configs(configs, named_args, **kwargs):
    """Keep the warp counts with between 1 and 64 tile elements per thread."""
    args = {**named_args, **kwargs}
    tile = args["ROWS"] * args["NB_PAD"] * args["M_PAD"] * args["P"]
    kept = [c for c in configs if c.num_warps * 32 <= max(tile, 32) and tile <= c.num_warps * 32 * 64]
    return keep_or_smallest(configs, kept, lambda c: c.num_warps)


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS,
                 key=["M_BUCKET", "NB", "M_SMALL", "P", "ROWS"],
                 prune_configs_by={"early_config_prune": prune_quantize_rotated_configs})
@triton.jit
def _quantize_rotated_kernel(
    x_ptr, small_ptr, signs_ptr, codes_ptr, scales_ptr, rot_scale,
    M, stride_xm, stride_cm, M_BUCKET,
    NB: tl.constexpr, NB_PAD: tl.constexpr, M_SMALL: tl.constexpr, M_PAD: tl.constexpr,
    P: tl.constexpr, LOG_P: tl.constexpr, ROWS: tl.constexpr,
    HAS_SMALL: tl.constexpr, HAS_SIGNS: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    blocks = tl.arange(0, NB_PAD)
    cols = tl.arange(0, P)
    a_idx = tl.arange(0, M_PAD)
    # Offsets of segment 0 of every block in a row ([NB_PAD, P]); segment i adds i * P.
    segment = blocks[:, None] * (M_SMALL * P) + cols[None, :]
    block_mask = (blocks < NB)[:, None]
    load_mask = row_mask[:, None, None] & block_mask[None, :, :]
    x_rows = x_ptr + rows[:, None, None] * stride_xm
    if HAS_SMALL:
        acc = tl.zeros((ROWS, NB_PAD, M_PAD, P), tl.float32)
        for i in range(M_SMALL):
            offs = segment + i * P
            xi = tl.load(x_rows + offs[None, :, :], mask=load_mask, other=0.0).to(tl.float32)
            if HAS_SIGNS:
                xi = xi * tl.load(signs_ptr + offs, mask=block_mask, other=0.0)[None, :, :]
            hi = tl.load(small_ptr + i * M_SMALL + a_idx, mask=a_idx < M_SMALL, other=0.0)
            acc += xi[:, :, None, :] * hi[None, None, :, None]
    else:
        xi = tl.load(x_rows + segment[None, :, :], mask=load_mask, other=0.0).to(tl.float32)
        if HAS_SIGNS:
            xi = xi * tl.load(signs_ptr + segment, mask=block_mask, other=0.0)[None, :, :]
        acc = tl.reshape(xi, (ROWS, NB_PAD, M_PAD, P))
    for _ in tl.static_range(LOG_P):
        halves = tl.permute(tl.reshape(acc, (ROWS * NB_PAD * M_PAD, 2, P // 2)), (0, 2, 1))
        a, b = tl.split(halves)
        acc = tl.reshape(tl.join(a + b, a - b), (ROWS, NB_PAD, M_PAD, P))
    y = acc * rot_scale
    absmax = tl.max(tl.abs(tl.reshape(y, (ROWS, NB_PAD * M_PAD * P))), axis=1)
    scale = guarded_scale(absmax, QMAX)
    tl.store(scales_ptr + rows, scale, mask=row_mask)
    codes = quantize_codes(y, scale[:, None, None, None], QMAX, FP8)
    out = (codes_ptr + rows[:, None, None, None] * stride_cm + blocks[None, :, None, None] * (M_SMALL * P)
           + a_idx[None, None, :, None] * P + cols[None, None, None, :])
    store_mask = load_mask[:, :, None, :] & (a_idx < M_SMALL)[None, None, :, None]
    tl.store(out, codes, mask=store_mask)


def row_tile(n: int, m: int, block: int) -> int:
    """The padded register tile of one row: ``NB_PAD * M_PAD * P`` float32 elements."""
    return next_power_of_2(n // block) * next_power_of_2(m) * (block // m)


def kernel_applies(n: int, m: int, block: int) -> bool:
    """Whether a row of n channels (blocks of ``block = m * P``) fits :data:`MAX_ROW_TILE`."""
    return row_tile(n, m, block) <= MAX_ROW_TILE


def quantize_rotated_rows(
    x2: torch.Tensor,
    small: Optional[torch.Tensor],
    signs: Optional[torch.Tensor],
    block: int,
    bits: int,
    format: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[M, n]`` and float32 scales ``[M, 1]`` of the rows ``x2 [M, n]`` (inputs
    already validated, the row fits :data:`MAX_ROW_TILE`)."""
    rows, n = x2.shape
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    codes = torch.empty((rows, n), dtype=codes_dtype(format), device=x2.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x2.device)
    if rows == 0:
        return codes, scales
    m = 1 if small is None else small.shape[0]
    p = block // m
    nb, m_pad = n // block, next_power_of_2(m)
    rows_tile = rows_per_program(rows, row_tile(n, m, block))
    small32 = None if small is None else small.to(torch.float32).contiguous()
    signs32 = None if signs is None else signs.to(torch.float32).contiguous()
    _quantize_rotated_kernel[(triton.cdiv(rows, rows_tile),)](
        x2, small32 if small32 is not None else x2, signs32 if signs32 is not None else x2, codes, scales,
        1.0 / math.sqrt(block), rows, x2.stride(0), codes.stride(0), m_bucket(rows),
        NB=nb, NB_PAD=next_power_of_2(nb), M_SMALL=m, M_PAD=m_pad, P=p, LOG_P=p.bit_length() - 1,
        ROWS=rows_tile, HAS_SMALL=small32 is not None, HAS_SIGNS=signs32 is not None,
        QMAX=act_qmax(bits, format), FP8=format == "fp8", enable_fp_fusion=False,
    )
    return codes, scales


def triton_quantize_rotated(
    x: torch.Tensor,
    small: Optional[torch.Tensor],
    signs: Optional[torch.Tensor],
    block: int,
    bits: int,
    format: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes and float32 scales of the block Hadamard rotation of ``x``, fused
    (see the module docstring): ``(codes [..., n], scales [..., 1])``, codes int8 (int8 and
    int4 range) or float8_e4m3fn.

    CUDA tensors (CPU tensors under TRITON_INTERPRET=1). Raises TypeError / ValueError for
    wrong dtypes, shapes, formats or devices, and ValueError for a row beyond
    :data:`MAX_ROW_TILE`, naming ``triton_quantize_rotated``.
    """
    m = check_quantize_rotated_inputs(NAME, x, small, signs, block, bits, format)
    n = x.shape[-1]
    if not kernel_applies(n, m, block):
        raise ValueError(
            f"{NAME}: a row of n = {n} channels ({n // block} blocks of {block} = {m} * {block // m}) needs a "
            f"register tile of {row_tile(n, m, block)} float32 values (blocks and the small order padded to "
            f"powers of two), above MAX_ROW_TILE = {MAX_ROW_TILE}; compose qcompile::hadamard and "
            f"qcompile::quantize_per_token for rows this long"
        )
    check_kernel_device(NAME, INTERPRETED, x=x, small=small, signs=signs)
    codes, scales = quantize_rotated_rows(x.reshape(-1, n), small, signs, block, bits, format)
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], 1)
