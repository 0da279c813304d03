"""Hadamard matrices and randomized Hadamard rotations: pure numerics, no graphs.

A Hadamard matrix H of order n has entries +-1 and ``H @ H.T == n * I``, so ``H / sqrt(n)``
is orthogonal. Rotating the input dimension of a linear by such a matrix spreads outlier
channels over all channels (QuaRot, QuIP#), which is what lets 4-bit activations survive.

Constructions (:func:`hadamard_matrix`), each checked exactly (``H @ H.T == n * I`` in
integer-valued float64, exact below 2**53) when first built:

* Sylvester: ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]`` for powers of two;
* Paley I: order ``q + 1`` for a prime power ``q = 3 (mod 4)``;
* Paley II: order ``2 (q + 1)`` for a prime power ``q = 1 (mod 4)``;
* Kronecker products ``H_a (x) H_b`` of orders reached by these.

Prime powers (not only primes) matter: 344 = 7**3 + 1 gives 11008 = 344 * 2**5 (the MLP
width of Llama-2-7B), and 28 = 3**3 + 1. Williamson-type matrices are not built, so
orders such as 92 and 172 (= 4 * 43) are not reached; 8 * 43 = 344 and 16 * 23 = 368
(Paley I, 367 prime) are.

A rotation of a dimension n (:func:`rotation_plan`) is either *full*, one Hadamard matrix of
order ``n = m * 2**k`` applied as ``H_m (x) H_{2**k}`` (a small ``m x m`` matrix and a fast
Walsh-Hadamard transform, FWHT), with the smallest such m (at most ``max_small_order``), or
*block-diagonal* when no order-n matrix is reachable: ``n / b`` blocks of the largest
reachable order b dividing n, with a description saying why.

:func:`random_hadamard` returns the orthogonal float64 matrix ``Q = diag(s) H / sqrt(b)``
(block-diagonal H, random signs ``s`` from a seed); :func:`apply_hadamard` computes
``x @ Q`` along the last dimension without building Q (butterflies for the power of two, a
small matmul for m), which is also the meaning of the op ``qcompile::hadamard``
(:mod:`qcompile.kernels.hadamard`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

__all__ = [
    "hadamard_matrix",
    "hadamard_construction",
    "RotationPlan",
    "rotation_plan",
    "random_signs",
    "random_hadamard",
    "apply_hadamard",
    "apply_block_hadamard",
    "fwht",
    "MAX_SMALL_ORDER",
]

# Largest order m of the dense factor H_m in a rotation plan. Applying it costs m
# multiply-adds per element (the FWHT costs log2 of the power of two), and the Triton kernel
# holds next_power_of_2(m) rows of a block in registers.
MAX_SMALL_ORDER = 512


# ---------------------------------------------------------------------------------------
# Finite fields GF(p**k) for the Paley constructions (p odd, q small).


def _prime_power(q: int) -> Optional[tuple[int, int]]:
    """(p, k) with ``q == p**k``, p prime and k >= 1; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); polynomials as coefficient lists, lowest degree first, f monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _irreducible_polynomial(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (coefficients, low first),
    found by trial division by every monic polynomial of degree 1 .. k // 2."""
    def monic(degree: int):
        for code in range(p**degree):
            yield [(code // p**i) % p for i in range(degree)] + [1]

    for f in monic(k):
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in monic(d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character_table(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(digits, chi) for GF(q): element e (0 <= e < q) is the polynomial whose coefficients
    are the base-p digits of e, ``digits[e]`` those digits, and ``chi[e]`` the quadratic
    character (0 for zero, 1 for a nonzero square, -1 otherwise)."""
    p, k = _prime_power(q)
    digits = np.array([[(e // p**i) % p for i in range(k)] for e in range(q)], dtype=np.int64)
    f = _irreducible_polynomial(p, k) if k > 1 else [0, 1]
    weights = p ** np.arange(k, dtype=np.int64)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for e in range(1, q):
        a = digits[e].tolist()
        square = [0] * (2 * k - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                square[i + j] += ai * aj
        reduced = _poly_mod(square, f, p) if k > 1 else [square[0] % p]
        chi[int(np.dot(reduced + [0] * (k - len(reduced)), weights))] = 1
    return digits, chi


def _jacobsthal(q: int) -> np.ndarray:
    """The Jacobsthal matrix ``Q[i, j] = chi(a_i - a_j)`` of GF(q)."""
    p, k = _prime_power(q)
    digits, chi = _quadratic_character_table(q)
    weights = p ** np.arange(k, dtype=np.int64)
    difference = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[difference @ weights]


# ---------------------------------------------------------------------------------------
# Constructions.


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def hadamard_construction(n: int) -> Optional[str]:
    """How :func:`hadamard_matrix` builds order n, as text ("sylvester", "paley1(q=7^3)",
    "paley2(q=13)", "kron(12,20)"), or None when no construction here reaches n."""
    if n < 1:
        return None
    if _is_power_of_two(n):
        return "sylvester"
    if n % 4:
        return None
    pk = _prime_power(n - 1)
    if pk is not None and (n - 1) % 4 == 3:
        return f"paley1(q={_power_text(*pk)})"
    pk = _prime_power(n // 2 - 1)
    if pk is not None and (n // 2 - 1) % 4 == 1:
        return f"paley2(q={_power_text(*pk)})"
    for a in range(2, math.isqrt(n) + 1):
        if n % a == 0 and hadamard_construction(a) and hadamard_construction(n // a):
            return f"kron({a},{n // a})"
    return None


def _power_text(p: int, k: int) -> str:
    return str(p) if k == 1 else f"{p}^{k}"


@lru_cache(maxsize=64)
def _hadamard_array(n: int) -> np.ndarray:
    """The +-1 matrix of order n as a read-only int8 array, checked exactly."""
    how = hadamard_construction(n)
    if how is None:
        raise ValueError(_no_hadamard_message(n))
    if how == "sylvester":
        h = np.ones((1, 1), dtype=np.int8)
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
    elif how.startswith("paley1"):
        q = n - 1
        s = np.zeros((n, n), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        h = (s + np.eye(n, dtype=np.int64)).astype(np.int8)
    elif how.startswith("paley2"):
        q = n // 2 - 1
        c = np.zeros((q + 1, q + 1), dtype=np.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        identity = np.eye(q + 1, dtype=np.int64)
        h = (np.kron(c, [[1, 1], [1, -1]]) + np.kron(identity, [[1, -1], [-1, -1]])).astype(np.int8)
    else:  # kron(a,b)
        a, b = (int(v) for v in how[len("kron("):-1].split(","))
        h = np.kron(_hadamard_array(a), _hadamard_array(b)).astype(np.int8)
    hf = h.astype(np.float64)
    if not np.array_equal(hf @ hf.T, n * np.eye(n)):
        raise AssertionError(f"the {how} construction of order {n} is not a Hadamard matrix")  # a bug here
    h.setflags(write=False)
    return h


def _no_hadamard_message(n: int) -> str:
    if n < 1:
        return f"no Hadamard matrix of order {n}: the order must be >= 1"
    if n > 2 and n % 4:
        return f"no Hadamard matrix of order {n} exists: orders above 2 are multiples of 4"
    return (
        f"no construction here reaches a Hadamard matrix of order {n} (Sylvester, Paley I/II for "
        f"prime powers, and Kronecker products of these); rotation_plan({n}) gives a block-diagonal rotation"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """A Hadamard matrix of order n (entries +-1, ``H @ H.T == n * I``) as a new tensor.

    Raises ValueError when n has no construction here (see the module docstring), saying why.
    The matrix is the same on every call (Sylvester for powers of two; otherwise the first of
    Paley I, Paley II, Kronecker product in that order).
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"hadamard_matrix: n must be an int, got {type(n).__name__}")
    return torch.from_numpy(_hadamard_array(n).copy()).to(dtype)


# ---------------------------------------------------------------------------------------
# Rotation plans.


@dataclass(frozen=True)
class RotationPlan:
    """How to rotate a dimension ``n`` by a (block-diagonal) Hadamard matrix.

    ``n = num_blocks * block`` and ``block = small_order * power``, power a power of two:
    each of the ``num_blocks`` diagonal blocks is ``H_small (x) H_power`` (Sylvester for
    ``H_power``), normalized by ``1 / sqrt(block)``. ``full`` when ``block == n``.

    Attributes:
        n: the rotated dimension.
        block: the order b of each diagonal block.
        small_order: m, the order of the dense factor (1 when the block is a power of two).
        power: the power of two ``block // small_order``.
        small: the +-1 matrix ``H_m`` (int8 ``[m, m]``), or None when m == 1; treat as read-only.
        construction: how ``H_m`` is built (:func:`hadamard_construction`), "" when m == 1.
        reason: why the plan is block-diagonal ("" when full).
    """

    n: int
    block: int
    small_order: int
    power: int
    small: Optional[torch.Tensor] = field(compare=False, repr=False)
    construction: str
    reason: str = ""

    @property
    def full(self) -> bool:
        return self.block == self.n

    @property
    def num_blocks(self) -> int:
        return self.n // self.block

    @property
    def description(self) -> str:
        """One line for reports: the rotation, and for a block-diagonal one, why."""
        if self.small_order == 1:
            shape = f"Sylvester H_{self.power}"
        else:
            shape = f"H_{self.small_order} ({self.construction}) (x) Sylvester H_{self.power}"
        if self.full:
            return f"full Hadamard of order {self.n} = {shape}"
        return f"block-diagonal Hadamard of {self.num_blocks} blocks of {self.block} ({shape}): {self.reason}"


def _split_order(n: int, max_small_order: int) -> Optional[tuple[int, int]]:
    """(m, 2**j) with ``n = m * 2**j``, H_m constructible and m <= max_small_order, for the
    smallest such m; None if there is none."""
    power = n & -n  # largest power of two dividing n
    odd = n // power
    if odd == 1:
        return 1, n
    m = odd * 4 if power >= 4 else None
    while m is not None and m <= min(n, max_small_order):
        if hadamard_construction(m):
            return m, n // m
        m *= 2
    return None


@lru_cache(maxsize=256)
def rotation_plan(n: int, max_small_order: int = MAX_SMALL_ORDER) -> RotationPlan:
    """The rotation of a dimension n: full when some ``H_m (x) H_{2**k}`` of order n has
    ``m <= max_small_order`` (the smallest such m), otherwise block-diagonal with the largest
    block order b dividing n that is reachable (b = 1 for odd n: signs only, no mixing).

    Plans are cached (same object for the same arguments); treat ``small`` as read-only.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"rotation_plan: n must be a positive int, got {n!r}")
    if not isinstance(max_small_order, int) or max_small_order < 1:
        raise ValueError(f"rotation_plan: max_small_order must be a positive int, got {max_small_order!r}")
    split = _split_order(n, max_small_order)
    reason = ""
    block = n
    if split is None:
        divisors = sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)
        block = next(b for b in divisors[1:] if _split_order(b, max_small_order))
        split = _split_order(block, max_small_order)
        reason = _fallback_reason(n, max_small_order)
    m, power = split
    small = None if m == 1 else hadamard_matrix(m)
    return RotationPlan(
        n=n, block=block, small_order=m, power=power, small=small,
        construction="" if m == 1 else hadamard_construction(m), reason=reason,
    )


def _fallback_reason(n: int, max_small_order: int) -> str:
    if n == 1 or n % 2:
        return f"no Hadamard matrix of order {n} exists (odd order); only the signs apply"
    if n % 4:
        return f"no Hadamard matrix of order {n} exists (orders above 2 are multiples of 4)"
    power = n & -n
    odd = n // power
    tried = []
    m = odd * 4
    while m <= min(n, max_small_order):
        tried.append(m)
        m *= 2
    if not tried:
        return (
            f"no Hadamard matrix of order {n} = {odd} * 2^{power.bit_length() - 1} with a dense factor of "
            f"order <= {max_small_order} (the smallest would be {odd * 4})"
        )
    return (
        f"no Hadamard matrix of order {n} is built here: none of the orders "
        f"{', '.join(map(str, tried))} (= {odd} * 2^j) has a construction (Sylvester, Paley I/II, "
        f"Kronecker products) with a dense factor of order <= {max_small_order}"
    )


# ---------------------------------------------------------------------------------------
# Randomized rotations and their fast application.


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n random +-1 values, deterministic in ``seed`` (a CPU torch.Generator)."""
    gen = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


def random_hadamard(n: int, seed: int, plan: Optional[RotationPlan] = None) -> torch.Tensor:
    """The orthogonal float64 matrix ``Q = diag(s) H / sqrt(b)`` of order n.

    H is the (block-diagonal) Hadamard matrix of ``plan`` (default :func:`rotation_plan(n)
    <rotation_plan>`), b its block order, and ``s = random_signs(n, seed)``. ``x @ Q`` is
    :func:`apply_hadamard(x, plan, s) <apply_hadamard>` and the op
    ``qcompile::hadamard(x, plan.small, s, plan.block)``.
    """
    plan = rotation_plan(n) if plan is None else plan
    if plan.n != n:
        raise ValueError(f"random_hadamard: the plan is for n = {plan.n}, not {n}")
    signs = random_signs(n, seed)
    return apply_hadamard(torch.diag(signs), plan)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform along the last dimension (length a power of
    two): ``x @ H`` with the Sylvester H, by log2(length) butterfly stages in x's dtype.

    Constant-geometry form: every stage maps ``(x[j], x[j + P/2])`` to
    ``(x[j] + x[j + P/2], x[j] - x[j + P/2])`` at positions ``(2j, 2j + 1)``; after log2(P)
    stages the perfect shuffles compose to the identity. The Triton kernel does the same.
    """
    p = x.shape[-1]
    if not _is_power_of_two(p):
        raise ValueError(f"fwht: the last dimension must be a power of two, got {p}")
    lead = x.shape[:-1]
    for _ in range(p.bit_length() - 1):
        halves = x.reshape(*lead, 2, p // 2)
        a, b = halves[..., 0, :], halves[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-1).reshape(*lead, p)
    return x


def apply_block_hadamard(
    x: torch.Tensor, small: Optional[torch.Tensor], block: int, signs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(x * signs) @ blockdiag(H_small (x) H_{block/m}) / sqrt(block)`` along the last
    dimension, in x's dtype (small: the +-1 ``[m, m]`` matrix or None for m = 1).

    The arithmetic order: sign multiply, FWHT over each block's power-of-two factor, the
    small matmul ``H_small.T @ X`` on the ``[m, block/m]`` view of each block, then the
    scale ``1 / sqrt(block)`` (rounded once to x's dtype).
    """
    n = x.shape[-1]
    m = 1 if small is None else small.shape[0]
    if n % block or block % m or not _is_power_of_two(block // m):
        raise ValueError(
            f"apply_block_hadamard: need n = {n} a multiple of block = {block} and block / m "
            f"(m = {m}) a power of two"
        )
    if signs is not None:
        x = x * signs.to(x.dtype)
    y = fwht(x.reshape(*x.shape[:-1], n // block, m, block // m))
    if small is not None:
        # H_small.T @ Y on each block's [m, P] view, written as Y.T @ H_small: one batched
        # product over the P columns instead of one [m, m] @ [m, P] product per block.
        y = (y.transpose(-1, -2) @ small.to(x.dtype)).transpose(-1, -2)
    y = y * (1.0 / math.sqrt(block))
    return y.reshape(x.shape)


def apply_hadamard(x: torch.Tensor, plan: RotationPlan, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ Q`` along the last dimension without building Q: ``Q = diag(signs) H / sqrt(b)``
    with the plan's (block-diagonal) H (signs default to all ones). Computed in x's dtype;
    with float64 x it matches the explicit product to about 1e-15 relative."""
    if x.shape[-1] != plan.n:
        raise ValueError(f"apply_hadamard: x has {x.shape[-1]} channels, the plan rotates {plan.n}")
    if signs is not None and tuple(signs.shape) != (plan.n,):
        raise ValueError(f"apply_hadamard: signs must have shape [{plan.n}], got {tuple(signs.shape)}")
    return apply_block_hadamard(x, plan.small, plan.block, signs)
