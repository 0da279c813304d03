"""Triton implementation of ``qcompile::quantize_per_token`` (CUDA, or CPU under TRITON_INTERPRET=1).

One program per row of ``x [M, K]``: load the row (upcast to float32), divide it by the
smoothing vector, take its absmax, ``scale = absmax / qmax`` with the tiny-scale guard
(scale 1.0 below the smallest normal float32), ``codes = x / scale`` rounded half to even and
clamped (int8 / int4-range int8), or clamped and converted to float8 e4m3fn (round to nearest
even, as torch's cast). When the row fits in one block of :data:`MAX_SINGLE_PASS_BLOCK`
elements it is read from memory once and kept in registers; longer rows are read twice
(absmax, then codes), the second read mostly from L2. A static mode takes the scale from
memory instead (``linear_w8a8`` with ``act_scale``).

Bit-identical to :func:`qcompile.act_quant.quantize_activation_per_token` (and
``quantize_activation_static``): the same float32 operations in the same order, each
correctly rounded. Two details make that hold on GPUs:

* divisions use ``tl.div_rn``: Triton lowers a plain float32 ``/`` to the approximate
  ``div.full.f32`` on NVIDIA GPUs (up to 2 ulp off), ``tl.div_rn`` to ``div.rn.f32``;
* rounding half to even uses the float32 identity ``(v + 1.5 * 2**23) - 1.5 * 2**23``
  (:func:`round_half_even`), exact for ``|v| < 2**22``. libdevice's ``rint`` (``cvt.rni``
  on GPU) is the natural choice, but Triton's interpreter cannot run libdevice functions
  (``extern_elementwise`` is not implemented there), so the kernels the CPU tests run would
  not be the kernels the GPU runs. The identity is plain IEEE float32 arithmetic: the same
  code on both, with the launch option ``enable_fp_fusion=False`` so nothing is contracted,
  and LLVM never reassociates floating-point additions without fast-math flags (the PTX
  holds ``add.rn.f32`` / ``sub.rn.f32``; checked by the tests). For ``|v| >= 2**22`` the
  result still has the sign of v and magnitude >= 2**21, so the clamp to qmax that follows
  gives the same code as exact rounding would.

fp8 codes are rounded the same way, in float32 with the step of each value's e4m3 binade
(:func:`round_to_e4m3`), and then converted exactly. The float rounding helpers here
(:func:`round_half_even`, :func:`round_to_e4m3`, :func:`round_to_bfloat16`,
:func:`cast_output`) are shared with the linear kernels.

Non-finite inputs are not checked (as in the reference): a row holding NaN or Inf gets
meaningless codes, which may differ from the reference's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qcompile.act_quant import act_qmax, codes_dtype, usable_scale
from qcompile.kernels._triton_common import (
    check_kernel_device,
    interpreter_active,
    keep_or_smallest,
    m_bucket,
)
from qcompile.kernels.quantize_per_token import OP_NAME, check_quantize_per_token_inputs

__all__ = [
    "triton_quantize_per_token",
    "quantize_rows",
    "static_scale_of",
    "round_half_even",
    "round_to_e4m3",
    "round_to_bfloat16",
    "cast_output",
    "guarded_scale",
    "quantize_codes",
    "prune_quantize_configs",
    "MAX_SINGLE_PASS_BLOCK",
    "LOOP_BLOCK",
    "INTERPRETED",
    "GPU_CONFIGS",
    "INTERPRETER_CONFIGS",
]

INTERPRETED = interpreter_active()
# Rows up to this many elements are held in registers and read once (16384 float32 values
# over 8-16 warps is 32-64 registers per thread); longer rows are processed in LOOP_BLOCK chunks.
MAX_SINGLE_PASS_BLOCK = 16384
LOOP_BLOCK = 4096
_ROUNDING_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
_MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny, 2**-126

# Only num_warps is tuned (the block is the row, or LOOP_BLOCK); the interpreter ignores it.
GPU_CONFIGS = [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]
INTERPRETER_CONFIGS = [triton.Config({}, num_warps=4)]


def prune_quantize_configs(configs, named_args, **kwargs):
    """Keep the warp counts that suit the block: at least one element per thread and at
    most 64 (more would spill registers)."""
    block = {**named_args, **kwargs}["BLOCK_K"]
    kept = [c for c in configs if c.num_warps * 32 <= max(block, 32) and block <= c.num_warps * 32 * 64]
    return keep_or_smallest(configs, kept, lambda c: c.num_warps)


@triton.jit
def round_half_even(v):
    """Round float32 ``v`` to the nearest integer, ties to even, for ``|v| < 2**22`` (see the
    module docstring); larger values keep their sign and stay beyond 2**21 in magnitude."""
    return (v + _ROUNDING_MAGIC) - _ROUNDING_MAGIC


@triton.jit
def round_to_e4m3(v):
    """Round float32 ``v`` (``|v| <= 448``) to the nearest float8 e4m3fn value, ties to even,
    as a float32: the same identity as :func:`round_half_even` with the step of v's binade
    (2**(e - 3) for ``|v|`` in [2**e, 2**(e + 1)), and 2**-9 among the subnormals, below 2**-6).
    A result of zero takes v's sign, as the cast gives -0 for small negative values."""
    biased_exponent = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # 1.5 * 2**(step exponent + 23): biased exponent max(e, -6) + 127 - 3 + 23 = max(., 121) + 20.
    magic = ((tl.maximum(biased_exponent, 121) + 20) << 23 | 0x400000).to(tl.float32, bitcast=True)
    r = (v + magic) - magic
    return tl.where(r == 0.0, v * 0.0, r)


