"""``qcompile::linear_w8a8`` and ``qcompile::linear_fp8``: linears with 8-bit weights AND
8-bit activations, the activations quantized inside the op.

    linear_w8a8(Tensor x, Tensor qweight, Tensor wscales, Tensor? bias, Tensor? smooth,
                Tensor? act_scale) -> Tensor
    linear_fp8(Tensor x, Tensor qweight, Tensor wscales, Tensor? bias, Tensor? smooth) -> Tensor

Both compute ``F.linear(x, W, bias)`` for ``x [..., K]`` (float32, bfloat16 or float16)
into ``[..., N]`` in x's dtype, with ``W = qweight * wscales[:, None]`` quantized
symmetrically per output channel (``wscales`` float32 ``[N]``; see
:func:`qcompile.act_quant.quantize_weight_per_channel_int8` and
:func:`qcompile.act_quant.quantize_weight_fp8`), and x first divided by the optional
smoothing vector ``smooth [K]`` (online smoothing: the weight was multiplied by it) and
quantized:

``linear_w8a8`` (``qweight`` int8 ``[N, K]``, codes in [-127, 127]):

* dynamic (``act_scale is None``): per token, int8 codes in [-127, 127] with
  ``xscale = absmax / 127`` (``qcompile::quantize_per_token`` with bits 8, format "int");
* static (``act_scale`` float32, 0-d or ``[1]``, from calibration): one scale for every
  token, ``codes = clamp(round(x / act_scale), -127, 127)``;
* ``acc = codes @ qweight.T`` accumulated exactly in integers (int32);
* epilogue in float32: ``out = acc * xscale[:, None] * wscales[None, :] + bias``, in that
  order (:func:`w8a8_epilogue`), then cast to x's dtype.

``linear_fp8`` (``qweight`` float8_e4m3fn ``[N, K]``): per-token e4m3fn activation codes
with ``xscale = absmax / 448``, then ``out = (codes * xscale) @ (qweight * wscales).T +
bias``.

Implementations:

* references (:func:`linear_w8a8_reference`, :func:`linear_fp8_reference`), pure torch.
  The int8 reference accumulates in float64, exact for any realistic K (every partial sum
  is an integer below 2**53), and returns the same float32 epilogue; the fp8 reference
  dequantizes activations and weights and multiplies in float32.
* CPU fast path of ``linear_w8a8`` (:func:`linear_w8a8_cpu`): the activation codes from
  the in-place quantization of ``qcompile::quantize_per_token``'s CPU path, then
  ``torch._int_mm`` (int8 x int8 -> int32; see Dispatch below) against a cached contiguous
  ``[K, N]`` copy of the weight (the transposed view is ~1.8x slower at M = 32,
  K = N = 4096; the copy costs K * N bytes per weight and lives as long as the weight, in
  a :class:`qcompile.kernels._common.KernelLayoutCache`), then the float32 epilogue. It is
  bit-identical to the reference: int32 accumulation is exact, and the quantization and
  epilogue do the same float32 operations in the same order.
  Where it applies (:func:`int_mm_supported`): on CPU ``torch._int_mm`` is exact for every
  shape with K >= 2 (checked against int64 matmuls on random shapes, M = 0 to 257, odd K
  and N, on torch 2.13 and 2.11), but with K = 1 and N > 1 it returns garbage
  (uninitialized memory, on both versions), so K = 1 takes the reference accumulation; on
  CUDA it needs M > 16 and K, N multiples of 8 (cuBLASLt) and the weight as the
  column-major view ``qweight.t()`` (a contiguous ``[K, N]`` copy failed with
  CUBLAS_STATUS_NOT_SUPPORTED at M = 17, K = 64, N = 48; torch 2.11, H100); other CUDA calls take the reference
  accumulation. K is limited to :data:`INT_MM_MAX_K` so that int32 cannot overflow.
  Dispatch on CPU: the faster of ``torch._int_mm`` and :func:`int8_matmul_float32`
  (float32 GEMMs over blocks of K small enough that every partial sum is an exact
  integer, summed in int32: the same integers), timed once per process
  (:func:`cpu_int8_gemm`). Where the CPU has AVX-512 VNNI or AMX, ``torch._int_mm`` wins:
  measured on such a machine (1 thread, minimum of repeated runs; the whole op with
  quantization and epilogue against fp32 ``F.linear`` with bias; two runs): M = 32,
  K = N = 384: 0.13 ms vs 0.11-0.12 ms (0.86-0.93x: fixed per-call overhead); M = 4096,
  K = N = 384: 4.7-6.2 ms vs 16.8-17.8 ms (2.9-3.5x); M = 32, K = N = 4096: 5.2-5.4 ms vs
  18.0-21.7 ms (3.4-4.1x); M = 4096, K = N = 4096: 432-637 ms vs 1483-2288 ms (3.4-3.6x).
  On AVX2 without VNNI ``torch._int_mm`` takes tens of times as long as a float32 GEMM
  (FINDINGS.md), and the float32 blocks win. Tiny layers lose to the per-call overhead, but
  falling back to a float linear there would drop the activation quantization, i.e.
  change the op's meaning, so they stay on this path.
* CPU path of ``linear_fp8``: the reference. ``torch._scaled_mm`` runs on CPU, but it is
  not faster: :func:`linear_fp8_cpu` (``torch._scaled_mm`` of the e4m3fn codes with unit
  per-tensor scales and float32 output, then this module's float32 epilogue applies the
  per-token and per-channel scales) measured 5-20% slower than the reference at every
  shape above on torch 2.13, and about 190x slower on torch 2.11 (147 ms against 0.78 ms
  at M = 32, K = N = 384, on the GPU machine's CPU), so the op does not use it; the
  function stays callable to compare. Unit per-tensor scales because torch 2.11 on CPU
  rejects row-wise scales ("Now _scaled_mm only supports per-tensor scaling for CPU
  backend"; torch 2.13 accepts them). The reference itself is slow on CPU (0.13x-0.87x
  of fp32 ``F.linear``): converting e4m3fn weights to float32 on every call costs more
  than the GEMM. fp8 is for GPUs; on CPU the op serves accuracy evaluation.
* CUDA path of ``linear_w8a8``, when triton is installed: the Triton kernels of
  :mod:`qcompile.kernels.triton_linear_w8a8` (per-token or static quantization, then an
  int8 ``tl.dot`` GEMM with int32 accumulation and this epilogue fused; bit-identical to the
  reference), registered by :mod:`qcompile.kernels._triton_common`; ``QCOMPILE_TRITON=0``,
  or K > :data:`INT_MM_MAX_K`, sends CUDA calls to the reference. ``linear_fp8`` has no
  Triton kernel yet.
* fake implementations, so torch.export and torch.compile can trace the ops.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F

from qcompile.act_quant import (
    FP8_DTYPE,
    dequantize_activation,
    quantize_activation_per_token,
    quantize_activation_static,
    usable_scale,
)
from qcompile.kernels._common import KernelLayoutCache, all_on_cpu
from qcompile.kernels.quantize_per_token import (
    check_activation_and_smooth,
    check_same_device,
    quantize_rows_fast,
    quantize_static_fast,
)

__all__ = [
    "linear_w8a8",
    "linear_w8a8_reference",
    "linear_w8a8_cpu",
    "linear_fp8",
    "linear_fp8_reference",
    "linear_fp8_cpu",
    "check_w8a8_inputs",
    "int8_matmul_reference",
    "int8_matmul",
    "int8_matmul_float32",
    "cpu_int8_gemm",
    "FLOAT32_EXACT_K",
    "int_mm_applies",
    "int_mm_supported",
    "w8a8_epilogue",
    "quantize_activation_rows",
    "INT_MM_MAX_K",
    "INT_MM_CPU_MIN_K",
    "INT_MM_CUDA_MIN_ROWS",
    "INT_MM_CUDA_MULTIPLE",
    "W8A8_SCHEMA",
    "FP8_LINEAR_SCHEMA",
]

OP_NAME = "qcompile::linear_w8a8"
FP8_OP_NAME = "qcompile::linear_fp8"
W8A8_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor wscales, Tensor? bias, Tensor? smooth, Tensor? act_scale) -> Tensor"
)
FP8_LINEAR_SCHEMA = "(Tensor x, Tensor qweight, Tensor wscales, Tensor? bias, Tensor? smooth) -> Tensor"

# |code| <= 128 for any int8 (127 for our symmetric codes), so |acc| <= 2**14 * K, which
# fits int32 (2**31 - 1) for K <= 131071; beyond it the reference's exact accumulation is used.
INT_MM_MAX_K = (2**31 - 1) // 2**14
# torch._int_mm on CUDA (cuBLASLt): "self.size(0) needs to be greater than 16" and K, N "a
# multiple of 8". On CPU every shape is exact (M = 0 and odd K / N included) except K = 1
# with N > 1, which returns uninitialized memory (torch 2.13 and 2.11), so the CPU path
# needs K >= 2.
INT_MM_CPU_MIN_K = 2
INT_MM_CUDA_MIN_ROWS = 17
INT_MM_CUDA_MULTIPLE = 8


def check_w8a8_inputs(
    op: str,
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor] = None,
    weight_dtype: torch.dtype = torch.int8,
) -> int:
    """Validate the inputs of ``linear_w8a8`` (int8 weight) or ``linear_fp8`` (e4m3fn weight).

    Only shapes and dtypes (never values), so it also runs on fake tensors. Returns N;
    raises TypeError for a wrong dtype and ValueError for a wrong shape, naming ``op`` and
    the shapes involved.
    """
    k = check_activation_and_smooth(op, x, smooth)
    check_same_device(op, x, qweight=qweight, wscales=wscales, bias=bias, act_scale=act_scale)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != weight_dtype:
        got = qweight.dtype if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{op}: qweight must be {weight_dtype}, got {got}")
    if qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(
            f"{op}: qweight must have shape [N, K] = [N, {k}] for x of shape {tuple(x.shape)}, "
            f"got {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    if wscales.dtype != torch.float32:
        raise TypeError(f"{op}: wscales must be float32, got {wscales.dtype}")
    if tuple(wscales.shape) != (n,):
        raise ValueError(
            f"{op}: wscales must have shape [N] = [{n}] for qweight of shape {tuple(qweight.shape)}, "
            f"got {tuple(wscales.shape)}"
        )
    if bias is not None:
        if not bias.is_floating_point() or bias.dtype == FP8_DTYPE:
            raise TypeError(f"{op}: bias must be float32, bfloat16, float16 or float64, got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    if act_scale is not None:
        if act_scale.dtype != torch.float32:
            raise TypeError(f"{op}: act_scale must be float32, got {act_scale.dtype}")
        if act_scale.dim() > 1 or act_scale.numel() != 1:
            raise ValueError(
                f"{op}: act_scale must be a per-tensor scale of shape [] or [1], got {tuple(act_scale.shape)}"
            )
    return n


def quantize_activation_rows(
    x2: torch.Tensor, smooth: Optional[torch.Tensor], act_scale: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[M, K]`` of the rows ``x2 [M, K]`` and their scales (``[M, 1]`` dynamic,
    ``[1, 1]`` static), by the in-place CPU routine on CPU and the reference elsewhere;
    both give the same bits."""
    on_cpu = all_on_cpu(x2, smooth, act_scale)
    if act_scale is None:
        if on_cpu:
            return quantize_rows_fast(x2, smooth, 8, "int")
        return quantize_activation_per_token(x2, smooth, 8, "int")
    if on_cpu:
        scale = usable_scale(act_scale.to(torch.float32).reshape(1, 1))
        return quantize_static_fast(x2, smooth, scale), scale
    return quantize_activation_static(x2, act_scale, smooth, 8)


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [N, K].T`` of int8 tensors, exact, as int64 ``[M, N]``.

    Computed in float64, which is exact: the products are integers of at most 2**14 and
    every partial sum is an integer below 2**53 (for K < 2**39).
    """
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int64)


def int_mm_supported(device_type: str, m: int, k: int, n: int) -> bool:
    """Whether ``torch._int_mm`` computes an ``[M, K] @ [K, N]`` int8 product exactly on
    ``device_type``: K at most :data:`INT_MM_MAX_K` (no int32 overflow) and either CPU with
    K >= 2 or CUDA with M > 16 and K, N multiples of 8. Other devices: no."""
    if k > INT_MM_MAX_K:
        return False
    if device_type == "cpu":
        return k >= INT_MM_CPU_MIN_K
    if device_type == "cuda":
        return m >= INT_MM_CUDA_MIN_ROWS and k % INT_MM_CUDA_MULTIPLE == 0 and n % INT_MM_CUDA_MULTIPLE == 0
    return False


def int_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """:func:`int_mm_supported` for ``a [M, K] @ b [N, K].T`` on the tensors' (common) device."""
    if a.device != b.device:
        return False
    return int_mm_supported(a.device.type, a.shape[0], a.shape[1], b.shape[0])


