"""Weight quantizers: pure tensor numerics, with no knowledge of graphs or modules.

A weight ``W`` of shape ``[N, K]`` (out_features x in_features, the ``nn.Linear`` layout)
is split along K into ``G = K / group_size`` groups per row. Every group has one scale
and, for asymmetric grids, one zero point, and dequantizes as

    W[n, k] = (code[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]

Storage conventions (see :class:`QuantizedWeight`):

* 8-bit weights are always stored as ``int8``. Symmetric: codes in [-127, 127], no zero
  point (``zeros is None``, meaning zero point 0). Asymmetric: the unsigned grid 0..255 is
  shifted by -128 into int8, and so are the zero points (which therefore lie in
  [-128, 127]); the formula above holds unchanged on the stored values.
* 4-bit weights are unsigned codes 0..15, packed two per byte (:func:`pack_int4`).
  Symmetric 4-bit uses zero point 8; :func:`quantize_weight_rtn` always stores the zero
  points of 4-bit weights explicitly, and ``zeros is None`` on a 4-bit weight means
  zero point 8 (the midpoint of the code range, as ONNX Runtime's MatMulNBits assumes).
* 3-bit grids (``grid_bits=3``) live in the 4-bit container: codes 0..7 (asymmetric) or
  1..7 around the zero point 4 (symmetric), packed like 4-bit codes, with explicit zero
  points; ``QuantizedWeight.bits`` stays 4, so every 4-bit kernel and exporter reads them
  unchanged (they store no more than 4-bit weights do; the gain is accuracy per level
  count, not size).

A grid (scales, zero points and the code range, :class:`WeightGrid`) can also be chosen
on its own (:func:`weight_grid`) and weights rounded onto it by another algorithm (GPTQ,
``qcompile.gptq``), then packed with :func:`quantized_weight_from_codes`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedWeight",
    "WeightGrid",
    "quantize_weight_rtn",
    "weight_grid",
    "round_to_grid",
    "quantized_weight_from_codes",
    "grid_storage_bits",
    "dequantize_weight",
    "dequantize_codes",
    "check_quantized_layout",
    "pack_int4",
    "unpack_int4",
    "INT4_DEFAULT_ZERO_POINT",
]

SUPPORTED_BITS = (4, 8)
# The grids each container holds: 8-bit codes are 8-bit grids; the 4-bit container holds
# 4-bit and 3-bit grids.
GRID_BITS = {8: (8,), 4: (4, 3)}
INT4_DEFAULT_ZERO_POINT = 8
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# A scale below the smallest normal float32 cannot represent its group (w / scale would
# lose all precision or overflow); such a group is all zeros or denormal dust, and is
# quantized with scale 1.0, which maps every value to the zero point.
_MIN_SCALE = torch.finfo(torch.float32).tiny

# Weights are quantized row by row (every row has its own grids), so large weights are
# worked on a block of rows at a time: a block holds at most this many elements (64 MiB of
# float64), which bounds the temporaries of the range search and of GPTQ whatever N is
# (a 64000 x 2048 LM head would otherwise need several [N, K] copies).
ROW_BLOCK_ELEMENTS = 1 << 23


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight matrix ``[out_features, in_features]`` quantized per group of input channels.

    Attributes:
        qweight: the codes.
            * ``bits == 8``: ``int8 [N, K]``. Symmetric: codes in [-127, 127]. Asymmetric:
              the unsigned code ``c`` in 0..255 is stored as ``c - 128``.
            * ``bits == 4``: ``uint8 [N, ceil(K / 2)]``, two unsigned codes 0..15 per byte:
              the low nibble holds column ``2j``, the high nibble column ``2j + 1``. For odd
              K the high nibble of each row's last byte is padding, always 0, and is never
              read as a weight (:func:`unpack_int4` drops it).
        scales: ``float32 [N, G]``, ``G = K // group_size``; always positive.
        zeros: ``float32 [N, G]`` of integer values, the zero point of each group in the
            stored code space (for asymmetric 8-bit, shifted by -128 like the codes, so in
            [-128, 127]; for 4-bit, in 0..15). ``None`` means the default zero point:
            0 for 8-bit (symmetric int8), 8 for 4-bit.
        bits: 4 or 8.
        group_size: input channels per group; equals ``in_features`` for per-channel.
        in_features: K.
        out_features: N.
        symmetric: whether the grid is symmetric around zero. For 8-bit this coincides with
            ``zeros is None``; symmetric 4-bit weights carry explicit zero points of 8.

    Dequantization: ``w = (code - zero) * scale`` on the stored values (see
    :func:`dequantize_weight`).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    symmetric: bool

    def __post_init__(self) -> None:
        n = check_quantized_layout(
            self.qweight, self.scales, self.zeros,
            bits=self.bits, group_size=self.group_size, in_features=self.in_features,
        )
        if n != self.out_features:
            raise ValueError(f"out_features={self.out_features} but qweight has {n} rows")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.bits == 8 and self.symmetric != (self.zeros is None):
            raise ValueError(
                "8-bit weights are symmetric exactly when zeros is None; got "
                f"symmetric={self.symmetric} with zeros {'None' if self.zeros is None else 'present'}"
            )

    @property
    def num_groups(self) -> int:
        """G, the number of groups per output row."""
        return self.in_features // self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes held by ``qweight``, ``scales`` and ``zeros`` together."""
        tensors = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return sum(t.numel() * t.element_size() for t in tensors)


