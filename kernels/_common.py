"""Pieces shared by the weight-only linear ops (``qcompile::linear_w8a16``, ``linear_w4a16``).

* :func:`check_linear_inputs` validates shapes and dtypes (never values, so it also runs on
  fake tensors while tracing);
* :func:`reference_linear` is the float32 pure-torch reference: dequantize, then linear;
* :class:`KernelLayoutCache` keeps the weight layouts that CPU kernels need, per weight;
* :func:`define_weight_only_linear` registers one op: its real implementation (CPU fast
  path when it applies, the reference otherwise) and its fake implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary, WeakIdRef

from qcompile.quantizers import check_quantized_layout, dequantize_codes

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

WEIGHT_ONLY_LINEAR_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int group_size) -> Tensor"
)


def check_linear_inputs(
    op: str,
    bits: int,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group_size: int,
) -> int:
    """Validate the inputs of a weight-only linear; return N (out_features).

    Raises TypeError for a wrong dtype and ValueError for a wrong shape, naming ``op``.
    """
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: x must be one of {ACTIVATION_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., K], got a 0-d tensor")
    try:
        n = check_quantized_layout(
            qweight, scales, zeros, bits=bits, group_size=group_size, in_features=x.shape[-1]
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{op} with x of shape {tuple(x.shape)}: {exc}") from exc
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"{op}: bias must be floating point, got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias must have shape [{n}], got {tuple(bias.shape)}")
    return n


def reference_linear(
    bits: int,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """``F.linear(x, dequantized weight, bias)`` computed in float32, returned in x's dtype."""
    w = dequantize_codes(
        qweight, scales, zeros, bits=bits, group_size=group_size, in_features=x.shape[-1]
    )
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


# Rows (tokens) from which a CPU call dequantizes the weight to bfloat16 and runs a bf16
# GEMM instead of the packed-integer kernels. Those kernels are built for few rows (decode,
# GEMV-like); with many rows a bf16 GEMM is 2-3x faster and the one pass that dequantizes
# the weight is paid back (measured here, 2 threads: at K=N=384 and 4096 rows the int8
# kernel takes 11.5 ms, dequantize + bf16 GEMM 3.8 ms; at K=N=4096 the int4 weight's
# dequantization alone costs about 80 ms, so int4 switches later than int8).
MANY_ROWS = {8: 256, 4: 1024}


