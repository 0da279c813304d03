"""qcompile.resident: the resident-memory sampler behind the pass log's check figures."""
from __future__ import annotations

import pytest
import torch

from qcompile.resident import PeakWatch, resident_bytes


def test_peak_watch_sees_a_block_allocation_that_is_freed_before_the_block_ends():
    if resident_bytes() is None:
        pytest.skip("no /proc/self/statm on this system: resident memory is not measured")
    size = 256 * 2**20
    with PeakWatch(interval=0.001) as watch:
        block = torch.ones(size // 4)  # touched: resident, not only reserved
        for _ in range(20):  # held for well over one sampling interval
            block.add_(1)
        del block
    assert watch.peak - watch.start >= 0.8 * size, (watch.start, watch.peak)
