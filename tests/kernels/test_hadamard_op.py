"""Tests of ``qcompile::hadamard``: reference, CPU path, fake implementation (torch.export,
torch.compile), errors, and the Triton kernel (kernels/triton_hadamard.py).

The Triton kernel cases run under Triton's interpreter in a subprocess with TRITON_INTERPRET=1
from the start (:func:`test_kernel_cases_under_the_interpreter`; the reason is in
tests/kernels/test_triton_kernels.py), or in-process on a CUDA device. To see them one by one:

    TRITON_INTERPRET=1 pytest tests/kernels/test_hadamard_op.py

Bounds, with S = sum over the block of |x_i * s_i| / sqrt(b) (= (|x| @ |Q|) per output):

* against the float64 truth ``x @ Q``: the float32 computation rounds the sign products (u
  each), log2(P) butterfly levels and m - 1 matmul additions (each within u of the running
  sum's magnitude, bounded by S sqrt(b)), the scale constant and the scaling (u each): within
  ``(log2 P + m + 3) u S`` with u = 2**-24 (first order; the factor 1.01 covers the higher
  order), plus one rounding to x's dtype, ``u_out |truth|``;
* CPU path or kernel against the reference: both are within that bound of the truth, in
  different orders, so within twice it, plus a rounding to x's dtype on each side.
"""
from __future__ import annotations

import math
import re
import zlib

import pytest
import torch

from tests.kernels.interpreter import (
    DEVICE,
    kernel_case,
    needs_triton,
    not_interpreted,
    run_kernel_cases,
)

import qcompile.kernels  # noqa: F401  (registers the ops)
from qcompile.hadamard import apply_hadamard, random_signs, rotation_plan
from qcompile.kernels import hadamard as kh

HADAMARD = torch.ops.qcompile.hadamard
U32 = 2.0**-24
OUTPUT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LEADING = [(1,), (3,), (17,), (2, 3)]



def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _case(n, leading, dtype, with_signs, key, block=None):
    """x, small, signs, block for dimension n (the rotation plan's, or the given block)."""
    gen = _gen(n, leading, str(dtype), with_signs, key, block)
    plan = rotation_plan(n)
    small, plan_block = kh.hadamard_args(plan)
    if block is not None:
        small = None if block & (block - 1) == 0 else small
        plan_block = block
    x = (torch.randn(*leading, n, generator=gen) * 3).to(dtype)
    signs = random_signs(n, zlib.crc32(repr(key).encode()), torch.float32) if with_signs else None
    return x, small, signs, plan_block


