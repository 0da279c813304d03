"""Per-layer precision by the ILP against uniform and sensitivity-blind assignments.

    .venv/bin/python benchmarks/precision_ilp.py [--models minilm,llama] [--budgets 3.5,4.0,4.5]
        [--seeds 3] [--samples 16] [--threads 2]

Candidates: int3 g128 / int4 g128 (asymmetric, range search, 4-bit container) and int8
per-channel, i.e. the ``"auto"`` preset's. For each model and average-bits budget:

* ILP: ``passes/assign_precision.py``'s problem (``budget_constraints`` +
  ``solve_assignment``) over the Ω of each sensitivity method: ``local`` (layer output
  error), ``hessian`` (HAWQ, Hutchinson trace with ``--samples`` HVPs), ``e2e`` (measured
  loss increase with one layer quantized, on 2 calibration batches);
* random: layers in random order, each raised from int3 to a random one of int4/int8 while the
  budget allows (``--seeds`` draws; mean and worst shown);
* by size: smallest layers raised to int8 first, then to int4, while the budget allows;
* uniform int3 / int4 / int8 for scale (``--budgets 4.0`` gives the ILP at uniform int4's cost).

Every assignment is applied through ``qcompile.quantize`` with the recipe pinning each layer
(``precision_pins``), so all rows share one quantization path; the ``"auto"`` preset itself is
also run at 4.5 bits (its row must match ILP/hessian with the same sample count; ``--methods ''
--budgets '' --uniform ''`` runs it alone). Metrics on held-out data: MiniLM —
cosine of mean-pooled embeddings against float32 on 256 held-out texts (calibration: 64 other
texts); tiny Llama — held-out loss (nats/byte) and perplexity (calibration: 8 batches of
4 calibration windows). Also: solver time for 500 layers × 6 candidates, and the time of each
sensitivity analysis (with the Hutchinson standard errors).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import qcompile
from qcompile.budget import Budget
from qcompile.calibration import flatten_calibration
from qcompile.capture import capture
from qcompile.cost_model import linear_costs
from qcompile.graph_utils import layer_name, quantizable_linears
from qcompile.passes.assign_precision import budget_constraints
from qcompile.passes.canonicalize import canonicalize
from qcompile.pipeline import PassContext, run_passes
from qcompile.precision_ilp import BudgetConstraint, solve_assignment
from qcompile.recipe import PRESETS
from qcompile.sensitivity import layer_sensitivity
from qcompile.weight_formats import candidate_formats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import emit, header, markdown_table  # noqa: E402  (shared report helpers)

BASE = PRESETS["auto"]
CANDIDATES = ("w3", "w4", "w8")


def log(msg: str) -> None:
    print(f"  [precision] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- solver time

def solver_time(layers: int = 500, cands: int = 6, repeats: int = 5) -> list[str]:
    rng = np.random.default_rng(0)
    bits = np.array([2, 3, 4, 6, 8, 16])[:cands]
    times, gaps = [], []
    for _ in range(repeats):
        numel = rng.integers(10_000, 50_000_000, size=layers).astype(float)
        omega = rng.exponential(size=(layers, cands)) * (2.0 ** -bits)[None, :] * numel[:, None]
        table = numel[:, None] * bits
        # a latency-like second budget: memory-bound below 8 bits, compute-bound above
        latency = numel[:, None] * np.maximum(bits / 8, 1.0)
        cons = [BudgetConstraint("avg_bits", table, 4.5 * numel.sum(), 1 / numel.sum()),
                BudgetConstraint("latency", latency, 0.8 * latency.max(1).sum())]
        start = time.perf_counter()
        result = solve_assignment(omega, cons)
        times.append(time.perf_counter() - start)
        gaps.append(result.gap)
    return [f"{layers} layers x {cands} candidates (avg_bits 4.5 and a latency-like budget, random Ω and sizes; "
            f"HiGHS default relative gap 1e-4): median {statistics.median(times) * 1e3:.0f} ms, max "
            f"{max(times) * 1e3:.0f} ms over {repeats} random problems (largest proven gap {max(gaps):.1e})"]


# --------------------------------------------------------------------------- assignments

def random_assignment(bits: np.ndarray, numel: np.ndarray, limit: float, rng) -> np.ndarray:
    """Start at the cheapest candidate; visit layers in random order, raise each to a random
    dearer candidate when the total (Σ numel · bits) stays within ``limit``."""
    choice = np.zeros(len(numel), dtype=int)
    total = float((numel * bits[0]).sum())
    for layer in rng.permutation(len(numel)):
        target = int(rng.integers(1, len(bits)))
        extra = numel[layer] * (bits[target] - bits[choice[layer]])
        if total + extra <= limit:
            choice[layer], total = target, total + extra
    return choice


def by_size_assignment(bits: np.ndarray, numel: np.ndarray, limit: float) -> np.ndarray:
    """Smallest layers first to the dearest candidate, then (same order) to the next one."""
    choice = np.zeros(len(numel), dtype=int)
    total = float((numel * bits[0]).sum())
    order = np.argsort(numel, kind="stable")
    for target in range(len(bits) - 1, 0, -1):
        for layer in order:
            if choice[layer] >= target:
                continue
            extra = numel[layer] * (bits[target] - bits[choice[layer]])
            if total + extra <= limit:
                choice[layer], total = target, total + extra
    return choice


# --------------------------------------------------------------------------- one model

class Case:
    """A model, its data and metric; ``quantize(pins)`` → metric of the pinned assignment."""

    def __init__(self, name, title, model, example_args, example_kwargs, calibration, metric: Callable[[Any], tuple],
                 metric_head: list[str], loss: str):
        self.name, self.title, self.model, self.metric, self.metric_head, self.loss = name, title, model, metric, metric_head, loss
        self.example_args, self.example_kwargs, self.calibration = example_args, example_kwargs, calibration
        cap = capture(model, example_args, example_kwargs)
        example = cap.flatten_inputs(example_args, example_kwargs)
        self.flat_calibration = flatten_calibration(cap, calibration)
        self.gm = run_passes(cap.graph_module, [canonicalize], PassContext(BASE, example, verify=False,
                                                                          progress=False))
        self.nodes = quantizable_linears(self.gm)
        self.layers = [layer_name(n) for n in self.nodes]
        self.formats = candidate_formats(CANDIDATES, BASE.group_size, BASE.symmetric)
        self.costs, self.sizes = linear_costs(self.gm, self.nodes)
        self.numel = np.array([c.out_features * c.in_features for c in self.costs], dtype=float)
        self.bits = np.array([f.grid_bits for f in self.formats], dtype=float)

    def quantize(self, recipe) -> tuple:
        qm = qcompile.quantize(self.model, self.example_args, self.example_kwargs, recipe=recipe,
                               calibration=self.calibration, verify=False, progress=False)
        return self.metric(qm), qm.report()

    def pinned(self, choice: np.ndarray, budget: float):
        pins = tuple((name, CANDIDATES[c]) for name, c in zip(self.layers, choice))
        return BASE.replace(name="pinned", budget=Budget(avg_bits=budget), precision_pins=pins)

    def avg_bits(self, choice) -> float:
        return float((self.numel * self.bits[choice]).sum() / self.numel.sum())


def run_case(case: Case, budgets: list[float], seeds: int, samples: int, methods: list[str], uniform: list[str],
             auto: bool) -> None:
    emit(f"## {case.title}")
    emit()
    tables, timing = {}, []
    for method in methods:
        log(f"{case.name}: sensitivity {method}")
        table = layer_sensitivity(case.gm, case.flat_calibration, case.nodes, case.formats, method=method,
                                  clip_ratios=BASE.clip_ratios, samples=samples, loss=case.loss, e2e_batches=2,
                                  progress=sys.stderr.isatty())
        tables[method] = table
        extra = ""
        if table.traces is not None:
            rel = [table.traces.std_errors[n] / abs(table.traces.traces[n]) for n in case.layers
                   if table.traces.traces[n] != 0]
            extra = (f"; {samples} HVPs, loss {table.traces.loss}; standard error / |trace| median "
                     f"{statistics.median(rel):.1%}, max {max(rel):.1%}")
        timing.append(f"- `{method}`: {table.seconds:.1f} s{extra}")
    e2e = ", 2 of them for e2e" if "e2e" in methods else ""
    emit(f"{len(case.layers)} linears; sensitivity analysis time ({torch.get_num_threads()} threads; "
         f"{len(case.flat_calibration)} calibration batches{e2e}, Ω for 3 candidates per layer):")
    emit()
    emit("\n".join(timing))
    emit()
    rows = []

    def add(label, budget, choice=None, recipe=None):
        recipe = recipe if recipe is not None else case.pinned(choice, budget)
        t0 = time.perf_counter()
        metrics, report = case.quantize(recipe)
        layers = [r for r in report.layers if "omega" in r]
        numel = sum(r["shape"][0] * r["shape"][1] for r in layers)
        avg = sum(r["bits"] * r["shape"][0] * r["shape"][1] for r in layers) / numel
        mix = "/".join(str(sum(r["bits"] == b for r in layers)) for b in (3, 4, 8))
        rows.append([label, f"{budget:g}" if budget else "-", f"{avg:.3f}", mix, f"{report.quantized_bytes / 2**20:.2f}",
                     *metrics])
        log(f"{case.name}: {label} @ {budget}: {metrics} ({time.perf_counter() - t0:.0f} s)")

    for c, name in enumerate(CANDIDATES):
        if name not in uniform:
            continue
        add(f"uniform {name}", None, np.full(len(case.layers), c), case.pinned(np.full(len(case.layers), c), 8.0))
    for budget in budgets:
        limit = budget * case.numel.sum()
        for method, table in tables.items():
            cons = budget_constraints(Budget(avg_bits=budget), case.costs, case.formats, case.sizes)
            result = solve_assignment(table.omega, cons)
            add(f"ILP, Ω {method}", budget, result.choice)
        for seed in range(seeds):
            choice = random_assignment(case.bits, case.numel, limit, np.random.default_rng(seed))
            add(f"random (seed {seed})", budget, choice)
        add("by size (small layers first)", budget, by_size_assignment(case.bits, case.numel, limit))
    if auto:
        add('preset "auto" (Ω hessian)', 4.5, recipe="auto")
    head = ["assignment", "budget avg bits", "avg bits", "#int3/#int4/#int8", "linear MiB", *case.metric_head]
    emit(markdown_table(head, rows, "lrrrr" + "r" * len(case.metric_head)))
    emit()


def minilm_case() -> Case:
    from qcompile.data import batches, calibration_and_heldout, embed_texts, embedding_cosine, load_minilm

    model, tokenizer = load_minilm()
    calib_texts, eval_texts = calibration_and_heldout(64, 256)
    calib = list(batches(calib_texts, tokenizer, batch_size=16))
    with torch.no_grad():
        reference = embed_texts(model, tokenizer, eval_texts)

    def metric(qm):
        with torch.no_grad():
            cos = embedding_cosine(embed_texts(qm, tokenizer, eval_texts), reference)
        return f"{float(cos.mean()):.6f}", f"{float(cos.min()):.6f}", f"{float((1 - cos).mean()):.2e}"

    return Case("minilm", "all-MiniLM-L6-v2 (embedding cosine on 256 held-out texts)", model, (), calib[0], calib, metric,
                ["cos mean", "cos min", "mean 1-cos"], loss="mse")


def llama_case() -> Case:
    import qcompile.lm_eval as lm

    model = lm.load_tiny_llama()
    windows = lm.heldout_windows()
    calibration = lm.calibration_inputs(n_batches=8, batch_size=4)
    base = lm.mean_nll(model, windows)

    def metric(qm):
        loss = lm.mean_nll(qm, windows)
        return f"{loss:.5f}", f"{math.exp(loss):.4f}", f"{math.exp(loss - base):.5f}x"

    return Case("llama", f"tiny Llama (held-out loss, {windows.shape[0]} windows; float32 {base:.5f} nats/byte, "
                f"perplexity {math.exp(base):.4f})", model, calibration[0], {}, calibration, metric,
                ["loss (nats/byte)", "perplexity", "vs float"], loss="lm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,llama")
    p.add_argument("--budgets", default="3.5,4.5")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--samples", type=int, default=16, help="Hutchinson HVPs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="local,hessian,e2e", help="sensitivity methods of the ILP rows")
    p.add_argument("--uniform", default="w3,w4,w8", help="uniform rows")
    p.add_argument("--no-auto", action="store_true", help='skip the preset "auto" row')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    emit(header("qcompile per-layer precision (ILP) against uniform and sensitivity-blind assignments", args.threads))
    emit("Solver time (scipy.optimize.milp / HiGHS): " + solver_time()[0])
    emit()
    builders = {"minilm": minilm_case, "llama": llama_case}
    for name in filter(None, args.models.split(",")):  # --models "" times the solver only
        run_case(builders[name](), [float(b) for b in filter(None, args.budgets.split(","))], args.seeds,
                 args.samples, list(filter(None, args.methods.split(","))), args.uniform.split(","),
                 not args.no_auto)
    emit(f"(total wall time {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
