"""Tests of activation quantization: qcompile::quantize_per_token, qcompile::linear_w8a8 and
qcompile::linear_fp8 (references, CPU paths, fake implementations, torch.export,
torch.compile) and the weight quantizers of qcompile.act_quant.

Everything is compared with float64 computations, with bounds that state their reason:

* Integer codes: ``q = round(fl(x / s))`` where ``fl(x / s)`` is a float32 division
  (relative error <= 2**-24) of a value of magnitude <= qmax, so
  ``|x - q * s| <= s / 2 + qmax * 2**-24 * s``; the clamp only acts on the row maximum,
  off by the rounding of ``s = fl(absmax / qmax)``, inside the same bound.
* fp8 e4m3fn codes keep 3 mantissa bits: a normal value (|v| >= 2**-6) is off by at most
  2**-4 of itself after rounding to nearest; subnormals are spaced 2**-9, so off by at most
  2**-10 (in code units, i.e. 2**-10 * s). Plus the float32 division: 2**-24 of |x|.
* int8 x int8 accumulation is exact in int32 and in the float64 reference: compared with
  ``torch.equal``. The float32 epilogue ``acc * xs * ws + b`` rounds 4 times (acc to
  float32, two products, the sum), so it is within ``4 * 2**-24 * (|acc xs ws| + |b|)``
  of the float64 value, plus one rounding of the result to x's dtype.
* Whole linears against ``x @ W.T + b`` with the unquantized x and the exactly
  dequantized W: the activation's quantization error per element (bounds above, or
  ``act_scale / 2`` when static without saturation) times ``|W|``, summed over K, plus
  the epilogue (int8) or float32 dot product (fp8: (K + 4) * 2**-24 of ``|x̂| @ |Ŵ|.T``,
  recursive summation plus the rounding of each dequantized factor and of the bias).
"""
from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile.kernels  # noqa: F401  (registers the ops)
from qcompile.act_quant import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_activation,
    dequantize_weight_per_channel,
    quantize_activation_per_token,
    quantize_activation_static,
    quantize_weight_fp8,
    quantize_weight_per_channel_int8,
)
from qcompile.kernels import ACTIVATION_QUANT_LINEAR_OPS, ACTIVATION_QUANT_LINEAR_REFERENCES
from qcompile.kernels import linear_w8a8 as w8a8_module
from qcompile.kernels import quantize_per_token as qpt_module
from qcompile.quantizers import quantize_weight_rtn