def check_quantized_layout(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
) -> int:
    """Check that the tensors of a quantized weight agree with each other; return N.

    Only shapes and dtypes are checked (never values), so this also works on fake tensors
    while tracing. Raises TypeError for a wrong dtype and ValueError for a wrong shape.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    _check_group_size(group_size, in_features)
    expected_dtype = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != expected_dtype:
        raise TypeError(f"{bits}-bit qweight must be {expected_dtype}, got {qweight.dtype}")
    packed_cols = in_features if bits == 8 else (in_features + 1) // 2
    if qweight.dim() != 2 or qweight.shape[1] != packed_cols:
        raise ValueError(
            f"{bits}-bit qweight for in_features={in_features} must have shape [N, {packed_cols}], "
            f"got {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    groups = in_features // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if tuple(t.shape) != (n, groups):
            raise ValueError(
                f"{name} must have shape [N, K / group_size] = [{n}, {groups}] "
                f"(in_features={in_features}, group_size={group_size}), got {tuple(t.shape)}"
            )
    return n


def quantize_weight_rtn(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratios: tuple[float, ...] | None = None,
    importance: torch.Tensor | None = None,
    grid_bits: int | None = None,
) -> QuantizedWeight:
    """Quantize ``w [N, K]`` by rounding to the nearest grid point, per group of K.

    Args:
        w: floating-point weight ``[out_features, in_features]``; computed in float32.
        bits: 8 or 4: the storage container (``QuantizedWeight.bits``).
        group_size: input channels sharing one scale; must divide K. ``None`` means one
            group per row (per-channel). A caller that wants a fallback for a group size
            that does not divide K must pass ``None`` itself.
        symmetric: symmetric grids have scale ``absmax / qmax`` (qmax 127 for 8-bit, 7 for
            4-bit) and codes in [-qmax, qmax] (stored with zero point 8 for 4-bit).
            Asymmetric grids span ``[min(w, 0), max(w, 0)]`` with ``2**bits - 1`` steps and an
            integer zero point ``round(-min / scale)``.
        clip_ratios: optional range search: for each group, the grid's range is shrunk by
            each ratio in turn (1.0 = the full range) and the ratio whose rounded weights
            have the smallest squared error is kept. Rounding stays round-to-nearest; only
            the grid changes. Shrinking trades clipping a few outliers for finer steps
            for the rest. None (or ``(1.0,)``) is plain min/max RTN.
        importance: optional ``[K]`` non-negative weights of the input channels in the range
            search's error, ``Σ_j importance_j (ŵ_j − w_j)²``. With ``importance = E[x_j²]``
            over calibration inputs this is the expected squared *output* error of the
            group under a diagonal approximation of ``E[x xᵀ]`` (AWQ's output-aware
            clipping, without its cost); None weighs all channels equally. A ``[K, K]``
            matrix is a full second moment ``H = E[x xᵀ]`` (or any symmetric PSD matrix):
            each group's error is then ``Δ_g H_g Δ_gᵀ`` with ``H_g`` the group's diagonal
            block of H, the exact expected squared output error of that group's part of the
            dot product on the calibration inputs, cross-channel terms included (AWQ's
            ``auto_clip`` objective, computed from H instead of sampled tokens).
        grid_bits: the grid's bit width when narrower than the container: 3 with
            ``bits=4`` is a 3-bit grid (asymmetric: ``7`` steps, codes 0..7; symmetric:
            scale ``absmax / 3``, codes 1..7 around zero point 4) stored as 4-bit codes.
            None means ``bits`` (results for 4- and 8-bit grids are unchanged by it).

    Every element is reproduced to within half its group's scale. A group whose scale would
    be below the smallest normal float32 (all zeros, say) gets scale 1.0 and dequantizes to
    exactly 0. Raises ValueError for non-finite weights, a group size that does not divide
    K, or unsupported bits; TypeError for a non-floating weight.
    """
    codes, grid = _rtn(w, bits, group_size, symmetric, clip_ratios, importance, grid_bits)
    return quantized_weight_from_codes(codes.reshape(grid.out_features, grid.in_features), grid)


@dataclass(frozen=True, eq=False)
class WeightGrid:
    """The quantization grid of one weight ``[N, K]``: per group a scale and a zero point.

    An element ``w`` of group ``g`` of row ``n`` rounds to the stored code
    ``clamp(round(w / scales[n, g]) + zeros[n, g], code_min, code_max)`` and dequantizes to
    ``(code - zeros[n, g]) * scales[n, g]`` (:func:`round_to_grid`). Codes and zero points
    are in the stored code space of :class:`QuantizedWeight` (shifted by -128 for
    asymmetric 8-bit). ``zeros is None`` only for symmetric 8-bit (zero point 0).
    """

    scales: torch.Tensor
    zeros: torch.Tensor | None
    code_min: int
    code_max: int
    bits: int
    grid_bits: int
    group_size: int
    in_features: int
    symmetric: bool

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def zero_points(self) -> torch.Tensor:
        """``zeros``, with symmetric 8-bit's implicit 0 as a tensor ``[N, G]``."""
        return torch.zeros_like(self.scales) if self.zeros is None else self.zeros