# float32 holds every integer up to 2**24 exactly and an int8 product is at most 2**14 in
# magnitude, so a float32 GEMM over at most 2**10 of them is exact in any summation order
# (fused multiply-adds included).
FLOAT32_EXACT_K = 2**10


def int8_matmul_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [N, K].T`` exactly, as int32: float32 GEMMs over blocks of at most
    :data:`FLOAT32_EXACT_K` of K (each exact, see there), summed in int32 (exact for
    K <= :data:`INT_MM_MAX_K`). The same integers as ``torch._int_mm``; the way to get them
    fast on CPUs whose int8 GEMM is slow (AVX2 without VNNI: ``torch._int_mm`` runs tens of
    times slower than a float32 GEMM there)."""
    m, k = a.shape
    acc = torch.zeros(m, b.shape[0], dtype=torch.int32, device=a.device)
    for k0 in range(0, k, FLOAT32_EXACT_K):
        block = torch.mm(a[:, k0:k0 + FLOAT32_EXACT_K].float(), b[:, k0:k0 + FLOAT32_EXACT_K].float().t())
        acc.add_(block.to(torch.int32))
    return acc


_INT8_GEMMS = ("int_mm", "float32")


@functools.lru_cache(maxsize=1)
def cpu_int8_gemm() -> str:
    """Which exact int8 GEMM the CPU path uses: ``"int_mm"`` (``torch._int_mm``) or
    ``"float32"`` (:func:`int8_matmul_float32`), whichever is faster on this CPU, timed
    once per process on a ``[64, 512] @ [512, 512]`` product (fastest of 3 runs each, after
    a warm-up). Both give the same integers, so the choice changes speed only. The
    environment variable ``QCOMPILE_CPU_INT8_GEMM`` (``int_mm`` or ``float32``) fixes it."""
    forced = os.environ.get("QCOMPILE_CPU_INT8_GEMM")
    if forced:
        if forced not in _INT8_GEMMS:
            raise ValueError(f"QCOMPILE_CPU_INT8_GEMM must be one of {_INT8_GEMMS}, got {forced!r}")
        return forced
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 512), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=gen)
    b_t = b.t().contiguous()

    def fastest(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    int_mm = fastest(lambda: torch._int_mm(a, b_t))
    float32 = fastest(lambda: int8_matmul_float32(a, b))
    return "int_mm" if int_mm <= float32 else "float32"


def _transposed_weight(qweight, wscales, zeros, group_size) -> torch.Tensor:
    return qweight.t().contiguous()


# torch._int_mm reads its second operand as [K, N]; a contiguous copy is ~1.8x faster than
# the transposed view at few rows (M = 32, K = N = 4096, 1 thread: 4.4 ms against 8.2 ms).
_WEIGHT_T_CACHE = KernelLayoutCache(_transposed_weight)


def int8_matmul(a: torch.Tensor, b: torch.Tensor, wscales: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [N, K].T`` exactly: on CPU int32 from the faster of ``torch._int_mm``
    and :func:`int8_matmul_float32` (:func:`cpu_int8_gemm`); on CUDA int32 from
    ``torch._int_mm`` where :func:`int_mm_applies`; else int64 from
    :func:`int8_matmul_reference`. ``wscales`` is only part of the cache key of ``b``'s
    transposed copy (the copy is rebuilt if ``b`` changes in place)."""
    if all_on_cpu(a, b) and a.shape[1] <= INT_MM_MAX_K and cpu_int8_gemm() == "float32":
        return int8_matmul_float32(a, b)
    if not int_mm_applies(a, b):
        return int8_matmul_reference(a, b)
    # CUDA's cuBLASLt wants the column-major view; CPU is faster with the contiguous copy.
    b_t = _WEIGHT_T_CACHE.get(b, wscales, None, b.shape[1]) if all_on_cpu(b) else b.t()
    return torch._int_mm(a.contiguous(), b_t)


