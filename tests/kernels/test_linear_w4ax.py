"""Tests of qcompile::linear_w4a8 and qcompile::linear_w4a4 (4-bit group-wise weights,
per-token int8 / int4 activations): references, CPU int_mm path, fake implementations,
torch.export, torch.compile, errors.

Everything is compared with float64 computations built here from the dequantized codes,
with bounds that state their reason (u = 2**-24, the float32 unit roundoff):

* The group accumulation is exact (int32 in the CPU path, float64 in the reference), so the
  CPU path and the reference are compared with ``torch.equal``: they do the same float32
  epilogue operations in the same order.
* Against ``y64 = (codes * xscale) @ W64.T + b`` (float64, W64 the exactly dequantized
  weight, the same real number as ``xscale * Σ_g acc_g * scale_g + b``): the float32
  epilogue rounds each group's product (G roundings), each of the G - 1 sums, the product by
  xscale and the bias add, plus the bias's own conversion to float32: at most G + 3 roundings
  on any path, so the error is below ``γ(G + 3) * (|x̂| @ |W64|.T + |b|)`` with
  ``γ(n) = n u / (1 - n u)`` (accumulators stay below 2**24 here, so their conversion to
  float32 is exact), plus one rounding of the result to x's dtype.
* Against the unquantized linear ``(x / smooth) @ W64.T + b``: each activation code is off
  by at most ``xscale * (1/2 + qmax u)`` (rounding to the grid after a float32 division;
  see tests/kernels/test_activation_quant.py), times ``|W64|`` summed over K, plus the
  epilogue bound above.

The Triton kernel (:mod:`qcompile.kernels.triton_linear_w4ax`) is bit-identical to the
reference; its cases (``test_triton_case_*``) run under the interpreter in the subprocess of
:func:`test_triton_cases_under_the_interpreter` (TRITON_INTERPRET=1 must be set before
triton is first imported), or in-process on a CUDA machine.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.kernels.interpreter import run_kernel_cases

import qcompile.kernels  # noqa: F401  (registers the ops)
from qcompile.act_quant import quantize_activation_per_token, smooth_activation
from qcompile.kernels import W4_ACT_QUANT_LINEAR_OPS, W4_ACT_QUANT_LINEAR_REFERENCES
from qcompile.kernels import linear_w4ax as w4ax
from qcompile.quantizers import dequantize_codes, pack_int4, quantize_weight_rtn, unpack_int4

OPS = {8: torch.ops.qcompile.linear_w4a8, 4: torch.ops.qcompile.linear_w4a4}
NAMES = {8: "qcompile::linear_w4a8", 4: "qcompile::linear_w4a4"}
QMAX = {8: 127, 4: 7}
U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# (N, K, group_size, symmetric): per-channel with odd K and N, g32 with K not a multiple of
# 64, g128, group sizes 2 and 3 (the smallest int_mm inner dimensions), per-channel K = 2.
LAYOUTS = [
    (17, 67, None, True),
    (33, 96, 32, False),
    (48, 256, 128, True),
    (5, 160, 32, True),
    (9, 12, 2, False),
    (7, 9, 3, True),
    (3, 2, None, False),
]

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
INTERPRETED = TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = TRITON_INSTALLED and torch.cuda.is_available() and not INTERPRETED
triton_case = pytest.mark.skipif(
    not (INTERPRETED or ON_CUDA),
    reason="Triton case: runs under the interpreter in test_triton_cases_under_the_interpreter's subprocess",
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _id(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _case(n, k, group_size, symmetric, leading, dtype, seed, with_bias=True, with_smooth=True, zeros_none=False):
    g = _gen(seed)
    x = torch.randn(*leading, k, generator=g) * 3
    x[..., 0] *= 20  # an outlier channel
    if x.dim() > 1 and x.shape[:-1].numel() > 1:
        x.reshape(-1, k)[1] = 0.0  # an all-zero token
    smooth = torch.rand(k, generator=g) + 0.5 if with_smooth else None
    qw = quantize_weight_rtn(torch.randn(n, k, generator=g), 4, group_size, symmetric)
    zeros = None if zeros_none else qw.zeros
    if zeros_none:
        assert symmetric and bool((qw.zeros == 8).all())
    bias = torch.randn(n, generator=g) if with_bias else None
    return x.to(dtype), qw.qweight, qw.scales, zeros, bias, smooth, qw.group_size


def _float64_expected(act_bits, x, qweight, scales, zeros, bias, smooth, group_size):
    """(y64 from the activation codes, its epilogue bound, the smoothed float32 input,
    xscales, |W64|) — see the module docstring."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    codes, xscales = quantize_activation_per_token(x2, smooth, act_bits, "int")
    w64 = dequantize_codes(qweight, scales, zeros, bits=4, group_size=group_size, in_features=k, dtype=torch.float64)
    xq64 = codes.to(torch.float64) * xscales.to(torch.float64)
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    y64 = xq64 @ w64.T + b64
    rounds = k // group_size + 3
    gamma = rounds * U32 / (1 - rounds * U32)
    bound = gamma * (xq64.abs() @ w64.abs().T + b64.abs())
    return y64, bound, smooth_activation(x2, smooth), xscales, w64


