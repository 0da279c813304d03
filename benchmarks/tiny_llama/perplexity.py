"""Held-out perplexity of the tiny Llama: float32 against qcompile's quantized presets.

    .venv/bin/python benchmarks/tiny_llama/perplexity.py [--recipes w8a16,w4a16] [--windows N] [--threads N]

The model and text are ``qcompile.lm_eval``'s: ``load_tiny_llama()`` (trained by
``benchmarks/tiny_llama/train.py``), the held-out windows (non-overlapping 256-token
windows of 160 held-out standard-library docstrings; nats per byte). Each recipe is
applied with ``qcompile.quantize(model, (input_ids,), recipe=...)`` on an example batch
of 4 calibration windows, with ``calibration=`` 8 batches of 4 calibration windows
(texts disjoint from the held-out ones; weight-only presets use them only for the
per-layer error report and, for w4a16, the E[x²] weighting of the range search).

``--recipes`` takes preset names and the variants of :data:`VARIANTS` (one change to a
preset each, so a row differs from its preset in one thing only); ``--list`` prints them.
The rotation and rounding comparison of BENCHMARKS.md::

    .venv/bin/python benchmarks/tiny_llama/perplexity.py --threads 2 --recipes \
        w4a16,w4a16-gptq,w4a16-gptq-rot,w3a16,w3a16-gptq,w4a8-rtn-norot,w4a8-rtn-input,w4a8-norot,\
        w4a8-input,w4a8,w4a4-rtn-norot,w4a4-rtn-input,w4a4-rtn,w4a4-norot,w4a4-input,w4a4
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import qcompile
import qcompile.lm_eval as lm


# name -> (base preset, changes): RTN vs GPTQ at 4 and 3 bits, rotation on/off
VARIANTS: dict[str, tuple[str, dict]] = {
    "w3a16": ("w4a16", {"weight_bits": 3}),
    "w3a16-gptq": ("w4a16-gptq", {"weight_bits": 3}),
    "w4a16-gptq-rot": ("w4a16-gptq", {"rotate": "input"}),
    "w4a8-norot": ("w4a8", {"rotate": "off"}),
    "w4a8-rtn": ("w4a8", {"method": "rtn"}),
    "w4a8-rtn-norot": ("w4a8", {"method": "rtn", "rotate": "off"}),
    "w4a4-norot": ("w4a4", {"rotate": "off"}),
    "w4a4-rtn": ("w4a4", {"method": "rtn"}),
    "w4a4-rtn-norot": ("w4a4", {"method": "rtn", "rotate": "off"}),
    # an online rotation of every quantized linear's input instead of the presets' offline
    # residual-stream rotation (plus online rotations of the other linears' inputs)
    "w4a8-input": ("w4a8", {"rotate": "input"}),
    "w4a8-rtn-input": ("w4a8", {"method": "rtn", "rotate": "input"}),
    "w4a4-input": ("w4a4", {"rotate": "input"}),
    "w4a4-rtn-input": ("w4a4", {"method": "rtn", "rotate": "input"}),
}


def resolve(name: str):
    if name in qcompile.PRESETS:
        return qcompile.PRESETS[name]
    base, changes = VARIANTS[name]
    return qcompile.PRESETS[base].replace(name=name, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="w8a16,w4a16", help="comma-separated presets (default w8a16,w4a16)")
    parser.add_argument("--windows", type=int, default=None, help="use only the first N held-out windows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--list", action="store_true", help="print the recipe names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in (*qcompile.PRESETS, *VARIANTS):
            print(name, "" if name in qcompile.PRESETS else f"= {VARIANTS[name][0]} with {VARIANTS[name][1]}")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in qcompile.PRESETS and r not in VARIANTS]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; see --list")

    model = lm.load_tiny_llama()
    windows = lm.heldout_windows()
    if args.windows is not None:
        windows = windows[: args.windows]
    calibration = lm.calibration_inputs(n_batches=8, batch_size=4)
    example = calibration[0]
    meta = lm.tiny_llama_metadata()

    rows = []
    t = time.perf_counter()
    loss = lm.mean_nll(model, windows)
    rows.append(("float32", loss, None, time.perf_counter() - t))
    for recipe in recipes:
        t = time.perf_counter()
        qm = qcompile.quantize(model, example, recipe=resolve(recipe), calibration=calibration, progress=False)
        t_quant = time.perf_counter() - t
        t = time.perf_counter()
        rows.append((recipe, lm.mean_nll(qm, windows), t_quant, time.perf_counter() - t))

    print(f"tiny Llama ({meta['model']['parameters']:,} parameters), {windows.shape[0]} held-out windows of "
          f"{windows.shape[1]} bytes; recorded float held-out loss {meta['results']['heldout_loss']:.4f} "
          f"(all {meta['split']['heldout_windows']} windows)")
    print(f"{'model':<16} {'loss (nats/byte)':>17} {'perplexity':>11} {'vs float':>9} {'quantize s':>11} {'eval s':>7}")
    base = rows[0][1]
    for name, loss, t_quant, t_eval in rows:
        tq = f"{t_quant:.1f}" if t_quant is not None else "-"
        print(f"{name:<16} {loss:>17.5f} {math.exp(loss):>11.4f} {math.exp(loss - base):>8.5f}x {tq:>11} {t_eval:>7.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
