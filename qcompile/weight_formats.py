"""The formats a per-layer precision choice picks from: pure numerics, no graphs.

A :class:`WeightFormat` is one candidate for one linear: its weight kept in floating point,
INT8 per output channel (symmetric), or a 4-bit / 3-bit grid in groups of input channels
(the packed 4-bit container), and its input activation either left in 16-bit floating
point (weight-only: ``qcompile::linear_w8a16`` / ``linear_w4a16``) or quantized per token,
dynamically and symmetrically, to INT8 or INT4 (``qcompile::linear_w8a8`` for 8-bit
weights with 8-bit activations, ``linear_w4a8`` / ``linear_w4a4`` for 4-bit weights).
These are the formats the repository's kernels run. :func:`candidate_formats` builds them
from a recipe's candidate names (:data:`CANDIDATE_NAMES`), :func:`fake_quantize` rounds a
weight as ``passes/quantize_weights.py`` would with RTN, :func:`fake_quantize_activation`
rounds an input as the kernels do, and :func:`weight_bytes` / :attr:`WeightFormat.bits`
are what a size budget counts.

``bits`` is the grid's nominal bit width (3, 4, 8, or the float dtype's width): an average
over it is what ``Budget(avg_bits=...)`` limits. Bytes are the storage actually held:
a 3-bit grid lives in the 4-bit container, so it costs the bytes of 4-bit weights (plus
scales and zero points), and ``Budget(bytes=...)`` cannot tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .act_quant import dequantize_activation, quantize_activation_per_token
from .quantizers import dequantize_weight, quantize_weight_rtn

__all__ = ["PRECISION_META", "WeightFormat", "CANDIDATE_NAMES", "candidate_formats", "fake_quantize",
           "fake_quantize_activation", "weight_bytes", "effective_group"]

# node.meta key of the WeightFormat that passes/assign_precision.py chose for a linear
# (passes/quantize_weights.py rounds the weight to it instead of the recipe's weight_bits)
PRECISION_META = "qcompile.precision"

# candidate name -> (weight grid bits or None for floating point kept, activation bits:
# 16 = left in floating point, 8 / 4 = per-token dynamic symmetric INT8 / INT4)
CANDIDATE_NAMES: dict[str, tuple[int | None, int]] = {
    "w3": (3, 16), "w4": (4, 16), "w8": (8, 16), "float": (None, 16),
    "w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4),
}


@dataclass(frozen=True)
class WeightFormat:
    """One candidate weight format.

    Attributes:
        name: a key of :data:`CANDIDATE_NAMES` (``"w3"``, ``"w4"``, ``"w8"``, ``"float"``,
            ``"w8a8"``, ``"w4a8"``, ``"w4a4"``).
        grid_bits: 3, 4 or 8; None for floating point.
        group_size: input channels per scale for 3/4-bit grids (None: per output channel);
            8-bit weights are always per-channel.
        symmetric: grid symmetry for 3/4-bit grids (8-bit is symmetric, as the w8a16 preset).
        act_bits: 16 (input left in floating point), 8 or 4 (input quantized per token).
    """

    name: str
    grid_bits: int | None
    group_size: int | None = None
    symmetric: bool = True
    act_bits: int = 16

    @property
    def is_float(self) -> bool:
        return self.grid_bits is None

    @property
    def storage_bits(self) -> int | None:
        """The container: 4 for 3- and 4-bit grids, 8 for 8-bit, None for float."""
        if self.grid_bits is None:
            return None
        return 4 if self.grid_bits in (3, 4) else 8

    def bits(self, float_bits: int) -> int:
        """Nominal bits per weight (``float_bits``, the model's float width, when kept float)."""
        return float_bits if self.grid_bits is None else self.grid_bits

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits != 16

    def label(self) -> str:
        if self.grid_bits is None:
            return "float"
        acts = f", a int{self.act_bits} per-token" if self.quantizes_activations else ""
        if self.grid_bits == 8:
            return "int8 per-channel sym" + acts
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.grid_bits} {group} {'sym' if self.symmetric else 'asym'}" + acts


def candidate_formats(names: tuple[str, ...], group_size: int | None, symmetric: bool) -> list[WeightFormat]:
    """The formats named ``names`` (see :data:`CANDIDATE_NAMES`), 3/4-bit ones with the given
    group size and symmetry."""
    out = []
    for name in names:
        if name not in CANDIDATE_NAMES:
            raise ValueError(f"unknown format {name!r}; known: {sorted(CANDIDATE_NAMES)}")
        bits, act_bits = CANDIDATE_NAMES[name]
        if bits in (3, 4):
            out.append(WeightFormat(name, bits, group_size, symmetric, act_bits))
        else:
            out.append(WeightFormat(name, bits, None, True, act_bits))
    return out


def effective_group(fmt: WeightFormat, in_features: int) -> int | None:
    """The group size used on a layer: the format's, or per-channel when it does not divide K."""
    if fmt.group_size is None or in_features % fmt.group_size:
        return None
    return fmt.group_size


def fake_quantize(
    w: torch.Tensor,
    fmt: WeightFormat,
    *,
    clip_ratios: tuple[float, ...] | None = None,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w`` rounded to ``fmt`` by RTN and dequantized (float32); ``w`` itself (as float32)
    for float. ``clip_ratios`` / ``importance``: the range search of
    :func:`qcompile.quantizers.quantize_weight_rtn`, as ``passes/quantize_weights.py`` applies
    them (to 8-bit weights too)."""
    if fmt.is_float:
        return w.detach().float()
    if fmt.grid_bits == 8:
        return dequantize_weight(quantize_weight_rtn(w, 8, None, True, clip_ratios=clip_ratios, importance=importance))
    group = effective_group(fmt, w.shape[1])
    q = quantize_weight_rtn(w, 4, group, fmt.symmetric, clip_ratios=clip_ratios, importance=importance,
                            grid_bits=fmt.grid_bits)
    return dequantize_weight(q)


def fake_quantize_activation(x: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """``x`` as the linear of format ``fmt`` computes with it: quantized per token
    (dynamic, symmetric, ``qcompile.act_quant.quantize_activation_per_token``) and
    dequantized, in float32; ``x`` itself (as float32) when ``fmt`` leaves activations float."""
    if not fmt.quantizes_activations:
        return x.float()
    codes, scales = quantize_activation_per_token(x.float(), bits=fmt.act_bits)
    return dequantize_activation(codes, scales)


def weight_bytes(fmt: WeightFormat, out_features: int, in_features: int, float_bytes_per_weight: int) -> int:
    """Bytes of a ``[N, K]`` weight in ``fmt``: codes + float32 scales (+ zero points), exactly
    :attr:`qcompile.quantizers.QuantizedWeight.nbytes`; ``N·K·float_bytes_per_weight`` for float."""
    n, k = out_features, in_features
    if fmt.is_float:
        return n * k * float_bytes_per_weight
    if fmt.grid_bits == 8:
        return n * k + 4 * n  # int8 codes, one float32 scale per row, no zero points
    group = effective_group(fmt, k) or k
    groups = k // group
    return n * ((k + 1) // 2) + 2 * 4 * n * groups  # packed nibbles, float32 scales and zero points