def grid_storage_bits(grid_bits: int) -> int:
    """The container (``QuantizedWeight.bits``) of a grid of ``grid_bits``: 8 for 8, else 4."""
    for bits, grids in GRID_BITS.items():
        if grid_bits in grids:
            return bits
    raise ValueError(f"weight grids have {sorted(g for gs in GRID_BITS.values() for g in gs)} bits, got {grid_bits!r}")


def weight_grid(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    *,
    clip_ratios: tuple[float, ...] | None = None,
    importance: torch.Tensor | None = None,
    grid_bits: int | None = None,
) -> WeightGrid:
    """The grid :func:`quantize_weight_rtn` would round ``w`` onto (same arguments).

    Computed a block of rows at a time (:func:`row_blocks`): rows are independent, so the
    grid is the same as in one piece, without ``[N, K]`` temporaries."""
    _check_weight(w)
    grids = [_rtn(w[rows], bits, group_size, symmetric, clip_ratios, importance, grid_bits)[1]
             for rows in row_blocks(*w.shape)]
    if len(grids) == 1:
        return grids[0]
    zeros = None if grids[0].zeros is None else torch.cat([g.zeros for g in grids])
    return dataclasses.replace(grids[0], scales=torch.cat([g.scales for g in grids]), zeros=zeros)


def row_blocks(n: int, k: int, elements: int | None = None) -> list[slice]:
    """Consecutive row ranges of an ``[n, k]`` weight, each of at most ``elements``
    (default :data:`ROW_BLOCK_ELEMENTS`) elements, and at least one row."""
    rows = max(1, (ROW_BLOCK_ELEMENTS if elements is None else elements) // max(k, 1))
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)] or [slice(0, 0)]