def _assert_within(actual, expected, tolerance, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    excess = (actual.to(torch.float64) - expected).abs() - tolerance
    worst = excess.max().item() if excess.numel() else 0.0
    assert worst <= 0.0, f"{what}: error exceeds its bound by {worst:.3e}"


def _out_bound(bound, y64, dtype):
    """Add the final rounding to x's dtype: |fl(y) - y64| <= e + u (|y64| + e)."""
    return bound + UNIT_ROUNDOFF[dtype] * (y64.abs() + bound)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
@pytest.mark.parametrize("leading", [(1,), (3,), (17,), ()], ids=_id)
def test_exact_group_accumulation_and_epilogue(act_bits, layout, leading):
    n, k, group_size, symmetric = layout
    case = _case(n, k, group_size, symmetric, leading, torch.float32, seed=n + k + len(leading))
    y = OPS[act_bits](*case)
    assert y.shape == (*leading, n) and y.dtype == torch.float32
    y64, bound, *_ = _float64_expected(act_bits, *case)
    _assert_within(y.reshape(-1, n), y64, _out_bound(bound, y64, torch.float32), f"w4a{act_bits} vs float64")
    # The CPU int_mm path and the reference give the same bits.
    assert torch.equal(y, w4ax.linear_w4ax_reference(act_bits, *case))
    assert torch.equal(y, W4_ACT_QUANT_LINEAR_REFERENCES[act_bits](*case))
    # ... and they are the documented epilogue applied to exact int64 group sums.
    assert torch.equal(y.reshape(-1, n), _documented_epilogue(act_bits, *case))


def _documented_epilogue(act_bits, x, qweight, scales, zeros, bias, smooth, group_size):
    """The module docstring's numerics, spelled out: int64 group sums, then float32
    ``y = acc_0 s_0; y = y + acc_g s_g (g = 1..G-1); y = y * xscale; y = y + b``."""
    k = x.shape[-1]
    codes, xscales = quantize_activation_per_token(x.reshape(-1, k), smooth, act_bits, "int")
    n, groups = scales.shape
    zero = torch.full_like(scales, 8) if zeros is None else zeros
    w = unpack_int4(qweight, k).to(torch.int64).reshape(n, groups, group_size) - zero.to(torch.int64)[..., None]
    a = codes.to(torch.int64).reshape(-1, groups, group_size)
    acc = (a[:, None] * w[None]).sum(-1)  # [M, N, G], exact in int64
    y = acc[..., 0].to(torch.float32) * scales[:, 0]
    for g in range(1, groups):
        y = y + acc[..., g].to(torch.float32) * scales[:, g]
    y = y * xscales
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias,with_smooth,zeros_none",
                         [(True, True, False), (False, False, False), (True, False, True), (False, True, True)])