def w8a8_epilogue(
    acc: torch.Tensor,
    xscales: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``acc [M, N] * xscales [M, 1] (or [1, 1]) * wscales [N] + bias`` in float32, as ``out_dtype``.

    ``acc`` may be int32 or int64 (or float64 holding integers): each is converted to the
    nearest float32, so equal integer accumulators give equal outputs.
    """
    # One new buffer, then in place (out of place the epilogue costs 2x more at 4096 x 384).
    y = acc.to(torch.float32, copy=True)
    y.mul_(xscales.to(torch.float32)).mul_(wscales.to(torch.float32))
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(out_dtype)


def linear_w8a8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """The op's meaning in pure torch: quantize x (per token or static), exact integer
    accumulation (float64), float32 epilogue."""
    n = check_w8a8_inputs(OP_NAME, x, qweight, wscales, bias, smooth, act_scale)
    x2 = x.reshape(-1, x.shape[-1])
    if act_scale is None:
        codes, xscales = quantize_activation_per_token(x2, smooth, 8, "int")
    else:
        codes, xscales = quantize_activation_static(x2, act_scale, smooth, 8)
    y = w8a8_epilogue(int8_matmul_reference(codes, qweight), xscales, wscales, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def linear_w8a8_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """The CPU fast path called directly; raises ValueError where ``torch._int_mm`` does not apply."""
    n = check_w8a8_inputs(OP_NAME, x, qweight, wscales, bias, smooth, act_scale)
    k = x.shape[-1]
    if not all_on_cpu(x, qweight, wscales, bias, smooth, act_scale) or not int_mm_supported("cpu", 0, k, n):
        raise ValueError(
            f"{OP_NAME}: the CPU int_mm path needs CPU tensors and {INT_MM_CPU_MIN_K} <= K <= "
            f"{INT_MM_MAX_K}; got x on {x.device}, qweight on {qweight.device}, K={k}"
        )
    return _linear_w8a8(x, qweight, wscales, bias, smooth, act_scale, n)


def _linear_w8a8(x, qweight, wscales, bias, smooth, act_scale, n) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    codes, xscales = quantize_activation_rows(x2, smooth, act_scale)
    y = w8a8_epilogue(int8_matmul(codes, qweight, wscales), xscales, wscales, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _w8a8_implementation(x, qweight, wscales, bias, smooth, act_scale):
    n = check_w8a8_inputs(OP_NAME, x, qweight, wscales, bias, smooth, act_scale)
    return _linear_w8a8(x, qweight, wscales, bias, smooth, act_scale, n)


def _w8a8_fake(x, qweight, wscales, bias, smooth, act_scale):
    n = check_w8a8_inputs(OP_NAME, x, qweight, wscales, bias, smooth, act_scale)
    return x.new_empty((*x.shape[:-1], n))


linear_w8a8 = torch.library.custom_op(OP_NAME, _w8a8_implementation, mutates_args=(), schema=W8A8_SCHEMA)
linear_w8a8.register_fake(_w8a8_fake)


def linear_fp8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
) -> torch.Tensor:
    """The op's meaning in pure torch: per-token e4m3fn activations; dequantize activations
    and weights to float32, then ``F.linear`` in float32, cast to x's dtype."""
    n = check_w8a8_inputs(FP8_OP_NAME, x, qweight, wscales, bias, smooth, None, FP8_DTYPE)
    x2 = x.reshape(-1, x.shape[-1])
    codes, xscales = quantize_activation_per_token(x2, smooth, 8, "fp8")
    y = _fp8_dequantized_linear(codes, xscales, qweight, wscales, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _fp8_dequantized_linear(codes, xscales, qweight, wscales, bias) -> torch.Tensor:
    xd = dequantize_activation(codes, xscales)
    wd = dequantize_activation(qweight, wscales.reshape(-1, 1))
    return F.linear(xd, wd, None if bias is None else bias.to(torch.float32))


def linear_fp8_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    bias: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
) -> torch.Tensor:
    """``torch._scaled_mm`` on CPU: the e4m3fn codes multiplied with unit per-tensor scales
    into float32, then :func:`w8a8_epilogue` applies the per-token and per-channel scales
    and the bias (unit scales because torch 2.11 on CPU supports only per-tensor scaling).

    Not the op's CPU path: on this CPU it is no faster than :func:`linear_fp8_reference`
    (see the module docstring). Its numerics differ from the reference's only in float32
    rounding: it scales the accumulated sum, the reference scales each factor first.
    Raises ValueError for non-CPU tensors.
    """
    n = check_w8a8_inputs(FP8_OP_NAME, x, qweight, wscales, bias, smooth, None, FP8_DTYPE)
    if not all_on_cpu(x, qweight, wscales, bias, smooth):
        raise ValueError(f"{FP8_OP_NAME}: the CPU _scaled_mm path needs CPU tensors, got x on {x.device}")
    x2 = x.reshape(-1, x.shape[-1])
    codes, xscales = quantize_rows_fast(x2, smooth, 8, "fp8")
    one = torch.ones((), dtype=torch.float32)
    acc = torch._scaled_mm(codes, qweight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return w8a8_epilogue(acc, xscales, wscales, bias, x.dtype).reshape(*x.shape[:-1], n)


def _fp8_implementation(x, qweight, wscales, bias, smooth):
    n = check_w8a8_inputs(FP8_OP_NAME, x, qweight, wscales, bias, smooth, None, FP8_DTYPE)
    x2 = x.reshape(-1, x.shape[-1])
    if all_on_cpu(x2, smooth):
        codes, xscales = quantize_rows_fast(x2, smooth, 8, "fp8")
    else:
        codes, xscales = quantize_activation_per_token(x2, smooth, 8, "fp8")
    y = _fp8_dequantized_linear(codes, xscales, qweight, wscales, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _fp8_fake(x, qweight, wscales, bias, smooth):
    n = check_w8a8_inputs(FP8_OP_NAME, x, qweight, wscales, bias, smooth, None, FP8_DTYPE)
    return x.new_empty((*x.shape[:-1], n))


linear_fp8 = torch.library.custom_op(
    FP8_OP_NAME, _fp8_implementation, mutates_args=(), schema=FP8_LINEAR_SCHEMA
)
linear_fp8.register_fake(_fp8_fake)