def dequantized_bf16_linear(
    bits: int,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """Many-row CPU path: dequantize (in float32) to a bfloat16 weight, then a bf16 GEMM."""
    w = dequantize_codes(
        qweight, scales, zeros, bits=bits, group_size=group_size, in_features=x.shape[-1],
        dtype=torch.bfloat16,
    )
    y = F.linear(rows_as_bfloat16(x), w)
    return restore_output(y, x, bias)


def all_on_cpu(*tensors: Optional[torch.Tensor]) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


def rows_as_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> contiguous bfloat16 [M, K], the activation layout of the CPU kernels."""
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


def restore_output(y: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Kernel output [M, N] -> [..., N] in x's dtype; the bias is added in float32."""
    if bias is not None:
        y = y.to(torch.float32) + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    # Inference tensors (made under torch.inference_mode) keep no version counter; they can
    # be changed in place only inside inference_mode, which this cache cannot see.
    version = -1 if t.is_inference() else t._version
    return version, t.data_ptr()


@dataclass
class _CacheEntry:
    stamp: tuple[int, int]
    scales: WeakIdRef
    scales_stamp: tuple[int, int]
    zeros: Optional[WeakIdRef]
    zeros_stamp: Optional[tuple[int, int]]
    group_size: int
    value: object

    def matches(self, qweight, scales, zeros, group_size) -> bool:
        if self.stamp != _stamp(qweight) or self.group_size != group_size:
            return False
        if self.scales() is not scales or self.scales_stamp != _stamp(scales):
            return False
        if zeros is None:
            return self.zeros is None
        return self.zeros is not None and self.zeros() is zeros and self.zeros_stamp == _stamp(zeros)


class KernelLayoutCache:
    """Per-weight cache of what a CPU kernel needs beyond the stored quantized weight.

    Why it exists: the CPU int4 kernel reads its weight in an opaque tiled layout made by
    ``aten._convert_weight_to_int4pack_for_cpu`` and its scales and zero offsets as one
    bfloat16 tensor; building them costs far more than the matmul itself (about 50 ms
    against about 1 ms at K = N = 4096), so they are built once per weight, not per call.

    Entries are keyed weakly on the identity of the ``qweight`` tensor object, so an entry
    lives exactly as long as its weight. (``torch.utils.weak.WeakIdKeyDictionary``, not
    ``weakref.WeakKeyDictionary``: the latter compares live keys with ``==``, which on
    tensors is elementwise and raises.) An entry is rebuilt when ``qweight``, ``scales`` or ``zeros`` change
    in place (their ``_version`` counter or data pointer moves), when other ``scales`` /
    ``zeros`` tensors come with the same ``qweight``, or when the group size differs.
    Limitation: inference tensors have no version counter, so an in-place change made to
    one inside ``torch.inference_mode`` is not seen.

    ``build(qweight, scales, zeros, group_size)`` must return values that do not reference
    ``qweight`` itself: the cache holds values strongly, and a reference to the key would
    keep the weight (and the entry) alive forever.
    """

    def __init__(self, build: Callable[..., object]):
        self._build = build
        self._entries = WeakIdKeyDictionary()

    def get(self, qweight, scales, zeros, group_size):
        entry = self._entries.get(qweight)
        if entry is None or not entry.matches(qweight, scales, zeros, group_size):
            entry = _CacheEntry(
                stamp=_stamp(qweight),
                scales=WeakIdRef(scales),
                scales_stamp=_stamp(scales),
                zeros=None if zeros is None else WeakIdRef(zeros),
                zeros_stamp=None if zeros is None else _stamp(zeros),
                group_size=group_size,
                value=self._build(qweight, scales, zeros, group_size),
            )
            self._entries[qweight] = entry
        return entry.value

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class CpuFastPath:
    """A CPU kernel for a weight-only linear: ``applies(x, qweight, scales, zeros, group_size)``
    says whether ``run(x, qweight, scales, zeros, bias, group_size)`` can compute the op."""

    applies: Callable[..., bool]
    run: Callable[..., torch.Tensor]


def define_weight_only_linear(name: str, bits: int, cpu_fast_path: CpuFastPath):
    """Register ``qcompile::<name>`` with the weight-only linear schema; return its CustomOpDef.

    The real implementation takes ``cpu_fast_path`` when it applies and the float32
    reference otherwise; the fake implementation checks the inputs and returns [..., N].
    """
    qualname = f"qcompile::{name}"

    def implementation(x, qweight, scales, zeros, bias, group_size):
        check_linear_inputs(qualname, bits, x, qweight, scales, zeros, bias, group_size)
        if all_on_cpu(x, qweight, scales, zeros, bias) and x.numel() >= MANY_ROWS[bits] * x.shape[-1]:
            return dequantized_bf16_linear(bits, x, qweight, scales, zeros, bias, group_size)
        if cpu_fast_path.applies(x, qweight, scales, zeros, group_size):
            return cpu_fast_path.run(x, qweight, scales, zeros, bias, group_size)
        return reference_linear(bits, x, qweight, scales, zeros, bias, group_size)

    def fake(x, qweight, scales, zeros, bias, group_size):
        n = check_linear_inputs(qualname, bits, x, qweight, scales, zeros, bias, group_size)
        return x.new_empty((*x.shape[:-1], n))

    op = torch.library.custom_op(
        qualname, implementation, mutates_args=(), schema=WEIGHT_ONLY_LINEAR_SCHEMA
    )
    op.register_fake(fake)
    return op
