"""Held-out perplexity of the tiny Llama: float32 against qcompile's quantized presets.

    .venv/bin/python benchmarks/tiny_llama/perplexity.py [--recipes w8a16,w4a16] [--windows N] [--threads N]

The model and text are ``qcompile.lm_eval``'s: ``load_tiny_llama()`` (trained by
``benchmarks/tiny_llama/train.py``), the held-out windows (non-overlapping 256-token
windows of 160 held-out standard-library docstrings; nats per byte). Each recipe is
applied with ``qcompile.quantize(model, (input_ids,), recipe=...)`` on an example batch
of 4 calibration windows, with ``calibration=`` 8 batches of 4 calibration windows
(texts disjoint from the held-out ones; weight-only presets use them only for the
per-layer error report and, for w4a16, the E[x²] weighting of the range search).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import qcompile
import qcompile.lm_eval as lm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="w8a16,w4a16", help="comma-separated presets (default w8a16,w4a16)")
    parser.add_argument("--windows", type=int, default=None, help="use only the first N held-out windows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in qcompile.PRESETS]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; presets: {', '.join(sorted(qcompile.PRESETS))}")

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
        qm = qcompile.quantize(model, example, recipe=recipe, calibration=calibration, progress=False)
        t_quant = time.perf_counter() - t
        t = time.perf_counter()
        rows.append((recipe, lm.mean_nll(qm, windows), t_quant, time.perf_counter() - t))

    print(f"tiny Llama ({meta['model']['parameters']:,} parameters), {windows.shape[0]} held-out windows of "
          f"{windows.shape[1]} bytes; recorded float held-out loss {meta['results']['heldout_loss']:.4f} "
          f"(all {meta['split']['heldout_windows']} windows)")
    print(f"{'model':<12} {'loss (nats/byte)':>17} {'perplexity':>11} {'vs float':>9} {'quantize s':>11} {'eval s':>7}")
    base = rows[0][1]
    for name, loss, t_quant, t_eval in rows:
        tq = f"{t_quant:.1f}" if t_quant is not None else "-"
        print(f"{name:<12} {loss:>17.5f} {math.exp(loss):>11.4f} {math.exp(loss - base):>8.5f}x {tq:>11} {t_eval:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
