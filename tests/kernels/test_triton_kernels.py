"""Tests of the Triton kernels (kernels/triton_*.py) and their registration as CUDA kernels.

How the kernel cases run here (no GPU): under Triton's interpreter, on CPU tensors. The
interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported, and in
a whole-suite run torch._dynamo imports triton while the first test modules are collected
(before tests/export/test_bad_input.py), so a conftest cannot switch it on in time.
:func:`test_kernel_cases_under_the_interpreter` therefore runs this file in a subprocess
whose environment has TRITON_INTERPRET=1 from the start; there the kernel cases run
(and the compiled-mode tests skip). To see the cases one by one:

    TRITON_INTERPRET=1 pytest tests/kernels/test_triton_kernels.py

On a machine with a CUDA device the kernel cases also run in the main process, on CUDA
tensors (compiled kernels), and ``test_ops_run_the_triton_kernels_on_cuda`` checks that
``torch.ops.qcompile.*`` reach them.

Comparisons, against the ops' pure-torch references on fresh random inputs (seeded per
case), odd shapes (M = 1, 3, 17 and a [2, 3] batch; K and N not multiples of the tiles,
K = 1) and every supported dtype:

* quantize_per_token: codes and scales bitwise (the kernel does the reference's float32
  operations in the same order, each correctly rounded).
* linear_w8a8: bitwise (int32 accumulation is exact; the epilogue is the reference's float32
  operations in order, with no fused multiply-add).
* linear_w4a16: within ``(u_w + 2 (K + 1) 2**-24) * (|x| @ |W|.T + |b|) + 2 u_out |y|``:
  the kernel rounds the dequantized weight to x's dtype (u_w = 2**-8 for bfloat16, 2**-11
  for float16, 0 for float32), both sides sum K float32 products in different orders (each
  within (K + 1) 2**-24 of the exact sum, relative to the sum of magnitudes, bias included),
  and each rounds its result to x's dtype once (u_out, relative).

The compiled-mode tests (main process) compile each kernel for an sm_90 target without a GPU
and check the instructions that the bit-exactness rests on (correctly rounded division, no
fused multiply-add, integer tensor-core dot), plus the wrappers' errors, the config pruning,
the split-K choice and the dispatch of the registered CUDA implementations.
"""
from __future__ import annotations

import re
import zlib

import pytest
import torch

from tests.kernels.interpreter import run_kernel_cases

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from triton.backends import backends as triton_backends  # noqa: E402

import qcompile.kernels  # noqa: E402,F401  (registers the ops)
from qcompile.act_quant import quantize_weight_per_channel_int8  # noqa: E402
from qcompile.kernels import _triton_common as common  # noqa: E402
from qcompile.kernels import triton_linear_w4a16 as w4a16  # noqa: E402
from qcompile.kernels import triton_linear_w8a8 as w8a8  # noqa: E402
from qcompile.kernels import triton_quantize_per_token as qpt  # noqa: E402
from qcompile.kernels.linear_w4a16 import linear_w4a16_reference  # noqa: E402
from qcompile.kernels.linear_w8a8 import INT_MM_MAX_K, linear_w8a8_reference  # noqa: E402
from qcompile.kernels.quantize_per_token import quantize_per_token_reference  # noqa: E402
from qcompile.quantizers import dequantize_codes, quantize_weight_rtn  # noqa: E402

INTERPRETED = common.interpreter_active()
# On a machine with a GPU (and no interpreter) the kernel cases also run in-process on CUDA.
ON_CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_CUDA else "cpu"
kernel_case = pytest.mark.skipif(
    not (INTERPRETED or ON_CUDA),
    reason="kernel case: runs under the interpreter in test_kernel_cases_under_the_interpreter's subprocess",
)
compiled_only = pytest.mark.skipif(INTERPRETED, reason="needs compiled-mode (non-interpreted) Triton")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")

X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [(8, "int"), (4, "int"), (8, "fp8")]
LEADING = [(1,), (3,), (17,), (2, 3)]


def _shape_pairs(shapes):
    """(index, leading, shape): every shape with M = 17 (two row blocks of the interpreter's
    16-row tiles) and with one of the other leading shapes in turn (M = 1, 3, [2, 3])."""
    others = [lead for lead in LEADING if lead != (17,)]
    for j, shape in enumerate(shapes):
        for i, leading in enumerate(((17,), others[j % len(others)])):
            yield i + j, leading, shape


