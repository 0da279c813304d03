"""``qcompile::hadamard``: a block-diagonal normalized Hadamard transform along the last dim.

    hadamard(Tensor x, Tensor? small, Tensor? signs, int block) -> Tensor

For ``x [..., n]`` (float32, bfloat16, float16 — or float64, which the pass manager's
equivalence check runs graphs in, computed in float64) with ``n = num_blocks * block`` and
``block = m * 2**k``, returns ``(x * signs) @ Q`` with

    Q = blockdiag(H_small (x) H_{2**k}, ..., H_small (x) H_{2**k}) / sqrt(block)

in x's dtype, computed in float32. ``small`` is the +-1 matrix ``H_m`` (``[m, m]``, any
real dtype; None means m = 1) and ``H_{2**k}`` the Sylvester matrix, applied as a fast
Walsh-Hadamard transform. ``signs`` (``[n]``, floating point, optional) multiplies each
channel first: random +-1 signs make the rotation a randomized Hadamard
(:func:`qcompile.hadamard.random_hadamard`), and any other per-channel factor (a smoothing
vector) fuses the same way. Why ``block`` is an argument: it is not implied by ``small`` and
n, since a dimension with no Hadamard matrix of its own order is rotated block-diagonally
(:func:`qcompile.hadamard.rotation_plan` decides; :func:`hadamard_args` turns a plan into
the op's arguments).

Implementations:

* :func:`hadamard_reference`: pure torch, :func:`qcompile.hadamard.apply_block_hadamard` in
  float32 (sign multiply, butterflies, small matmul, scale).
* CPU path (:func:`hadamard_cpu`): torch has no Walsh-Hadamard kernel, so the block is
  written as a Kronecker product of small matrices (``H_m``, and Sylvester factors of order
  <= 64) and each is applied as one float32 GEMM over all rows and blocks: 2-3 GEMMs
  instead of log2(2**k) butterfly passes. Measured here (1 thread, float32, signs on; the
  2 cores were shared with other jobs, so absolute times are noisy, the ratios less so):
  32 x 4096: 0.85 ms vs 8.5 ms for the reference; 4096 x 768: 32 ms vs 96 ms;
  4096 x 4096: 620 ms vs 3220 ms; 512 x 11008: 188 ms vs 300 ms; 2048 x 14336: 1.55 s vs
  4.9 s. Results differ from the reference by float32 summation order only.
* on CUDA, when triton is installed, the Triton kernel of
  :mod:`qcompile.kernels.triton_hadamard` (registered by
  :mod:`qcompile.kernels._triton_common`); ``QCOMPILE_TRITON=0`` sends CUDA calls to the
  reference.
* fake implementation, so torch.export and torch.compile can trace the op.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

from qcompile.hadamard import RotationPlan, apply_block_hadamard, hadamard_matrix
from qcompile.kernels._common import ACTIVATION_DTYPES, all_on_cpu

__all__ = [
    "hadamard",
    "hadamard_reference",
    "hadamard_cpu",
    "kronecker_factors",
    "hadamard_args",
    "apply_hadamard_op",
    "check_hadamard_inputs",
    "HADAMARD_SCHEMA",
]

OP_NAME = "qcompile::hadamard"
_X_DTYPES = (*ACTIVATION_DTYPES, torch.float64)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (exact checks), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
HADAMARD_SCHEMA = "(Tensor x, Tensor? small, Tensor? signs, int block) -> Tensor"


def check_hadamard_inputs(
    x: torch.Tensor, small: Optional[torch.Tensor], signs: Optional[torch.Tensor], block: int
) -> int:
    """Validate the op's inputs (shapes, dtypes, devices; never values, so it also runs on
    fake tensors); return m, the order of ``small`` (1 when None).

    Raises TypeError for a wrong type or dtype and ValueError for a wrong shape or device,
    naming the op.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP_NAME}: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{OP_NAME}: x must be one of {_X_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{OP_NAME}: x must have shape [..., n], got a 0-d tensor")
    n = x.shape[-1]
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"{OP_NAME}: block must be a positive int, got {block!r}")
    if n % block:
        raise ValueError(
            f"{OP_NAME}: the last dimension of x ({n}, shape {tuple(x.shape)}) must be a multiple of block = {block}"
        )
    m = 1
    if small is not None:
        if small.dtype in (torch.bool,) or small.is_complex():
            raise TypeError(f"{OP_NAME}: small must hold real +-1 values, got {small.dtype}")
        if small.dim() != 2 or small.shape[0] != small.shape[1] or small.shape[0] < 1:
            raise ValueError(f"{OP_NAME}: small must be a square [m, m] matrix, got shape {tuple(small.shape)}")
        if small.device != x.device:
            raise ValueError(f"{OP_NAME}: small is on {small.device} but x is on {x.device}")
        m = small.shape[0]
    p, rest = divmod(block, m)
    if rest or p & (p - 1):
        raise ValueError(
            f"{OP_NAME}: block = {block} must be m * 2**k for the order m = {m} of small "
            f"(block / m = {block / m:g} is not a power of two)"
        )
    if signs is not None:
        if not signs.is_floating_point():
            raise TypeError(f"{OP_NAME}: signs must be floating point, got {signs.dtype}")
        if tuple(signs.shape) != (n,):
            raise ValueError(
                f"{OP_NAME}: signs must have shape [n] = [{n}] for x of shape {tuple(x.shape)}, got {tuple(signs.shape)}"
            )
        if signs.device != x.device:
            raise ValueError(f"{OP_NAME}: signs is on {signs.device} but x is on {x.device}")
    return m