def test_against_the_unquantized_linear(act_bits, dtype, with_bias, with_smooth, zeros_none):
    n, k, group_size = 24, 128, 32
    case = _case(n, k, group_size, zeros_none, (2, 5), dtype, 7 + act_bits, with_bias, with_smooth, zeros_none)
    y = OPS[act_bits](*case)
    assert y.dtype == dtype and y.shape == (2, 5, n)
    _, bound, xs32, xscales, w64 = _float64_expected(act_bits, *case)
    bias = case[4]
    y_true = xs32.to(torch.float64) @ w64.T + (0.0 if bias is None else bias.to(torch.float64))
    act_error = xscales.to(torch.float64) * (0.5 + QMAX[act_bits] * U32)  # [M, 1] per element
    total = bound + act_error @ w64.abs().sum(dim=1, keepdim=True).T
    _assert_within(y.reshape(-1, n), y_true, _out_bound(total, y_true, dtype), f"w4a{act_bits} {dtype}")
    assert torch.equal(y, w4ax.linear_w4ax_reference(act_bits, *case))
    assert torch.equal(y.reshape(-1, n), _documented_epilogue(act_bits, *case))


def test_int4_activations_are_coarser_than_int8():
    case = _case(32, 128, 32, True, (64,), torch.float32, 3, with_smooth=False)
    y_true = case[0] @ dequantize_codes(case[1], case[2], case[3], bits=4, group_size=32, in_features=128).T + case[4]
    err8 = (OPS[8](*case) - y_true).pow(2).mean()
    err4 = (OPS[4](*case) - y_true).pow(2).mean()
    assert err4 > 4 * err8


def test_grouped_row_blocks_and_large_accumulators(monkeypatch):
    """Row blocks of the grouped path (16 rows, then a partial block), and group sums well
    beyond 2**24, where the float32 conversion of the accumulator rounds: still bit-identical
    to the reference, whose float64 sums convert to the same float32."""
    monkeypatch.setattr(w4ax, "_BLOCK_BYTES", 4 * 40)  # rows_per_block -> its minimum, 16
    assert w4ax.rows_per_block(40) == 16
    case = _case(40, 96, 32, False, (50,), torch.bfloat16, 11)
    assert torch.equal(OPS[8](*case), w4ax.linear_w4ax_reference(8, *case))
    # Saturated codes: all activations 127 * sign, all weights 15 away from the zero point.
    k, group_size = 16384, 8192
    x = torch.ones(3, k)
    x[1] = -1.0
    codes = torch.full((5, k), 15, dtype=torch.uint8)
    zeros = torch.zeros(5, 2)
    scales = torch.rand(5, 2, generator=_gen(5)) + 0.5
    qweight = pack_int4(codes)
    y = OPS[8](x, qweight, scales, zeros, None, None, group_size)
    acc = 127 * 15 * group_size  # 15_605_760 < 2**24: exact in float32
    assert torch.equal(y, w4ax.linear_w4ax_reference(8, x, qweight, scales, zeros, None, None, group_size))
    expected = (acc * scales[:, 0] + acc * scales[:, 1]) * (1.0 / 127)
    torch.testing.assert_close(y[0], expected, rtol=4 * U32, atol=0)
    # Per-channel, K = 16384: |acc| = 31_211_520 > 2**24 rounds on conversion, the same way in both.
    scales1 = torch.rand(5, 1, generator=_gen(6)) + 0.5
    y1 = OPS[8](x, qweight, scales1, torch.zeros(5, 1), None, None, k)
    assert torch.equal(y1, w4ax.linear_w4ax_reference(8, x, qweight, scales1, torch.zeros(5, 1), None, None, k))


def test_zero_tokens_empty_batch_and_non_contiguous_x():
    n, k = 16, 64
    x, qweight, scales, zeros, bias, smooth, gs = _case(n, k, 32, False, (4,), torch.float32, 21)
    x = torch.zeros(4, k)
    for bits in (8, 4):
        assert torch.equal(OPS[bits](x, qweight, scales, zeros, bias, smooth, gs), bias.expand(4, n))
        empty = OPS[bits](torch.empty(0, 3, k), qweight, scales, zeros, bias, smooth, gs)
        assert empty.shape == (0, 3, n)
    wide = torch.randn(3, 2 * k, generator=_gen(22))
    view = wide[:, ::2]
    assert not view.is_contiguous()
    assert torch.equal(OPS[8](view, qweight, scales, zeros, bias, smooth, gs),
                       OPS[8](view.contiguous(), qweight, scales, zeros, bias, smooth, gs))


