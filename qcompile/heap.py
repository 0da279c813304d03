"""Returning freed memory to the operating system, for runs that must stay under a budget.

Tensors are allocated by the C library's ``malloc``. glibc serves a large request from
its own ``mmap`` (and unmaps it on ``free``) only above a threshold that it *raises* to
the size of every large block freed, up to 32 MiB; below it, blocks come from the heap,
and freed heap memory is kept by the process for reuse. Stage-by-stage quantization frees
many blocks of a few to a few tens of MiB (row blocks of a Hessian, GPTQ's updates, a
stage's activations), so the heap keeps growing with memory the process no longer uses
(``tests/test_heap.py`` frees forty 3-10 MiB blocks: tens of MB stay resident by default,
none with :func:`return_large_frees`; ``benchmarks/streaming.py`` shows a whole run).

:func:`return_large_frees` fixes the threshold (so blocks above it are always mapped and
unmapped on their own) and :func:`trim_heap` gives free heap pages back. Both are
process-wide glibc settings (``mallopt`` / ``malloc_trim``); on another C library they do
nothing and return False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["LARGE_BLOCK_BYTES", "return_large_frees", "trim_heap"]

# Blocks at or above this size are mapped on their own and returned to the system on free:
# small enough to cover the per-block temporaries of GPTQ and calibration, large enough that
# the many small tensors of a forward pass still come from the heap.
LARGE_BLOCK_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None  # not glibc (musl, macOS): nothing to tune
    return libc


def return_large_frees(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more by its own memory map, so that
    freeing it returns it to the system at once (glibc's ``M_MMAP_THRESHOLD``; this also
    stops glibc from raising the threshold as large blocks are freed). Process-wide and
    lasting. Returns whether the setting was applied."""
    libc = _glibc()
    if libc is None:
        return False
    if int(threshold) <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(int(threshold))))


def trim_heap() -> bool:
    """Give free heap pages back to the system (glibc ``malloc_trim(0)``). Returns whether
    any memory was released (False also where the C library has no such call)."""
    libc = _glibc()
    return False if libc is None else bool(libc.malloc_trim(ctypes.c_size_t(0)))