@triton.jit
def round_to_bfloat16(y):
    """float32 ``y`` -> bfloat16 rounded to nearest even, bit for bit as torch's cast (NaN
    becomes 0x7FC0), by integer operations on the bits. Triton's interpreter (3.9) truncates
    float32 to bfloat16 instead of rounding, so the native cast would not be testable on CPU."""
    bits = y.to(tl.int32, bitcast=True)
    upper = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).to(tl.int16)
    return tl.where(y != y, 0x7FC0, upper).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_output(y, OUT_DTYPE: tl.constexpr):
    """float32 ``y`` in ``OUT_DTYPE`` (float32, bfloat16 or float16), rounded to nearest even."""
    if OUT_DTYPE == tl.bfloat16:
        out = round_to_bfloat16(y)
    else:
        out = y.to(OUT_DTYPE)
    return out


@triton.jit
def guarded_scale(absmax, QMAX: tl.constexpr):
    """``absmax / qmax`` (correctly rounded), 1.0 where that is below the smallest normal
    float32: :func:`qcompile.act_quant.usable_scale`'s guard."""
    scale = tl.div_rn(absmax, QMAX)
    return tl.where(scale < _MIN_NORMAL, 1.0, scale)


@triton.jit
def quantize_codes(xs, scale, QMAX: tl.constexpr, FP8: tl.constexpr):
    """float32 ``xs / scale`` rounded to the codes: int8 (half to even, clamped to qmax) or
    float8 e4m3fn; bit for bit as :func:`qcompile.act_quant.quantize_activation_per_token`."""
    v = tl.div_rn(xs, scale)
    if FP8:
        # Rounded in float32 first, so the conversion is exact: Triton's interpreter (3.9)
        # converts float32 to e4m3 wrongly (no carry into the exponent, ties away from zero).
        codes = round_to_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX)).to(tl.float8e4nv)
    else:
        codes = tl.minimum(tl.maximum(round_half_even(v), -QMAX), QMAX).to(tl.int8)
    return codes


@triton.jit
def _load_smoothed(x_row, smooth_ptr, offs, mask, HAS_SMOOTH: tl.constexpr):
    xs = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        xs = tl.div_rn(xs, tl.load(smooth_ptr + offs, mask=mask, other=1.0))
    return xs