def test_smoothing_equals_pre_divided_input():
    x, qweight, scales, zeros, bias, smooth, gs = _case(8, 64, 32, True, (5,), torch.float32, 31)
    for bits in (8, 4):
        assert torch.equal(OPS[bits](x, qweight, scales, zeros, bias, smooth, gs),
                           OPS[bits](x / smooth, qweight, scales, zeros, bias, None, gs))


def test_dispatch_rule_and_group_size_one_takes_the_reference(monkeypatch):
    assert w4ax.int_mm_path_applies(torch.ones(1), None, group_size=2)
    assert not w4ax.int_mm_path_applies(torch.ones(1), group_size=1)
    assert not w4ax.int_mm_path_applies(torch.ones(1), group_size=w4ax.W4AX_INT32_MAX_GROUP + 1)
    assert not w4ax.int_mm_path_applies(torch.ones(1, device="meta"), group_size=32)
    case = _case(6, 5, 1, False, (3,), torch.float32, 41)
    called = []
    original = w4ax.linear_w4ax_reference
    monkeypatch.setattr(w4ax, "linear_w4ax_reference", lambda *a: called.append(a[0]) or original(*a))
    y = OPS[4](*case)
    assert called == [4]
    y64, bound, *_ = _float64_expected(4, *case)
    _assert_within(y, y64, _out_bound(bound, y64, torch.float32), "group_size 1")
    with pytest.raises(ValueError, match=r"qcompile::linear_w4a4: the CPU int_mm path needs .*group_size=1"):
        w4ax.linear_w4ax_cpu(4, *case)


def test_layout_cache_is_reused_and_invalidated():
    x, qweight, scales, zeros, bias, smooth, gs = _case(16, 64, 32, False, (3,), torch.float32, 51)
    cache = w4ax._LAYOUT_CACHES[8]
    y = OPS[8](x, qweight, scales, zeros, bias, smooth, gs)
    first = cache.get(qweight, scales, zeros, gs)
    OPS[8](x, qweight, scales, zeros, bias, smooth, gs)
    assert cache.get(qweight, scales, zeros, gs) is first
    zeros.add_(1).clamp_(max=15)  # in place: the cached centered codes must be rebuilt
    y2 = OPS[8](x, qweight, scales, zeros, bias, smooth, gs)
    assert cache.get(qweight, scales, zeros, gs) is not first
    assert torch.equal(y2, w4ax.linear_w4ax_reference(8, x, qweight, scales, zeros, bias, smooth, gs))
    assert not torch.equal(y, y2)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_naming_the_op():
    x, qweight, scales, zeros, bias, smooth, gs = _case(16, 64, 32, False, (3,), torch.float32, 61)
    for bits, op in ((8, OPS[8]), (4, OPS[4])):
        name = NAMES[bits]
        with pytest.raises(TypeError, match=f"{name}: x must be one of"):
            op(x.double(), qweight, scales, zeros, bias, smooth, gs)
        with pytest.raises(TypeError, match=f"{name} with x of shape \\(3, 64\\): 4-bit qweight must be torch.uint8"):
            op(x, qweight.to(torch.int8), scales, zeros, bias, smooth, gs)
        with pytest.raises(ValueError, match=rf"{name} with x of shape \(3, 64\): .*must have shape \[N, 32\], got \(16, 31\)"):
            op(x, qweight[:, :31], scales, zeros, bias, smooth, gs)
        with pytest.raises(ValueError, match=f"{name} with x of shape .*group_size=48 does not divide in_features=64"):
            op(x, qweight, scales, zeros, bias, smooth, 48)
        with pytest.raises(ValueError, match=rf"{name} with x .*scales must have shape \[N, K / group_size\] = \[16, 1\]"):
            op(x, qweight, scales, zeros, bias, smooth, 64)
        with pytest.raises(TypeError, match=f"{name} with x .*zeros must be float32"):
            op(x, qweight, scales, zeros.to(torch.int32), bias, smooth, gs)
        with pytest.raises(ValueError, match=rf"{name}: bias must have shape \[N\] = \[16\]"):
            op(x, qweight, scales, zeros, bias[:3], smooth, gs)
        with pytest.raises(TypeError, match=f"{name}: bias must be float32"):
            op(x, qweight, scales, zeros, bias.to(torch.int32), smooth, gs)
        with pytest.raises(ValueError, match=rf"{name}: smooth must have shape \[K\] = \[64\]"):
            op(x, qweight, scales, zeros, bias, smooth[:8], gs)
        with pytest.raises(ValueError, match=f"{name}: scales is on meta but x is on cpu"):
            op(x, qweight, scales.to("meta"), zeros, bias, smooth, gs)
        bad = zeros.clone()
        bad[2, 1] = 16.0
        with pytest.raises(ValueError, match=rf"{name}: zeros must hold integer zero points in 0..15.*zeros\[2, 1\] = 16.0"):
            op(x, qweight, scales, bad, bias, smooth, gs)
        bad[2, 1] = 3.5
        with pytest.raises(ValueError, match=rf"{name}: zeros must hold integer.*= 3.5"):
            w4ax.linear_w4ax_reference(bits, x, qweight, scales, bad, bias, smooth, gs)
    with pytest.raises(ValueError, match="act_bits must be one of"):
        w4ax.linear_w4ax_reference(6, x, qweight, scales, zeros, bias, smooth, gs)