def round_to_grid(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, code_min: int, code_max: int
) -> torch.Tensor:
    """Codes ``clamp(round(w / scales) + zeros, code_min, code_max)``, in ``w``'s dtype.

    ``scales`` and ``zeros`` broadcast against ``w`` (e.g. one column of a grid against one
    column of weights); computed in ``w``'s dtype (float64 makes the division exact to
    within one rounding of the quotient).
    """
    return torch.clamp(torch.round(w / scales.to(w.dtype)) + zeros.to(w.dtype), code_min, code_max)


def quantized_weight_from_codes(codes: torch.Tensor, grid: WeightGrid) -> QuantizedWeight:
    """Pack integer-valued codes ``[N, K]`` (stored code space, within the grid's code range)
    with their grid into a :class:`QuantizedWeight`."""
    n, k = grid.out_features, grid.in_features
    if tuple(codes.shape) != (n, k):
        raise ValueError(f"codes must have shape [{n}, {k}] like the grid, got {tuple(codes.shape)}")
    if codes.numel() and (float(codes.min()) < grid.code_min or float(codes.max()) > grid.code_max):
        raise ValueError(
            f"codes must lie in [{grid.code_min}, {grid.code_max}], got [{float(codes.min())}, {float(codes.max())}]"
        )
    if grid.bits == 8:
        qweight = codes.to(torch.int8)
    else:
        qweight = pack_int4(codes.to(torch.uint8))
    return QuantizedWeight(
        qweight=qweight, scales=grid.scales, zeros=grid.zeros, bits=grid.bits, group_size=grid.group_size,
        in_features=k, out_features=n, symmetric=grid.symmetric,
    )


