"""Tests of qcompile::linear_w8a16 and qcompile::linear_w4a16 (reference, CPU fast path,
fake implementation, torch.export and torch.compile).

Numerics are compared with ``x @ W.T + b`` in float64, W being the exact (float64)
dequantization of the stored codes, with an error bound per output element built from
``|x| @ |W|.T`` (the sum of the magnitudes of the terms being added):

* float32 reference: a float32 dot product of K terms errs by at most K * 2**-24 of that
  sum (the worst-case bound of recursive summation), plus one rounding of each dequantized
  weight and of the bias (hence K + 2), plus the final rounding to x's dtype.
* CPU fast paths: x, the scales (w8a16) or the scales and zero offsets (w4a16) and the
  kernel's output are rounded to bfloat16 (unit roundoff 2**-8) by design ("a16"). Each
  product term is off by a few bfloat16 roundings of its magnitude, where for w4a16 the
  magnitude includes the separately rounded ``scale * |q - 8|`` and offset
  ``scale * |8 - zero|`` (see ``_fast_path_tolerance``).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qcompile.kernels  # noqa: F401  (registers the ops)
from qcompile.kernels import WEIGHT_ONLY_LINEAR_OPS, WEIGHT_ONLY_LINEAR_REFERENCES
from qcompile.kernels import linear_w4a16 as w4_module
from qcompile.kernels import linear_w8a16 as w8_module
from qcompile.quantizers import QuantizedWeight, dequantize_weight, quantize_weight_rtn, unpack_int4

FAST_PATH_APPLIES = {8: w8_module.cpu_fast_path_applies, 4: w4_module.cpu_fast_path_applies}
FP32_EPS = 2.0**-24
BF16_EPS = 2.0**-8
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# (bits, N, K, group_size or None for per-channel, symmetric, CPU fast path expected)
CASES = [
    (8, 32, 64, None, True, True),
    (8, 17, 48, None, True, True),  # odd N is fine for int8pack
    (8, 24, 40, None, True, False),  # K % 16 != 0
    (8, 32, 64, 16, True, False),  # grouped
    (8, 32, 64, None, False, False),  # asymmetric
    (8, 5, 7, None, False, False),
    (4, 32, 128, 32, True, True),
    (4, 32, 128, 64, False, True),
    (4, 16, 256, None, False, True),  # per-channel, group 256
    (4, 17, 64, 32, True, False),  # N % 16 != 0
    (4, 32, 48, 16, False, False),  # group 16 not supported by int4pack
    (4, 8, 9, None, False, False),  # odd K
    (4, 6, 15, 5, True, False),  # odd group size
]
# Leading shapes of x (M = 1, 3, 17, a [2, 3] batch, a 1-D x), each with or without a bias.
LEADING_AND_BIAS = [((1,), True), ((3,), False), ((17,), True), ((2, 3), False), ((), True)]


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()
    return g


def _case_id(case) -> str:
    bits, n, k, g, sym, fast = case
    return f"w{bits}-N{n}-K{k}-g{g or 'K'}-{'sym' if sym else 'asym'}-{'fast' if fast else 'ref'}"


def _make(case, gen, leading=(3,), x_dtype=torch.float32, with_bias=True):
    bits, n, k, group_size, symmetric, _ = case
    w = torch.randn(n, k, generator=gen)
    w[0] = 0.0  # an all-zero row
    qw = quantize_weight_rtn(w, bits, group_size, symmetric)
    x = torch.randn(*leading, k, generator=gen).to(x_dtype)
    bias = torch.randn(n, generator=gen) if with_bias else None
    return qw, x, bias


def _args(qw: QuantizedWeight, x, bias):
    return (x, qw.qweight, qw.scales, qw.zeros, bias, qw.group_size)


def _float64_linear(qw, x, bias):
    w = dequantize_weight(qw, torch.float64)
    y = x.to(torch.float64) @ w.T
    abs_sum = x.to(torch.float64).abs() @ w.abs().T
    if bias is not None:
        y = y + bias.to(torch.float64)
        abs_sum = abs_sum + bias.to(torch.float64).abs()
    return y, abs_sum


def _reference_tolerance(qw, x, y64, abs_sum):
    return (qw.in_features + 2) * FP32_EPS * abs_sum + UNIT_ROUNDOFF[x.dtype] * y64.abs()


def _offset_magnitudes(qw) -> torch.Tensor:
    """[N, K] float64: scale * (|q - 8| + |8 - zero|), what the int4 kernel rounds to bf16."""
    scales = qw.scales.to(torch.float64).repeat_interleave(qw.group_size, dim=1)
    zeros = qw.zeros.to(torch.float64).repeat_interleave(qw.group_size, dim=1)
    codes = unpack_int4(qw.qweight, qw.in_features).to(torch.float64)
    return scales * ((codes - 8).abs() + (8 - zeros).abs())


def _fast_path_tolerance(qw, x, y64, abs_sum):
    # Per term: x rounded (1), scale or offset rounded (1), dequantized weight possibly held in
    # bf16 (1): 3 bf16 roundings of the term's magnitude; then the bf16 output (1) and the
    # cast to x's dtype (1), and the float32 accumulation.
    terms = abs_sum
    if qw.bits == 4:
        terms = terms + x.to(torch.float64).abs() @ _offset_magnitudes(qw).T
    return (
        3 * BF16_EPS * terms
        + (BF16_EPS + UNIT_ROUNDOFF[x.dtype]) * y64.abs()
        + (qw.in_features + 2) * FP32_EPS * abs_sum
    )


def _assert_within(actual, expected, tolerance, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    excess = (actual.to(torch.float64) - expected).abs() - tolerance
    worst = excess.max().item() if excess.numel() else 0.0
    assert worst <= 0.0, f"{what}: error exceeds its bound by {worst:.3e}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize(
    "leading,with_bias",
    LEADING_AND_BIAS,
    ids=["x".join(map(str, s or ("1d",))) + ("-bias" if b else "") for s, b in LEADING_AND_BIAS],
)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_op_and_reference_match_float64(case, leading, with_bias, x_dtype, gen):
    bits, n, k, _, _, fast = case
    qw, x, bias = _make(case, gen, leading, x_dtype, with_bias)
    args = _args(qw, x, bias)
    assert FAST_PATH_APPLIES[bits](x, qw.qweight, qw.scales, qw.zeros, qw.group_size) is fast
    y64, abs_sum = _float64_linear(qw, x, bias)

    reference = WEIGHT_ONLY_LINEAR_REFERENCES[bits](*args)
    assert reference.dtype == x_dtype and tuple(reference.shape) == (*leading, n)
    _assert_within(reference, y64, _reference_tolerance(qw, x, y64, abs_sum), "reference")

    out = WEIGHT_ONLY_LINEAR_OPS[bits](*args)
    assert out.dtype == x_dtype and tuple(out.shape) == (*leading, n)
    if fast:
        _assert_within(out, y64, _fast_path_tolerance(qw, x, y64, abs_sum), "CPU fast path")
    else:
        assert torch.equal(out, reference), "the fallback must be the reference itself"


@pytest.mark.parametrize("bits,direct", [(8, w8_module.linear_w8a16_cpu), (4, w4_module.linear_w4a16_cpu)])
def test_fast_path_called_directly_refuses_what_it_cannot_compute(bits, direct, gen):
    case = (bits, 17, 64, 16, False, False)
    qw, x, bias = _make(case, gen)
    with pytest.raises(ValueError, match="CPU int"):
        direct(*_args(qw, x, bias))


def test_non_contiguous_activations(gen):
    for case in (CASES[0], CASES[6]):
        qw, x, bias = _make(case, gen, leading=(5,))
        x_t = x.T.contiguous().T  # same values, column-major strides
        assert not x_t.is_contiguous()
        out = WEIGHT_ONLY_LINEAR_OPS[case[0]](*_args(qw, x_t, bias))
        assert torch.equal(out, WEIGHT_ONLY_LINEAR_OPS[case[0]](*_args(qw, x, bias)))


def test_empty_batch(gen):
    for case in (CASES[0], CASES[6], CASES[4]):
        qw, x, bias = _make(case, gen, leading=(0,))
        assert tuple(WEIGHT_ONLY_LINEAR_OPS[case[0]](*_args(qw, x, bias)).shape) == (0, case[1])


def test_int4_zeros_none_means_zero_point_8(gen):
    qw, x, bias = _make((4, 32, 64, 32, True, True), gen)
    assert bool((qw.zeros == 8).all())
    for impl in (WEIGHT_ONLY_LINEAR_OPS[4], WEIGHT_ONLY_LINEAR_REFERENCES[4]):
        with_zeros = impl(x, qw.qweight, qw.scales, qw.zeros, bias, 32)
        assert torch.equal(impl(x, qw.qweight, qw.scales, None, bias, 32), with_zeros)


@pytest.mark.parametrize("bits,cache", [(8, w8_module._SCALES_CACHE), (4, w4_module._LAYOUT_CACHE)])
def test_cpu_layout_cache_is_reused_invalidated_and_released(bits, cache, gen):
    case = next(c for c in CASES if c[0] == bits and c[5])
    qw, x, bias = _make(case, gen)
    op = WEIGHT_ONLY_LINEAR_OPS[bits]
    # the cache is process-wide: weights of earlier tests that only a collection frees would
    # otherwise leave it during this test and move the count
    gc.collect()
    entries_before = len(cache)
    op(*_args(qw, x, bias))
    layout = cache.get(qw.qweight, qw.scales, qw.zeros, qw.group_size)
    op(*_args(qw, x, bias))
    assert cache.get(qw.qweight, qw.scales, qw.zeros, qw.group_size) is layout, "rebuilt on a plain call"
    assert len(cache) == entries_before + 1

    # An in-place change to the weight (or its scales) must be seen by the next call.
    other = quantize_weight_rtn(torch.randn(case[1], case[2], generator=gen), bits, case[3], case[4])
    qw.qweight.copy_(other.qweight)
    qw.scales.copy_(other.scales)
    if qw.zeros is not None:
        qw.zeros.copy_(other.zeros)
    y64, abs_sum = _float64_linear(other, x, bias)
    _assert_within(op(*_args(qw, x, bias)), y64, _fast_path_tolerance(other, x, y64, abs_sum), "after copy_")
    assert cache.get(qw.qweight, qw.scales, qw.zeros, qw.group_size) is not layout

    # The entry dies with its weight (the cached layout must not keep the weight alive).
    weight = weakref.ref(qw.qweight)
    del qw, other, layout
    gc.collect()
    assert weight() is None
    assert len(cache) == entries_before


@pytest.mark.parametrize("bits", [8, 4])
def test_invalid_inputs_raise_clear_errors(bits, gen):
    qw, x, bias = _make((bits, 32, 64, 32, False, True), gen)
    op = WEIGHT_ONLY_LINEAR_OPS[bits]
    with pytest.raises(TypeError, match="x must be one of"):
        op(x.to(torch.int32), qw.qweight, qw.scales, qw.zeros, bias, 32)
    with pytest.raises(ValueError, match=r"x of shape \(3, 63\)"):
        op(x[..., :63], qw.qweight, qw.scales, qw.zeros, bias, 32)
    with pytest.raises(ValueError, match=r"bias must have shape \[32\]"):
        op(x, qw.qweight, qw.scales, qw.zeros, bias[:5], 32)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        op(x, qw.qweight, qw.scales, qw.zeros, bias, 48)
    with pytest.raises(TypeError, match="qweight must be"):
        op(x, qw.qweight.to(torch.int16), qw.scales, qw.zeros, bias, 32)


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_implementation_gives_shape_and_dtype(bits):
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = quantize_weight_rtn(torch.randn(24, 64), bits, 32, False)
    with FakeTensorMode() as mode:
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        fake_args = [mode.from_tensor(t) for t in (qw.qweight, qw.scales, qw.zeros)]
        out = WEIGHT_ONLY_LINEAR_OPS[bits](x, *fake_args, torch.empty(24), 32)
        assert tuple(out.shape) == (2, 3, 24) and out.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="does not divide"):
            WEIGHT_ONLY_LINEAR_OPS[bits](x, *fake_args, None, 24)


class _QuantizedLinear(torch.nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor):
        super().__init__()
        self.op = WEIGHT_ONLY_LINEAR_OPS[qw.bits]
        self.group_size = qw.group_size
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return self.op(x, self.qweight, self.scales, self.zeros, self.bias, self.group_size)


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_export_keeps_the_op(bits, gen):
    qw, x, bias = _make((bits, 32, 64, None if bits == 8 else 32, True, True), gen, leading=(2, 3))
    module = _QuantizedLinear(qw, bias)
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(WEIGHT_ONLY_LINEAR_OPS[bits]) == 1, targets
    other = torch.randn(5, 3, 64, generator=gen)
    assert torch.equal(program.module()(other), module(other))


def test_torch_compile_inductor_matches_eager(gen):
    qw, x, bias = _make(CASES[7], gen, leading=(4,))

    def f(inp):
        return torch.ops.qcompile.linear_w4a16(inp, qw.qweight, qw.scales, qw.zeros, bias, qw.group_size)

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(x), f(x))