def _generator(*key) -> torch.Generator:
    """A generator seeded from the case (the same inputs on every run, different per case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def _on_device(*tensors):
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if a.is_floating_point():
        return torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))
    return torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Main process: the interpreter cases in a subprocess.


@compiled_only
def test_kernel_cases_under_the_interpreter():
    run_kernel_cases(__file__, 20)


# ---------------------------------------------------------------------------------------
# Kernel cases (interpreter, or CUDA): quantize_per_token.


@kernel_case
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("bits,format", FORMATS)
def test_quantize_per_token_bitwise(dtype, bits, format):
    for i, leading in enumerate(LEADING):
        for j, k in enumerate((1, 7, 130)):
            gen = _generator("qpt", str(dtype), bits, format, leading, k)
            x = _randn(gen, *leading, k, dtype=dtype, scale=3.0)
            smooth = torch.rand(k, generator=gen, device=DEVICE) + 0.5 if (i + j) % 2 else None
            got = qpt.triton_quantize_per_token(x, smooth, bits, format)
            want = quantize_per_token_reference(x, smooth, bits, format)
            assert _same_bits(got[0], want[0]), (leading, k, smooth is not None)
            assert _same_bits(got[1], want[1]), (leading, k, smooth is not None)


@kernel_case
@pytest.mark.parametrize("bits,format", FORMATS)
def test_quantize_per_token_ties_zeros_and_tiny_rows(bits, format):
    # Row 0: absmax = qmax, so scale 1 and the values below are exact ties (ints: halves;
    # fp8: midpoints between e4m3 neighbours, including subnormals). Row 1: zeros (scale 1).
    # Row 2: denormal dust (scale below the smallest normal float32 -> 1.0). Row 3: -0.0.
    qmax = {(8, "int"): 127.0, (4, "int"): 7.0, (8, "fp8"): 448.0}[(bits, format)]
    if format == "fp8":
        ties = [448.0, 0.5 * (1.0 + 1.125), -(3.0 + 3.25) / 2, 2.0**-9 * 1.5, -(2.0**-10), 240.0, -208.0]
    else:
        ties = [qmax, 0.5, -0.5, 1.5, -2.5, 2.5, -3.5]
    x = torch.zeros(4, len(ties))
    x[0] = torch.tensor(ties)
    x[2] = torch.tensor([1e-42, -3e-43, 0.0, 1e-44, 0.0, 0.0, -1e-45])
    x[3] = -0.0
    (x,) = _on_device(x)
    got = qpt.triton_quantize_per_token(x, None, bits, format)
    want = quantize_per_token_reference(x, None, bits, format)
    assert _same_bits(got[0], want[0]) and _same_bits(got[1], want[1])


@kernel_case
@pytest.mark.parametrize("bits,format", FORMATS)
def test_quantize_rows_two_pass_and_static(bits, format):
    # Rows longer than the single-pass block are read twice; the static mode uses a given scale.
    gen = _generator("two-pass", bits, format)
    x = _randn(gen, 5, 300, dtype=torch.bfloat16, scale=2.0)
    smooth = (torch.rand(300, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    got = qpt.quantize_rows(x, smooth, bits, format, max_single_pass_block=64)
    want = quantize_per_token_reference(x, smooth, bits, format)
    assert _same_bits(got[0], want[0]) and _same_bits(got[1], want[1])
    if format == "int" and bits == 8:
        from qcompile.act_quant import quantize_activation_static

        for act_scale in _on_device(torch.tensor(0.01), torch.tensor([0.0])):  # saturating; guarded zero
            for block in (64, qpt.MAX_SINGLE_PASS_BLOCK):
                codes, scale = qpt.quantize_rows(x, smooth, 8, "int", qpt.static_scale_of(act_scale), block)
                want_codes, want_scale = quantize_activation_static(x, act_scale, smooth, 8)
                assert _same_bits(codes, want_codes) and _same_bits(scale, want_scale)


@kernel_case
def test_quantize_per_token_empty_rows():
    codes, scales = qpt.triton_quantize_per_token(torch.zeros(0, 5, device=DEVICE), None, 8, "int")
    assert codes.shape == (0, 5) and scales.shape == (0, 1)


# ---------------------------------------------------------------------------------------
# Kernel cases (interpreter, or CUDA): linear_w8a8.

W8A8_SHAPES = [(48, 64), (17, 40), (5, 7), (9, 1), (33, 130)]


@kernel_case
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_linear_w8a8_bitwise(dtype, static):
    for case, leading, (n, k) in _shape_pairs(W8A8_SHAPES):
        gen = _generator("w8a8", str(dtype), static, leading, n, k)
        x = _randn(gen, *leading, k, dtype=dtype)
        qweight, wscales = quantize_weight_per_channel_int8(_randn(gen, n, k))
        # Vary bias (float32 / x's dtype / none) and smoothing across the cases.
        bias = [None, _randn(gen, n), _randn(gen, n, dtype=dtype)][case % 3]
        smooth = torch.rand(k, generator=gen, device=DEVICE) + 0.5 if case % 2 else None
        act_scale = torch.tensor(0.02, device=DEVICE) if static else None  # saturates the largest |x|
        got = w8a8.triton_linear_w8a8(x, qweight, wscales, bias, smooth, act_scale)
        want = linear_w8a8_reference(x, qweight, wscales, bias, smooth, act_scale)
        assert _same_bits(got, want), (leading, n, k)


@kernel_case
def test_linear_w8a8_empty():
    qweight, wscales = quantize_weight_per_channel_int8(torch.randn(6, 5, device=DEVICE))
    assert w8a8.triton_linear_w8a8(torch.zeros(0, 5, device=DEVICE), qweight, wscales, None, None, None).shape == (0, 6)


# ---------------------------------------------------------------------------------------
# Kernel cases (interpreter, or CUDA): linear_w4a16.

# (N, K, group_size): tile-aligned groups (32, 64 with BLOCK_K 32), groups that split
# tiles (8, 65, 7), per-channel with odd K (K = 7: a padding nibble), K = 1.
W4A16_SHAPES = [(48, 64, 32), (17, 40, 8), (33, 130, 65), (5, 7, 7), (9, 1, 1), (40, 128, 64)]
WEIGHT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OUTPUT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _assert_w4a16_close(got, x, qweight, scales, zeros, bias, group_size, context):
    want = linear_w4a16_reference(x, qweight, scales, zeros, bias, group_size)
    assert got.dtype == want.dtype and got.shape == want.shape, context
    k = x.shape[-1]
    w = dequantize_codes(qweight, scales, zeros, bits=4, group_size=group_size, in_features=k, dtype=torch.float64)
    magnitude = x.double().abs() @ w.abs().T + (0.0 if bias is None else bias.double().abs())
    bound = (WEIGHT_ROUNDOFF[x.dtype] + 2 * (k + 1) * 2.0**-24) * magnitude
    bound = bound + 2 * OUTPUT_ROUNDOFF[x.dtype] * want.double().abs()
    excess = (got.double() - want.double()).abs() - bound
    assert excess.max().item() <= 0.0, (context, excess.max().item())


@kernel_case
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_linear_w4a16_close_to_reference(dtype, symmetric):
    for case, leading, (n, k, group_size) in _shape_pairs(W4A16_SHAPES):
        gen = _generator("w4a16", str(dtype), symmetric, leading, n, k)
        x = _randn(gen, *leading, k, dtype=dtype)
        qw = quantize_weight_rtn(_randn(gen, n, k), 4, group_size, symmetric)
        # zeros=None (implicit zero point 8) for symmetric weights, explicit otherwise.
        zeros = None if symmetric else qw.zeros
        bias = [None, _randn(gen, n, dtype=dtype)][case % 2]
        split_k = [1, 3, None][case % 3]  # None: the wrapper's choice
        got = w4a16.triton_linear_w4a16(x, qw.qweight, qw.scales, zeros, bias, group_size, split_k=split_k)
        _assert_w4a16_close(got, x, qw.qweight, qw.scales, zeros, bias, group_size, (leading, n, k, split_k))


@kernel_case
def test_linear_w4a16_empty():
    qw = quantize_weight_rtn(torch.randn(6, 8, device=DEVICE), 4, 4, True)
    y = w4a16.triton_linear_w4a16(torch.zeros(0, 8, device=DEVICE), qw.qweight, qw.scales, None, None, 4)
    assert y.shape == (0, 6)


@cuda_only
def test_ops_run_the_triton_kernels_on_cuda(monkeypatch):
    # Through torch.ops: the registered CUDA implementation gives the Triton results, and
    # with QCOMPILE_TRITON=0 the reference's.
    gen = _generator("dispatch")
    x = _randn(gen, 5, 96, dtype=torch.float16)
    qweight, wscales = quantize_weight_per_channel_int8(_randn(gen, 40, 96))
    qw = quantize_weight_rtn(_randn(gen, 40, 96), 4, 32, False)
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "1")
    codes = torch.ops.qcompile.quantize_per_token(x, None, 8, "int")
    assert all(_same_bits(a, b) for a, b in zip(codes, qpt.triton_quantize_per_token(x, None, 8, "int")))
    y8 = torch.ops.qcompile.linear_w8a8(x, qweight, wscales, None, None, None)
    assert _same_bits(y8, w8a8.triton_linear_w8a8(x, qweight, wscales, None, None, None))
    y4 = torch.ops.qcompile.linear_w4a16(x, qw.qweight, qw.scales, qw.zeros, None, 32)
    assert _same_bits(y4, w4a16.triton_linear_w4a16(x, qw.qweight, qw.scales, qw.zeros, None, 32))
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "0")
    y4_reference = torch.ops.qcompile.linear_w4a16(x, qw.qweight, qw.scales, qw.zeros, None, 32)
    assert _same_bits(y4_reference, linear_w4a16_reference(x, qw.qweight, qw.scales, qw.zeros, None, 32))


# ---------------------------------------------------------------------------------------
# Main process: what the GPU compiler emits (sm_90 target, no GPU needed).


def _ptx(kernel, signature: dict, constexprs: dict, **options) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _instructions(ptx: str) -> set:
    return set(re.findall(r"^\s*([a-z][\w.]*)", ptx, re.M))


needs_nvidia_backend = pytest.mark.skipif("nvidia" not in triton_backends, reason="triton has no NVIDIA backend here")


@compiled_only
@needs_nvidia_backend
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_quantize_kernel_ptx_rounds_correctly(fp8):
    ptx = _ptx(
        qpt._quantize_rows_kernel,
        {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "static_scale_ptr": "*fp32",
         "codes_ptr": "*fp8e4nv" if fp8 else "*i8", "scales_ptr": "*fp32",
         "K": "i32", "stride_xm": "i32", "stride_cm": "i32", "M_BUCKET": "i32"},
        {"QMAX": 448.0 if fp8 else 127.0, "HAS_SMOOTH": True, "STATIC": False, "FP8": fp8,
         "BLOCK_K": 1024, "SINGLE_PASS": True},
        enable_fp_fusion=False, num_warps=4,
    )
    ops = _instructions(ptx)
    assert "div.rn.f32" in ops and not any(op.startswith(("div.full", "div.approx")) for op in ops)
    assert not any(op.startswith("fma") for op in ops)
    # The rounding identity survives as two correctly rounded additions of +-1.5 * 2**23
    # (fp8: of a computed constant, so only the instruction is checked).
    assert "add.rn.f32" in ops
    if fp8:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ops
    else:
        assert re.search(r"add\.rn\.f32\s+\S+ \S+ 0f4B400000;", ptx.replace(",", ""))
        assert re.search(r"add\.rn\.f32\s+\S+ \S+ 0fCB400000;", ptx.replace(",", ""))


@compiled_only
@needs_nvidia_backend
def test_w8a8_kernel_ptx_int8_dot_and_unfused_epilogue():
    ptx = _ptx(
        w8a8._w8a8_gemm_kernel,
        {"a_ptr": "*i8", "b_ptr": "*i8", "xscale_ptr": "*fp32", "wscale_ptr": "*fp32", "bias_ptr": "*fp32",
         "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", "stride_am": "i32",
         "stride_bn": "i32", "stride_ym": "i32", "stride_xscale": "i32"},
        {"HAS_BIAS": True, "OUT_DTYPE": tl.bfloat16, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8},
        enable_fp_fusion=False, num_warps=4, num_stages=3,
    )
    ops = _instructions(ptx)
    assert any(op.startswith("mma.") and ".s32.s8.s8" in op for op in ops), sorted(ops)
    assert {"cvt.rn.f32.s32", "mul.rn.f32", "add.rn.f32"} <= ops
    assert not any(op.startswith("fma") for op in ops)


@compiled_only
@needs_nvidia_backend
@pytest.mark.parametrize("dtype,group_size,split_k", [("bf16", 128, 1), ("fp32", 130, 4)])
def test_w4a16_kernel_compiles(dtype, group_size, split_k):
    ptx = _ptx(
        w4a16._w4a16_kernel,
        {"x_ptr": f"*{dtype}", "qweight_ptr": "*u8", "scales_ptr": "*fp32", "zeros_ptr": "*fp32",
         "bias_ptr": "*fp32", "y_ptr": f"*{dtype}" if split_k == 1 else "*fp32", "M": "i32", "N": "i32",
         "K": "i32", "M_BUCKET": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_sn": "i32",
         "stride_ym": "i32", "stride_ysplit": "i32"},
        {"GROUP_SIZE": group_size, "SPLIT_K": split_k, "HAS_ZEROS": True, "HAS_BIAS": True,
         "X_DTYPE": tl.bfloat16 if dtype == "bf16" else tl.float32,
         "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64 if group_size == 128 else 32, "GROUP_M": 8},
        enable_fp_fusion=False, num_warps=4, num_stages=3,
    )
    ops = _instructions(ptx)
    if dtype == "bf16":
        assert any(op.startswith("mma.") and "bf16" in op for op in ops), sorted(ops)
    else:  # IEEE float32: no tensor-core (TF32) dot
        assert not any(op.startswith(("mma.", "wgmma.")) for op in ops)


# ---------------------------------------------------------------------------------------
# Main process: registration, dispatch, wrappers' errors, pruning, split-K choice.


def test_cuda_implementations_registered():
    assert common.CUDA_KERNELS_REGISTERED
    for qualname in common.CUDA_IMPLEMENTATIONS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), qualname


@compiled_only
def test_cuda_dispatch_uses_triton_unless_switched_off(monkeypatch):
    # The registered CUDA functions called directly with CPU tensors: with the switch on they
    # reach the Triton wrapper (which refuses CPU tensors outside the interpreter); with
    # QCOMPILE_TRITON=0 they return the reference.
    x = torch.randn(3, 16)
    qweight, wscales = quantize_weight_per_channel_int8(torch.randn(8, 16))
    qw4 = quantize_weight_rtn(torch.randn(8, 16), 4, 8, True)
    calls = {
        "qcompile::quantize_per_token": ((x, None, 8, "int"), quantize_per_token_reference),
        "qcompile::linear_w8a8": ((x, qweight, wscales, None, None, None), linear_w8a8_reference),
        "qcompile::linear_w4a16": ((x, qw4.qweight, qw4.scales, None, None, 8), linear_w4a16_reference),
    }
    for qualname, (args, reference) in calls.items():
        monkeypatch.setenv(common.TRITON_SWITCH_ENV, "1")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            common.CUDA_IMPLEMENTATIONS[qualname](*args)
        monkeypatch.setenv(common.TRITON_SWITCH_ENV, "0")
        got, want = common.CUDA_IMPLEMENTATIONS[qualname](*args), reference(*args)
        if isinstance(want, tuple):  # quantize_per_token: (codes, scales)
            assert all(_same_bits(g, w) for g, w in zip(got, want)), qualname
        else:
            assert _same_bits(got, want), qualname
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "yes")
    with pytest.raises(ValueError, match="QCOMPILE_TRITON must be '0' or '1'"):
        common.triton_path_enabled()


@compiled_only
def test_w8a8_dispatch_beyond_int32_safe_k_takes_the_reference(monkeypatch):
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "1")
    k = INT_MM_MAX_K + 1
    x = torch.randn(1, k)
    qweight, wscales = quantize_weight_per_channel_int8(torch.randn(2, k))
    got = common.CUDA_IMPLEMENTATIONS["qcompile::linear_w8a8"](x, qweight, wscales, None, None, None)
    assert _same_bits(got, linear_w8a8_reference(x, qweight, wscales, None, None, None))
    with pytest.raises(ValueError, match="int32"):
        w8a8.triton_linear_w8a8(x.to("meta"), qweight.to("meta"), wscales.to("meta"), None, None, None)


def test_wrappers_raise_clear_errors():
    x = torch.randn(3, 16)
    qweight, wscales = quantize_weight_per_channel_int8(torch.randn(8, 16))
    qw4 = quantize_weight_rtn(torch.randn(8, 16), 4, 8, True)
    with pytest.raises(TypeError, match="quantize_per_token: x must be one of"):
        qpt.triton_quantize_per_token(x.to(torch.int32), None, 8, "int")
    with pytest.raises(ValueError, match='format="fp8"'):
        qpt.triton_quantize_per_token(x, None, 4, "fp8")
    with pytest.raises(ValueError, match="smooth must have shape"):
        qpt.triton_quantize_per_token(x, torch.ones(15), 8, "int")
    with pytest.raises(ValueError, match="qweight must have shape"):
        w8a8.triton_linear_w8a8(torch.randn(3, 15), qweight, wscales, None, None, None)
    with pytest.raises(TypeError, match="wscales must be float32"):
        w8a8.triton_linear_w8a8(x, qweight, wscales.double(), None, None, None)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        w4a16.triton_linear_w4a16(x, qw4.qweight, qw4.scales, None, torch.zeros(8, device="meta"), 8)
    with pytest.raises(TypeError, match="4-bit qweight must be torch.uint8"):
        w4a16.triton_linear_w4a16(x, qw4.qweight.to(torch.int8), qw4.scales, None, None, 8)
    with pytest.raises(ValueError, match="split_k must be an int from 1 to 16"):
        w4a16.triton_linear_w4a16(x, qw4.qweight, qw4.scales, None, None, 8, split_k=0)
    if not INTERPRETED:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            w4a16.triton_linear_w4a16(x, qw4.qweight, qw4.scales, None, None, 8)


def _kw(config) -> tuple:
    return (config.kwargs.get("BLOCK_M"), config.kwargs.get("BLOCK_N"), config.kwargs.get("BLOCK_K"))


def test_w8a8_pruning_fits_tiles_to_the_problem(monkeypatch):
    a = torch.empty(1, 1, dtype=torch.int8)
    decode = w8a8.prune_w8a8_configs(w8a8.GPU_CONFIGS, {"a_ptr": a, "N": 4096, "K": 4096, "M_BUCKET": 1})
    assert decode and all(_kw(c)[0] == 16 for c in decode)
    small = w8a8.prune_w8a8_configs(w8a8.GPU_CONFIGS, {"a_ptr": a, "N": 100, "K": 100, "M_BUCKET": 32})
    assert sorted(_kw(c) for c in small) == [(16, 64, 128), (16, 128, 128), (32, 64, 128)]
    assert len(w8a8.prune_w8a8_configs(w8a8.GPU_CONFIGS, {"a_ptr": a, "N": 8192, "K": 8192, "M_BUCKET": 4096})) == len(
        w8a8.GPU_CONFIGS
    )
    # Nothing fits a tiny shared memory: the smallest tile remains.
    monkeypatch.setattr(common, "DEFAULT_SHARED_MEMORY", 1024)
    kept = w8a8.prune_w8a8_configs(w8a8.GPU_CONFIGS, {"a_ptr": a, "N": 4096, "K": 4096, "M_BUCKET": 1})
    assert [_kw(c) for c in kept] == [(16, 64, 128)]


def test_w4a16_pruning_prefers_group_aligned_tiles():
    x = torch.empty(1, 1, dtype=torch.float16)
    args = {"x_ptr": x, "N": 4096, "K": 4096, "M_BUCKET": 1, "SPLIT_K": 4, "GROUP_SIZE": 128}
    kept = w4a16.prune_w4a16_configs(w4a16.GPU_CONFIGS, args)
    assert kept and all(_kw(c)[0] == 16 and 128 % _kw(c)[2] == 0 for c in kept)
    odd = w4a16.prune_w4a16_configs(w4a16.GPU_CONFIGS, {**args, "M_BUCKET": 64, "GROUP_SIZE": 4095, "K": 4095})
    assert odd and all(_kw(c)[0] <= 64 for c in odd)
    tiny_k = w4a16.prune_w4a16_configs(w4a16.GPU_CONFIGS, {**args, "K": 64, "GROUP_SIZE": 32, "SPLIT_K": 1})
    assert tiny_k and all(_kw(c)[2] <= 64 and 32 % _kw(c)[2] == 0 for c in tiny_k)


def test_quantize_pruning_matches_warps_to_the_block():
    def warps(block):
        return sorted(c.num_warps for c in qpt.prune_quantize_configs(qpt.GPU_CONFIGS, {}, BLOCK_K=block))

    assert warps(8) == [1]
    assert warps(128) == [1, 2, 4]
    assert warps(16384) == [8, 16]


def test_split_k_choice_and_m_bucket():
    cpu = torch.device("cpu")
    assert w4a16.choose_split_k(17, 4096, 4096, cpu) == 1
    assert w4a16.choose_split_k(1, 64, 4096, cpu) == 8  # 4 nominal SMs: 8 splits of 1 tile
    assert w4a16.choose_split_k(1, 64, 300, cpu) == 1  # K too short to split
    assert [common.m_bucket(m) for m in (1, 3, 16, 17, 5000)] == [1, 4, 16, 32, 4096]
    assert [common.next_power_of_2(n) for n in (0, 1, 2, 3, 1025)] == [1, 1, 2, 4, 2048]