QPT = torch.ops.qcompile.quantize_per_token
W8A8 = torch.ops.qcompile.linear_w8a8
FP8 = torch.ops.qcompile.linear_fp8
FP32_EPS = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [(8, "int"), (4, "int"), (8, "fp8")]
QMAX = {(8, "int"): 127, (4, "int"): 7, (8, "fp8"): 448}
# Leading shapes of x: M = 1, 3, 17, a [2, 3] batch, and a 1-D x.
LEADING = [(1,), (3,), (17,), (2, 3), ()]
# (N, K): multiples of 8 and not, K = 1.
NK = [(48, 64), (17, 40), (5, 7), (9, 1), (33, 130)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(leading, k, dtype, seed, zero_row=True) -> torch.Tensor:
    x = torch.randn(*leading, k, generator=_gen(seed)) * 3
    x[..., 0] *= 20  # an outlier channel
    if zero_row and x.dim() > 1 and x.shape[:-1].numel() > 1:
        x.reshape(-1, k)[0] = 0.0  # an all-zero token (never the only one)
    return x.to(dtype)


def _id(v) -> str:
    return "x".join(map(str, v)) or "1d"


def _per_element_error_bound(x64, scales64, bits, format):
    """float64 bound on |x - codes * scales| for each element (see the module docstring)."""
    if format == "int":
        return scales64 * (0.5 + QMAX[(bits, format)] * FP32_EPS)
    return 2.0**-4 * x64.abs() + 2.0**-10 * scales64 + FP32_EPS * x64.abs()


def _assert_within(actual, expected, tolerance, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    excess = (actual.to(torch.float64) - expected).abs() - tolerance
    worst = excess.max().item() if excess.numel() else 0.0
    assert worst <= 0.0, f"{what}: error exceeds its bound by {worst:.3e}"


# ---------------------------------------------------------------- quantize_per_token


@pytest.mark.parametrize("bits,format", FORMATS, ids=[f"{f}{b}" for b, f in FORMATS])
@pytest.mark.parametrize("leading", LEADING, ids=_id)
@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_quantize_per_token_error_bound_and_layout(bits, format, leading, k, x_dtype):
    x = _x(leading, k, x_dtype, seed=k)
    codes, scales = QPT(x, None, bits, format)
    assert codes.shape == x.shape and codes.dtype == (FP8_DTYPE if format == "fp8" else torch.int8)
    assert scales.shape == (*leading, 1) and scales.dtype == torch.float32

    x64 = x.to(torch.float64)
    q64 = codes.to(torch.float64)
    assert bool((q64.abs() <= QMAX[(bits, format)]).all())
    bound = _per_element_error_bound(x64, scales.to(torch.float64), bits, format)
    _assert_within(q64 * scales.to(torch.float64), x64, bound, f"{format}{bits} codes * scales")

    absmax = x.to(torch.float32).abs().amax(dim=-1, keepdim=True)
    nonzero = absmax > 0
    # The scale is absmax / qmax in float32, and the row maximum uses the full range.
    assert torch.equal(scales[nonzero], (absmax / QMAX[(bits, format)])[nonzero])
    assert bool((q64.abs().amax(dim=-1, keepdim=True)[nonzero] == QMAX[(bits, format)]).all())
    # The CPU fast path is bit-identical to the reference.
    ref_codes, ref_scales = qpt_module.quantize_per_token_reference(x, None, bits, format)
    assert torch.equal(codes.view(torch.int8), ref_codes.view(torch.int8))
    assert torch.equal(scales, ref_scales)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(0, 6),
    k=st.integers(1, 40),
    log10_magnitude=st.integers(-42, 37),
    fmt=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_per_token_bound_holds_at_any_magnitude(m, k, log10_magnitude, fmt, seed):
    """Magnitudes from float32 denormals (1e-42) to near its maximum (1e37)."""
    bits, format = fmt
    x = torch.randn(m, k, generator=_gen(seed), dtype=torch.float64) * 10.0**log10_magnitude
    x = x.to(torch.float32)
    codes, scales = QPT(x, None, bits, format)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    x64 = x.to(torch.float64)
    bound = _per_element_error_bound(x64, scales.to(torch.float64), bits, format)
    _assert_within(codes.to(torch.float64) * scales.to(torch.float64), x64, bound, "codes * scales")
    ref = quantize_activation_per_token(x, None, bits, format)
    assert torch.equal(codes.view(torch.int8), ref[0].view(torch.int8)) and torch.equal(scales, ref[1])


@pytest.mark.parametrize("bits,format", FORMATS, ids=[f"{f}{b}" for b, f in FORMATS])
def test_all_zero_rows_get_scale_one_and_zero_codes(bits, format):
    x = torch.zeros(4, 16)
    x[1, 3] = 2.5  # one non-zero row among zero rows
    x[2] = 1e-45  # denormal dust: scale would underflow, so it is guarded too
    codes, scales = QPT(x, None, bits, format)
    for row in (0, 2, 3):
        assert scales[row].item() == 1.0
        assert bool((codes[row].to(torch.float32) == 0).all())
    assert scales[1].item() == pytest.approx(2.5 / QMAX[(bits, format)])


@pytest.mark.parametrize("bits,format", FORMATS, ids=[f"{f}{b}" for b, f in FORMATS])
def test_round_trip_is_stable(bits, format):
    """Quantizing the dequantized values gives back the same codes (and scales up to a
    float32 rounding of qmax * scale / qmax)."""
    x = _x((5,), 33, torch.float32, seed=3)
    codes, scales = QPT(x, None, bits, format)
    again_codes, again_scales = QPT(dequantize_activation(codes, scales), None, bits, format)
    assert torch.equal(again_codes.view(torch.int8), codes.view(torch.int8))
    torch.testing.assert_close(again_scales, scales, rtol=4 * FP32_EPS, atol=0.0)


@pytest.mark.parametrize("bits,format", FORMATS, ids=[f"{f}{b}" for b, f in FORMATS])
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_smoothing_divides_x_by_the_vector(bits, format, x_dtype):
    x = _x((2, 3), 24, x_dtype, seed=5)
    smooth = torch.rand(24, generator=_gen(6)) * 4 + 0.25
    codes, scales = QPT(x, smooth, bits, format)
    divided = x.to(torch.float32) / smooth
    expected_codes, expected_scales = QPT(divided, None, bits, format)
    assert torch.equal(codes.view(torch.int8), expected_codes.view(torch.int8))
    assert torch.equal(scales, expected_scales)
    ref = qpt_module.quantize_per_token_reference(x, smooth, bits, format)
    assert torch.equal(codes.view(torch.int8), ref[0].view(torch.int8)) and torch.equal(scales, ref[1])
    # A bf16 smoothing vector means the same as its float32 value.
    if x_dtype == torch.float32:
        s16 = smooth.to(torch.bfloat16)
        assert torch.equal(QPT(x, s16, bits, format)[1], QPT(x, s16.to(torch.float32), bits, format)[1])


def test_non_contiguous_and_empty_inputs():
    x = _x((6,), 20, torch.float32, seed=8)
    x_t = x.T.contiguous().T
    assert not x_t.is_contiguous()
    for bits, format in FORMATS:
        a, b = QPT(x_t, None, bits, format), QPT(x, None, bits, format)
        assert torch.equal(a[0].view(torch.int8), b[0].view(torch.int8)) and torch.equal(a[1], b[1])
        codes, scales = QPT(torch.empty(0, 20), None, bits, format)
        assert codes.shape == (0, 20) and scales.shape == (0, 1)


# ---------------------------------------------------------------- linear_w8a8


def _w8a8_case(n, k, leading, x_dtype, with_bias, seed, with_smooth=False):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = 0.0  # an all-zero output channel
    smooth = torch.rand(k, generator=g) * 3 + 0.5 if with_smooth else None
    # SmoothQuant: the weight absorbs s (multiplied along K) where x is divided by it.
    qweight, wscales = quantize_weight_per_channel_int8(w if smooth is None else w * smooth)
    x = _x(leading, k, x_dtype, seed + 1)
    bias = torch.randn(n, generator=g) if with_bias else None
    return x, qweight, wscales, bias, smooth


def _epilogue_float64(acc, xscales, wscales, bias):
    y = acc.to(torch.float64) * xscales.to(torch.float64) * wscales.to(torch.float64)
    magnitude = y.abs()
    if bias is not None:
        y = y + bias.to(torch.float64)
        magnitude = magnitude + bias.to(torch.float64).abs()
    return y, magnitude


@pytest.mark.parametrize("n,k", NK, ids=lambda v: str(v))
@pytest.mark.parametrize("leading", LEADING, ids=_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_linear_w8a8_exact_accumulation_and_epilogue(n, k, leading, with_bias, static):
    x, qweight, wscales, bias, _ = _w8a8_case(n, k, leading, torch.float32, with_bias, seed=n * k)
    act_scale = (x.abs().amax() / 127).reshape(1) if static else None
    x2 = x.reshape(-1, k)
    if static:
        codes, xscales = quantize_activation_static(x2, act_scale)
    else:
        codes, xscales = quantize_activation_per_token(x2)

    # int8 x int8 accumulation: the CPU path (torch._int_mm or blocked float32 GEMMs, int32)
    # equals the exact one; with torch._int_mm K = 1 takes the exact accumulation itself
    # (torch._int_mm is wrong there on CPU).
    assert w8a8_module.int_mm_applies(codes, qweight) is (k >= 2)
    fast_acc = w8a8_module.int8_matmul(codes, qweight, wscales)
    float32_gemm = w8a8_module.cpu_int8_gemm() == "float32"
    assert fast_acc.dtype == (torch.int32 if k >= 2 or float32_gemm else torch.int64)
    exact = w8a8_module.int8_matmul_reference(codes, qweight)
    assert torch.equal(fast_acc.to(torch.int64), exact)

    out = W8A8(x, qweight, wscales, bias, None, act_scale)
    assert out.shape == (*leading, n) and out.dtype == x.dtype
    reference = w8a8_module.linear_w8a8_reference(x, qweight, wscales, bias, None, act_scale)
    assert torch.equal(out, reference), "the CPU path must be bit-identical to the reference"

    y64, magnitude = _epilogue_float64(exact, xscales, wscales, bias)
    tol = 4 * FP32_EPS * magnitude
    _assert_within(out.reshape(-1, n), y64, tol, "epilogue")


@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_smooth", [False, True], ids=["plain", "smooth"])
def test_linear_w8a8_approximates_the_float_linear(x_dtype, static, with_smooth):
    """Against ``x @ W.T + b`` with the unquantized x: the activation quantization error,
    propagated through |W|, plus the epilogue and the final rounding to x's dtype."""
    n, k = 24, 40
    x, qweight, wscales, bias, smooth = _w8a8_case(n, k, (2, 3), x_dtype, True, 11, with_smooth)
    x2 = x.reshape(-1, k)
    xs64 = x2.to(torch.float64) / (1.0 if smooth is None else smooth.to(torch.float64))  # what gets quantized
    if static:
        act_scale = (x2.to(torch.float32) / (1.0 if smooth is None else smooth)).abs().amax().reshape(1) / 127
        _, xscales = quantize_activation_static(x2, act_scale, smooth)
    else:
        act_scale = None
        _, xscales = quantize_activation_per_token(x2, smooth)
    out = W8A8(x, qweight, wscales, bias, smooth, act_scale)
    assert out.dtype == x_dtype
    assert torch.equal(out, ACTIVATION_QUANT_LINEAR_REFERENCES["int8"](x, qweight, wscales, bias, smooth, act_scale))

    w64 = dequantize_weight_per_channel(qweight, wscales, torch.float64)  # = W * s, quantized
    y64 = xs64 @ w64.T + bias.to(torch.float64)
    # Per element: the float32 division x / s (2**-24 of |x / s|), then the integer rounding
    # (the scale is large enough that nothing saturates beyond the row or tensor maximum).
    per_element = xscales.to(torch.float64) * (0.5 + 127 * FP32_EPS) + FP32_EPS * xs64.abs()
    quantization = per_element @ w64.abs().T
    magnitude = (xs64.abs() + per_element) @ w64.abs().T + bias.abs().to(torch.float64)
    tol = quantization + 4 * FP32_EPS * magnitude + UNIT_ROUNDOFF[x_dtype] * (y64.abs() + quantization)
    _assert_within(out.reshape(-1, n), y64, tol, "w8a8 vs float linear")
    if smooth is not None:
        # Online smoothing: passing s equals dividing x by s beforehand (the same float32
        # division), up to the final cast to x's dtype.
        divided = x.to(torch.float32) / smooth
        assert torch.equal(out, W8A8(divided, qweight, wscales, bias, None, act_scale).to(x_dtype))


def test_linear_w8a8_smoothing_equals_pre_divided_input():
    x, qweight, wscales, bias, smooth = _w8a8_case(32, 48, (7,), torch.float32, True, 12, True)
    for act_scale in (None, torch.tensor(0.05)):
        a = W8A8(x, qweight, wscales, bias, smooth, act_scale)
        b = W8A8(x / smooth, qweight, wscales, bias, None, act_scale)
        assert torch.equal(a, b)


def test_static_scale_saturates_and_single_token_static_equals_dynamic():
    x, qweight, wscales, bias, _ = _w8a8_case(16, 32, (1,), torch.float32, True, 13)
    # One token: the per-tensor absmax is the token's absmax, so static == dynamic.
    act_scale = (x.abs().amax() / 127).reshape(())
    assert torch.equal(W8A8(x, qweight, wscales, bias, None, act_scale), W8A8(x, qweight, wscales, bias, None, None))
    # A calibrated scale too small for this input: codes saturate at +-127, not wrap.
    small = act_scale / 4
    codes, _ = quantize_activation_static(x, small)
    assert int(codes.max()) == 127 and int(codes.min()) == -127
    assert torch.equal(
        W8A8(x, qweight, wscales, bias, None, small),
        w8a8_module.linear_w8a8_reference(x, qweight, wscales, bias, None, small),
    )
    # A zero static scale (calibrated on all-zero activations) is guarded like a zero row.
    zero = W8A8(x, qweight, wscales, bias, None, torch.zeros(1))
    assert bool(torch.isfinite(zero).all())


@pytest.fixture
def cpu_int8_gemm(request, monkeypatch):
    """Fix the CPU int8 GEMM (``QCOMPILE_CPU_INT8_GEMM``) to ``request.param`` for one test."""
    monkeypatch.setenv("QCOMPILE_CPU_INT8_GEMM", request.param)
    w8a8_module.cpu_int8_gemm.cache_clear()
    yield request.param
    w8a8_module.cpu_int8_gemm.cache_clear()


@pytest.mark.parametrize("cpu_int8_gemm", ["int_mm", "float32"], indirect=True)
def test_int32_accumulation_exact_beyond_float32_integers(cpu_int8_gemm):
    """|acc| up to 127 * 127 * 4100 > 2**24: the int32 (either CPU GEMM) and the exact float64
    accumulations agree, and so do their conversions to float32 in the epilogue."""
    k = 4100
    a = torch.full((3, k), 127, dtype=torch.int8)
    a[1] = -127
    a[2, ::3] = -5
    b = torch.full((5, k), 127, dtype=torch.int8)
    b[1, ::2] = -127
    b[2] = torch.randint(-127, 128, (k,), generator=_gen(0), dtype=torch.int8)
    fast = w8a8_module.int8_matmul(a, b, torch.ones(5))
    exact = w8a8_module.int8_matmul_reference(a, b)
    assert torch.equal(fast.to(torch.int64), exact) and int(exact.abs().max()) > 2**24
    ones = torch.ones(3, 1), torch.ones(5)
    assert torch.equal(
        w8a8_module.w8a8_epilogue(fast, *ones, None, torch.float32),
        w8a8_module.w8a8_epilogue(exact, *ones, None, torch.float32),
    )


def test_int_mm_dispatch_rule():
    # CPU: every shape; CUDA: M > 16 and K, N multiples of 8; K bounded for int32.
    supported = w8a8_module.int_mm_supported
    assert supported("cpu", 1, 7, 5) and supported("cpu", 0, 2, 1)
    assert not supported("cpu", 3, 1, 9)  # K = 1: torch._int_mm returns garbage on CPU
    assert not supported("cpu", 4, w8a8_module.INT_MM_MAX_K + 1, 4)
    assert supported("cuda", 17, 64, 48)
    assert not supported("cuda", 16, 64, 48)
    assert not supported("cuda", 32, 60, 48) and not supported("cuda", 32, 64, 44)
    assert not supported("meta", 32, 64, 64)
    assert (2**14) * w8a8_module.INT_MM_MAX_K <= 2**31 - 1


def test_fallback_accumulation_beyond_the_int32_limit():
    """K > INT_MM_MAX_K: the op takes the exact (float64) accumulation and still equals the reference."""
    k = w8a8_module.INT_MM_MAX_K + 1
    x, qweight, wscales, bias, _ = _w8a8_case(3, k, (2,), torch.float32, True, 14)
    codes, _ = quantize_activation_per_token(x)
    assert not w8a8_module.int_mm_applies(codes, qweight)
    assert w8a8_module.int8_matmul(codes, qweight, wscales).dtype == torch.int64
    assert torch.equal(W8A8(x, qweight, wscales, bias, None, None), w8a8_module.linear_w8a8_reference(x, qweight, wscales, bias, None, None))
    with pytest.raises(ValueError, match="CPU int_mm path needs"):
        w8a8_module.linear_w8a8_cpu(x, qweight, wscales, bias, None, None)


def test_torch_int_mm_k1_is_still_broken_on_cpu_or_the_rule_can_go():
    """Documents why K = 1 is excluded: if this starts failing, torch fixed it."""
    a = torch.randint(-127, 128, (3, 1), dtype=torch.int8, generator=_gen(0))
    b = torch.randint(-127, 128, (9, 1), dtype=torch.int8, generator=_gen(1))
    exact = w8a8_module.int8_matmul_reference(a, b)
    wrong = [not torch.equal(torch._int_mm(a, b.t().contiguous()).to(torch.int64), exact) for _ in range(5)]
    if not any(wrong):
        pytest.xfail("torch._int_mm gave the right answer for K = 1 here; INT_MM_CPU_MIN_K may be dropped")


def test_empty_batch_and_non_contiguous_x():
    x, qweight, wscales, bias, _ = _w8a8_case(16, 24, (5,), torch.float32, True, 15)
    assert W8A8(x[:0], qweight, wscales, bias, None, None).shape == (0, 16)
    assert FP8(x[:0], *quantize_weight_fp8(torch.randn(16, 24)), bias, None).shape == (0, 16)
    x_t = x.T.contiguous().T
    assert torch.equal(W8A8(x_t, qweight, wscales, bias, None, None), W8A8(x, qweight, wscales, bias, None, None))


def test_float32_int8_gemm_is_exact_at_the_extremes():
    """Blocks of FLOAT32_EXACT_K keep every float32 partial sum an integer below 2**24, also
    for the largest products (-128 * -128 = 2**14, K a multiple of the block and one over),
    K = 1 (where torch._int_mm fails), M = 0 and odd sizes with fresh random codes."""
    block = w8a8_module.FLOAT32_EXACT_K
    assert 2**14 * block <= 2**24
    for k in (block, block + 1, 3 * block):
        a = torch.full((2, k), -128, dtype=torch.int8)
        got = w8a8_module.int8_matmul_float32(a, a)
        assert got.dtype == torch.int32 and int(got[0, 0]) == 2**14 * k
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for m, k, n in ((0, 5, 3), (7, 1, 9), (33, block + 3, 17), (5, 2 * block + 1, 1)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        assert torch.equal(w8a8_module.int8_matmul_float32(a, b).to(torch.int64),
                           w8a8_module.int8_matmul_reference(a, b)), (m, k, n)


@pytest.mark.parametrize("cpu_int8_gemm", ["int_mm", "float32"], indirect=True)
def test_both_cpu_int8_gemms_give_the_reference_bits(cpu_int8_gemm):
    x, qweight, wscales, bias, _ = _w8a8_case(40, 1100, (3, 5), torch.float32, True, 21)
    assert w8a8_module.cpu_int8_gemm() == cpu_int8_gemm
    assert torch.equal(W8A8(x, qweight, wscales, bias, None, None),
                       w8a8_module.linear_w8a8_reference(x, qweight, wscales, bias, None, None))


def test_cpu_int8_gemm_is_chosen_once_and_can_be_fixed(monkeypatch):
    w8a8_module.cpu_int8_gemm.cache_clear()
    monkeypatch.delenv("QCOMPILE_CPU_INT8_GEMM", raising=False)
    try:
        chosen = w8a8_module.cpu_int8_gemm()
        assert chosen in ("int_mm", "float32") and w8a8_module.cpu_int8_gemm() is chosen
        w8a8_module.cpu_int8_gemm.cache_clear()
        monkeypatch.setenv("QCOMPILE_CPU_INT8_GEMM", "vnni")
        with pytest.raises(ValueError, match="QCOMPILE_CPU_INT8_GEMM must be one of"):
            w8a8_module.cpu_int8_gemm()
    finally:
        w8a8_module.cpu_int8_gemm.cache_clear()


@pytest.mark.parametrize("cpu_int8_gemm", ["int_mm"], indirect=True)
def test_transposed_weight_cache_is_reused_invalidated_and_released(cpu_int8_gemm):
    cache = w8a8_module._WEIGHT_T_CACHE
    x, qweight, wscales, bias, _ = _w8a8_case(16, 32, (4,), torch.float32, True, 16)
    before = len(cache)
    W8A8(x, qweight, wscales, bias, None, None)
    layout = cache.get(qweight, wscales, None, 32)
    W8A8(x, qweight, wscales, bias, None, None)
    assert cache.get(qweight, wscales, None, 32) is layout and len(cache) == before + 1
    other, other_scales = quantize_weight_per_channel_int8(torch.randn(16, 32, generator=_gen(17)))
    qweight.copy_(other)
    wscales.copy_(other_scales)
    assert torch.equal(
        W8A8(x, qweight, wscales, bias, None, None),
        w8a8_module.linear_w8a8_reference(x, other, other_scales, bias, None, None),
    )
    del qweight, wscales, other, layout
    gc.collect()
    assert len(cache) == before


# ---------------------------------------------------------------- linear_fp8 and weights


def _fp8_float64(x, smooth, qweight, wscales, bias):
    """(y64 with the unquantized x, quantization bound, dot-product magnitude, y64 of the dequantized x)."""
    k = x.shape[-1]
    xs64 = x.to(torch.float64).reshape(-1, k)
    if smooth is not None:
        xs64 = xs64 / smooth.to(torch.float64)
    codes, xscales = quantize_activation_per_token(x.reshape(-1, k), smooth, 8, "fp8")
    xq64 = dequantize_activation(codes, xscales, torch.float64)
    w64 = dequantize_weight_per_channel(qweight, wscales, torch.float64)
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    per_element = _per_element_error_bound(xs64, xscales.to(torch.float64), 8, "fp8")
    y_exact = xs64 @ w64.T + b64
    y_quant = xq64 @ w64.T + b64
    return y_exact, per_element @ w64.abs().T, xq64.abs() @ w64.abs().T + b64.abs(), y_quant


@pytest.mark.parametrize("n,k", NK, ids=lambda v: str(v))
@pytest.mark.parametrize("leading", [(1,), (3,), (17,), (2, 3)], ids=_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_smooth", [False, True], ids=["plain", "smooth"])
def test_linear_fp8_against_float64(n, k, leading, with_bias, with_smooth):
    g = _gen(n + k)
    w = torch.randn(n, k, generator=g)
    smooth = torch.rand(k, generator=g) + 0.5 if with_smooth else None
    qweight, wscales = quantize_weight_fp8(w if smooth is None else w * smooth)
    x = _x(leading, k, torch.float32, seed=k)
    bias = torch.randn(n, generator=g) if with_bias else None

    out = FP8(x, qweight, wscales, bias, smooth)
    assert out.shape == (*leading, n) and out.dtype == torch.float32
    assert torch.equal(out, ACTIVATION_QUANT_LINEAR_REFERENCES["fp8"](x, qweight, wscales, bias, smooth))
    y_exact, quantization, magnitude, y_quant = _fp8_float64(x, smooth, qweight, wscales, bias)
    dot = (k + 4) * FP32_EPS * magnitude
    _assert_within(out.reshape(-1, n), y_quant, dot, "fp8 reference vs its float64 value")
    _assert_within(out.reshape(-1, n), y_exact, quantization + dot, "fp8 vs the float linear")

    # torch._scaled_mm on CPU scales the accumulated sum instead: the same bound holds.
    scaled = w8a8_module.linear_fp8_cpu(x, qweight, wscales, bias, smooth)
    _assert_within(scaled.reshape(-1, n), y_quant, dot, "_scaled_mm path vs float64")


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_fp8_half_precision_activations(x_dtype):
    w = torch.randn(24, 40, generator=_gen(21))
    qweight, wscales = quantize_weight_fp8(w)
    x = _x((2, 3), 40, x_dtype, seed=22)
    bias = torch.randn(24, generator=_gen(23))
    out = FP8(x, qweight, wscales, bias, None)
    assert out.dtype == x_dtype
    _, _, magnitude, y_quant = _fp8_float64(x, None, qweight, wscales, bias)
    tol = (40 + 4) * FP32_EPS * magnitude + UNIT_ROUNDOFF[x_dtype] * y_quant.abs()
    _assert_within(out.reshape(-1, 24), y_quant, tol, "fp8 with half activations")


def test_weight_quantizers():
    w = torch.randn(12, 50, generator=_gen(31)) * 0.2
    w[3] = 0.0
    w[4, 7] = 40.0  # an outlier sets its row's scale
    codes, scales = quantize_weight_per_channel_int8(w)
    qw = quantize_weight_rtn(w, 8, None, True)
    assert torch.equal(codes, qw.qweight) and torch.equal(scales, qw.scales.reshape(-1))
    assert scales.shape == (12,) and codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    w64 = w.to(torch.float64)
    _assert_within(dequantize_weight_per_channel(codes, scales, torch.float64), w64,
                   scales.to(torch.float64)[:, None] * (0.5 + 127 * FP32_EPS), "int8 weights")

    f8, f8_scales = quantize_weight_fp8(w)
    assert f8.dtype == FP8_DTYPE and f8.shape == (12, 50) and f8_scales.shape == (12,)
    assert f8_scales[3].item() == 1.0 and bool((f8[3].to(torch.float32) == 0).all())
    assert f8_scales[4].item() == pytest.approx(40.0 / FP8_MAX)
    bound = _per_element_error_bound(w64, f8_scales.to(torch.float64)[:, None], 8, "fp8")
    _assert_within(dequantize_weight_per_channel(f8, f8_scales, torch.float64), w64, bound, "fp8 weights")

    with pytest.raises(TypeError, match="floating point"):
        quantize_weight_fp8(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight_fp8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_fp8(torch.ones(4))


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_naming_the_op():
    x, qweight, wscales, bias, _ = _w8a8_case(16, 32, (3,), torch.float32, True, 41)
    fq, fs = quantize_weight_fp8(torch.randn(16, 32))
    qpt = "qcompile::quantize_per_token"
    with pytest.raises(ValueError, match=f"{qpt}.*bits in \\(8, 4\\), got bits=5"):
        QPT(x, None, 5, "int")
    with pytest.raises(ValueError, match=f"{qpt}: format must be one of \\('int', 'fp8'\\), got 'int2'"):
        QPT(x, None, 8, "int2")
    with pytest.raises(ValueError, match=f'{qpt}: format="fp8" .*needs bits=8'):
        QPT(x, None, 4, "fp8")
    with pytest.raises(TypeError, match=f"{qpt}: x must be one of"):
        QPT(x.to(torch.int32), None, 8, "int")
    with pytest.raises(ValueError, match=rf"{qpt}: smooth must have shape \[K\] = \[32\] for x of shape \(3, 32\), got \(31,\)"):
        QPT(x, torch.ones(31), 8, "int")
    with pytest.raises(TypeError, match=f"{qpt}: smooth must be"):
        QPT(x, torch.ones(32, dtype=torch.int64), 8, "int")

    op = "qcompile::linear_w8a8"
    with pytest.raises(TypeError, match=f"{op}: qweight must be torch.int8, got torch.float8_e4m3fn"):
        W8A8(x, fq, wscales, bias, None, None)
    with pytest.raises(TypeError, match=f"{op}: qweight must be torch.int8, got torch.uint8"):
        W8A8(x, qweight.view(torch.uint8), wscales, bias, None, None)
    with pytest.raises(ValueError, match=rf"{op}: qweight must have shape \[N, K\] = \[N, 31\] for x of shape \(3, 31\), got \(16, 32\)"):
        W8A8(x[:, :31], qweight, wscales, bias, None, None)
    with pytest.raises(ValueError, match=rf"{op}: wscales must have shape \[N\] = \[16\] .*got \(16, 1\)"):
        W8A8(x, qweight, wscales[:, None], bias, None, None)
    with pytest.raises(TypeError, match=f"{op}: wscales must be float32"):
        W8A8(x, qweight, wscales.double(), bias, None, None)
    with pytest.raises(ValueError, match=rf"{op}: bias must have shape \[N\] = \[16\]"):
        W8A8(x, qweight, wscales, bias[:3], None, None)
    with pytest.raises(ValueError, match=rf"{op}: act_scale must be a per-tensor scale of shape \[\] or \[1\], got \(2,\)"):
        W8A8(x, qweight, wscales, bias, None, torch.ones(2))
    with pytest.raises(TypeError, match=f"{op}: act_scale must be float32"):
        W8A8(x, qweight, wscales, bias, None, torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"{op}: smooth must have shape"):
        W8A8(x, qweight, wscales, bias, torch.ones(8), None)
    with pytest.raises(ValueError, match=f"{op}: qweight is on meta but x is on cpu"):
        W8A8(x, qweight.to("meta"), wscales, bias, None, None)

    fop = "qcompile::linear_fp8"
    with pytest.raises(TypeError, match=f"{fop}: qweight must be torch.float8_e4m3fn, got torch.int8"):
        FP8(x, qweight, wscales, bias, None)
    with pytest.raises(ValueError, match=f"{fop}: qweight must have shape"):
        FP8(x, fq[:, :16], fs, bias, None)


# ---------------------------------------------------------------- tracing


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qweight, wscales = quantize_weight_per_channel_int8(torch.randn(24, 40))
    fq, fs = quantize_weight_fp8(torch.randn(24, 40))
    with FakeTensorMode() as mode:
        x = torch.empty(2, 3, 40, dtype=torch.bfloat16)
        qw, ws, f8, f8s = (mode.from_tensor(t) for t in (qweight, wscales, fq, fs))
        for bits, format in FORMATS:
            codes, scales = QPT(x, torch.empty(40), bits, format)
            assert codes.shape == (2, 3, 40) and scales.shape == (2, 3, 1) and scales.dtype == torch.float32
            assert codes.dtype == (FP8_DTYPE if format == "fp8" else torch.int8)
        for act_scale in (None, torch.empty(()), torch.empty(1)):
            out = W8A8(x, qw, ws, torch.empty(24), None, act_scale)
            assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
        out = FP8(x, f8, f8s, None, torch.empty(40))
        assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="qcompile::linear_w8a8: qweight must have shape"):
            W8A8(torch.empty(2, 41), qw, ws, None, None, None)
        with pytest.raises(ValueError, match="bits=5"):
            QPT(x, None, 5, "int")


class _QuantizedBlock(torch.nn.Module):
    """Two quantized linears and an explicit per-token quantization, as a lowered graph holds them."""

    def __init__(self, gen):
        super().__init__()
        w1 = torch.randn(32, 48, generator=gen)
        w2 = torch.randn(16, 32, generator=gen)
        smooth = torch.rand(48, generator=gen) + 0.5
        q1, s1 = quantize_weight_per_channel_int8(w1 * smooth)
        q2, s2 = quantize_weight_fp8(w2)
        for name, t in dict(q1=q1, s1=s1, q2=q2, s2=s2, smooth=smooth, b1=torch.randn(32, generator=gen),
                            act=torch.tensor(0.04)).items():
            self.register_buffer(name, t)

    def forward(self, x):
        h = W8A8(x, self.q1, self.s1, self.b1, self.smooth, None)
        h_static = W8A8(x, self.q1, self.s1, None, self.smooth, self.act)
        y = FP8(torch.relu(h + h_static), self.q2, self.s2, None, None)
        codes, scales = QPT(y, None, 8, "int")
        return codes.to(torch.float32) * scales


def test_torch_export_keeps_the_ops():
    module = _QuantizedBlock(_gen(51))
    x = _x((2, 3), 48, torch.float32, seed=52)
    program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.qcompile.linear_w8a8.default) == 2, targets
    assert targets.count(torch.ops.qcompile.linear_fp8.default) == 1, targets
    assert targets.count(torch.ops.qcompile.quantize_per_token.default) == 1, targets
    other = _x((5, 3), 48, torch.float32, seed=53)
    assert torch.equal(program.module()(other), module(other))


def test_torch_compile_inductor_matches_eager():
    module = _QuantizedBlock(_gen(61))
    x = _x((4,), 48, torch.float32, seed=62)
    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(x), module(x))


def test_registries():
    assert ACTIVATION_QUANT_LINEAR_OPS["int8"] is torch.ops.qcompile.linear_w8a8.default
    assert ACTIVATION_QUANT_LINEAR_OPS["fp8"] is torch.ops.qcompile.linear_fp8.default
    assert set(ACTIVATION_QUANT_LINEAR_REFERENCES) == set(ACTIVATION_QUANT_LINEAR_OPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reference_paths_match_cpu():
    """On CUDA the ops run their references (torch._int_mm where M > 16 and K, N are
    multiples of 8): the codes, scales and int8 linears are bit-identical to the CPU
    ones; fp8 linears differ only by float32 summation order."""
    for m, k, n in ((32, 64, 48), (3, 40, 17)):
        x, qweight, wscales, bias, smooth = _w8a8_case(n, k, (m,), torch.float32, True, m + k, True)
        cuda = [None if t is None else t.cuda() for t in (x, qweight, wscales, bias, smooth)]
        for bits, format in FORMATS:
            c_cpu, s_cpu = QPT(x, smooth, bits, format)
            c_gpu, s_gpu = QPT(cuda[0], cuda[4], bits, format)
            assert torch.equal(c_gpu.cpu().view(torch.int8), c_cpu.view(torch.int8)) and torch.equal(s_gpu.cpu(), s_cpu)
        for act_scale in (None, torch.tensor([0.05])):
            gpu_scale = None if act_scale is None else act_scale.cuda()
            assert torch.equal(W8A8(*cuda, gpu_scale).cpu(), W8A8(x, qweight, wscales, bias, smooth, act_scale))
        fq, fs = quantize_weight_fp8(torch.randn(n, k, generator=_gen(k)))
        y_cpu = FP8(x, fq, fs, bias, smooth)
        y_gpu = FP8(cuda[0], fq.cuda(), fs.cuda(), cuda[3], cuda[4]).cpu()
        _, _, magnitude, _ = _fp8_float64(x, smooth, fq, fs, bias)
        _assert_within(y_gpu, y_cpu.to(torch.float64), 2 * (k + 4) * FP32_EPS * magnitude, "fp8 CUDA vs CPU")