@triton.autotune(configs=INTERPRETER_CONFIGS if INTERPRETED else GPU_CONFIGS, key=["K", "M_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_quantize_configs})
@triton.jit
def _quantize_rows_kernel(
    x_ptr, smooth_ptr, static_scale_ptr, codes_ptr, scales_ptr,
    K, stride_xm, stride_cm, M_BUCKET,
    QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, FP8: tl.constexpr,
    BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    c_row = codes_ptr + row * stride_cm
    offs = tl.arange(0, BLOCK_K)
    if SINGLE_PASS:
        mask = offs < K
        xs = _load_smoothed(x_row, smooth_ptr, offs, mask, HAS_SMOOTH)
        if STATIC:
            scale = tl.load(static_scale_ptr)
        else:
            scale = guarded_scale(tl.max(tl.abs(xs), axis=0), QMAX)
            tl.store(scales_ptr + row, scale)
        tl.store(c_row + offs, quantize_codes(xs, scale, QMAX, FP8), mask=mask)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr)
        else:
            absmax = tl.zeros((BLOCK_K,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = k0 + offs < K
                xs = _load_smoothed(x_row, smooth_ptr, k0 + offs, mask, HAS_SMOOTH)
                absmax = tl.maximum(absmax, tl.abs(xs))
            scale = guarded_scale(tl.max(absmax, axis=0), QMAX)
            tl.store(scales_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            xs = _load_smoothed(x_row, smooth_ptr, k0 + offs, mask, HAS_SMOOTH)
            tl.store(c_row + k0 + offs, quantize_codes(xs, scale, QMAX, FP8), mask=mask)


def quantize_rows(
    x2: torch.Tensor,
    smooth: Optional[torch.Tensor],
    bits: int,
    format: str,
    static_scale: Optional[torch.Tensor] = None,
    max_single_pass_block: int = MAX_SINGLE_PASS_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[M, K]`` and scales of the rows ``x2 [M, K]`` (inputs already validated).

    Dynamic (``static_scale is None``): scales float32 ``[M, 1]``. Static: ``static_scale``
    is the guarded float32 scale of shape ``[1, 1]`` (:func:`qcompile.act_quant.usable_scale`),
    returned as is. ``max_single_pass_block`` exists for tests of the two-pass path.
    """
    m, k = x2.shape
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    codes = torch.empty((m, k), dtype=codes_dtype(format), device=x2.device)
    scales = static_scale if static_scale is not None else torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    if m == 0:
        return codes, scales
    smooth32 = None if smooth is None else smooth.to(torch.float32).contiguous()
    single_pass = triton.next_power_of_2(k) <= max_single_pass_block
    block = triton.next_power_of_2(k) if single_pass else min(LOOP_BLOCK, max_single_pass_block)
    _quantize_rows_kernel[(m,)](
        x2, smooth32 if smooth32 is not None else x2, scales, codes, scales,
        k, x2.stride(0), codes.stride(0), m_bucket(m),
        QMAX=act_qmax(bits, format), HAS_SMOOTH=smooth32 is not None, STATIC=static_scale is not None,
        FP8=format == "fp8", BLOCK_K=block, SINGLE_PASS=single_pass, enable_fp_fusion=False,
    )
    return codes, scales


def triton_quantize_per_token(
    x: torch.Tensor, smooth: Optional[torch.Tensor], bits: int, format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on CUDA tensors (CPU tensors under TRITON_INTERPRET=1): ``(codes [..., K],
    scales [..., 1] float32)``, bit-identical to :func:`quantize_per_token_reference`.

    Raises TypeError / ValueError for wrong dtypes, shapes, formats or devices, naming the op.
    """
    check_quantize_per_token_inputs(x, smooth, bits, format)
    check_kernel_device(OP_NAME, INTERPRETED, x=x, smooth=smooth)
    codes, scales = quantize_rows(x.reshape(-1, x.shape[-1]), smooth, bits, format)
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], 1)


def static_scale_of(act_scale: torch.Tensor) -> torch.Tensor:
    """The guarded float32 ``[1, 1]`` scale the static mode of :func:`quantize_rows` takes."""
    return usable_scale(act_scale.to(torch.float32).reshape(1, 1)).contiguous()
