"""Rotate-then-quantize in one step: per-token quantization of a block Hadamard rotation.

    quantize_rotated(x, small, signs, block, bits, format) -> (codes [..., n], scales [..., 1] float32)

means ``quantize_per_token(hadamard(x, small, signs, block), None, bits, format)`` with the
rotation kept in float32 (never rounded to x's dtype in between): ``x [..., n]`` (float32,
bfloat16 or float16) is multiplied by ``signs [n]`` (random +-1 signs, optionally already
multiplied by a per-channel factor such as ``1 / smooth``), rotated by
``blockdiag(H_small (x) H_{2**k}) / sqrt(block)`` (:mod:`qcompile.kernels.hadamard`), and
quantized with one symmetric scale per row (:mod:`qcompile.act_quant`: int8, int4 codes
in [-7, 7] stored as int8, or float8 e4m3fn).

This module holds the pure-torch reference and the input checks (it never imports triton);
the fused Triton kernel is :mod:`qcompile.kernels.triton_quantize_rotated`. Not registered
as an op.
"""
from __future__ import annotations

from typing import Optional

import torch

from qcompile.act_quant import check_act_format, quantize_activation_per_token
from qcompile.hadamard import apply_block_hadamard
from qcompile.kernels.hadamard import check_hadamard_inputs
from qcompile.kernels.quantize_per_token import check_activation_and_smooth

__all__ = ["quantize_rotated_reference", "rotate_float32", "check_quantize_rotated_inputs", "NAME"]

NAME = "quantize_rotated"


def check_quantize_rotated_inputs(
    name: str,
    x: torch.Tensor,
    small: Optional[torch.Tensor],
    signs: Optional[torch.Tensor],
    block: int,
    bits: int,
    format: str,
) -> int:
    """Validate the inputs with the checks of ``qcompile::quantize_per_token`` (format; x
    float32 / bfloat16 / float16 ``[..., n]``, n >= 1) and of ``qcompile::hadamard``
    (small, signs, block); return m, the order of ``small`` (1 when None).

    Shapes and dtypes only, never values. Raises TypeError / ValueError naming ``name``
    (the function the caller called), followed by the failing checker's message.
    """
    try:
        check_act_format(bits, format)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    check_activation_and_smooth(name, x, None)
    try:
        return check_hadamard_inputs(x, small, signs, block)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from exc


def rotate_float32(
    x: torch.Tensor, small: Optional[torch.Tensor], signs: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    """``(x * signs) @ blockdiag(H_small (x) H_{2**k}) / sqrt(block)`` in float32 (x, small
    and signs converted first): :func:`qcompile.hadamard.apply_block_hadamard`, the
    arithmetic of :func:`qcompile.kernels.hadamard.hadamard_reference` without its final
    rounding to x's dtype."""
    s32 = None if signs is None else signs.to(torch.float32)
    h32 = None if small is None else small.to(torch.float32)
    return apply_block_hadamard(x.to(torch.float32), h32, block, s32)


def quantize_rotated_reference(
    x: torch.Tensor,
    small: Optional[torch.Tensor],
    signs: Optional[torch.Tensor],
    block: int,
    bits: int,
    format: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The meaning in pure torch: :func:`rotate_float32`, then
    :func:`qcompile.act_quant.quantize_activation_per_token` (no smoothing) of the float32
    rotation. Returns ``(codes [..., n], scales [..., 1] float32)``.

    Raises TypeError / ValueError for wrong dtypes, shapes, formats or devices, naming
    ``quantize_rotated_reference``.
    """
    check_quantize_rotated_inputs("quantize_rotated_reference", x, small, signs, block, bits, format)
    return quantize_activation_per_token(rotate_float32(x, small, signs, block), None, bits, format)
