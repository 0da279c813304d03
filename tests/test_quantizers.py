"""Tests of qcompile.quantizers: RTN weight quantization, dequantization, int4 packing.

Every numeric check compares against a float64 decoding of the stored codes that this file
writes itself (``_decode_float64``), so the dequantizer is checked too, not trusted.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.quantizers import (
    QuantizedWeight,
    dequantize_weight,
    pack_int4,
    quantize_weight_rtn,
    unpack_int4,
)

# RTN is exact to half a grid step. The rest is float32 rounding, measured in grid steps
# (|w / scale| <= 256 steps): converting a float64 weight to float32 (relative 2**-24, so at
# most 2**-16 steps), the division w / scale (again at most 2**-16 steps), and the rounded
# scale at the clamped ends of the grid (same order). Hence the bound scale * (1/2 + 2**-14).
HALF_STEP_SLACK = 2.0**-14


def _random_weight(gen: torch.Generator, n: int, k: int, magnitude: float) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * magnitude
    # Include exact zeros and one large outlier per row, which set the scale.
    w[:, 0] = 0.0
    w[torch.arange(n), torch.randint(0, k, (n,), generator=gen)] *= 8.0
    return w


def _codes(qw: QuantizedWeight) -> torch.Tensor:
    """Stored codes [N, K] as int64, unpacked by bit arithmetic written here."""
    if qw.bits == 8:
        return qw.qweight.to(torch.int64)
    packed = qw.qweight.to(torch.int64)
    low, high = packed % 16, packed // 16
    return torch.stack((low, high), dim=-1).reshape(qw.out_features, -1)[:, : qw.in_features]


def _per_element(t: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return t.to(torch.float64).repeat_interleave(qw.group_size, dim=1)


def _decode_float64(qw: QuantizedWeight) -> torch.Tensor:
    zeros = qw.zeros if qw.zeros is not None else torch.zeros_like(qw.scales)
    return (_codes(qw).to(torch.float64) - _per_element(zeros, qw)) * _per_element(qw.scales, qw)


def _check_half_step_bound(w: torch.Tensor, qw: QuantizedWeight) -> None:
    err = (w.to(torch.float64) - _decode_float64(qw)).abs()
    bound = _per_element(qw.scales, qw) * (0.5 + HALF_STEP_SLACK)
    excess = (err - bound).max().item()
    assert excess <= 0.0, f"RTN error exceeds scale/2 by {excess:.3e}"


def _check_code_ranges(qw: QuantizedWeight) -> None:
    codes = _codes(qw)
    if qw.bits == 8 and qw.symmetric:
        assert qw.zeros is None
        assert codes.min() >= -127 and codes.max() <= 127
    elif qw.bits == 8:
        assert codes.min() >= -128 and codes.max() <= 127
        assert qw.zeros.min() >= -128 and qw.zeros.max() <= 127
    else:
        assert codes.min() >= 0 and codes.max() <= 15
        assert qw.zeros.min() >= 0 and qw.zeros.max() <= 15
        if qw.symmetric:
            assert bool((qw.zeros == 8).all())
    if qw.zeros is not None:
        assert torch.equal(qw.zeros, qw.zeros.round()), "zero points must be integers"
    assert bool((qw.scales > 0).all()) and bool(torch.isfinite(qw.scales).all())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**63 - 1),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    n=st.integers(1, 6),
    num_groups=st.integers(1, 4),
    group_size=st.sampled_from([1, 2, 3, 5, 8, 32]),
    per_channel=st.booleans(),
    log_magnitude=st.floats(-30.0, 30.0),
)
def test_rtn_error_is_at_most_half_a_step(seed, bits, symmetric, n, num_groups, group_size, per_channel, log_magnitude):
    gen = torch.Generator().manual_seed(seed)
    k = num_groups * group_size
    w = _random_weight(gen, n, k, 10.0**log_magnitude)
    qw = quantize_weight_rtn(w, bits, None if per_channel else group_size, symmetric)
    assert (qw.bits, qw.in_features, qw.out_features, qw.symmetric) == (bits, k, n, symmetric)
    assert qw.group_size == (k if per_channel else group_size)
    _check_code_ranges(qw)
    _check_half_step_bound(w, qw)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_dequantize_weight_is_the_float64_decoding_rounded(bits, symmetric):
    gen = torch.Generator()
    gen.seed()
    w = torch.randn(7, 24, generator=gen)
    qw = quantize_weight_rtn(w, bits, 8, symmetric)
    exact = _decode_float64(qw)
    assert torch.equal(dequantize_weight(qw, torch.float64), exact)
    # float32: (code - zero) is exact, the product with the scale is rounded once.
    torch.testing.assert_close(dequantize_weight(qw), exact.to(torch.float32), rtol=2.0**-24, atol=0.0)
    assert dequantize_weight(qw, torch.bfloat16).dtype == torch.bfloat16


def test_symmetric_grids_use_absmax():
    w = torch.tensor([[-2.54, 1.0, 0.5, 0.0], [0.7, 0.1, -0.2, 0.3]])
    q8 = quantize_weight_rtn(w, 8, None, True)
    torch.testing.assert_close(q8.scales[:, 0], torch.tensor([2.54 / 127, 0.7 / 127]))
    assert q8.qweight[0, 0].item() == -127 and q8.qweight[1, 0].item() == 127
    q4 = quantize_weight_rtn(w, 4, 2, True)
    torch.testing.assert_close(q4.scales, torch.tensor([[2.54 / 7, 0.5 / 7], [0.7 / 7, 0.3 / 7]]))
    assert _codes(q4)[0].tolist() == [1, 8 + round(7 / 2.54), 15, 8]


def test_asymmetric_grids_span_min_and_max_including_zero():
    # All-positive row: the range is widened to include 0, so the zero point is the lowest code.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-3.0, -1.0, 0.5, 1.0]])
    q8 = quantize_weight_rtn(w, 8, None, False)
    torch.testing.assert_close(q8.scales[:, 0], torch.tensor([4.0 / 255, 4.0 / 255]))
    assert q8.zeros[0, 0].item() == -128  # unsigned zero point 0, stored shifted by -128
    assert q8.zeros[1, 0].item() == round(3.0 / (4.0 / 255)) - 128
    assert q8.qweight.dtype == torch.int8 and q8.qweight[0, 3].item() == 127
    q4 = quantize_weight_rtn(w, 4, None, False)
    assert q4.zeros[0, 0].item() == 0 and _codes(q4)[0, 3].item() == 15
    _check_half_step_bound(w, q8)
    _check_half_step_bound(w, q4)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_all_zero_and_denormal_rows_dequantize_to_exact_zero(bits, symmetric):
    w = torch.randn(4, 64)
    w[1] = 0.0
    w[3] = 1e-42  # denormal: absmax / 127 would underflow
    qw = quantize_weight_rtn(w, bits, 32, symmetric)
    d = dequantize_weight(qw)
    assert bool(torch.isfinite(qw.scales).all()) and bool(torch.isfinite(d).all())
    assert bool((d[1] == 0).all()) and bool((d[3] == 0).all())
    _check_half_step_bound(w, qw)


def test_extreme_magnitudes_do_not_overflow():
    w = torch.tensor([[3.0e38, -3.0e38, 1.0, 0.0]], dtype=torch.float32)
    for bits in (4, 8):
        for symmetric in (True, False):
            qw = quantize_weight_rtn(w, bits, None, symmetric)
            assert bool(torch.isfinite(qw.scales).all())
            _check_half_step_bound(w, qw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_rejected(bad):
    w = torch.randn(3, 8)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight_rtn(w, 8)


def test_float64_beyond_float32_range_is_rejected():
    with pytest.raises(ValueError, match="float32 range"):
        quantize_weight_rtn(torch.tensor([[1e300, 1.0]], dtype=torch.float64), 4, None, False)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(w=torch.randn(4, 10), bits=4, group_size=4), ValueError, "does not divide in_features=10"),
        (dict(w=torch.randn(4, 10), bits=8, group_size=0), ValueError, "group_size"),
        (dict(w=torch.randn(4, 10), bits=3), ValueError, "bits"),
        (dict(w=torch.randn(10), bits=8), ValueError, "2-D"),
        (dict(w=torch.randn(0, 10), bits=8), ValueError, "non-empty"),
        (dict(w=torch.ones(4, 10, dtype=torch.int32), bits=8), TypeError, "floating point"),
        (dict(w=torch.randn(4, 10), bits=8, symmetric=1), TypeError, "symmetric"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_weight_rtn(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_floating_input_dtypes_are_accepted(dtype):
    w = torch.randn(5, 16).to(dtype)
    qw = quantize_weight_rtn(w, 4, 8, False)
    _check_half_step_bound(w, qw)


@pytest.mark.parametrize("k", [1, 2, 7, 8, 33])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(0, 16, (5, k), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, math.ceil(k / 2))
    assert torch.equal(unpack_int4(packed, k), codes)


def test_pack_layout_low_nibble_first_and_odd_k_padding():
    packed = pack_int4(torch.tensor([[1, 2, 3], [15, 0, 9]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x09]]


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[16]], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        pack_int4(torch.tensor([[1]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 4)


def test_nbytes_counts_codes_scales_and_zeros():
    w = torch.randn(16, 64)
    assert quantize_weight_rtn(w, 8, None, True).nbytes == 16 * 64 + 16 * 4
    assert quantize_weight_rtn(w, 8, None, False).nbytes == 16 * 64 + 2 * 16 * 4
    assert quantize_weight_rtn(w, 4, 32, True).nbytes == 16 * 32 + 2 * 16 * 2 * 4
    assert quantize_weight_rtn(torch.randn(3, 9), 4, None, False).nbytes == 3 * 5 + 2 * 3 * 4


def test_quantized_weight_validates_its_layout():
    qw = quantize_weight_rtn(torch.randn(8, 32), 4, 16, False)
    fields = dict(
        qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bits=4, group_size=16,
        in_features=32, out_features=8, symmetric=False,
    )
    QuantizedWeight(**fields)
    with pytest.raises(ValueError, match=r"scales must have shape \[N, K / group_size\] = \[8, 2\]"):
        QuantizedWeight(**{**fields, "scales": qw.scales[:, :1]})
    with pytest.raises(TypeError, match="zeros must be float32"):
        QuantizedWeight(**{**fields, "zeros": qw.zeros.double()})
    with pytest.raises(TypeError, match="4-bit qweight must be torch.uint8"):
        QuantizedWeight(**{**fields, "qweight": qw.qweight.to(torch.int8)})
    with pytest.raises(ValueError, match="out_features=9"):
        QuantizedWeight(**{**fields, "out_features": 9})
    q8 = quantize_weight_rtn(torch.randn(8, 32), 8, None, True)
    with pytest.raises(ValueError, match="symmetric exactly when zeros is None"):
        QuantizedWeight(q8.qweight, q8.scales, None, 8, 32, 32, 8, symmetric=False)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_range_search_in_row_blocks_is_bit_identical(monkeypatch, symmetric, weighted):
    """The range search runs a large weight in blocks of rows to bound its temporaries; rows
    are independent, so the codes, scales and zeros are exactly those of one whole search
    (odd sizes: blocks of 3 rows over 37, the last block short)."""
    import qcompile.quantizers as quantizers
    from qcompile.recipe import CLIP_SEARCH

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(37, 96, generator=gen) * torch.rand(37, 1, generator=gen)
    importance = torch.rand(96, generator=gen) + 0.1 if weighted else None
    whole = quantize_weight_rtn(w, 4, 32, symmetric, CLIP_SEARCH, importance)
    monkeypatch.setattr(quantizers, "RANGE_SEARCH_BLOCK", 3 * 96)
    blocked = quantize_weight_rtn(w, 4, 32, symmetric, CLIP_SEARCH, importance)
    assert torch.equal(whole.qweight, blocked.qweight) and torch.equal(whole.scales, blocked.scales)
    assert (whole.zeros is None and blocked.zeros is None) or torch.equal(whole.zeros, blocked.zeros)