# ---------------------------------------------------------------- tracing


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, qweight, scales, zeros, bias, smooth, gs = _case(24, 96, 32, False, (1,), torch.float32, 71)
    with FakeTensorMode() as mode:
        x = torch.empty(2, 3, 96, dtype=torch.bfloat16)
        fq, fs, fz, fb = (mode.from_tensor(t) for t in (qweight, scales, zeros, bias))
        for bits in (8, 4):
            out = OPS[bits](x, fq, fs, fz, fb, torch.empty(96), gs)
            assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
            out = OPS[bits](x, fq, fs, None, None, None, gs)
            assert out.shape == (2, 3, 24)
            with pytest.raises(ValueError, match=f"{NAMES[bits]} with x of shape \\(2, 95\\)"):
                OPS[bits](torch.empty(2, 95), fq, fs, fz, None, None, gs)


class _W4Block(torch.nn.Module):
    """A W4A8 linear feeding a W4A4 one, as a lowered graph holds them."""

    def __init__(self, gen):
        super().__init__()
        smooth = torch.rand(64, generator=gen) + 0.5
        q1 = quantize_weight_rtn(torch.randn(48, 64, generator=gen) * smooth, 4, 32, False)
        q2 = quantize_weight_rtn(torch.randn(16, 48, generator=gen), 4, None, True)
        for name, t in dict(q1=q1.qweight, s1=q1.scales, z1=q1.zeros, q2=q2.qweight, s2=q2.scales,
                            smooth=smooth, b1=torch.randn(48, generator=gen)).items():
            self.register_buffer(name, t)

    def forward(self, x):
        h = OPS[8](x, self.q1, self.s1, self.z1, self.b1, self.smooth, 32)
        return OPS[4](torch.relu(h), self.q2, self.s2, None, None, None, 48)


def test_torch_export_keeps_the_ops():
    module = _W4Block(_gen(81))
    x = torch.randn(2, 3, 64, generator=_gen(82))
    program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(W4_ACT_QUANT_LINEAR_OPS[8]) == 1, targets
    assert targets.count(W4_ACT_QUANT_LINEAR_OPS[4]) == 1, targets
    other = torch.randn(5, 3, 64, generator=_gen(83))
    assert torch.equal(program.module()(other), module(other))


def test_torch_compile_matches_eager():
    module = _W4Block(_gen(91))
    x = torch.randn(7, 64, generator=_gen(92))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), module(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reference_matches_cpu():
    for layout in LAYOUTS[:4]:
        case = _case(*layout, (19,), torch.float32, 101)
        cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in case]
        for bits in (8, 4):
            assert torch.equal(OPS[bits](*cuda).cpu(), OPS[bits](*case))


