"""Triton implementation of ``qcompile::hadamard`` (CUDA, or CPU under TRITON_INTERPRET=1).

One program per (tile of ``ROWS`` rows, diagonal block). A block of ``b = m * P`` channels
(P = 2**k) is held in registers as a float32 tile ``[ROWS, M_PAD, P]`` (``M_PAD`` =
next_power_of_2(m), the padding rows masked):

1. the small factor first, as it is loaded: ``acc[:, a, :] += H[i, a] * (x * signs)[:, i*P:(i+1)*P]``
   for i = 0 .. m-1 (one load of each row segment; every product with +-1 is exact, so the
   order of these float32 additions is the only difference from the reference's matmul);
   with m = 1 the segment is simply loaded;
2. the Walsh-Hadamard transform along P in log2(P) constant-geometry butterfly stages
   (reshape ``[.., 2, P/2]``, pair element j with j + P/2, write ``(a + b, a - b)`` to
   positions 2j, 2j + 1; the shuffles compose to the identity), as
   :func:`qcompile.hadamard.fwht`;
3. the scale ``1 / sqrt(b)`` (float32), and the cast to x's dtype (bfloat16 rounded to
   nearest even by :func:`qcompile.kernels.triton_quantize_per_token.cast_output`, as the
   interpreter would truncate).

The result differs from the reference (which applies the butterflies first and then the small
matmul) only by float32 rounding: each output is a signed sum of the block's b inputs
computed in at most ``m + log2(P)`` rounded additions, so
``|kernel - reference| <= 2 (m + log2 P + 1) 2**-24 sum(|x|) / sqrt(b)`` plus one rounding
to x's dtype on each side; the tests assert that bound.

Limits: a block whose padded tile ``M_PAD * P`` exceeds :data:`MAX_TILE` elements (e.g. a
pure power of two above 2**15) does not fit in registers; the wrapper then computes the op
with the reference (:func:`qcompile.kernels.hadamard.hadamard_reference`) and says so in
:func:`kernel_applies`.
"""
from __future__ import annotations

import math
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
)
from qcompile.kernels.hadamard import OP_NAME, check_hadamard_inputs, hadamard_reference
from qcompile.kernels.triton_quantize_per_token import cast_output

__all__ = [
    "triton_hadamard",
    "hadamard_rows",
    "kernel_applies",
    "rows_per_program",
    "prune_hadamard_configs",
    "MAX_TILE",
    "TILE_TARGET",
    "INTERPRETED",
    "GPU_CONFIGS",
    "INTERPRETER_CONFIGS",
]

INTERPRETED = interpreter_active()
# Largest register tile [M_PAD, P] of one block (float32 elements): 32768 values over 16
# warps is 64 registers per thread.
MAX_TILE = 32768
# Rows per program are chosen so that a program holds about this many elements (small
# blocks would otherwise launch one tiny program per row and block).
TILE_TARGET = 4096

GPU_CONFIGS = [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]
INTERPRETER_CONFIGS = [triton.Config({}, num_warps=4)]

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def prune_hadamard_configs(configs, named_args, **kwargs):
    """Keep the warp counts with between 1 and 64 tile elements per thread."""
    args = {**named_args, **kwargs}
    tile = args["ROWS"] * args["M_PAD"] * args["P"]
    kept = [c for c in configs if c.num_warps * 32 <= max(tile, 32) and tile <= c.num_warps * 32 * 64]
    return keep_or_smallest(configs, kept, lambda c: c.num_warps)


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS,
                 key=["M_BUCKET", "M_SMALL", "P", "ROWS"],
                 prune_configs_by={"early_config_prune": prune_hadamard_configs})
