"""Shared pieces of the Triton kernels, and their registration as the ops' CUDA implementations.

This module never imports triton at import time, so ``import qcompile`` stays cheap and works
on machines without triton or without a GPU. Importing it (``qcompile.kernels`` does)
registers, when triton is installed, the Triton paths as the CUDA kernels of
``qcompile::quantize_per_token``, ``qcompile::linear_w8a8``, ``qcompile::linear_w4a16`` and
``qcompile::hadamard``, and ``qcompile::linear_w4a8`` / ``linear_w4a4``
(``torch.library.register_kernel(..., "cuda", ...)``): CPU calls keep
their CPU paths, CUDA calls take the Triton kernels, and a graph needs no change to use them.
The kernel modules (``triton_quantize_per_token``, ``triton_linear_w8a8``,
``triton_linear_w4a16``, ``triton_hadamard``, ``triton_linear_w4ax``) are imported on the
first CUDA call.

``QCOMPILE_TRITON=0`` in the environment (read on every call) sends CUDA calls to the
pure-torch references instead, which is how the ops ran on CUDA before: for comparison and as
an escape hatch. The references are also public functions (``*_reference``) that take CUDA
tensors.

Helpers for the kernel modules: :func:`interpreter_active`, :func:`check_kernel_device`,
:func:`next_power_of_2`, :func:`m_bucket`, :func:`shared_memory_bytes`, :func:`sm_count`
and :func:`keep_or_smallest` (the last step of every ``prune_configs_by`` function).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional, Sequence

import torch

from qcompile.kernels.hadamard import hadamard_reference
from qcompile.kernels.linear_w4a16 import linear_w4a16_reference
from qcompile.kernels.linear_w4ax import W4AX_INT32_MAX_GROUP, linear_w4ax_reference
from qcompile.kernels.linear_w8a8 import INT_MM_MAX_K, linear_w8a8_reference
from qcompile.kernels.quantize_per_token import quantize_per_token_reference

__all__ = [
    "TRITON_SWITCH_ENV",
    "triton_installed",
    "triton_path_enabled",
    "interpreter_active",
    "check_kernel_device",
    "next_power_of_2",
    "m_bucket",
    "shared_memory_bytes",
    "sm_count",
    "keep_or_smallest",
    "register_cuda_implementations",
    "CUDA_IMPLEMENTATIONS",
]

TRITON_SWITCH_ENV = "QCOMPILE_TRITON"
# Largest M bucket used as an autotuning key: beyond it the best tiles no longer change.
M_BUCKET_CAP = 4096
# Shared memory per block assumed off CUDA (tests of the pruning functions on CPU tensors)
# and when torch does not report it: an H100's opt-in limit, 227 KiB.
DEFAULT_SHARED_MEMORY = 227 * 1024
# Streaming multiprocessors assumed off CUDA (for the split-K heuristic under the interpreter).
DEFAULT_SM_COUNT = 4


def triton_installed() -> bool:
    """Whether triton can be imported here (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_path_enabled() -> bool:
    """False when ``QCOMPILE_TRITON=0``: CUDA calls then run the pure-torch references."""
    value = os.environ.get(TRITON_SWITCH_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{TRITON_SWITCH_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


def interpreter_active() -> bool:
    """Whether ``triton.jit`` builds interpreted kernels in this process (TRITON_INTERPRET=1).

    Triton decides this when a kernel is decorated, and its own library functions are
    decorated when triton is first imported, so the variable must be set before that.
    """
    import triton

    return bool(triton.knobs.runtime.interpret)


def check_kernel_device(op: str, interpreted: bool, **tensors: Optional[torch.Tensor]) -> torch.device:
    """The common device of ``tensors`` (None entries ignored); ValueError naming ``op`` if
    they differ, or if it is neither CUDA nor (when ``interpreted``) CPU."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    distinct = set(devices.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    device = distinct.pop()
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return device
    raise ValueError(
        f"{op}: the Triton kernel needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
        f"got tensors on {device}"
    )


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """The autotuning key for the number of rows: the next power of two, capped at 4096, so
    that calls with nearby M share one tuning result."""
    return min(next_power_of_2(m), M_BUCKET_CAP)


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (the opt-in maximum on CUDA)."""
    if device.type != "cuda":
        return DEFAULT_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", DEFAULT_SHARED_MEMORY))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (a nominal 4 elsewhere)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def keep_or_smallest(configs: Sequence, kept: list, size: Callable[[object], int]) -> list:
    """``kept`` if any config survived pruning, else the config with the smallest ``size``
    (the autotuner needs at least one, and the smallest tile fits every shape)."""
    return kept if kept else [min(configs, key=size)]


# ---------------------------------------------------------------------------------------
# CUDA implementations of the ops: the Triton kernels, or the references when switched off.


def _quantize_per_token_cuda(x, smooth, bits, format):
    if not triton_path_enabled():
        return quantize_per_token_reference(x, smooth, bits, format)
    from qcompile.kernels.triton_quantize_per_token import triton_quantize_per_token

    return triton_quantize_per_token(x, smooth, bits, format)


def _linear_w8a8_cuda(x, qweight, wscales, bias, smooth, act_scale):
    # Beyond INT_MM_MAX_K an int32 accumulator could overflow; the reference accumulates
    # exactly in float64 (as the op did on CUDA before).
    if not triton_path_enabled() or x.shape[-1] > INT_MM_MAX_K:
        return linear_w8a8_reference(x, qweight, wscales, bias, smooth, act_scale)
    from qcompile.kernels.triton_linear_w8a8 import triton_linear_w8a8

    return triton_linear_w8a8(x, qweight, wscales, bias, smooth, act_scale)


def _linear_w4a16_cuda(x, qweight, scales, zeros, bias, group_size):
    if not triton_path_enabled():
        return linear_w4a16_reference(x, qweight, scales, zeros, bias, group_size)
    from qcompile.kernels.triton_linear_w4a16 import triton_linear_w4a16

    return triton_linear_w4a16(x, qweight, scales, zeros, bias, group_size)


def _hadamard_cuda(x, small, signs, block):
    if not triton_path_enabled() or x.dtype == torch.float64:  # float64: exact checks, not speed
        return hadamard_reference(x, small, signs, block)
    from qcompile.kernels.triton_hadamard import triton_hadamard

    return triton_hadamard(x, small, signs, block)


def _linear_w4ax_cuda(act_bits):
    def implementation(x, qweight, scales, zeros, bias, smooth, group_size):
        # Beyond W4AX_INT32_MAX_GROUP a group's int32 accumulator could overflow; the
        # reference accumulates exactly in float64.
        if not triton_path_enabled() or group_size > W4AX_INT32_MAX_GROUP:
            return linear_w4ax_reference(act_bits, x, qweight, scales, zeros, bias, smooth, group_size)
        from qcompile.kernels.triton_linear_w4ax import triton_linear_w4ax

        return triton_linear_w4ax(act_bits, x, qweight, scales, zeros, bias, smooth, group_size)

    return implementation


CUDA_IMPLEMENTATIONS = {
    "qcompile::quantize_per_token": _quantize_per_token_cuda,
    "qcompile::linear_w8a8": _linear_w8a8_cuda,
    "qcompile::linear_w4a16": _linear_w4a16_cuda,
    "qcompile::linear_w4a8": _linear_w4ax_cuda(8),
    "qcompile::linear_w4a4": _linear_w4ax_cuda(4),
    "qcompile::hadamard": _hadamard_cuda,
}


def register_cuda_implementations() -> bool:
    """Register :data:`CUDA_IMPLEMENTATIONS` as the ops' CUDA kernels if triton is
    installed; return whether it did. Registering again replaces the same functions."""
    if not triton_installed():
        return False
    for qualname, implementation in CUDA_IMPLEMENTATIONS.items():
        torch.library.register_kernel(qualname, "cuda", implementation)
    return True


CUDA_KERNELS_REGISTERED = register_cuda_implementations()