# ---------------------------------------------------------------- Triton


@pytest.mark.skipif(not TRITON_INSTALLED or INTERPRETED, reason="needs triton; runs the interpreter cases")
def test_triton_cases_under_the_interpreter():
    run_kernel_cases(__file__, 8, "-k", "triton_case")


def _device_case(*args):
    device = "cuda" if ON_CUDA else "cpu"
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]


def _same_bits(a, b) -> bool:
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


@triton_case
@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_triton_case_bitwise(layout):
    from qcompile.kernels.triton_linear_w4ax import triton_linear_w4ax

    n, k, group_size, symmetric = layout
    for i, (act_bits, dtype, leading) in enumerate(((8, torch.float32, (17,)), (4, torch.bfloat16, (2, 3)),
                                                    (8, torch.float16, (1,)))):
        case = _device_case(*_case(n, k, group_size, symmetric, leading, dtype, seed=k + i,
                                   with_bias=i != 1, zeros_none=symmetric and i == 2))
        y = triton_linear_w4ax(act_bits, *case)
        assert _same_bits(y, w4ax.linear_w4ax_reference(act_bits, *case)), (act_bits, dtype, leading)


@triton_case
def test_triton_case_empty_and_errors():
    from qcompile.kernels.triton_linear_w4ax import triton_linear_w4ax

    x, qweight, scales, zeros, bias, smooth, gs = _device_case(*_case(16, 64, 32, False, (3,), torch.float32, 5))
    assert triton_linear_w4ax(4, x[:0], qweight, scales, zeros, bias, smooth, gs).shape == (0, 16)
    bad = zeros.clone()
    bad[0, 0] = -1.0
    with pytest.raises(ValueError, match=r"qcompile::linear_w4a8: zeros must hold integer zero points"):
        triton_linear_w4ax(8, x, qweight, scales, bad, bias, smooth, gs)
    with pytest.raises(ValueError, match="act_bits must be one of"):
        triton_linear_w4ax(6, x, qweight, scales, zeros, bias, smooth, gs)
    with pytest.raises(ValueError, match=r"qcompile::linear_w4a4: scales is on meta"):
        triton_linear_w4ax(4, x, qweight, scales.to("meta"), zeros, bias, smooth, gs)


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_triton_registration_and_pruning(monkeypatch):
    from qcompile.kernels import _triton_common as common
    from qcompile.kernels import triton_linear_w4ax as tw

    assert common.CUDA_IMPLEMENTATIONS.keys() >= set(NAMES.values())
    for qualname in NAMES.values():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), qualname
    # Switched off, or beyond the int32-safe group size, the CUDA implementation is the reference.
    case = _case(8, 16, 8, True, (3,), torch.float32, 9)
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "0")
    assert torch.equal(common.CUDA_IMPLEMENTATIONS[NAMES[4]](*case), w4ax.linear_w4ax_reference(4, *case))
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "1")
    monkeypatch.setattr(common, "W4AX_INT32_MAX_GROUP", 4)
    assert torch.equal(common.CUDA_IMPLEMENTATIONS[NAMES[8]](*case), w4ax.linear_w4ax_reference(8, *case))
    # Pruning: tiles within the problem, and aligned with the group size where possible.
    a = torch.empty(1, dtype=torch.int8)
    kept = tw.prune_w4ax_configs(tw.GPU_CONFIGS, {"a_ptr": a, "M_BUCKET": 4096, "N": 4096, "GROUP_SIZE": 32})
    assert kept and all(c.kwargs["BLOCK_K"] == 32 for c in kept)
    kept = tw.prune_w4ax_configs(tw.GPU_CONFIGS, {"a_ptr": a, "M_BUCKET": 1, "N": 4096, "GROUP_SIZE": 4096})
    assert kept and all(c.kwargs["BLOCK_M"] == 16 and 4096 % c.kwargs["BLOCK_K"] == 0 for c in kept)
    kept = tw.prune_w4ax_configs(tw.GPU_CONFIGS, {"a_ptr": a, "M_BUCKET": 1, "N": 8, "GROUP_SIZE": 3})
    assert len(kept) == 1  # nothing fits: the smallest tile
