"""Tests of qcompile.hadamard: Hadamard constructions, rotation plans, randomized rotations
and their fast application.

Bounds and their reasons:

* Constructions are checked exactly: ``H @ H.T == n * I`` in int64 (no rounding at all;
  above order 256 in float64, where integer sums below 2**53 are exact too), entries
  exactly +-1.
* ``random_hadamard`` is ``diag(s) H / sqrt(b)``: each entry is +-fl(1 / sqrt(b)) (the
  butterflies sum exact integers), so relative error <= 2**-53 per entry, and each entry of
  ``Q @ Q.T`` is a float64 sum of b products of magnitude ~1/b: within
  ``(b + 3) * 2**-53`` of the identity (recursive summation, the products, the entries).
* ``apply_hadamard`` against ``x @ Q`` (both float64): the butterflies (log2 P levels), the
  small matmul (m terms), the sign multiply and the scale each round relative to the sum of
  magnitudes ``sum|x| / sqrt(b)``, and so does the explicit product (n terms), so the
  difference is within ``(n + m + log2 P + 4) * 2**-53 * (|x| @ |Q|)``; about 1e-12 of the
  magnitude at the largest n here.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from qcompile.hadamard import (
    MAX_SMALL_ORDER,
    RotationPlan,
    apply_block_hadamard,
    apply_hadamard,
    fwht,
    hadamard_construction,
    hadamard_matrix,
    random_hadamard,
    random_signs,
    rotation_plan,
)

F64_EPS = 2.0**-53
# Dimensions of common models (hidden sizes, MLP widths, head dims) with the dense factor
# their plan uses: all rotate with one full Hadamard matrix.
MODEL_DIMS = {
    64: 1, 80: 20, 96: 12, 128: 1, 384: 12, 768: 12, 896: 28, 1024: 1, 1536: 12, 2048: 1,
    2560: 20, 2816: 44, 3072: 12, 3584: 28, 4096: 1, 4864: 76, 5120: 20, 5632: 44,
    8192: 1, 8960: 140, 11008: 344, 13824: 108, 14336: 28, 18944: 148, 28672: 28,
}


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _check_exact(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.dtype == torch.int8 and h.shape == (n, n)
    assert torch.all(h.abs() == 1), n
    if n <= 256:  # int64
        h64 = h.numpy().astype(np.int64)
        assert np.array_equal(h64 @ h64.T, n * np.eye(n, dtype=np.int64)), n
    else:  # float64 holding integers: exact, every partial sum is an integer of magnitude <= n < 2**53
        hf = h.double()
        assert torch.equal(hf @ hf.T, n * torch.eye(n, dtype=torch.float64)), n


def test_every_constructible_order_up_to_256_is_exactly_hadamard():
    orders = [n for n in [1, 2] + list(range(4, 257, 4)) if hadamard_construction(n)]
    # What the constructions reach among multiples of 4 up to 256: all but the orders that
    # need Williamson-type matrices or similar.
    missing = [n for n in range(4, 257, 4) if n not in orders]
    assert missing == [92, 116, 156, 172, 184, 188, 232, 236], missing
    for n in orders:
        _check_exact(n)
    kinds = {hadamard_construction(n).split("(")[0] for n in orders}
    assert kinds == {"sylvester", "paley1", "paley2", "kron"}


@pytest.mark.parametrize("n,how", [(28, "paley1(q=3^3)"), (52, "paley2(q=5^2)"), (100, "paley2(q=7^2)"),
                                   (344, "paley1(q=7^3)"), (164, "paley1(q=163)"), (1024, "sylvester")])
def test_prime_power_and_large_orders(n, how):
    assert hadamard_construction(n) == how
    _check_exact(n)


def test_hadamard_matrix_is_a_fresh_copy_and_deterministic():
    a = hadamard_matrix(12)
    a.fill_(0)
    b = hadamard_matrix(12, dtype=torch.float64)
    assert b.dtype == torch.float64 and torch.equal(b, hadamard_matrix(12).double())
    assert torch.all(b.abs() == 1)


@pytest.mark.parametrize("n,message", [(6, "multiples of 4"), (7, "multiples of 4"), (0, "must be >= 1"),
                                       (172, r"rotation_plan\(172\)"), (92, "Paley")])
def test_hadamard_matrix_raises_without_a_construction(n, message):
    with pytest.raises(ValueError, match=message):
        hadamard_matrix(n)
    with pytest.raises(TypeError, match="must be an int"):
        hadamard_matrix(12.0)


def test_model_dimensions_get_full_plans():
    for n, m in MODEL_DIMS.items():
        plan = rotation_plan(n)
        assert plan.full and plan.small_order == m and plan.block == n, (n, plan.description)
        assert plan.power == n // m and plan.power & (plan.power - 1) == 0
        assert (plan.small is None) == (m == 1)
        assert plan.description.startswith(f"full Hadamard of order {n}")


@pytest.mark.parametrize("n,blocks,block,says", [
    (172, 43, 4, "none of the orders 172 (= 43 * 2^j)"),  # needs a Williamson matrix
    (232, 29, 8, "none of the orders 116, 232"),
    (6, 3, 2, "orders above 2 are multiples of 4"),
    (7, 7, 1, "odd order"),
])
def test_fallback_plans_are_block_diagonal_and_say_why(n, blocks, block, says):
    plan = rotation_plan(n)
    assert not plan.full and plan.num_blocks == blocks and plan.block == block, plan
    assert plan.description.startswith(f"block-diagonal Hadamard of {blocks} blocks of {block}")
    assert says in plan.description, plan.description


def test_order_one_is_the_identity():
    plan = rotation_plan(1)
    assert plan.full and plan.small is None and plan.description == "full Hadamard of order 1 = Sylvester H_1"
    x = torch.randn(4, 1, dtype=torch.float64)
    assert torch.equal(apply_hadamard(x, plan), x)


def test_small_order_cap_forces_block_diagonal():
    # 11008 = 43 * 256 needs H_344; with dense factors of order <= 64 the largest reachable
    # divisor is 256 (Sylvester).
    plan = rotation_plan(11008, max_small_order=64)
    assert (plan.num_blocks, plan.block, plan.small_order) == (43, 256, 1)
    assert "dense factor of order <= 64 (the smallest would be 172)" in plan.description
    assert rotation_plan(11008).small_order == 344 and 344 <= MAX_SMALL_ORDER
    # 16 * 23 = 368 (Paley I, 367 prime) is reached, though 92 and 184 are not.
    assert rotation_plan(23 * 16).full and rotation_plan(23 * 16).small_order == 368


def test_rotation_plan_validates_and_caches():
    assert rotation_plan(768) is rotation_plan(768)
    assert isinstance(rotation_plan(768), RotationPlan)
    for bad in (0, -4, 3.0, True):
        with pytest.raises(ValueError, match="positive int"):
            rotation_plan(bad)
    with pytest.raises(ValueError, match="max_small_order"):
        rotation_plan(16, max_small_order=0)


def _explicit_q(plan: RotationPlan, signs: torch.Tensor, columns=None) -> torch.Tensor:
    """``diag(signs) blockdiag(H_m (x) H_P) / sqrt(b)`` built densely from hadamard_matrix
    (only the given columns, if any: the whole matrix at n = 11008 is 1 GB)."""
    h_power = hadamard_matrix(plan.power, torch.float64)
    small = torch.ones(1, 1, dtype=torch.float64) if plan.small is None else plan.small.double()
    columns = torch.arange(plan.n) if columns is None else columns
    q = torch.zeros(plan.n, len(columns), dtype=torch.float64)
    for j, c in enumerate(columns.tolist()):
        start, within = c // plan.block * plan.block, c % plan.block
        column = torch.kron(small[:, within // plan.power], h_power[:, within % plan.power])
        q[start:start + plan.block, j] = column
    return signs.double()[:, None] * q / math.sqrt(plan.block)


@pytest.mark.parametrize("n", [1, 6, 16, 96, 172, 232, 1000])
def test_random_hadamard_is_orthogonal_and_deterministic(n):
    plan = rotation_plan(n)
    q = random_hadamard(n, seed=3)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    error = (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert error <= (plan.block + 3) * F64_EPS, (n, error)
    assert torch.equal(q, random_hadamard(n, seed=3))
    if n > 1:
        assert not torch.equal(q, random_hadamard(n, seed=4))
    columns = torch.randperm(n, generator=_gen("columns", n))[:64]
    explicit = _explicit_q(plan, random_signs(n, 3), columns)
    assert (q[:, columns] - explicit).abs().max().item() <= 2 * F64_EPS / math.sqrt(plan.block)
    # Every entry inside a block is +-1/sqrt(b); outside, zero.
    assert torch.allclose(q.abs().sum(), torch.tensor(n * plan.block / math.sqrt(plan.block), dtype=torch.float64))


def test_random_hadamard_plan_mismatch():
    with pytest.raises(ValueError, match="the plan is for n = 12"):
        random_hadamard(24, 0, plan=rotation_plan(12))


@pytest.mark.parametrize("p", [1, 2, 8, 64])
def test_fwht_is_the_sylvester_product(p):
    x = torch.randn(3, 5, p, generator=_gen("fwht", p), dtype=torch.float64)
    want = x @ hadamard_matrix(p, torch.float64)
    assert (fwht(x) - want).abs().max().item() <= (p.bit_length() + 1) * F64_EPS * x.abs().sum(-1).max().item()
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(2, 12))


@pytest.mark.parametrize("n", [12, 64, 112, 160, 192, 172, 232, 6, 7, 344 * 4, 11008])
@pytest.mark.parametrize("leading", [(1,), (3,), (2, 3)], ids=str)
def test_apply_hadamard_matches_explicit_product(n, leading):
    plan = rotation_plan(n)
    gen = _gen("apply", n, leading)
    x = torch.randn(*leading, n, generator=gen, dtype=torch.float64)
    signs = random_signs(n, zlib.crc32(repr(leading).encode()))
    # All columns of Q, or (n = 11008) 64 random ones.
    columns = None if n <= 2048 else torch.randperm(n, generator=gen)[:64]
    q = _explicit_q(plan, signs, columns)
    got = apply_hadamard(x, plan, signs)
    got = got if columns is None else got[..., columns]
    want = x @ q
    bound = (n + plan.small_order + plan.power.bit_length() + 4) * F64_EPS * (x.abs() @ q.abs())
    assert got.dtype == torch.float64
    assert torch.all((got - want).abs() <= bound), (n, leading, ((got - want).abs() / bound).max().item())
    assert ((got - want).abs() / (x.abs() @ q.abs())).max().item() < 1e-12
    # Without signs: the plain (block-diagonal) Hadamard.
    plain = apply_hadamard(x, plan)
    assert torch.allclose(plain, apply_hadamard(x, plan, torch.ones(n, dtype=torch.float64)), rtol=0, atol=0)


def test_apply_block_hadamard_any_block_and_errors():
    # The op's arguments directly: 3 blocks of 12 * 16 over n = 576.
    x = torch.randn(5, 576, generator=_gen("blocks"), dtype=torch.float64)
    small = hadamard_matrix(12)
    h = torch.kron(small.double(), hadamard_matrix(16, torch.float64)) / math.sqrt(192)
    want = x @ torch.block_diag(h, h, h)
    assert torch.allclose(apply_block_hadamard(x, small, 192), want, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="power of two"):
        apply_block_hadamard(x, small, 36)
    with pytest.raises(ValueError, match="multiple of block"):
        apply_block_hadamard(x, None, 7)
    with pytest.raises(ValueError, match="the plan rotates 12"):
        apply_hadamard(torch.zeros(2, 13), rotation_plan(12))
    with pytest.raises(ValueError, match=r"signs must have shape \[12\]"):
        apply_hadamard(torch.zeros(2, 12), rotation_plan(12), torch.ones(13))


def test_rotation_spreads_an_outlier_channel():
    # What the rotation is for: one channel 100x the others is spread over all channels.
    n = 768
    x = torch.randn(64, n, generator=_gen("outlier"), dtype=torch.float64)
    x[:, 5] *= 100
    y = apply_hadamard(x, rotation_plan(n), random_signs(n, 0))
    ratio = lambda t: (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean().item()  # noqa: E731
    assert ratio(x) > 20 and ratio(y) < 6
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
