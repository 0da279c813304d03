"""Tests of the fused rotate-and-quantize kernel (kernels/triton_quantize_rotated.py) against
its reference (kernels/quantize_rotated.py) and against float64.

The kernel cases run under Triton's interpreter in a subprocess with TRITON_INTERPRET=1 from
the start (:func:`test_kernel_cases_under_the_interpreter`; the reason is in
tests/kernels/test_triton_kernels.py), or in-process on a CUDA device. To see them one by one:

    TRITON_INTERPRET=1 pytest tests/kernels/test_triton_quantize_rotated.py

Bounds (u = 2**-24; S = sum over the block of |x_i s_i| / sqrt(block), per output):

* rotation: the kernel's and the reference's float32 rotations are each within
  ``B = (log2 P + m + 3) u S`` of the float64 truth (sign products, log2 P butterfly levels,
  m - 1 small-matrix additions, the scale constant and the scaling each round once, relative
  to at most S sqrt(block) before the scaling; the factor 1.01 covers second-order terms),
  so within ``D = 2 B`` of each other;
* scales: ``fl(absmax / qmax)`` on both sides, absmaxes within ``max D`` of each other:
  ``|s_k - s_r| <= max(D) / qmax + 2 u s_r``;
* codes: the reference's unrounded value ``v = rot_r / s_r`` (float64 here) and the kernel's
  float32 ``fl(rot_k / s_k)`` differ by at most
  ``tol = D / s_k + |rot_r| |s_r - s_k| / (s_k s_r) + u (|rot_r| + D) / s_k`` (and the
  reference's ``fl(v)`` by ``u |v|``). Rounding is monotone, so both codes lie between the
  codes of ``v - tol`` and ``v + tol``: they must be equal wherever those two agree (v not
  within tol of a rounding boundary). Where they differ, the codes must still be one step
  apart at most (the interval can span several fp8 steps near zero, where the steps are
  finer than the rotation's absolute error bound). The actual float32 differences are
  random-walk sized, far below the bound, so mismatches are rare: at most 0.1% of a case's
  elements (or 2) is asserted; over 6 draws of every case x dtype x signs kind x format
  (5e6 elements per format) the rate was 3e-6 (int8), 2e-7 (int4), 5e-6 (fp8), and at
  most 1 mismatch in a case of 8448 elements.
* dequantized ``codes * scale`` against the float64 rotation: half a step (integers:
  ``s / 2``; fp8: 2**-4 of the value, or 2**-10 s among e4m3 subnormals), plus the float32
  division (``3 u qmax s``, the clamp at qmax included) and the rotation's error B.
"""
from __future__ import annotations

import math
import re
import zlib

import pytest
import torch

from tests.kernels.interpreter import (
    DEVICE,
    INTERPRETED,
    kernel_case,
    needs_triton,
    not_interpreted,
    run_kernel_cases,
)

from qcompile.act_quant import FP8_DTYPE, act_qmax
from qcompile.hadamard import apply_block_hadamard, random_signs, rotation_plan
from qcompile.kernels.hadamard import hadamard_args
from qcompile.kernels.quantize_rotated import quantize_rotated_reference, rotate_float32


U32 = 2.0**-24
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [(8, "int"), (4, "int"), (8, "fp8")]
SIGNS_KINDS = ["none", "signs", "smooth"]
# (n, block or None for the rotation plan's, leading shape). Plans: 64 and 1024 Sylvester;
# 96 = H_12 (x) H_8, 768 = H_12 (x) H_64, 2816 = H_44 (x) H_64 (Paley I); 172 = 43 blocks of 4
# (a block count that is not a power of two); 576 with 3 blocks of 192 = 12 * 16; 7 = signs
# only (block 1).
CASES = [
    (64, None, (17,)),
    (96, None, (3,)),
    (172, None, (2, 3)),
    (576, 192, (1,)),
    (768, None, (17,)),
    (1024, None, (3,)),
    (2816, None, (3,)),
    (7, None, (17,)),
]


