"""CPU speed of ``qcompile::linear_w4a8`` / ``qcompile::linear_w4a4`` against fp32 ``F.linear``.

    .venv/bin/python benchmarks/w4ax_ops.py [--threads 2] [--rows 4096] [--repeat 9]

One linear with bias and a smoothing vector at MiniLM's shapes (K x N = 384 x 384 and
1536 x 384) and M rows of float32 activations. Candidates, timed interleaved in one run
(:func:`qcompile.timing.time_interleaved`, median of ``--repeat`` rounds after a warm-up):

* ``fp32 F.linear`` — the float linear the op replaces (the ratio's denominator);
* ``bf16 F.linear`` — the same in bfloat16 (weights and activations cast beforehand);
* ``w8a8 op`` — ``qcompile::linear_w8a8`` (per-channel int8 weights), for context;
* ``w4a16 op g128`` — ``qcompile::linear_w4a16``, for context;
* ``w4a8 op`` / ``w4a4 op`` per-channel, g128 and g32 — the ops' CPU path
  (``torch._int_mm`` per group, :mod:`qcompile.kernels.linear_w4ax`);
* ``w4a8 reference`` per-channel, g128 and g32 — the float64 pure-torch reference.

The ``x fp32`` column is the fp32 ``F.linear`` median divided by the candidate's (above 1:
faster). Each section states the CPU time other processes used meanwhile: these machines
are shared, and 2-thread kernels stall when a core is taken, so absolute times are noisy;
only ratios from one run are comparable.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import qcompile.kernels  # noqa: F401  (registers the ops)
from qcompile.act_quant import quantize_weight_per_channel_int8
from qcompile.kernels.linear_w4ax import linear_w4ax_reference
from qcompile.quantizers import quantize_weight_rtn
from qcompile.timing import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import CpuShare, QuietWaiter, emit, fmt_ms, header, markdown_table  # noqa: E402

SHAPES = [(384, 384), (1536, 384)]
GROUPS = [None, 128, 32]


def _label(group_size) -> str:
    return "per-channel" if group_size is None else f"g{group_size}"


def bench_shape(m: int, k: int, n: int, repeat: int) -> str:
    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    smooth = torch.rand(k, generator=gen) + 0.5
    x16, w16, b16 = x.to(torch.bfloat16), w.to(torch.bfloat16), bias.to(torch.bfloat16)
    q8, s8 = quantize_weight_per_channel_int8(w * smooth)
    q4 = quantize_weight_rtn(w, 4, 128, False)
    candidates = {
        "fp32 F.linear": lambda: F.linear(x, w, bias),
        "bf16 F.linear": lambda: F.linear(x16, w16, b16),
        "w8a8 op": lambda: torch.ops.qcompile.linear_w8a8(x, q8, s8, bias, smooth, None),
        "w4a16 op g128": lambda: torch.ops.qcompile.linear_w4a16(x, q4.qweight, q4.scales, q4.zeros, bias, 128),
    }
    for group_size in GROUPS:
        qw = quantize_weight_rtn(w * smooth, 4, group_size, False)
        args = (qw.qweight, qw.scales, qw.zeros, bias, smooth, qw.group_size)
        label = _label(group_size)
        candidates[f"w4a8 op {label}"] = lambda args=args: torch.ops.qcompile.linear_w4a8(x, *args)
        candidates[f"w4a4 op {label}"] = lambda args=args: torch.ops.qcompile.linear_w4a4(x, *args)
        candidates[f"w4a8 reference {label}"] = lambda args=args: linear_w4ax_reference(8, x, *args)
    share = CpuShare()
    timings = time_interleaved(candidates, warmup=2, repeat=repeat)
    base = timings["fp32 F.linear"].median_s
    rows = [[name, fmt_ms(t.median_s), f"{base / t.median_s:.2f}"] for name, t in timings.items()]
    table = markdown_table(["candidate", "median ms", "x fp32"], rows)
    return f"## M = {m}, K = {k}, N = {n}\n\n{table}\n\n{share.report()}\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait, at most, for the machine to be idle before each shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    emit(header("W4A8 / W4A4 ops on CPU", args.threads))
    waiter = QuietWaiter(args.quiet_wait)
    for k, n in SHAPES:
        waiter.wait()
        emit(bench_shape(args.rows, k, n, args.repeat))
    if waiter.waited:
        emit(f"(waited {waiter.waited:.0f} s for other processes to go quiet)")


if __name__ == "__main__":
    main()
