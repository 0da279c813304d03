"""Weight layouts of the ONNX operators qcompile emits: pure array conversions, exact.

A qcompile quantized weight (:class:`qcompile.quantizers.QuantizedWeight` layout: int8
``[N, K]`` or 4-bit codes packed two per byte, float32 scales and integer-valued float32
zero points ``[N, G]``) is first brought into one neutral form, :class:`UnsignedGrid`
(unsigned codes and unsigned zero points, ``W = (code - zero_point) * scale`` per group),
and from there into each operator's storage:

* :func:`to_matmulnbits` — ``com.microsoft.MatMulNBits``: codes packed per block along K
  into ``B [N, k_blocks, block_size * bits / 8]``, scales ``[N, k_blocks]``, zero points
  packed like B (or absent when all equal the default ``2 ** (bits - 1)``);
* :func:`to_dequantize_linear` — ONNX ``DequantizeLinear`` (opset 21) on the transposed
  weight ``[K, N]`` that ``MatMul`` reads: per-axis (one group per row) or blocked
  along K, INT8 / INT4 / UINT4.

Every conversion only moves integers and copies float32 scales, so the dequantized
weight is bit-identical to qcompile's. Nothing here knows about graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from qcompile.quantizers import INT4_DEFAULT_ZERO_POINT, check_quantized_layout, unpack_int4

__all__ = [
    "UnsignedGrid",
    "unsigned_grid",
    "MATMULNBITS_BLOCK_SIZES",
    "matmulnbits_block_size",
    "MatMulNBitsWeights",
    "to_matmulnbits",
    "DequantizeLinearWeights",
    "to_dequantize_linear",
    "stored_zeros",
]

# The block sizes ONNX Runtime's CPU MatMulNBits kernel accepts (measured on 1.31: "Only
# block sizes 16, 32, 64, 128, and 256 are supported for MatMulNBits op"); the schema
# itself allows any power of two >= 16.
MATMULNBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)
# Block size used to tile one per-channel group (group_size == K) longer than the largest block.
_PER_CHANNEL_BLOCK = 128


@dataclass(frozen=True)
class UnsignedGrid:
    """A quantized weight ``[N, K]`` in unsigned code space.

    ``W[n, k] = (codes[n, k] - zero_points[n, k // group_size]) * scales[n, k // group_size]``

    codes: uint8 ``[N, K]`` in ``0 .. 2**bits - 1``; scales: float32 ``[N, G]``;
    zero_points: uint8 ``[N, G]`` in the same range.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def default_zero_point(self) -> int:
        """The zero point MatMulNBits assumes when none is given: ``2 ** (bits - 1)``."""
        return 2 ** (self.bits - 1)

    @property
    def has_default_zero_points(self) -> bool:
        return bool((self.zero_points == self.default_zero_point).all())


def unsigned_grid(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int, group_size: int
) -> UnsignedGrid:
    """qcompile's stored weight -> :class:`UnsignedGrid` (exact).

    8-bit codes and zero points are stored shifted by -128 (symmetric: no zero points,
    meaning 0), so +128 brings both to the unsigned grid; 4-bit codes are already
    unsigned and ``zeros=None`` means zero point 8. Raises ValueError for zero points
    that are not integers in the code range (qcompile's quantizers never make them).
    """
    in_features = scales.shape[1] * group_size
    check_quantized_layout(qweight, scales, zeros, bits=bits, group_size=group_size, in_features=in_features)
    qweight, scales = qweight.detach().cpu(), scales.detach().cpu()
    levels = 2**bits
    if bits == 8:
        codes = (qweight.to(torch.int16) + 128).to(torch.uint8)
        offset, default = 128, 0.0
    else:
        codes = unpack_int4(qweight, in_features)
        offset, default = 0, float(INT4_DEFAULT_ZERO_POINT)
    if zeros is None:
        zero_points = np.full(tuple(scales.shape), default + offset, dtype=np.float64)
    else:
        zero_points = zeros.detach().cpu().to(torch.float64).numpy() + offset
    if not (np.isfinite(zero_points).all() and (zero_points == np.round(zero_points)).all()):
        raise ValueError("zero points must be integers (qcompile stores integer-valued float32 zero points)")
    if zero_points.size and (zero_points.min() < 0 or zero_points.max() > levels - 1):
        raise ValueError(f"{bits}-bit zero points must lie in the code range, got [{zero_points.min()}, {zero_points.max()}]")
    return UnsignedGrid(
        codes=codes.numpy(),
        scales=scales.to(torch.float32).numpy(),
        zero_points=zero_points.astype(np.uint8),
        bits=bits,
        group_size=group_size,
    )


def stored_zeros(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int) -> torch.Tensor:
    """The zero points qcompile means, made explicit: ``zeros`` itself, or the default
    (0 for 8-bit, 8 for 4-bit) as a float32 tensor shaped like ``scales``."""
    if zeros is not None:
        return zeros
    default = 0.0 if bits == 8 else float(INT4_DEFAULT_ZERO_POINT)
    return torch.full(tuple(scales.shape), default, dtype=torch.float32)


# --------------------------------------------------------------------------- MatMulNBits


def matmulnbits_block_size(in_features: int, group_size: int) -> int | None:
    """The MatMulNBits block size that represents groups of ``group_size`` exactly, or None.

    * A group size in :data:`MATMULNBITS_BLOCK_SIZES` is the block size.
    * Otherwise each group is split into equal blocks (the largest supported block size
      that divides it), each block repeating its group's scale and zero point.
    * One group per row (per-channel) fits any block size, since every block has the same
      scale: a row of at most 256 is one block (padded up to the next supported size),
      a longer row is tiled in blocks of 128 (the last one padded).
    * None: groups that no supported block size divides (e.g. 40 or 200 channels while
      the row has several groups) — MatMulNBits cannot represent them.
    """
    if group_size == in_features:
        if in_features <= MATMULNBITS_BLOCK_SIZES[-1]:
            return next(b for b in MATMULNBITS_BLOCK_SIZES if b >= in_features)
        return _PER_CHANNEL_BLOCK
    for block in reversed(MATMULNBITS_BLOCK_SIZES):
        if block <= group_size and group_size % block == 0:
            return block
    return None


@dataclass(frozen=True)
class MatMulNBitsWeights:
    """Inputs B, scales and zero_points of ``com.microsoft.MatMulNBits`` (plus its attributes)."""

    B: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, k_blocks] (8-bit) or [N, ceil(k_blocks / 2)] (4-bit)
    bits: int
    block_size: int
    in_features: int
    out_features: int


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 ``[..., 2m]`` -> ``[..., m]``, element 2j in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def to_matmulnbits(grid: UnsignedGrid, block_size: int) -> MatMulNBitsWeights:
    """Lay ``grid`` out for MatMulNBits with ``block_size`` (from :func:`matmulnbits_block_size`)."""
    n, k, g = grid.out_features, grid.in_features, grid.group_size
    k_blocks = -(-k // block_size)
    if grid.num_groups == 1:
        block_scales = np.repeat(grid.scales, k_blocks, axis=1)
        block_zeros = np.repeat(grid.zero_points, k_blocks, axis=1)
    elif g % block_size == 0:
        block_scales = np.repeat(grid.scales, g // block_size, axis=1)
        block_zeros = np.repeat(grid.zero_points, g // block_size, axis=1)
    else:
        raise ValueError(f"block_size {block_size} does not divide group_size {g}")
    codes = grid.codes
    pad = k_blocks * block_size - k
    if pad:
        # Padding codes equal the block's zero point, so they dequantize to exactly 0.
        codes = np.concatenate([codes, np.repeat(block_zeros[:, -1:], pad, axis=1)], axis=1)
    blocks = codes.reshape(n, k_blocks, block_size)
    B = _pack_nibbles(blocks) if grid.bits == 4 else blocks.astype(np.uint8)
    zero_points = None
    if not grid.has_default_zero_points:
        if grid.bits == 4:
            padded = np.concatenate([block_zeros, np.zeros((n, k_blocks % 2), np.uint8)], axis=1)
            zero_points = _pack_nibbles(padded)
        else:
            zero_points = block_zeros.astype(np.uint8)
    return MatMulNBitsWeights(
        B=np.ascontiguousarray(B),
        scales=np.ascontiguousarray(block_scales.astype(np.float32)),
        zero_points=None if zero_points is None else np.ascontiguousarray(zero_points),
        bits=grid.bits,
        block_size=block_size,
        in_features=k,
        out_features=n,
    )


# --------------------------------------------------------------------------- DequantizeLinear


@dataclass(frozen=True)
class DequantizeLinearWeights:
    """Inputs and attributes of one ``DequantizeLinear`` that yields the MatMul weight ``[K, N]``.

    data: ``[K, N]`` int8, or ml_dtypes int4 / uint4; scale: float32 ``[N]`` (per-axis,
    ``axis=1``) or ``[G, N]`` (blocked along K, ``axis=0``, ``block_size``); zero_point:
    same dtype and shape family as data/scale, or None (zero point 0).
    """

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int | None


def to_dequantize_linear(grid: UnsignedGrid) -> DequantizeLinearWeights:
    """Lay ``grid`` out for ``DequantizeLinear`` + ``MatMul(x, W)``.

    8-bit: INT8 data (the unsigned code - 128, i.e. qcompile's stored int8 values) with
    INT8 zero points, omitted when they are all 0 (symmetric). 4-bit: INT4 data (code - 8)
    without zero points when every zero point is 8 (symmetric), else UINT4 data and zero
    points.
    """
    codes_t = grid.codes.T.astype(np.int16)  # [K, N]
    zp_t = grid.zero_points.T.astype(np.int16)  # [G, N]
    if grid.bits == 8:
        data = (codes_t - 128).astype(np.int8)
        zero_point = None if grid.has_default_zero_points else (zp_t - 128).astype(np.int8)
    elif grid.has_default_zero_points:
        data = (codes_t - INT4_DEFAULT_ZERO_POINT).astype(ml_dtypes.int4)
        zero_point = None
    else:
        data = codes_t.astype(ml_dtypes.uint4)
        zero_point = zp_t.astype(ml_dtypes.uint4)
    scale = grid.scales.T.astype(np.float32)  # [G, N]
    if grid.num_groups == 1:
        return DequantizeLinearWeights(
            data=np.ascontiguousarray(data),
            scale=np.ascontiguousarray(scale[0]),
            zero_point=None if zero_point is None else np.ascontiguousarray(zero_point[0]),
            axis=1,
            block_size=None,
        )
    return DequantizeLinearWeights(
        data=np.ascontiguousarray(data),
        scale=np.ascontiguousarray(scale),
        zero_point=None if zero_point is None else np.ascontiguousarray(zero_point),
        axis=0,
        block_size=grid.group_size,
    )
