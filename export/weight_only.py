"""Pieces every flavor's translation of a weight-only linear shares.

The weight-only ops (``qcompile::linear_w8a16`` / ``linear_w4a16``) all have the schema
``(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int group_size)``;
:class:`WeightOnlyCall` gathers one call's ONNX inputs and constant tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qcompile.errors import ExportError

from .context import ExportContext
from .layouts import UnsignedGrid, unsigned_grid

__all__ = ["WeightOnlyCall", "read_call", "add_bias", "in_activation_dtype"]


@dataclass
class WeightOnlyCall:
    """One call of a weight-only linear, as a translation sees it."""

    op_name: str
    bits: int
    x: Any  # ONNX value
    bias: Any  # ONNX value or None
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    name: str  # base name for derived initializers (the weight's source name)

    @property
    def in_features(self) -> int:
        return int(self.scales.shape[1]) * self.group_size

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    def grid(self) -> UnsignedGrid:
        try:
            return unsigned_grid(self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"{self.op_name} ({self.name}): {exc}") from exc


def read_call(ctx: ExportContext, op_name: str, bits: int, x, qweight, scales, zeros, bias, group_size) -> WeightOnlyCall:
    """Resolve the constant inputs of one weight-only linear call."""
    return WeightOnlyCall(
        op_name=op_name,
        bits=bits,
        x=x,
        bias=bias,
        group_size=int(group_size),
        qweight=ctx.constant(qweight, "qweight", op_name),
        scales=ctx.constant(scales, "scales", op_name),
        zeros=None if zeros is None else ctx.constant(zeros, "zeros", op_name),
        name=ctx.source_name(qweight),
    )


def in_activation_dtype(array: np.ndarray, x: Any) -> np.ndarray:
    """``array`` (float32 scales) in the dtype of the activation ``x`` (float32, float16 or bfloat16)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return array
    return array.astype(dtype.numpy())


def add_bias(ctx: ExportContext, y, x, bias):
    """``y + bias`` (bias cast to y's dtype when the model stores it in another one)."""
    if bias is None:
        return y
    op = ctx.op
    if getattr(bias, "dtype", None) is not None and getattr(x, "dtype", None) is not None and bias.dtype != x.dtype:
        bias = op.CastLike(bias, y)
    return op.Add(y, bias)
