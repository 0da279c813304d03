"""Pieces shared by the Triton GEMM kernels (``triton_linear_w8a8``, ``triton_linear_w4a16``).

Imports triton: only the kernel modules import this one (see :mod:`._triton_common` for
the helpers that must not).

* :func:`tile_config` builds one autotuning config (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
  ``GROUP_M = 8``);
* :func:`gemm_configs_within` is the pruning both kernels share: tiles no larger than the
  problem and pipelined tiles that fit in shared memory; :func:`tile_volume` the size by
  which :func:`._triton_common.keep_or_smallest` picks the last resort;
* :func:`grouped_tile` maps a program id to its ``(pid_m, pid_n)`` tile in grouped order:
  ``GROUP_M`` row-blocks are walked together so that consecutive programs reuse weight
  tiles from L2.
"""
from __future__ import annotations

import triton
import triton.language as tl

from qcompile.kernels._triton_common import next_power_of_2

__all__ = ["tile_config", "gemm_configs_within", "tile_volume", "grouped_tile"]


def tile_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def tile_volume(config) -> int:
    kw = config.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"]


def gemm_configs_within(configs, m_bucket: int, n: int, k_limit: int, smem: int, a_bytes: int) -> list:
    """The configs whose tiles do not exceed the problem (BLOCK_M within ``m_bucket``,
    BLOCK_N within ``n`` rounded up to a power of two, 16 at least for both; BLOCK_K within
    ``k_limit``) and whose pipelined tiles, ``num_stages * BLOCK_K * (BLOCK_M * a_bytes +
    BLOCK_N)`` bytes (activations at ``a_bytes`` per element, one byte per weight element),
    fit in ``smem``."""
    m_limit = max(16, m_bucket)
    n_limit = max(16, next_power_of_2(n))

    def fits(c):
        kw = c.kwargs
        tiles = c.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] * a_bytes + kw["BLOCK_N"])
        return kw["BLOCK_M"] <= m_limit and kw["BLOCK_N"] <= n_limit and kw["BLOCK_K"] <= k_limit and tiles <= smem

    return [c for c in configs if fits(c)]


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_rows
    pid_n = (pid % (GROUP_M * blocks_n)) // group_rows
    return pid_m, pid_n
