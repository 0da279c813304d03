"""A recipe's quantizers as tensor -> dequantized-tensor functions ("fake quantization").

Used where a pass or an analysis needs to know what quantizing a tensor *would* do
(the smoothing scale search, per-layer error estimates) without touching a graph.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .act_quant import (
    dequantize_activation,
    dequantize_weight_per_channel,
    quantize_activation_per_token,
    quantize_activation_static,
    quantize_weight_fp8,
)
from .quantizers import dequantize_weight, quantize_weight_rtn
from .recipe import Recipe

__all__ = ["weight_group_size", "weight_fake_quant", "activation_fake_quant"]

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


def weight_group_size(recipe: Recipe, in_features: int) -> tuple[int | None, str]:
    """The group size to use and a note for the report when the recipe's cannot apply."""
    group = recipe.group_size
    if group is None:
        return None, ""
    if in_features % group:
        return None, f"in_features {in_features} not divisible by group {group}: per-channel"
    return group, ""


def weight_fake_quant(recipe: Recipe, in_features: int, *, clip: bool = False) -> FakeQuant:
    """``W -> dequantize(quantize(W))`` with the recipe's weight format (float32 out).

    ``clip`` includes the recipe's range search (slow); without it, plain min/max RTN.
    """
    if recipe.activation_bits == 8 and recipe.activation_format == "fp8":
        return lambda w: dequantize_weight_per_channel(*quantize_weight_fp8(w))
    group, _ = weight_group_size(recipe, in_features)
    ratios = recipe.clip_ratios if clip and recipe.clip_ratios else None
    return lambda w: dequantize_weight(
        quantize_weight_rtn(w, recipe.weight_storage_bits, group, recipe.symmetric, clip_ratios=ratios,
                            grid_bits=recipe.weight_bits)
    )


def activation_fake_quant(recipe: Recipe, static_absmax: Optional[torch.Tensor] = None) -> Optional[FakeQuant]:
    """``X -> dequantize(quantize(X))`` for the recipe's activations (per-token int8 / int4 /
    fp8, or static int8); None for 16-bit ones.

    Static INT8 needs ``static_absmax`` (the calibration abs-max of the tensor); without
    it the sample's own abs-max is used.
    """
    if recipe.activation_bits == 16:
        return None
    if recipe.activation_format == "fp8":
        return lambda x: dequantize_activation(*quantize_activation_per_token(x, None, 8, "fp8"))
    if recipe.activation_scale == "static":
        def static(x: torch.Tensor) -> torch.Tensor:
            absmax = static_absmax if static_absmax is not None else x.abs().amax()
            return dequantize_activation(*quantize_activation_static(x, absmax / 127.0))
        return static
    bits = recipe.activation_bits
    return lambda x: dequantize_activation(*quantize_activation_per_token(x, None, bits, "int"))
