"""The process's resident memory, now and at its highest during a block of work.

:class:`PeakWatch` samples the resident set size (``/proc/self/statm``) from a background
thread while a block runs: the kernel's own high-water mark (``VmHWM``) covers the
whole process life and resetting it (``/proc/self/clear_refs``) would disturb anyone
else measuring it, such as ``benchmarks/memory.py``. A sample every few milliseconds
misses only peaks shorter than that, and the block's start and end are always sampled.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["resident_bytes", "PeakWatch"]

_STATM = Path("/proc/self/statm")


def resident_bytes() -> int | None:
    """The resident set size of this process in bytes; None where ``/proc`` is missing."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, OSError):
        return None


class PeakWatch:
    """``with PeakWatch() as w: ...`` then ``w.peak`` (bytes, None without ``/proc``) and
    ``w.start`` (resident bytes when the block began)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = resident_bytes()
        if now is not None:
            self.peak = now if self.peak is None else max(self.peak, now)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakWatch":
        self.start = resident_bytes()
        self.peak = self.start
        if self.start is not None:
            self._thread = threading.Thread(target=self._loop, name="qcompile-peak-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