def _gen(*key) -> torch.Generator:
    """A generator seeded from the case (the same inputs on every run, different per case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _small_and_block(n: int, block=None):
    small, plan_block = hadamard_args(rotation_plan(n if block is None else block))
    return small, plan_block if block is None else block


def _signs(kind: str, n: int, gen: torch.Generator):
    """None, random +-1 (float32), or +-1 times a smoothing-like factor 1 / s with s in
    [0.5, 2) (float64: the kernel and the reference convert it to float32)."""
    if kind == "none":
        return None
    signs = random_signs(n, int(torch.randint(0, 2**31, (1,), generator=gen)), torch.float64)
    if kind == "signs":
        return signs.float()
    return signs / (torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.5)


def _rotation_truth_and_bound(x, small, signs, block):
    """float64 rotation of x (signs as float32, as both sides use them) and B, the bound of a
    float32 computation's error from it (module docstring)."""
    x64 = x.double() * (1.0 if signs is None else signs.float().double())
    m = 1 if small is None else small.shape[0]
    truth = apply_block_hadamard(x64, None if small is None else small.double(), block)
    n = x.shape[-1]
    magnitude = x64.abs().reshape(*x.shape[:-1], n // block, block).sum(-1, keepdim=True) / math.sqrt(block)
    magnitude = magnitude.expand(*x.shape[:-1], n // block, block).reshape(x.shape)
    return truth, 1.01 * ((block // m).bit_length() - 1 + m + 3) * U32 * magnitude


def _codes_of(v: torch.Tensor, bits: int, format: str) -> torch.Tensor:
    """The codes of float64 values v, rounded to float32 first (monotone, as the kernel's)."""
    qmax = act_qmax(bits, format)
    v32 = v.float()
    if format == "fp8":
        return v32.clamp(-qmax, qmax).to(FP8_DTYPE).float()
    return v32.round().clamp(-qmax, qmax)


def _one_step_apart(lo: torch.Tensor, hi: torch.Tensor, format: str) -> torch.Tensor:
    """Whether codes lo <= hi are equal or neighbours (integers: 1 apart; e4m3: within the
    step of the larger magnitude's binade, 2**-3 of it, or the subnormal step 2**-9; two
    steps are always more than that)."""
    gap = hi - lo
    if format == "fp8":
        return gap <= torch.maximum(torch.maximum(lo.abs(), hi.abs()) / 8, torch.full_like(gap, 2.0**-9))
    return gap <= 1


def assert_matches_reference(x, small, signs, block, bits, format, codes, scales, context):
    """The kernel's ``(codes, scales)`` against the reference and float64 (module docstring)."""
    want_codes, want_scales = quantize_rotated_reference(x, small, signs, block, bits, format)
    assert codes.dtype == want_codes.dtype and codes.shape == want_codes.shape, context
    assert scales.dtype == torch.float32 and scales.shape == want_scales.shape, context
    qmax = act_qmax(bits, format)
    truth, bound = _rotation_truth_and_bound(x, small, signs, block)
    diff = 2 * bound
    s_k, s_r = scales.double(), want_scales.double()
    # Scales.
    scale_bound = diff.amax(-1, keepdim=True) / qmax + 2 * U32 * s_r
    assert ((s_k - s_r).abs() <= 1.01 * scale_bound).all(), (context, (s_k - s_r).abs().max().item())
    # Codes: equal unless the reference's unrounded value is within tol of a rounding boundary.
    rot_r = rotate_float32(x, small, signs, block).double()
    v = rot_r / s_r
    tol = 1.01 * (diff / s_k + rot_r.abs() * (s_r - s_k).abs() / (s_k * s_r) + U32 * (rot_r.abs() + diff) / s_k)
    tol = torch.maximum(tol, U32 * v.abs())
    lo, hi = _codes_of(v - tol, bits, format), _codes_of(v + tol, bits, format)
    got, want = codes.float().double(), want_codes.float().double()
    assert ((lo <= want) & (want <= hi)).all(), (context, "the reference itself left the bound")
    assert ((lo <= got) & (got <= hi)).all(), (context, "a code differs away from a rounding boundary")
    mismatched = got != want
    assert _one_step_apart(torch.minimum(got, want)[mismatched], torch.maximum(got, want)[mismatched], format).all(), (
        context, "a code more than one step from the reference's")
    mismatches = int(mismatched.sum())
    assert mismatches <= max(2, 1e-3 * got.numel()), (context, mismatches, got.numel())
    # Dequantized against the float64 rotation: half a step, plus the division and rotation errors.
    dequantized = got * s_k
    if format == "fp8":
        half_step = torch.maximum((truth.abs() + bound) / 16, 2.0**-10 * s_k)
    else:
        half_step = 0.5 * s_k
    error_bound = 1.01 * (half_step + 3 * U32 * qmax * s_k + bound)
    excess = ((dequantized - truth).abs() - error_bound).max().item() if got.numel() else 0.0
    assert excess <= 0.0, (context, "dequantized", excess)
    return mismatches


def _on_device(*tensors):
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def _run_case(n, block, leading, dtype, signs_kind, bits, format, key):
    from qcompile.kernels.triton_quantize_rotated import triton_quantize_rotated

    gen = _gen(n, block, leading, str(dtype), signs_kind, bits, format, key)
    small, block = _small_and_block(n, block)
    x = (torch.randn(*leading, n, generator=gen) * 3).to(dtype)
    if x.shape[0] == 17:
        x[5] = 0.0  # an all-zero row: the scale guard (scale 1, codes 0)
    signs = _signs(signs_kind, n, gen)
    codes, scales = triton_quantize_rotated(*_on_device(x, small, signs), block, bits, format)
    context = (n, block, leading, str(dtype), signs_kind, bits, format)
    if x.shape[0] == 17:
        assert scales[5].item() == 1.0 and not codes[5].float().any(), context
    return assert_matches_reference(x, small, signs, block, bits, format, codes.cpu(), scales.cpu(), context)


# ---------------------------------------------------------------------------------------
# Main process: the interpreter cases in a subprocess.


@needs_triton
@not_interpreted
def test_kernel_cases_under_the_interpreter():
    run_kernel_cases(__file__, 8)


# ---------------------------------------------------------------------------------------
# Kernel cases (interpreter, or CUDA).


@kernel_case
@pytest.mark.parametrize("bits,format", FORMATS)
def test_kernel_matches_reference(bits, format):
    # Every dimension of CASES; dtypes and sign kinds in turn, shifted per format so that each
    # format meets every dtype and every kind.
    shift = FORMATS.index((bits, format))
    for i, (n, block, leading) in enumerate(CASES):
        dtype = X_DTYPES[(i + shift) % 3]
        signs_kind = SIGNS_KINDS[(i // 3 + i + 2 * shift) % 3]
        _run_case(n, block, leading, dtype, signs_kind, bits, format, "reference")


@kernel_case
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
def test_kernel_every_dtype_with_smoothing(dtype):
    # 17 rows (two programs of the interpreter's row tiles at n = 96) with a smoothing vector.
    for bits, format in FORMATS:
        _run_case(96, None, (17,), dtype, "smooth", bits, format, "dtypes")


@kernel_case
def test_kernel_model_widths_and_the_largest_tiles():
    # MLP widths with large small factors (11008 = H_344 (x) H_32, 14336 = H_28 (x) H_512), and
    # rows at MAX_ROW_TILE: 32768 = H_32768, 24576 = 2 blocks of H_12 (x) H_1024 (tile 2 * 16 * 1024).
    widths = [(4096, None), (11008, None), (14336, None), (32768, None), (24576, 12288)]
    for i, (n, block) in enumerate(widths):
        bits, format = FORMATS[i % 3]
        _run_case(n, block, (2,), X_DTYPES[(i + 1) % 3], SIGNS_KINDS[i % 3], bits, format, "widths")


@kernel_case
def test_kernel_guard_rows_strided_and_one_dimensional_inputs():
    from qcompile.kernels.triton_quantize_rotated import triton_quantize_rotated

    small, block = _small_and_block(768)
    gen = _gen("guard")
    # Rows: zeros; float32 denormal dust (rotated absmax / qmax below the smallest normal:
    # scale 1.0, codes 0); a single spike (one rotated block of equal magnitudes); Gaussian.
    x = torch.randn(4, 768, generator=gen)
    x[0] = 0.0
    x[1] = torch.randn(768, generator=gen) * 1e-41
    x[2] = 0.0
    x[2, 100] = -5.0
    for bits, format in FORMATS:
        codes, scales = triton_quantize_rotated(*_on_device(x, small), None, block, bits, format)
        assert scales[0].item() == 1.0 and scales[1].item() == 1.0, format
        assert not codes[:2].float().any(), format
        assert_matches_reference(x, small, None, block, bits, format, codes.cpu(), scales.cpu(), ("guard", format))
    # A strided view (every other column of a wider tensor has row stride 2n, column stride 2:
    # the wrapper makes it contiguous) and a sliced one (row stride 2n, column stride 1).
    wide = torch.randn(5, 2 * 64, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    for view in (wide[:, ::2], wide[:, 32:96]):
        codes, scales = triton_quantize_rotated(*_on_device(view), None, None, 64, 8, "int")
        assert_matches_reference(view, None, None, 64, 8, "int", codes.cpu(), scales.cpu(), "strided")
    # One-dimensional x: scales of shape [1], as the reference's.
    x1 = torch.randn(96, generator=gen)
    small96, block96 = _small_and_block(96)
    codes, scales = triton_quantize_rotated(*_on_device(x1, small96), None, block96, 4, "int")
    assert codes.shape == (96,) and scales.shape == (1,)
    assert_matches_reference(x1, small96, None, block96, 4, "int", codes.cpu(), scales.cpu(), "1-d")


@kernel_case
def test_kernel_empty_rows():
    from qcompile.kernels.triton_quantize_rotated import triton_quantize_rotated

    for format, dtype in (("int", torch.int8), ("fp8", FP8_DTYPE)):
        codes, scales = triton_quantize_rotated(torch.zeros(0, 3, 64, device=DEVICE), None, None, 64, 8, format)
        assert codes.shape == (0, 3, 64) and codes.dtype == dtype
        assert scales.shape == (0, 3, 1) and scales.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Main process: errors (raised before any launch), the limit, pruning, GPU compilation.


def _error_cases():
    small, block = _small_and_block(24)
    x = torch.randn(3, 24)
    return [
        (TypeError, "x must be one of", (x.double(), small, None, block, 8, "int")),
        (TypeError, "x must be one of", (x.to(torch.int32), small, None, block, 8, "int")),
        (ValueError, "0-d tensor", (torch.tensor(1.0), None, None, 1, 8, "int")),
        (ValueError, 'format="fp8"', (x, small, None, block, 4, "fp8")),
        (ValueError, "format must be one of", (x, small, None, block, 8, "nf4")),
        (ValueError, "bits in", (x, small, None, block, 3, "int")),
        (ValueError, "multiple of block = 16", (x, None, None, 16, 8, "int")),
        (ValueError, r"block / m = 2\.5 is not a power of two", (torch.randn(3, 30), small, None, 30, 8, "int")),
        (ValueError, "small must be a square", (x, small[:, :6], None, 24, 8, "int")),
        (ValueError, r"signs must have shape \[n\] = \[24\]", (x, small, torch.ones(12), 24, 8, "int")),
        (TypeError, "signs must be floating point", (x, small, torch.ones(24, dtype=torch.int8), 24, 8, "int")),
        (ValueError, "signs is on meta", (x, small, torch.ones(24, device="meta"), 24, 8, "int")),
    ]


def test_reference_errors_name_the_function():
    for error, message, args in _error_cases():
        with pytest.raises(error, match=f"quantize_rotated_reference: .*{message}"):
            quantize_rotated_reference(*args)


@needs_triton
def test_wrapper_errors_name_the_function():
    from qcompile.kernels import triton_quantize_rotated as tqr

    for error, message, args in _error_cases():
        with pytest.raises(error, match=f"triton_quantize_rotated: .*{message}"):
            tqr.triton_quantize_rotated(*args)
    # A row beyond the register tile: 65536 = one Sylvester block of 2**16 (2**16 > 32768), and
    # 2 blocks of 12 * 1024 (NB_PAD 2 * M_PAD 16 * 1024 = 32768 fits; 3 blocks pad to 4: 65536).
    with pytest.raises(ValueError, match=r"triton_quantize_rotated: .*65536 float32 values.*MAX_ROW_TILE = 32768"):
        tqr.triton_quantize_rotated(torch.zeros(2, 65536), None, None, 65536, 8, "int")
    small = _small_and_block(12 * 1024)[0]
    with pytest.raises(ValueError, match="MAX_ROW_TILE"):
        tqr.triton_quantize_rotated(torch.zeros(1, 3 * 12 * 1024), small, None, 12 * 1024, 8, "fp8")
    if not INTERPRETED:
        with pytest.raises(ValueError, match="triton_quantize_rotated: the Triton kernel needs CUDA tensors"):
            tqr.triton_quantize_rotated(torch.zeros(2, 24), None, None, 8, 8, "int")


@needs_triton
def test_limit_and_pruning():
    from qcompile.kernels import triton_quantize_rotated as tqr

    # Model widths that fit: 4096, 11008 = H_344 (x) H_32, 14336 = H_28 (x) H_512, 2 x (12 * 1024).
    for n, block, m in ((4096, 4096, 1), (11008, 11008, 344), (14336, 14336, 28), (24576, 12288, 12)):
        assert tqr.kernel_applies(n, m, block), n
    assert not tqr.kernel_applies(65536, 1, 65536) and not tqr.kernel_applies(3 * 12288, 12, 12288)
    assert tqr.row_tile(172, 1, 4) == 64 * 4 and tqr.row_tile(2816, 44, 2816) == 64 * 64

    def warps(rows, nb_pad, m_pad, p):
        args = {"ROWS": rows, "NB_PAD": nb_pad, "M_PAD": m_pad, "P": p}
        return sorted(c.num_warps for c in tqr.prune_quantize_rotated_configs(tqr.GPU_CONFIGS, args))

    assert warps(1, 1, 1, 8) == [1]
    assert warps(1, 1, 16, 8) == [1, 2, 4]
    assert warps(1, 1, 1, 32768) == [16]
    assert warps(4, 2, 16, 64) == [4, 8, 16]


@needs_triton
@not_interpreted
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_kernel_compiles_for_sm90_with_correct_rounding(fp8):
    # H_12 (x) H_64 in 3 blocks (padded to 4) of bfloat16 for an H100 target (no GPU needed):
    # everything lowers, divisions are correctly rounded and nothing is contracted into an FMA.
    import triton
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qcompile.kernels import triton_quantize_rotated as tqr

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no NVIDIA backend here")
    constexprs = {"NB": 3, "NB_PAD": 4, "M_SMALL": 12, "M_PAD": 16, "P": 64, "LOG_P": 6, "ROWS": 1,
                  "HAS_SMALL": True, "HAS_SIGNS": True, "QMAX": 448.0 if fp8 else 127.0, "FP8": fp8}
    signature = {"x_ptr": "*bf16", "small_ptr": "*fp32", "signs_ptr": "*fp32",
                 "codes_ptr": "*fp8e4nv" if fp8 else "*i8", "scales_ptr": "*fp32", "rot_scale": "fp32",
                 "M": "i32", "stride_xm": "i32", "stride_cm": "i32", "M_BUCKET": "i32",
                 **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=tqr._quantize_rotated_kernel.fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": 8, "enable_fp_fusion": False}
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    ops = set(re.findall(r"^\s*([a-z][\w.]*)", ptx, re.M))
    assert "div.rn.f32" in ops and not any(op.startswith(("div.full", "div.approx")) for op in ops), sorted(ops)
    assert not any(op.startswith("fma") for op in ops), sorted(ops)
    if fp8:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ops
