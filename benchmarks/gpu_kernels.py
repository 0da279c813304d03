"""GPU speed of the Triton kernels against fp16 cuBLAS, a plain copy and the hardware floor.

    python benchmarks/gpu_kernels.py [--quick] [--rows 1,16,1024,2048] [--shapes 4096x4096,...]
                                     [--peak-gbps G --peak-fp16-tflops T --peak-int8-tops T]
    python benchmarks/gpu_kernels.py --dry-run     # CPU, TRITON_INTERPRET=1, tiny shapes

For decode (M = 1, 16) and prefill (M = 1024, 2048) rows of 7B/8B-class layers (K, N in
4096, 11008, 14336), with float16 activations, each kernel is timed and set against its
baseline measured in the same run:

* ``quantize_per_token`` (int8, with a smoothing vector) and the fused smoothing + block
  Hadamard + per-token quantization (``triton_quantize_rotated``, signs carrying the
  smoothing vector), against ``x.clone()`` (a plain copy of the same tensor);
* ``hadamard`` (the block FWHT of a row of K, randomized signs), against ``x.clone()``;
* ``linear_w4a16`` (g128, asymmetric), ``linear_w8a8`` (dynamic per-token int8 activations,
  the whole op: quantization + int8 GEMM + epilogue) and ``linear_w4a8`` (g128, symmetric
  4-bit weights, per-token int8 activations), against float16 ``F.linear`` (cuBLAS).

Timing: CUDA events around each call, the median of ``--repeat`` calls after ``--warmup``
calls (the first also autotunes), each call on the next of several copies of its inputs
("rotating buffers", together at least ``--rotate-mib``, so that no call finds its operands
in the 50 MB L2 left by the previous one).

Floor: bytes a kernel must move (read its inputs once, write its outputs once) over the
bandwidth, or its multiply-adds over the compute peak of its math (fp16 for W4A16, int8 for
W8A8 and W4A8), whichever is longer. By default the peaks are measured in the same run: the
bandwidth of a 1 GiB device-to-device copy, the TFLOP/s of a float16 8192^3 matmul and the
TOP/s of an int8 ``torch._int_mm`` of 8192^3 (what cuBLAS reaches, so "% of floor" reads
against achievable hardware); ``--peak-*`` replace them with data-sheet figures. Each row
prints the achieved GB/s and TFLOP/s (TOP/s for the integer GEMMs).

Checks: each row also compares the kernel with its reference (bitwise for quantize_per_token,
linear_w8a8 and linear_w4a8; the largest relative difference for linear_w4a16 and hadamard;
for the fused rotation, the share of codes that differ from quantizing the float32 rotation,
which only float32 summation order can move).

The issue's goals are printed after the table (W4A16 at M = 1 >= 3.0x fp16 on 4096 x 4096 and
larger; W8A8 at M >= 1024 >= 1.6x fp16; fused smoothing + Hadamard + quantization <= 1.3x the
time of a copy).

Exits with status 2 and a message when no CUDA device is present (unless ``--dry-run``: the
same code on CPU tensors under Triton's interpreter, with tiny shapes and wall-clock timing,
which shows that every kernel, check and table cell runs; its times mean nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

DEFAULT_ROWS = [1, 16, 1024, 2048]
DEFAULT_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
QUICK_ROWS = [1, 1024]
QUICK_SHAPES = [(4096, 4096)]
DRY_ROWS = [1, 3]
DRY_SHAPES = [(256, 96)]
GROUP = 128
DRY_GROUP = 32

GOALS = (
    ("W4A16 at M = 1, K and N >= 4096: speedup over fp16 cuBLAS", "linear_w4a16", lambda r: r.m == 1, ">=", 3.0),
    ("W8A8 at M >= 1024: speedup over fp16 cuBLAS", "linear_w8a8", lambda r: r.m >= 1024, ">=", 1.6),
    ("fused smoothing + Hadamard + quantization: time / copy time", "quantize_rotated", lambda r: True, "<=", 1.3),
)


@dataclass
class Peaks:
    gbps: float
    fp16_tflops: float
    int8_tops: float
    measured: bool


@dataclass
class Row:
    kernel: str
    m: int
    k: int
    n: int
    ms: float
    bytes: float
    ops: float  # multiply-adds x 2 (0 for the memory-bound kernels)
    int_math: bool
    baseline: str
    baseline_ms: float
    check: str

    def floor_ms(self, peaks: Peaks) -> float:
        peak = peaks.int8_tops if self.int_math else peaks.fp16_tflops
        return max(self.bytes / (peaks.gbps * 1e9), self.ops / (peak * 1e12)) * 1e3


class Timer:
    """Median time of ``fn(*inputs)``, cycling through copies of the inputs."""

    def __init__(self, device: torch.device, warmup: int, repeat: int, rotate_bytes: int):
        self.device, self.warmup, self.repeat, self.rotate_bytes = device, warmup, repeat, rotate_bytes

    def count(self, nbytes: int) -> int:
        """Copies of an input set of ``nbytes`` to cycle through (at most 64)."""
        return max(1, min(64, math.ceil(self.rotate_bytes / max(nbytes, 1))))

    def copies(self, make: Callable[[], tuple], nbytes: int) -> list[tuple]:
        return [make() for _ in range(self.count(nbytes))]

    def median_ms(self, fn: Callable, sets: Sequence[tuple]) -> float:
        for i in range(self.warmup):
            fn(*sets[i % len(sets)])
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(self.repeat)]
            for i, (start, end) in enumerate(events):
                start.record()
                fn(*sets[i % len(sets)])
                end.record()
            torch.cuda.synchronize()
            return statistics.median(start.elapsed_time(end) for start, end in events)
        times = []
        for i in range(self.repeat):
            t0 = time.perf_counter()
            fn(*sets[i % len(sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)] as (K, N)."""
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not KxN (e.g. 4096x11008)")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def parse_rows(text: str) -> list[int]:
    try:
        rows = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rows {text!r} are not comma-separated integers") from None
    if any(r < 1 for r in rows):
        raise argparse.ArgumentTypeError(f"rows must be positive, got {text!r}")
    return rows


