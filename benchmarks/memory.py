"""Peak memory and time of the in-memory paths on Llama models of 0.1B to 1.1B parameters.

For each size, dtype and recipe a fresh subprocess builds a Llama with random weights
(TinyLlama-1.1B's widths: hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocabulary 32000,
untied head; 22 layers for 1.1B, 8 for 0.5B; 0.1B is hidden 768, MLP 2048, 12 heads / 4 KV
heads, 12 layers), then either quantizes it with ``qcompile.quantize`` (defaults, so the
float64 verification is on; calibration: 4 batches of 64 random tokens; example: 16
tokens) or calls ``torch.compile(model, backend="qcompile")`` once on the example. Printed
per row: the model's own bytes, the subprocess's resident memory before the work (model,
torch and the imports), its peak during the work (``VmHWM``, the kernel's high-water mark,
reset once the model is built), the peak as a multiple of the model's size (also after subtracting what the
process held before besides the model: torch, transformers and qcompile's imports), the
time, and the verification's share of it (the float64 checks, from the report's pass log).

    python benchmarks/memory.py                                   # every row (an hour or more)
    python benchmarks/memory.py --sizes 0.1B --recipes w8a16      # one quick row
    python benchmarks/memory.py --sizes 1.1B --dtypes float32 --recipes w4a16,backend-w8a16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from llama_sizes import SIZES, VOCAB, build_llama

RECIPES = ("w8a16", "w4a16", "w4a16-gptq", "w8a8", "backend-w8a16")


def worker(size: str, dtype_name: str, recipe: str, threads: int) -> None:
    """Build the model, run one recipe, print one RESULT line of JSON."""
    import torch

    import qcompile
    from qcompile.resident import resident_bytes
    from qcompile.sequential import peak_rss_bytes

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    model = build_llama(size, dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 16), generator=gen)
    calibration = [(torch.randint(0, VOCAB, (1, 64), generator=gen),) for _ in range(4)]
    before = resident_bytes()
    # The high-water mark from here on: building the model (random initialization) is not
    # what is measured. Writing 5 to clear_refs resets VmHWM to the current resident size.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    verify_seconds = None
    if recipe.startswith("backend-"):
        compiled = torch.compile(model, backend="qcompile", options={"recipe": recipe[len("backend-"):]})
        with torch.no_grad():
            compiled(ids)
    else:
        qm = qcompile.quantize(model, (ids,), recipe=recipe, calibration=calibration, progress=False)
        verify_seconds = sum(p.verify_seconds for p in qm.report().passes)
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "size": size, "dtype": dtype_name, "recipe": recipe, "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes, "rss_before": before, "peak": peak_rss_bytes(), "seconds": seconds,
        "verify_seconds": verify_seconds,
    }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="quantize() presets, and backend-<preset> for the torch.compile backend's first call")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (default: torch's own)")
    p.add_argument("--worker", nargs=3, metavar=("SIZE", "DTYPE", "RECIPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, args.threads)
        return
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| size | dtype | path | model | RSS before | peak (VmHWM) | peak / model | (peak - imports) / model "
          "| time | of it, verification |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            for recipe in args.recipes.split(","):
                done = subprocess.run([sys.executable, __file__, "--worker", size, dtype, recipe,
                                       "--threads", str(args.threads)], capture_output=True, text=True)
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if done.returncode != 0 or line is None:
                    reason = "killed (out of memory?)" if done.returncode in (-9, 137) else \
                        (done.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"| {size} | {dtype} | {recipe} | failed: exit {done.returncode}: {reason} ||||||||", flush=True)
                    continue
                r = json.loads(line[len("RESULT "):])
                gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
                verify = "-" if r["verify_seconds"] is None else f"{r['verify_seconds']:.0f} s"
                imports = r["rss_before"] - r["model_bytes"]  # torch, transformers, qcompile: no weights
                print(f"| {size} ({r['parameters'] / 1e9:.2f}B) | {dtype} | {recipe} | {gb(r['model_bytes'])} | "
                      f"{gb(r['rss_before'])} | {gb(r['peak'])} | {r['peak'] / r['model_bytes']:.2f}x | "
                      f"{(r['peak'] - imports) / r['model_bytes']:.2f}x | {r['seconds']:.0f} s | {verify} |", flush=True)


if __name__ == "__main__":
    main()