def _rtn(w, bits, group_size, symmetric, clip_ratios, importance, grid_bits) -> tuple[torch.Tensor, WeightGrid]:
    """RTN codes ``[N, G, g]`` and their grid (the work of :func:`quantize_weight_rtn`)."""
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    grid_bits = bits if grid_bits is None else grid_bits
    if grid_bits not in GRID_BITS[bits]:
        raise ValueError(f"a {bits}-bit container holds grids of {GRID_BITS[bits]} bits, got grid_bits={grid_bits!r}")
    w32 = _as_float32_matrix(w)
    n, k = w32.shape
    group_size = k if group_size is None else group_size
    _check_group_size(group_size, k)
    groups = w32.reshape(n, k // group_size, group_size)
    weight = None
    if importance is not None and importance.dim() == 2:
        weight = _hessian_blocks(importance, k, group_size)
    elif importance is not None:
        imp = importance.detach().to(torch.float32).reshape(-1)
        if imp.numel() != k or not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError(f"importance must be {k} finite non-negative values, got shape {tuple(importance.shape)}")
        weight = imp.reshape(1, k // group_size, group_size)
    codes, scales, zeros = _quantize_groups(groups, bits, grid_bits, symmetric, _check_clip_ratios(clip_ratios), weight)
    code_min, code_max = _code_range(bits, grid_bits, symmetric)
    grid = WeightGrid(scales=scales, zeros=zeros, code_min=code_min, code_max=code_max, bits=bits,
                      grid_bits=grid_bits, group_size=group_size, in_features=k, symmetric=symmetric)
    return codes, grid


def _symmetric_zero_point(bits: int, grid_bits: int) -> int:
    """Zero point of symmetric grids in stored code space: 0 for int8, mid-range for unsigned 4-bit."""
    return 0 if bits == 8 else 2 ** (grid_bits - 1)


def _code_range(bits: int, grid_bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        qmax = 2 ** (grid_bits - 1) - 1
        zero = _symmetric_zero_point(bits, grid_bits)
        return zero - qmax, zero + qmax
    shift = 2 ** (bits - 1) if bits == 8 else 0
    return -shift, 2**grid_bits - 1 - shift


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the weight ``[N, K]`` that ``qw`` represents, as ``dtype``."""
    return dequantize_codes(
        qw.qweight, qw.scales, qw.zeros,
        bits=qw.bits, group_size=qw.group_size, in_features=qw.in_features, dtype=dtype,
    )


def dequantize_codes(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize raw quantized-weight tensors (the layout of :class:`QuantizedWeight`).

    Computes ``(code - zero) * scale`` in float32 (float64 if ``dtype`` is float64, which
    makes the result exact) and returns ``dtype``.
    """
    n = check_quantized_layout(
        qweight, scales, zeros, bits=bits, group_size=group_size, in_features=in_features
    )
    codes = unpack_int4(qweight, in_features) if bits == 4 else qweight
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    grouped = codes.to(compute).reshape(n, in_features // group_size, group_size)
    if zeros is not None:
        grouped = grouped - zeros.to(compute).unsqueeze(-1)
    elif bits == 4:
        grouped = grouped - INT4_DEFAULT_ZERO_POINT
    w = grouped * scales.to(compute).unsqueeze(-1)
    return w.reshape(n, in_features).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes ``uint8 [N, K]`` (values 0..15) into ``uint8 [N, ceil(K/2)]``.

    Column ``2j`` goes to the low nibble of byte ``j`` and column ``2j + 1`` to its high
    nibble; for odd K the last high nibble is 0.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_int4 expects uint8 codes, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D [N, K] tensor, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_int4 expects codes in 0..15, got a maximum of {int(codes.max())}")
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [N, ceil(K/2)]`` -> ``uint8 [N, K]`` codes 0..15."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8 packed codes, got {packed.dtype}")
    if packed.dim() != 2 or packed.shape[1] != (in_features + 1) // 2:
        raise ValueError(
            f"unpack_int4 with in_features={in_features} expects shape [N, {(in_features + 1) // 2}], "
            f"got {tuple(packed.shape)}"
        )
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return nibbles.reshape(packed.shape[0], -1)[:, :in_features]


def _check_group_size(group_size: int, in_features: int) -> None:
    if not isinstance(in_features, (int, torch.SymInt)) or isinstance(in_features, bool) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            "use group_size=None for per-channel quantization"
        )


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be floating point ({', '.join(map(str, _FLOAT_DTYPES))}), got {w.dtype}")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty 2-D [out_features, in_features] tensor, got {tuple(w.shape)}")
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"weight of shape {tuple(w.shape)} holds {bad} non-finite values (NaN or Inf)")


def _as_float32_matrix(w: torch.Tensor) -> torch.Tensor:
    _check_weight(w)
    w32 = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise ValueError(f"weight of shape {tuple(w.shape)} holds values beyond the float32 range")
    return w32


def _usable_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale < _MIN_SCALE, torch.ones_like(scale), scale)


def _check_clip_ratios(clip_ratios: tuple[float, ...] | None) -> tuple[float, ...]:
    if clip_ratios is None:
        return (1.0,)
    ratios = tuple(float(r) for r in clip_ratios)
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"clip_ratios must be a non-empty sequence of numbers in (0, 1], got {clip_ratios!r}")
    return ratios


def _hessian_blocks(hessian: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """The diagonal ``[g, g]`` blocks ``[G, g, g]`` (float32) of a ``[K, K]`` second moment."""
    if tuple(hessian.shape) != (k, k) or not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"a matrix importance must be a finite [{k}, {k}] E[x xᵀ], got shape {tuple(hessian.shape)}")
    g = k // group_size
    h = hessian.detach().to(torch.float32).reshape(g, group_size, g, group_size)
    return h[torch.arange(g), :, torch.arange(g), :]  # [G, g, g]: advanced indices go first