@triton.jit
def _hadamard_kernel(
    x_ptr, small_ptr, signs_ptr, y_ptr, scale,
    M, stride_xm, stride_ym, M_BUCKET,
    M_SMALL: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
    ROWS: tl.constexpr, HAS_SMALL: tl.constexpr, HAS_SIGNS: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    block_start = tl.program_id(1).to(tl.int64) * (M_SMALL * P)
    row_mask = rows < M
    cols = tl.arange(0, P)
    a_idx = tl.arange(0, M_PAD)
    x_rows = x_ptr + rows[:, None] * stride_xm
    if HAS_SMALL:
        acc = tl.zeros((ROWS, M_PAD, P), tl.float32)
        for i in range(M_SMALL):
            offs = block_start + i * P + cols
            xi = tl.load(x_rows + offs[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
            if HAS_SIGNS:
                xi = xi * tl.load(signs_ptr + offs)[None, :]
            hi = tl.load(small_ptr + i * M_SMALL + a_idx, mask=a_idx < M_SMALL, other=0.0)
            acc += xi[:, None, :] * hi[None, :, None]
    else:
        offs = block_start + cols
        xi = tl.load(x_rows + offs[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
        if HAS_SIGNS:
            xi = xi * tl.load(signs_ptr + offs)[None, :]
        acc = tl.reshape(xi, (ROWS, M_PAD, P))
    for _ in tl.static_range(LOG_P):
        halves = tl.permute(tl.reshape(acc, (ROWS * M_PAD, 2, P // 2)), (0, 2, 1))
        a, b = tl.split(halves)
        acc = tl.reshape(tl.join(a + b, a - b), (ROWS, M_PAD, P))
    y = cast_output(acc * scale, OUT_DTYPE)
    out = y_ptr + rows[:, None, None] * stride_ym + block_start + a_idx[None, :, None] * P + cols[None, None, :]
    tl.store(out, y, mask=row_mask[:, None, None] & (a_idx < M_SMALL)[None, :, None])


def kernel_applies(n: int, m: int, block: int) -> bool:
    """Whether one block fits the kernel's register tile (else the wrapper uses the reference)."""
    return next_power_of_2(m) * (block // m) <= MAX_TILE


def rows_per_program(rows: int, tile: int) -> int:
    """Rows per program, a power of two: the most with at most :data:`TILE_TARGET` tile
    elements (at least one row), and no more than the rows there are (rounded up)."""
    fit = 1 << max(0, (TILE_TARGET // tile).bit_length() - 1)  # a power of two (tl.arange needs one)
    return min(next_power_of_2(rows), fit)


def hadamard_rows(
    x2: torch.Tensor, small: Optional[torch.Tensor], signs: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    """The transform of the rows ``x2 [M, n]`` (inputs already validated, block fits)."""
    rows, n = x2.shape
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((rows, n), dtype=x2.dtype, device=x2.device)
    if rows == 0:
        return y
    m = 1 if small is None else small.shape[0]
    p = block // m
    m_pad = next_power_of_2(m)
    rows_tile = rows_per_program(rows, m_pad * p)
    small32 = None if small is None else small.to(torch.float32).contiguous()
    signs32 = None if signs is None else signs.to(torch.float32).contiguous()
    grid = (triton.cdiv(rows, rows_tile), n // block)
    _hadamard_kernel[grid](
        x2, small32 if small32 is not None else x2, signs32 if signs32 is not None else x2, y,
        1.0 / math.sqrt(block), rows, x2.stride(0), y.stride(0), m_bucket(rows),
        M_SMALL=m, M_PAD=m_pad, P=p, LOG_P=p.bit_length() - 1, ROWS=rows_tile,
        HAS_SMALL=small32 is not None, HAS_SIGNS=signs32 is not None, OUT_DTYPE=_TORCH_TO_TL[x2.dtype],
    )
    return y


def triton_hadamard(
    x: torch.Tensor, small: Optional[torch.Tensor], signs: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    """The op on CUDA tensors (CPU tensors under TRITON_INTERPRET=1); see the module docstring.

    Raises TypeError / ValueError for wrong dtypes, shapes or devices, naming the op.
    """
    m = check_hadamard_inputs(x, small, signs, block)
    check_kernel_device(OP_NAME, INTERPRETED, x=x, small=small, signs=signs)
    if x.dtype not in _TORCH_TO_TL or not kernel_applies(x.shape[-1], m, block):
        return hadamard_reference(x, small, signs, block)  # float64 (exact checks) or a tile too large
    y = hadamard_rows(x.reshape(-1, x.shape[-1]), small, signs, block)
    return y.reshape(x.shape)