def measure_peaks(timer: Timer, dry: bool) -> Peaks:
    """Bandwidth of a large copy, float16 matmul TFLOP/s and int8 _int_mm TOP/s, measured."""
    dev = timer.device
    size, n = (16 << 20, 256) if dry else (1 << 30, 8192)
    buf = torch.empty(size, dtype=torch.uint8, device=dev)
    copy_ms = timer.median_ms(lambda b: b.clone(), [(buf,)])
    a16 = torch.randn(n, n, device=dev).half()
    mm_ms = timer.median_ms(lambda a: a @ a, [(a16,)])
    a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=dev)
    int_ms = timer.median_ms(lambda a: torch._int_mm(a, a), [(a8,)])
    ops = 2.0 * n**3
    return Peaks(gbps=2 * size / copy_ms / 1e6, fp16_tflops=ops / mm_ms / 1e9, int8_tops=ops / int_ms / 1e9,
                 measured=True)


def _nbytes(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Bench:
    """The kernels of one (M, K, N): inputs built once per copy, results checked once."""

    def __init__(self, timer: Timer, m: int, k: int, n: int, group: int):
        from qcompile.hadamard import random_signs, rotation_plan
        from qcompile.kernels.hadamard import hadamard_args

        self.timer, self.m, self.k, self.n, self.group = timer, m, k, n, group
        self.dev = timer.device
        self.gen = torch.Generator(device=self.dev).manual_seed(m * 1_000_003 + k * 1009 + n)
        self.w = torch.randn(n, k, device=self.dev, generator=self.gen) / k**0.5
        self.smooth = torch.rand(k, device=self.dev, generator=self.gen) + 0.5
        self.small, self.block = hadamard_args(rotation_plan(k), self.dev)
        self.signs = random_signs(k, seed=k).to(device=self.dev, dtype=torch.float32)
        self.x_sets = timer.copies(self._x, 2 * m * k)
        self.rows: list[Row] = []
        self._copy_ms: Optional[float] = None
        self._fp16_ms: Optional[float] = None

    def _x(self) -> tuple:
        return (torch.randn(self.m, self.k, device=self.dev, generator=self.gen).half(),)

    def _with_weights(self, weights: tuple, weight_bytes: int) -> list[tuple]:
        count = self.timer.count(2 * self.m * self.k + weight_bytes)
        return [(self.x_sets[i % len(self.x_sets)][0], *(None if w is None else w.clone() for w in weights))
                for i in range(count)]

    def copy_ms(self) -> float:
        if self._copy_ms is None:
            self._copy_ms = self.timer.median_ms(lambda x: x.clone(), self.x_sets)
        return self._copy_ms

    def fp16_ms(self) -> float:
        if self._fp16_ms is None:
            sets = self._with_weights((self.w.half(),), 2 * self.n * self.k)
            self._fp16_ms = self.timer.median_ms(F.linear, sets)
        return self._fp16_ms

    def add(self, kernel, ms, nbytes, ops, int_math, baseline, check) -> None:
        base_ms = self.copy_ms() if baseline == "copy" else self.fp16_ms()
        self.rows.append(Row(kernel, self.m, self.k, self.n, ms, nbytes, ops, int_math, baseline, base_ms, check))

    def quantize(self) -> None:
        from qcompile.act_quant import quantize_activation_per_token
        from qcompile.kernels.triton_quantize_per_token import triton_quantize_per_token

        m, k, x = self.m, self.k, self.x_sets[0][0]
        codes, scales = triton_quantize_per_token(x, self.smooth, 8, "int")
        ref_codes, ref_scales = quantize_activation_per_token(x, self.smooth, 8, "int")
        exact = torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        ms = self.timer.median_ms(lambda x: triton_quantize_per_token(x, self.smooth, 8, "int"), self.x_sets)
        self.add("quantize_per_token", ms, 2 * m * k + 4 * k + m * k + 4 * m, 0, False, "copy",
                 "bitwise" if exact else "DIFFERS")

    def quantize_rotated(self) -> None:
        from qcompile.kernels.quantize_rotated import quantize_rotated_reference
        from qcompile.kernels.triton_quantize_rotated import triton_quantize_rotated

        m, k, x = self.m, self.k, self.x_sets[0][0]
        signs = self.signs / self.smooth  # the smoothing vector folded into the rotation's signs
        codes, _ = triton_quantize_rotated(x, self.small, signs, self.block, 8, "int")
        ref_codes, _ = quantize_rotated_reference(x, self.small, signs, self.block, 8, "int")
        differ = (codes != ref_codes).float().mean().item()
        ms = self.timer.median_ms(lambda x: triton_quantize_rotated(x, self.small, signs, self.block, 8, "int"),
                                  self.x_sets)
        self.add("quantize_rotated", ms, 2 * m * k + 4 * k + m * k + 4 * m, 0, False, "copy",
                 f"{differ:.1e} of codes differ")

    def hadamard(self) -> None:
        from qcompile.kernels.hadamard import hadamard_reference
        from qcompile.kernels.triton_hadamard import triton_hadamard

        m, k, x = self.m, self.k, self.x_sets[0][0]
        y = triton_hadamard(x, self.small, self.signs, self.block)
        ref = hadamard_reference(x, self.small, self.signs, self.block)
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        ms = self.timer.median_ms(lambda x: triton_hadamard(x, self.small, self.signs, self.block), self.x_sets)
        self.add("hadamard", ms, 4 * m * k + 4 * k, 0, False, "copy", f"rel err {err:.1e}")

    def w4a16(self) -> None:
        from qcompile.kernels.linear_w4a16 import linear_w4a16_reference
        from qcompile.kernels.triton_linear_w4a16 import triton_linear_w4a16
        from qcompile.quantizers import quantize_weight_rtn

        m, k, n, g = self.m, self.k, self.n, self.group
        qw = quantize_weight_rtn(self.w, 4, g, False)
        weights = (qw.qweight, qw.scales, qw.zeros)
        y = triton_linear_w4a16(self.x_sets[0][0], *weights, None, g)
        ref = linear_w4a16_reference(self.x_sets[0][0], *weights, None, g)
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        wbytes = _nbytes(weights)
        ms = self.timer.median_ms(lambda x, q, s, z: triton_linear_w4a16(x, q, s, z, None, g),
                                  self._with_weights(weights, wbytes))
        self.add("linear_w4a16", ms, 2 * m * k + wbytes + 2 * m * n, 2.0 * m * k * n, False, "fp16 cuBLAS",
                 f"rel err {err:.1e}")

    def w8a8(self) -> None:
        from qcompile.act_quant import quantize_weight_per_channel_int8
        from qcompile.kernels.linear_w8a8 import linear_w8a8_reference
        from qcompile.kernels.triton_linear_w8a8 import triton_linear_w8a8

        m, k, n = self.m, self.k, self.n
        weights = quantize_weight_per_channel_int8(self.w)
        x = self.x_sets[0][0]
        exact = torch.equal(triton_linear_w8a8(x, *weights, None, None, None),
                            linear_w8a8_reference(x, *weights, None, None, None))
        wbytes = _nbytes(weights)
        ms = self.timer.median_ms(lambda x, q, s: triton_linear_w8a8(x, q, s, None, None, None),
                                  self._with_weights(weights, wbytes))
        self.add("linear_w8a8", ms, 2 * m * k + wbytes + 2 * m * n, 2.0 * m * k * n, True, "fp16 cuBLAS",
                 "bitwise" if exact else "DIFFERS")

    def w4a8(self) -> None:
        from qcompile.kernels.linear_w4ax import linear_w4a8_reference
        from qcompile.kernels.triton_linear_w4ax import triton_linear_w4ax
        from qcompile.quantizers import quantize_weight_rtn

        m, k, n, g = self.m, self.k, self.n, self.group
        qw = quantize_weight_rtn(self.w, 4, g, True)
        weights = (qw.qweight, qw.scales, qw.zeros)
        x = self.x_sets[0][0]
        exact = torch.equal(triton_linear_w4ax(8, x, *weights, None, None, g),
                            linear_w4a8_reference(x, *weights, None, None, g))
        wbytes = _nbytes(weights)
        ms = self.timer.median_ms(lambda x, q, s, z: triton_linear_w4ax(8, x, q, s, z, None, None, g),
                                  self._with_weights(weights, wbytes))
        self.add("linear_w4a8", ms, 2 * m * k + wbytes + 2 * m * n, 2.0 * m * k * n, True, "fp16 cuBLAS",
                 "bitwise" if exact else "DIFFERS")

    def run(self) -> list[Row]:
        for step in (self.quantize, self.quantize_rotated, self.hadamard, self.w4a16, self.w8a8, self.w4a8):
            step()
        return self.rows


COLUMNS = ("kernel", "M", "K", "N", "ms", "GB/s", "TFLOP/s", "floor ms", "% of floor", "baseline", "baseline ms",
           "speedup", "check")


def row_cells(row: Row, peaks: Peaks) -> list[str]:
    floor = row.floor_ms(peaks)
    if row.baseline == "copy":
        speedup = f"{row.ms / row.baseline_ms:.2f}x copy time"
    else:
        speedup = f"{row.baseline_ms / row.ms:.2f}x"
    tflops = f"{row.ops / row.ms / 1e9:.3g}" if row.ops else "-"
    return [row.kernel, str(row.m), str(row.k), str(row.n), f"{row.ms:.4g}", f"{row.bytes / row.ms / 1e6:.4g}",
            tflops, f"{floor:.4g}", f"{100 * floor / row.ms:.3g}%", row.baseline, f"{row.baseline_ms:.4g}", speedup,
            row.check]


def goal_lines(rows: Sequence[Row]) -> list[str]:
    lines = []
    for text, kernel, applies, relation, target in GOALS:
        chosen = [r for r in rows if r.kernel == kernel and applies(r) and min(r.k, r.n) >= 4096]
        if kernel == "quantize_rotated":
            chosen = [r for r in rows if r.kernel == kernel]
        if not chosen:
            lines.append(f"- {text}: no row measured it")
            continue
        values = [(r.ms / r.baseline_ms) if relation == "<=" else (r.baseline_ms / r.ms) for r in chosen]
        worst = max(values) if relation == "<=" else min(values)
        met = worst <= target if relation == "<=" else worst >= target
        lines.append(f"- {text} {relation} {target}: worst {worst:.2f} over {len(chosen)} rows "
                     f"({'met' if met else 'NOT met'})")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4096 x 4096 only, M = 1 and 1024")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors under TRITON_INTERPRET=1, tiny shapes: checks the script, times mean nothing")
    parser.add_argument("--rows", type=parse_rows, help="comma-separated M values")
    parser.add_argument("--shapes", type=parse_shapes, help="comma-separated KxN values")
    parser.add_argument("--warmup", type=int, default=10, help="calls before timing (default 10)")
    parser.add_argument("--repeat", type=int, default=100, help="timed calls, median reported (default 100)")
    parser.add_argument("--rotate-mib", type=int, default=256, help="input copies cycled through (default 256 MiB)")
    parser.add_argument("--peak-gbps", type=float, help="memory bandwidth floor (GB/s) instead of a measured copy")
    parser.add_argument("--peak-fp16-tflops", type=float, help="float16 peak instead of a measured 8192^3 matmul")
    parser.add_argument("--peak-int8-tops", type=float, help="int8 peak instead of a measured 8192^3 _int_mm")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeat < 1:
        parser.error("--warmup and --repeat must be at least 1")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (qcompile imports it)
        if "triton" in sys.modules:
            parser.error("--dry-run needs triton not yet imported in this process (TRITON_INTERPRET=1 must come first)")
        device = torch.device("cpu")
        warmup, repeat, rotate = 1, 2, 1 << 20
    else:
        if not torch.cuda.is_available():
            print("benchmarks/gpu_kernels.py needs a CUDA device (the Triton kernels run on GPUs); none is available "
                  "here. --dry-run runs the same code on CPU under Triton's interpreter.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        warmup, repeat, rotate = args.warmup, args.repeat, args.rotate_mib << 20
    import triton

    import qcompile.kernels  # noqa: F401  (registers the ops)

    rows = args.rows or (DRY_ROWS if args.dry_run else QUICK_ROWS if args.quick else DEFAULT_ROWS)
    shapes = args.shapes or (DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    timer = Timer(device, warmup, repeat, rotate)
    peaks = measure_peaks(timer, args.dry_run)
    peaks = Peaks(args.peak_gbps or peaks.gbps, args.peak_fp16_tflops or peaks.fp16_tflops,
                  args.peak_int8_tops or peaks.int8_tops,
                  measured=not (args.peak_gbps or args.peak_fp16_tflops or args.peak_int8_tops))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run under TRITON_INTERPRET=1)"
    print(f"# {name} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"# floors from {'measured' if peaks.measured else 'given'} peaks: {peaks.gbps:.0f} GB/s, "
          f"{peaks.fp16_tflops:.0f} fp16 TFLOP/s, {peaks.int8_tops:.0f} int8 TOP/s; "
          f"median of {repeat} calls after {warmup}, inputs rotated over >= {rotate >> 20} MiB")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    results: list[Row] = []
    group = DRY_GROUP if args.dry_run else GROUP
    for k, n in shapes:
        for m in rows:
            for row in Bench(timer, m, k, n, group).run():
                results.append(row)
                print("| " + " | ".join(row_cells(row, peaks)) + " |", flush=True)
    print()
    print("\n".join(goal_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
