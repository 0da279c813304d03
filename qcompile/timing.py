"""Latency measurement for benchmarks and the demo: ratios measured in one run.

These machines are shared and noisy, so candidates are timed interleaved (A, B, C, A,
B, C, ...) after a warm-up, and each is summarized by its median; what we report is the
ratio of medians taken in the same run.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "time_interleaved"]


@dataclass
class Timing:
    name: str
    median_s: float
    samples: list[float]

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def time_interleaved(candidates: dict[str, Callable[[], object]], *, warmup: int = 2, repeat: int = 7,
                     min_seconds: float = 0.0) -> dict[str, Timing]:
    """Time each zero-argument callable, interleaving them; return medians by name."""
    with torch.no_grad():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        start = time.perf_counter()
        rounds = 0
        while rounds < repeat or time.perf_counter() - start < min_seconds:
            for name, fn in candidates.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
            rounds += 1
    return {name: Timing(name, statistics.median(s), s) for name, s in samples.items()}