def _group_error(diff: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per group ``[N, G]``: Σ diff², Σ w diff² (``weight [1, G, g]``) or diff H_g diffᵀ (``[G, g, g]``)."""
    if weight is None:
        return diff.pow(2).sum(dim=-1)
    if weight.dim() == 3 and weight.shape[0] == diff.shape[1] and weight.shape[-1] == weight.shape[-2]:
        return torch.einsum("ngi,gij,ngj->ng", diff, weight, diff)
    return (diff.pow(2) * weight).sum(dim=-1)


# Elements of a weight the range search holds at once: it keeps about five temporaries the
# size of what it searches (candidate codes, the best codes, errors), so a 32000 x 2048 LM
# head searched whole would take 1.3 GB; rows are searched in blocks of this many elements.
RANGE_SEARCH_BLOCK = 1 << 22


def _quantize_groups(groups: torch.Tensor, bits: int, grid_bits: int, symmetric: bool, ratios: tuple[float, ...],
                     weight: torch.Tensor | None = None):
    """Quantize groups [N, G, g] with each range ratio; keep, per group, the least (weighted) squared error.

    Rows are independent: a large weight is searched in blocks of rows
    (:data:`RANGE_SEARCH_BLOCK` elements), so the search's temporaries stay small."""
    per_row = max(1, groups[0].numel()) if groups.shape[0] else 1
    rows = max(1, RANGE_SEARCH_BLOCK // per_row)
    if len(ratios) > 1 and groups.shape[0] > rows:
        parts = [_search_ranges(groups[i:i + rows], bits, grid_bits, symmetric, ratios, weight)
                 for i in range(0, groups.shape[0], rows)]
        codes, scales, zeros = (torch.cat(column) if column[0] is not None else None for column in zip(*parts))
        return codes, scales, zeros
    return _search_ranges(groups, bits, grid_bits, symmetric, ratios, weight)


def _search_ranges(groups: torch.Tensor, bits: int, grid_bits: int, symmetric: bool, ratios: tuple[float, ...],
                   weight: torch.Tensor | None):
    quantize = _quantize_symmetric if symmetric else _quantize_asymmetric
    best = None
    best_err = None
    for ratio in ratios:
        codes, scales, zeros = quantize(groups, bits, grid_bits, ratio)
        if len(ratios) == 1:
            return codes, scales, zeros
        offset = zeros if zeros is not None else torch.zeros_like(scales)
        err = _group_error((codes - offset.unsqueeze(-1)) * scales.unsqueeze(-1) - groups, weight)
        if best is None:
            best, best_err = [codes, scales, zeros], err
            continue
        better = err < best_err
        best[0] = torch.where(better.unsqueeze(-1), codes, best[0])
        best[1] = torch.where(better, scales, best[1])
        if zeros is not None:
            best[2] = torch.where(better, zeros, best[2])
        best_err = torch.minimum(err, best_err)
    return best[0], best[1], best[2]


def _quantize_symmetric(groups: torch.Tensor, bits: int, grid_bits: int, ratio: float = 1.0):
    """groups [N, G, g] -> (codes [N, G, g] in stored space, scales [N, G], zeros or None)."""
    qmax = 2 ** (grid_bits - 1) - 1
    scales = _usable_scale(groups.abs().amax(dim=-1) * ratio / qmax)
    q = torch.clamp(torch.round(groups / scales.unsqueeze(-1)), -qmax, qmax)
    if bits == 8:
        return q, scales, None
    zero = _symmetric_zero_point(bits, grid_bits)  # INT4_DEFAULT_ZERO_POINT for 4-bit grids
    zeros = torch.full_like(scales, zero)
    return q + zero, scales, zeros


def _quantize_asymmetric(groups: torch.Tensor, bits: int, grid_bits: int, ratio: float = 1.0):
    """groups [N, G, g] -> (codes [N, G, g] in stored space, scales [N, G], zeros [N, G])."""
    levels = 2**grid_bits - 1
    lo = groups.amin(dim=-1).clamp(max=0.0) * ratio
    hi = groups.amax(dim=-1).clamp(min=0.0) * ratio
    # hi / levels - lo / levels rather than (hi - lo) / levels: hi - lo can overflow float32.
    scales = _usable_scale(hi / levels - lo / levels)
    zeros = torch.clamp(torch.round(-lo / scales), 0, levels)
    codes = torch.clamp(torch.round(groups / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, levels)
    if bits == 8:
        shift = 2 ** (bits - 1)
        return codes - shift, scales, zeros - shift
    return codes, scales, zeros
