"""Where the time of MiniLM's W8A8 forward under ``torch.compile(backend="qcompile")`` goes.

    .venv/bin/python benchmarks/minilm_cpu_profile.py [--dtype fp32|bf16] [--threads N] [--runs N]

Compiles all-MiniLM-L6-v2 (or a bf16 copy) with ``backend="qcompile"`` and the w8a8 preset
(calibrated on 64 other texts in batches of the timing batch's shape, as in
``minilm_cpu.py``), times the forward on batch 32 x 128 tokens, then profiles ``--runs``
forwards with ``torch.profiler`` and splits their CPU time into:

* int8 matmuls: ``aten::_int_mm`` (with the int8 GOP/s they reach: 2·M·K·N per linear,
  counted from the compiled graph's matmul shapes);
* attention: the CPU flash SDPA kernel;
* generated kernels: Inductor's own C++ loops (GEMM epilogues fused with the residual add,
  LayerNorm, GELU and the per-token activation quantization);
* the rest (framework overhead).

For scale it times the model's linears alone at the int8 graph's GEMM shapes (Q, K and V
merged into one) as float32 and bfloat16 ``F.linear`` and as ``torch._int_mm``: the GEMM cost
of Inductor fp32, of Inductor bf16 and of the int8 path on this CPU, and so the most that
bf16 can gain here. It times attention alone at the model's shapes ([32, 12, 128, 32], with no mask:
the fastest these kernels run them) with the flash kernel and with the math form compiled by
Inductor, and prints what the int8 matmuls and the faster attention leave for everything else
at a given speedup over an Inductor fp32 time you pass (``--inductor-fp32-ms``, from
``minilm_cpu.py`` run just before on the same machine).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers backend="qcompile" with torch.compile)
from qcompile.data import calibration_and_heldout, load_minilm
from qcompile.timing import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import N_CALIB_TEXTS, header, timing_batch, timing_shaped_batches  # noqa: E402

ATTENTION_KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu",)
INT8_MATMUL = "aten::_int_mm"


def _median_ms(fn, warmup: int = 3, repeat: int = 11) -> float:
    return time_interleaved({"fn": fn}, warmup=warmup, repeat=repeat)["fn"].median_s * 1e3


def _int_mm_ops(compiled_shapes: list[tuple[int, int, int]]) -> float:
    return sum(2.0 * m * k * n for m, k, n in compiled_shapes)


def _record_int_mm_shapes(prof) -> list[tuple[int, int, int]]:
    shapes = []
    for event in prof.events():
        if event.name == INT8_MATMUL and event.input_shapes and len(event.input_shapes) >= 2:
            (m, k), (_, n) = event.input_shapes[0], event.input_shapes[1]
            shapes.append((m, k, n))
    return shapes


def profile(dtype: torch.dtype, runs: int) -> dict[str, float]:
    model, tokenizer = load_minilm()
    if dtype != torch.float32:
        model = model.to(dtype)
    enc = timing_batch(tokenizer)
    calib_texts, _ = calibration_and_heldout(N_CALIB_TEXTS, 256)
    calib = timing_shaped_batches(tokenizer, calib_texts)
    compiled = torch.compile(model, backend="qcompile",
                             options={"recipe": "w8a8", "calibration": calib, "inner": "inductor", "progress": False})
    print("compiling (quantization with calibration, then Inductor) ...", file=sys.stderr, flush=True)
    forward_ms = _median_ms(lambda: compiled(**enc))
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(runs):
            compiled(**enc)
    buckets: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / runs / 1e3
        if event.key == INT8_MATMUL:
            buckets["int8 matmuls (aten::_int_mm)"] += ms
        elif event.key in ATTENTION_KERNELS:
            buckets["attention (flash SDPA)"] += ms
        elif event.key.startswith("## Call CompiledFxGraph") or event.key.startswith("graph_"):
            buckets["generated kernels (Inductor C++)"] += ms
        else:
            buckets["other (framework)"] += ms
    shapes = _record_int_mm_shapes(prof)
    int8_gops = _int_mm_ops(shapes) / runs / 1e9
    return {"forward_ms": forward_ms, "int8_gop": int8_gops, "shapes": shapes, **buckets}


def linear_floors_ms(shapes: list[tuple[int, int, int]], runs: int) -> dict[str, float]:
    """ms per forward of the model's linears alone (the int8 matmuls' shapes, ``runs``
    forwards' worth of them) as float32 and bfloat16 ``F.linear`` and as ``torch._int_mm``:
    what the GEMMs of Inductor fp32, Inductor bf16 and the int8 path cost on this CPU."""
    counts: dict[tuple[int, int, int], int] = defaultdict(int)
    for shape in shapes:
        counts[shape] += 1
    gen = torch.Generator().manual_seed(0)
    totals: dict[str, float] = defaultdict(float)
    for (m, k, n), count in counts.items():
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        xb, wb = x.bfloat16(), w.bfloat16()
        a, b = torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
        bt = b.t()
        timings = time_interleaved({"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb),
                                    "int8": lambda: torch._int_mm(a, bt)}, warmup=2, repeat=7)
        for name, timing in timings.items():
            totals[name] += count / runs * timing.median_s * 1e3
    return dict(totals)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v


def attention_alone_ms(dtype: torch.dtype, batch: int = 32, heads: int = 12, seq: int = 128, head_dim: int = 32,
                       layers: int = 6) -> tuple[float, float]:
    """(flash SDPA, the math form compiled by Inductor): ms for ``layers`` attentions of the
    model's shapes, no mask."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    compiled = torch.compile(_math_attention)
    timings = time_interleaved({"flash": lambda: F.scaled_dot_product_attention(q, k, v),
                                "math": lambda: compiled(q, k, v)}, warmup=3, repeat=21)
    return layers * timings["flash"].median_s * 1e3, layers * timings["math"].median_s * 1e3


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's dtype (default fp32)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--runs", type=int, default=5, help="forwards profiled (default 5)")
    p.add_argument("--inductor-fp32-ms", type=float, default=None, metavar="MS",
                   help="Inductor fp32's forward time from minilm_cpu.py on this machine, for the budget lines")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(header(f"Where MiniLM's W8A8 forward goes: backend=\"qcompile\", {args.dtype} model", args.threads))
    result = profile(dtype, args.runs)
    forward = result.pop("forward_ms")
    gop = result.pop("int8_gop")
    shapes = result.pop("shapes")
    profiled = sum(result.values())
    print(f"forward (median of 11, not profiled): {forward:.1f} ms; profiled: {profiled:.1f} ms per forward "
          f"(mean of {args.runs})\n")
    print("| part | ms per forward | share |")
    print("|:--|--:|--:|")
    for name, ms in sorted(result.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.1f} | {100 * ms / profiled:.0f}% |")
    int_mm_ms = result.get("int8 matmuls (aten::_int_mm)", 0.0)
    print()
    if int_mm_ms:
        print(f"- int8 matmuls: {gop:.1f} GOP per forward, {gop / int_mm_ms * 1e3:.0f} GOP/s")
    floors = linear_floors_ms(shapes, args.runs)
    print(f"- the model's linears alone ({len(shapes) // args.runs} GEMMs at the int8 graph's shapes): float32 "
          f"F.linear {floors['fp32']:.1f} ms, bfloat16 F.linear {floors['bf16']:.1f} ms, int8 torch._int_mm "
          f"{floors['int8']:.1f} ms per forward")
    if args.inductor_fp32_ms:
        print(f"  (so on this CPU Inductor bf16, whose linears are bf16 GEMMs, cannot run faster than "
              f"{args.inductor_fp32_ms / floors['bf16']:.2f}x Inductor fp32's {args.inductor_fp32_ms:.0f} ms even "
              "if everything but its GEMMs took no time)")
    floor, math = attention_alone_ms(dtype)
    print(f"- attention alone at the model's shapes, no mask (6 layers of [32, 12, 128, 32] {args.dtype}): "
          f"flash SDPA {floor:.1f} ms; the math form (matmul, softmax, matmul) compiled by Inductor {math:.1f} ms")
    if args.inductor_fp32_ms:
        rest = profiled - int_mm_ms - result.get("attention (flash SDPA)", 0.0)
        for speedup in (2.5, 2.8):
            budget = args.inductor_fp32_ms / speedup
            print(f"- {speedup}x over Inductor fp32 ({args.inductor_fp32_ms:.0f} ms) is {budget:.0f} ms: after the "
                  f"int8 matmuls and the attention floor, {budget - int_mm_ms - min(floor, math):.0f} ms for "
                  f"everything else (now {rest:.0f} ms)")


if __name__ == "__main__":
    main()
