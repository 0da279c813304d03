"""CUDA speed of the Triton kernels against torch baselines, as ratios measured in one run.

    python benchmarks/triton_kernels.py [--quick] [--rows 1,16,128,2048] [--shapes 4096x4096,...]

For each (M, K, N), with float16 activations:

* ``quantize_per_token`` (int8, with a smoothing vector): the Triton kernel against the
  pure-torch reference (what the op ran on CUDA before) and against a plain copy of x
  (``x.clone()``, the memory-traffic floor of a pass over x);
* ``linear_w4a16`` (group 128, asymmetric): the Triton kernel against ``F.linear`` on the
  float16 weight (cuBLAS);
* ``linear_w8a8`` (dynamic per-token activations): the whole op (quantization + int8 GEMM +
  epilogue) against float16 ``F.linear``, and its GEMM alone (int8 codes in, epilogue
  included) against ``torch._int_mm`` (cuBLASLt int8, no epilogue; only where it applies:
  M > 16 and K, N multiples of 8).

Ratios are baseline time / Triton time (above 1: Triton is faster). Each time is the median
of ``triton.testing.do_bench`` (which clears the L2 cache before every run), after a call
that autotunes. Each row also checks the Triton results against the references: bitwise for
quantize_per_token and linear_w8a8, the largest relative difference for linear_w4a16.

Exits with status 2 and a message when no CUDA device is present.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DEFAULT_ROWS = [1, 16, 128, 2048]
DEFAULT_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]  # (K, N)
QUICK_ROWS = [1, 128]
QUICK_SHAPES = [(4096, 4096)]
W4_GROUP = 128


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)] as (K, N)."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_shape(m: int, k: int, n: int) -> dict:
    from qcompile.act_quant import quantize_activation_per_token, quantize_weight_per_channel_int8
    from qcompile.kernels.linear_w4a16 import linear_w4a16_reference
    from qcompile.kernels.linear_w8a8 import int_mm_supported, linear_w8a8_reference
    from qcompile.kernels.triton_linear_w4a16 import triton_linear_w4a16
    from qcompile.kernels.triton_linear_w8a8 import int8_gemm_epilogue, triton_linear_w8a8
    from qcompile.kernels.triton_quantize_per_token import quantize_rows, triton_quantize_per_token
    from qcompile.quantizers import quantize_weight_rtn

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(m * 1_000_003 + k * 1009 + n)
    x = torch.randn(m, k, device=dev, generator=gen).half()
    w = torch.randn(n, k, device=dev, generator=gen) / k**0.5
    w16 = w.half()
    smooth = torch.rand(k, device=dev, generator=gen) + 0.5
    row = {"M": m, "K": k, "N": n}

    # quantize_per_token
    codes, scales = triton_quantize_per_token(x, smooth, 8, "int")
    ref_codes, ref_scales = quantize_activation_per_token(x, smooth, 8, "int")
    row["qpt exact"] = torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    t_qpt = median_ms(lambda: triton_quantize_per_token(x, smooth, 8, "int"))
    row["qpt ms"] = t_qpt
    row["qpt vs ref"] = median_ms(lambda: quantize_activation_per_token(x, smooth, 8, "int")) / t_qpt
    row["copy/qpt"] = median_ms(lambda: x.clone()) / t_qpt

    # linear_w4a16
    qw = quantize_weight_rtn(w, 4, W4_GROUP, False)
    y = triton_linear_w4a16(x, qw.qweight, qw.scales, qw.zeros, None, W4_GROUP)
    ref = linear_w4a16_reference(x, qw.qweight, qw.scales, qw.zeros, None, W4_GROUP)
    row["w4 rel err"] = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    t_w4 = median_ms(lambda: triton_linear_w4a16(x, qw.qweight, qw.scales, qw.zeros, None, W4_GROUP))
    t_fp16 = median_ms(lambda: F.linear(x, w16))
    row["w4 ms"] = t_w4
    row["fp16 ms"] = t_fp16
    row["w4 vs fp16"] = t_fp16 / t_w4

    # linear_w8a8
    qweight, wscales = quantize_weight_per_channel_int8(w)
    y8 = triton_linear_w8a8(x, qweight, wscales, None, None, None)
    row["w8a8 exact"] = torch.equal(y8, linear_w8a8_reference(x, qweight, wscales, None, None, None))
    t_w8 = median_ms(lambda: triton_linear_w8a8(x, qweight, wscales, None, None, None))
    row["w8a8 ms"] = t_w8
    row["w8a8 vs fp16"] = t_fp16 / t_w8
    codes8, xscales = quantize_rows(x, None, 8, "int")
    t_gemm = median_ms(lambda: int8_gemm_epilogue(codes8, xscales, qweight, wscales, None, torch.float16))
    if int_mm_supported("cuda", m, k, n):
        weight_t = qweight.t()
        row["gemm vs _int_mm"] = median_ms(lambda: torch._int_mm(codes8, weight_t)) / t_gemm
    else:
        row["gemm vs _int_mm"] = None
    return row


COLUMNS = ["M", "K", "N", "qpt ms", "qpt vs ref", "copy/qpt", "qpt exact", "fp16 ms", "w4 ms", "w4 vs fp16",
           "w4 rel err", "w8a8 ms", "w8a8 vs fp16", "gemm vs _int_mm", "w8a8 exact"]


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2e}" if value < 1e-2 else f"{value:.3f}"
    return str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape (4096 x 4096), M = 1 and 128")
    parser.add_argument("--rows", help="comma-separated M values")
    parser.add_argument("--shapes", help="comma-separated KxN values")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py needs a CUDA device (the Triton kernels run on GPUs); "
              "none is available here.", file=sys.stderr)
        return 2
    import triton

    import qcompile.kernels  # noqa: F401  (registers the ops)

    rows = [int(v) for v in args.rows.split(",")] if args.rows else (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print("# ratios: baseline time / Triton time (> 1: Triton faster); copy/qpt: x.clone() time / quantize time")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for k, n in shapes:
        for m in rows:
            result = bench_shape(m, k, n)
            print("| " + " | ".join(format_cell(result[c]) for c in COLUMNS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
