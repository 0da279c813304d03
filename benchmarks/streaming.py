"""Streaming quantization of a synthetic Llama checkpoint larger than the memory budget.

For each layer count, generates a Llama-architecture checkpoint with random weights
(sharded safetensors, float32; by default TinyLlama-1.1B's widths — hidden 2048, MLP
5632, 32 heads, 4 KV heads — with a 64000-token vocabulary and an untied LM head: 1.05 GB
of embedding + head and 0.176 GB per layer, so 16 layers are 3.87 GB and 17 are 4.04 GB)
under ``--workdir``, quantizes it stage by stage with ``qcompile.streaming`` in a fresh
subprocess (w4a16-gptq: int4 g128 GPTQ with activation order; random-token
calibration), and reports the subprocess's peak resident memory (``VmHWM``, its own
high-water mark, which counts the memory-mapped weight pages it touched; not
``ru_maxrss``, which a subprocess inherits from its parent at the fork), the wall time
of each stage, and the total. The checkpoint and the output are deleted after each run,
so the disk holds at most one checkpoint and its output.

    python benchmarks/streaming.py                      # 4, 8 and 16 layers
    python benchmarks/streaming.py --layers 17          # a checkpoint over 4 GB
    python benchmarks/streaming.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config(args, layers: int):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )


def worker(ck: str, out: str, recipe: str, batches: int, seq: int, vocab: int, threads: int) -> None:
    """Quantize ``ck`` into ``out``; print one JSON line with the figures."""
    import torch

    from qcompile.sequential import peak_rss_bytes
    from qcompile.streaming import quantize_checkpoint

    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, vocab, (1, seq), generator=gen)} for _ in range(batches)]
    start = time.perf_counter()
    rss_before = peak_rss_bytes()
    recipe_arg = json.loads(recipe) if recipe.startswith("{") else recipe
    cpu_marks = [time.process_time()]
    rss_now: list[int] = []  # resident memory right after each stage (not the peak)

    def stage_done(_index: int, _seconds: float) -> None:
        cpu_marks.append(time.process_time())
        rss_now.append(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))

    result = quantize_checkpoint(ck, out, recipe=recipe_arg, calibration=calibration, progress=True,
                                 on_stage_done=stage_done)
    total = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "stages": result.stages, "stage_seconds": result.stage_seconds, "total_seconds": total,
        # CPU seconds (all threads) per stage, approximately: the marks also count the
        # manifest update; the first one also the capture (made before the first stage)
        "stage_cpu_seconds": [b - a for a, b in zip(cpu_marks[1:-1], cpu_marks[2:])],
        "rss_after_stage": rss_now,
        "peak_rss": result.peak_rss, "peak_rss_after_imports": rss_before,
        "capture_seconds": total - sum(result.stage_seconds.values()),
        "output_bytes": sum(p.stat().st_size for p in Path(out).iterdir()),
    }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,8,16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--recipe", default="w4a16-gptq",
                   help="a preset, or JSON Recipe fields (default w4a16-gptq)")
    p.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per calibration batch (default 128)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/qcompile_streaming_bench")
    p.add_argument("--worker", nargs=2, metavar=("CK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, args.recipe, args.batches, args.seq, args.vocab, args.threads)
        return

    from qcompile.checkpoint import write_synthetic_checkpoint

    work = Path(args.workdir)
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        shutil.rmtree(work, ignore_errors=True)
        ck, out = work / "ck", work / "out"
        try:
            t0 = time.perf_counter()
            size = write_synthetic_checkpoint(_config(args, layers), ck)
            gen_s = time.perf_counter() - t0
            print(f"{layers} layers: wrote {size / 1e9:.2f} GB checkpoint in {gen_s:.0f} s", flush=True)
            cmd = [sys.executable, __file__, "--worker", str(ck), str(out), "--recipe", args.recipe,
                   "--batches", str(args.batches), "--seq", str(args.seq), "--vocab", str(args.vocab),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # progress on stderr
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"the streaming worker failed for {layers} layers (exit {proc.returncode})")
            res = json.loads(line[len("RESULT "):])
            res.update(layers=layers, checkpoint_bytes=size)
            rows.append(res)
            secs = [res["stage_seconds"][str(i)] for i in range(res["stages"])]
            print(f"  peak RSS {res['peak_rss'] / 2**30:.2f} GiB; total {res['total_seconds']:.0f} s "
                  f"(capture {res['capture_seconds']:.0f} s); stage wall seconds: " + " ".join(f"{s:.1f}" for s in secs)
                  + "; CPU seconds of stages 2..: " + " ".join(f"{s:.1f}" for s in res["stage_cpu_seconds"])
                  + "; resident GiB after each stage: "
                  + " ".join(f"{b / 2**30:.2f}" for b in res.get("rss_after_stage", [])),
                  flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    import torch

    print("\ncommand: python " + " ".join(sys.argv))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}; load average at the end: "
          + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"recipe {args.recipe}; {args.batches} x {args.seq} calibration tokens; hidden {args.hidden}, "
          f"MLP {args.intermediate}, heads {args.heads} (KV {args.kv_heads}), vocab {args.vocab}")
    print("| layers | checkpoint (fp32) | peak RSS | capture s | stages | stage wall s: median (min-max) | "
          "stage CPU s: median | total wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        secs = [r["stage_seconds"][str(i)] for i in range(r["stages"])]
        cpu = r["stage_cpu_seconds"] or [float("nan")]
        print(f"| {r['layers']} | {r['checkpoint_bytes'] / 1e9:.2f} GB | {r['peak_rss'] / 2**30:.2f} GiB | "
              f"{r['capture_seconds']:.0f} | {r['stages']} | {statistics.median(secs):.1f} ({min(secs):.1f}-{max(secs):.1f}) | "
              f"{statistics.median(cpu):.1f} | {r['total_seconds']:.0f} |")


if __name__ == "__main__":
    main()