def hadamard_reference(
    x: torch.Tensor, small: Optional[torch.Tensor], signs: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    """The op's meaning in pure torch: :func:`qcompile.hadamard.apply_block_hadamard` on
    float32 (x, small and signs converted), the result in x's dtype."""
    check_hadamard_inputs(x, small, signs, block)
    dtype = _compute_dtype(x)
    x32 = x.to(dtype)
    s32 = None if signs is None else signs.to(dtype)
    h32 = None if small is None else small.to(dtype)
    return apply_block_hadamard(x32, h32, block, s32).to(x.dtype)


def hadamard_args(
    plan: RotationPlan, device: torch.device | str = "cpu"
) -> tuple[Optional[torch.Tensor], int]:
    """``(small, block)`` for the op from a rotation plan: ``small`` float32 on ``device``
    (None when the plan's dense factor has order 1)."""
    small = None if plan.small is None else plan.small.to(device=device, dtype=torch.float32)
    return small, plan.block


def apply_hadamard_op(x: torch.Tensor, plan: RotationPlan, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.qcompile.hadamard`` with the arguments of ``plan`` (float32 result equals
    :func:`qcompile.hadamard.apply_hadamard` up to float32 rounding)."""
    if x.shape[-1] != plan.n:
        raise ValueError(f"{OP_NAME}: x has {x.shape[-1]} channels, the plan rotates {plan.n}")
    small, block = hadamard_args(plan, x.device)
    return torch.ops.qcompile.hadamard(x, small, signs, block)


# Largest Sylvester factor of the CPU path: a power of two P is applied as GEMMs with
# Sylvester matrices of order <= this (H_P = H_64 (x) H_64 (x) ... (x) the remainder).
CPU_FACTOR = 64


@lru_cache(maxsize=16)
def _sylvester32(order: int) -> torch.Tensor:
    return hadamard_matrix(order, torch.float32)


def kronecker_factors(m: int, block: int) -> list[int]:
    """The orders the CPU path applies one GEMM each for: m (if > 1), then the power of
    two ``block / m`` split into factors of at most :data:`CPU_FACTOR`."""
    factors = [m] if m > 1 else []
    power = block // m
    while power > 1:
        factors.append(min(power, CPU_FACTOR))
        power //= factors[-1]
    return factors


def hadamard_cpu(
    x: torch.Tensor, small: Optional[torch.Tensor], signs: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    """The CPU fast path: ``H_small (x) H_P`` written as a Kronecker product of small
    matrices (:func:`kronecker_factors`), each applied as one float32 GEMM over every row
    and block on the last axis, which is then rotated to the front (a transposed copy); after
    one GEMM per factor the axes are back in order. 2-3 GEMMs of inner size <= 64 (or m)
    against the reference's log2(P) butterfly passes, each of which allocates and fills a
    new tensor. The +-1 products are exact; the sums are in another order than the
    reference's, so results differ by float32 rounding
    (``(m + log2 P + 2) 2**-24 sum|x| / sqrt(block)`` at most; tested).
    """
    m = check_hadamard_inputs(x, small, signs, block)
    if not all_on_cpu(x, small, signs):
        raise ValueError(f"{OP_NAME}: the CPU path needs CPU tensors, got x on {x.device}")
    dtype = _compute_dtype(x)
    y = x.to(dtype)
    if signs is not None:
        y = y * signs.to(dtype)
    rows = y.numel() // block
    factors = kronecker_factors(m, block)
    if not factors:  # block 1: only the signs (a copy: an op's output must not alias its input)
        return y.to(x.dtype, copy=y is x)
    sylvester_orders = factors[1:] if m > 1 else factors
    matrices = ([small.to(dtype)] if m > 1 else []) + [_sylvester32(f).to(dtype) for f in sylvester_orders]
    scale = 1.0 / math.sqrt(block)
    y = y.reshape(rows, block)
    for i, (order, matrix) in enumerate(zip(reversed(factors), reversed(matrices))):
        product = (y.reshape(-1, order) @ matrix).reshape(rows, block // order, order).transpose(1, 2)
        if i == len(factors) - 1:
            out = torch.empty((rows, order, block // order), dtype=dtype)
            y = torch.mul(product, scale, out=out)
        else:
            y = product.contiguous()
    return y.reshape(x.shape).to(x.dtype)


def _implementation(x, small, signs, block):
    check_hadamard_inputs(x, small, signs, block)
    if all_on_cpu(x, small, signs):
        return hadamard_cpu(x, small, signs, block)
    return hadamard_reference(x, small, signs, block)


def _fake(x, small, signs, block):
    check_hadamard_inputs(x, small, signs, block)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


hadamard = torch.library.custom_op(OP_NAME, _implementation, mutates_args=(), schema=HADAMARD_SCHEMA)
hadamard.register_fake(_fake)