def _truth_and_bound(x, small, signs, block):
    """float64 ``(x * signs) @ Q`` and the bound of a float32 computation's error from it."""
    from qcompile.hadamard import apply_block_hadamard

    x64 = x.double() * (1.0 if signs is None else signs.double())
    small64 = None if small is None else small.double()
    truth = apply_block_hadamard(x64, small64, block)
    m = 1 if small is None else small.shape[0]
    magnitude = x64.abs().reshape(*x.shape[:-1], x.shape[-1] // block, block).sum(-1, keepdim=True)
    magnitude = magnitude.expand(*x.shape[:-1], x.shape[-1] // block, block).reshape(x.shape) / math.sqrt(block)
    bound = 1.01 * ((block // m).bit_length() - 1 + m + 3) * U32 * magnitude
    return truth, bound


def _assert_close_to_truth(got, x, small, signs, block, context):
    truth, bound = _truth_and_bound(x, small, signs, block)
    assert got.dtype == x.dtype and got.shape == x.shape, context
    total = bound + OUTPUT_ROUNDOFF[x.dtype] * truth.abs()
    excess = ((got.double() - truth).abs() - total).max().item() if got.numel() else 0.0
    assert excess <= 0.0, (context, excess)


def _assert_close_to_reference(got, x, small, signs, block, context):
    want = kh.hadamard_reference(x, small, signs, block)
    _, bound = _truth_and_bound(x, small, signs, block)
    assert got.dtype == want.dtype and got.shape == want.shape, context
    u_out = OUTPUT_ROUNDOFF[x.dtype]
    total = 2 * bound * (1 + u_out) + u_out * (got.double().abs() + want.double().abs())
    excess = ((got.double() - want.double()).abs() - total).max().item() if got.numel() else 0.0
    assert excess <= 0.0, (context, excess)


# Dimensions: powers of two, 12 * 16, 20 * 8, 28 * 4, 1 (block 1), and plans that fall back to
# blocks (172: 43 blocks of 4; 6: 3 blocks of 2).
DIMS = [1, 2, 16, 128, 1024, 192, 160, 112, 172, 6]


# ---------------------------------------------------------------------------------------
# Reference and CPU path (main process).


@not_interpreted
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
def test_reference_and_cpu_path_close_to_float64(dtype):
    for i, n in enumerate(DIMS):
        leading = LEADING[i % len(LEADING)]
        x, small, signs, block = _case(n, leading, dtype, i % 2 == 0, "cpu")
        reference = kh.hadamard_reference(x, small, signs, block)
        _assert_close_to_truth(reference, x, small, signs, block, ("reference", n, leading))
        through_op = HADAMARD(x, small, signs, block)
        _assert_close_to_truth(through_op, x, small, signs, block, ("op", n, leading))
        _assert_close_to_reference(through_op, x, small, signs, block, ("op", n, leading))
        assert torch.equal(through_op, kh.hadamard_cpu(x, small, signs, block))


@not_interpreted
def test_op_with_a_plan_matches_apply_hadamard_and_other_blocks():
    plan = rotation_plan(768)
    x = torch.randn(5, 768, generator=_gen("plan"))
    signs = random_signs(768, 7)
    got = kh.apply_hadamard_op(x, plan, signs.float())
    _assert_close_to_truth(got, x, plan.small.float(), signs.float(), plan.block, "plan")
    assert torch.allclose(got.double(), apply_hadamard(x.double(), plan, signs), rtol=0, atol=1e-5)
    # Any block the schema allows: 3 blocks of 12 * 16, and 11008 = 344 * 32 (H_344).
    for n, block in ((576, 192), (11008, 11008)):
        x, small, signs, block = _case(n, (2,), torch.float32, True, "blocks", block if n == 576 else None)
        small = kh.hadamard_args(rotation_plan(192 if n == 576 else n))[0]
        _assert_close_to_truth(HADAMARD(x, small, signs, block), x, small, signs, block, n)
    with pytest.raises(ValueError, match="the plan rotates 768"):
        kh.apply_hadamard_op(torch.zeros(2, 767), plan)


@not_interpreted
def test_kronecker_factors():
    assert kh.kronecker_factors(1, 1) == []
    assert kh.kronecker_factors(1, 4096) == [64, 64]
    assert kh.kronecker_factors(12, 12 * 256) == [12, 64, 4]
    assert kh.kronecker_factors(344, 11008) == [344, 32]


@not_interpreted
def test_empty_and_one_dimensional_inputs():
    small, block = kh.hadamard_args(rotation_plan(12))
    assert HADAMARD(torch.zeros(0, 12), small, None, block).shape == (0, 12)
    x = torch.randn(12, generator=_gen("1d"))
    _assert_close_to_truth(HADAMARD(x, small, None, block), x, small, None, block, "1-d")
    # Block 1 without signs is the identity, returned as a new tensor (no aliasing).
    x = torch.randn(3, 5, generator=_gen("identity"))
    y = HADAMARD(x, None, None, 1)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


class _Rotated(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        small, block = kh.hadamard_args(rotation_plan(n))
        self.register_buffer("small", small)
        self.register_buffer("signs", random_signs(n, 0, torch.float32))
        self.block = block
        self.linear = torch.nn.Linear(n, 8)

    def forward(self, x):
        return self.linear(HADAMARD(torch.relu(x), self.small, self.signs, self.block))


@not_interpreted
def test_torch_export_keeps_the_op():
    module = _Rotated(96)
    x = torch.randn(3, 96, generator=_gen("export"))
    program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.qcompile.hadamard.default) == 1, targets
    other = torch.randn(5, 96, generator=_gen("export", 2))
    assert torch.equal(program.module()(other), module(other))


@not_interpreted
def test_torch_compile_fullgraph_matches_eager():
    module = _Rotated(80)
    x = torch.randn(4, 80, generator=_gen("compile"))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), module(x))


@not_interpreted
def test_clear_errors():
    x = torch.randn(3, 24)
    small = kh.hadamard_args(rotation_plan(12))[0]
    cases = [
        (TypeError, "x must be one of", (x.to(torch.int32), small, None, 24)),
        (ValueError, "0-d tensor", (torch.tensor(1.0), None, None, 1)),
        (ValueError, "multiple of block = 16", (x, None, None, 16)),
        (ValueError, r"block / m = 2\.5 is not a power of two", (torch.randn(3, 30), small, None, 30)),
        (ValueError, "small must be a square", (x, small[:, :6], None, 24)),
        (TypeError, "small must hold real", (x, small.bool(), None, 24)),
        (ValueError, r"signs must have shape \[n\] = \[24\]", (x, small, torch.ones(12), 24)),
        (TypeError, "signs must be floating point", (x, small, torch.ones(24, dtype=torch.int8), 24)),
        (ValueError, "signs is on meta", (x, small, torch.ones(24, device="meta"), 24)),
        (ValueError, "block must be a positive int", (x, small, None, 0)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            HADAMARD(*args)
        with pytest.raises(error, match=message):
            kh.hadamard_reference(*args)
        with pytest.raises(error, match="qcompile::hadamard"):
            kh.check_hadamard_inputs(*args)


# ---------------------------------------------------------------------------------------
# Triton: the interpreter cases in a subprocess, registration and compiled PTX (main process).


@needs_triton
@not_interpreted
def test_kernel_cases_under_the_interpreter():
    run_kernel_cases(__file__, 4)


@needs_triton
@not_interpreted
def test_cuda_implementation_registered_and_switch(monkeypatch):
    from qcompile.kernels import _triton_common as common

    assert torch._C._dispatch_has_kernel_for_dispatch_key("qcompile::hadamard", "CUDA")
    cuda_impl = common.CUDA_IMPLEMENTATIONS["qcompile::hadamard"]
    x, small, signs, block = _case(192, (3,), torch.float32, True, "switch")
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "1")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        cuda_impl(x, small, signs, block)  # the Triton wrapper refuses CPU tensors when compiled
    monkeypatch.setenv(common.TRITON_SWITCH_ENV, "0")
    assert torch.equal(cuda_impl(x, small, signs, block), kh.hadamard_reference(x, small, signs, block))


@needs_triton
@not_interpreted
def test_kernel_compiles_for_sm90():
    # H_12 (x) H_32 on bfloat16 for an H100 target (no GPU needed): the small-matrix loop, the
    # butterflies (reshape / permute / split / join) and the bfloat16 rounding all lower.
    import triton
    import triton.language as tl
    from triton.backends import backends as triton_backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qcompile.kernels import triton_hadamard as th

    if "nvidia" not in triton_backends:
        pytest.skip("triton has no NVIDIA backend here")
    m, p = 12, 32
    constexprs = {"M_SMALL": m, "M_PAD": 16, "P": p, "LOG_P": 5, "ROWS": th.rows_per_program(64, 16 * p),
                  "HAS_SMALL": True, "HAS_SIGNS": True, "OUT_DTYPE": tl.bfloat16}
    signature = {"x_ptr": "*bf16", "small_ptr": "*fp32", "signs_ptr": "*fp32", "y_ptr": "*bf16",
                 "scale": "fp32", "M": "i32", "stride_xm": "i32", "stride_ym": "i32", "M_BUCKET": "i32",
                 **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=th._hadamard_kernel.fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": 8, "enable_fp_fusion": True}
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    instructions = set(re.findall(r"^\s*([a-z][\w.]*)", ptx, re.M))
    assert {"sub.f32", "add.f32"} & instructions or {"sub.rn.f32", "add.rn.f32"} & instructions, sorted(instructions)


@needs_triton
def test_wrapper_errors_and_pruning():
    from qcompile.kernels import triton_hadamard as th

    with pytest.raises(TypeError, match="qcompile::hadamard: x must be one of"):
        th.triton_hadamard(torch.zeros(2, 16, dtype=torch.int32), None, None, 16)
    with pytest.raises(ValueError, match="signs is on meta but x is on cpu"):
        th.triton_hadamard(torch.zeros(2, 16), None, torch.ones(16, device="meta"), 16)
    warps = lambda tile: sorted(  # noqa: E731
        c.num_warps for c in th.prune_hadamard_configs(th.GPU_CONFIGS, {"ROWS": 1, "M_PAD": 1, "P": tile}))
    assert warps(8) == [1] and warps(128) == [1, 2, 4] and warps(32768) == [16]
    assert th.kernel_applies(2**15, 1, 2**15) and not th.kernel_applies(2**16, 1, 2**16)
    assert [th.rows_per_program(17, tile) for tile in (192, 16, 8192)] == [16, 32, 1]
    assert th.rows_per_program(3, 16) == 4


# ---------------------------------------------------------------------------------------
# Kernel cases (interpreter, or CUDA).


@kernel_case
def test_kernel_close_to_reference():
    from qcompile.kernels import triton_hadamard as th

    # Every dimension with M = 17 and with one of M = 1, 3, [2, 3]; the dtypes in turn.
    for i, n in enumerate(DIMS):
        for j, leading in enumerate(((17,), [(1,), (3,), (2, 3)][i % 3])):
            dtype = X_DTYPES[(i + j) % 3]
            x, small, signs, block = _case(n, leading, dtype, (i + j) % 2 == 0, "kernel")
            x, small, signs = (None if t is None else t.to(DEVICE) for t in (x, small, signs))
            got = th.triton_hadamard(x, small, signs, block)
            _assert_close_to_reference(got.cpu(), x.cpu(), None if small is None else small.cpu(),
                                       None if signs is None else signs.cpu(), block, (n, leading, str(dtype)))


@kernel_case
def test_kernel_other_blocks_large_m_and_strided_rows():
    from qcompile.kernels import triton_hadamard as th

    # 3 blocks of 12 * 16; 304 = H_76 (x) H_4 (Paley II, q = 37); a strided (sliced) x.
    for n, block_plan, leading in ((576, 192, (3,)), (304, 304, (2,))):
        x, _, signs, block = _case(n, leading, torch.float32, True, "other", block_plan if n == 576 else None)
        small = kh.hadamard_args(rotation_plan(block))[0]
        x, small, signs = x.to(DEVICE), small.to(DEVICE), signs.to(DEVICE)
        got = th.triton_hadamard(x, small, signs, block)
        _assert_close_to_reference(got.cpu(), x.cpu(), small.cpu(), signs.cpu(), block, n)
    wide = torch.randn(5, 64, generator=_gen("strided")).to(DEVICE)
    x = wide[:, 16:48]
    got = th.triton_hadamard(x, None, None, 32)
    _assert_close_to_reference(got.cpu(), x.cpu(), None, None, 32, "strided")


@kernel_case
def test_kernel_empty_and_reference_fallback(monkeypatch):
    from qcompile.kernels import triton_hadamard as th

    assert th.triton_hadamard(torch.zeros(0, 16, device=DEVICE), None, None, 16).shape == (0, 16)
    # A block beyond the register tile takes the reference (bit-identical to it).
    monkeypatch.setattr(th, "MAX_TILE", 64)
    x = torch.randn(3, 128, generator=_gen("fallback")).to(DEVICE)
    assert torch.equal(th.triton_hadamard(x, None, None, 128), kh.hadamard_reference(x, None, None, 128))


def test_float64_inputs_are_computed_in_float64():
    """The pass manager's equivalence check runs rotated graphs in float64: the op then
    computes in float64 (matches the explicit product to ~1e-15, far below float32's 1e-7)."""
    from qcompile.hadamard import random_hadamard, random_signs, rotation_plan
    from qcompile.kernels.hadamard import apply_hadamard_op

    plan = rotation_plan(384)
    x = torch.randn(5, 384, dtype=torch.float64)
    got = apply_hadamard_op(x, plan, random_signs(384, seed=4))
    want = x @ random_hadamard(384, seed=4, plan=plan)
    assert got.dtype == torch.float64
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-13
