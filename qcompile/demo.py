"""The main job: quantize the real all-MiniLM-L6-v2 and show fidelity, size and speed against
what a user would pick instead.

Candidates, each a ``torch.compile`` of the bundled model (Dynamo + Inductor), all in one run:

* the baselines ``Inductor fp32`` (``torch.compile(model)``) and ``Inductor bf16``
  (``torch.compile`` of a bfloat16 copy);
* one row per recipe through the qcompile backend, ``torch.compile(model, backend="qcompile",
  options={"recipe": r, "calibration": batches})`` (by default ``w8a8``, the fastest, and
  ``w4a16-gptq``, 4-bit weights with the best 4-bit fidelity).

Calibration and evaluation use disjoint sets of standard-library docstrings. Every batch
(calibration, evaluation, timing) holds ``batch`` texts padded or truncated to exactly ``seq``
tokens: Dynamo compiles the first call's shapes, and the qcompile backend checks its
calibration batches against them. Fidelity is the cosine between each candidate's and the
eager fp32 model's normalized mean-pooled sentence embeddings on the held-out texts. Speed is
the latency of one evaluation batch, the candidates timed interleaved in the same run
(:func:`qcompile.timing.time_interleaved`), reported as medians and as ratios against Inductor
fp32.

The fast CPU paths need the CPU's matrix instructions: torch's int8 matmul is a plain loop
without AVX-512 VNNI or AMX, and bfloat16 matmuls are slower than float32 without AVX-512 BF16
or AMX. A short probe measures both first; where int8 is slow, the recipes with int8
activations are skipped (they would take minutes per batch), and the output says so and why.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .data import calibration_and_heldout, embedding_cosine, load_minilm, mean_pooled_embeddings
from .errors import RecipeError
from .recipe import Recipe, resolve_recipe
from .report import Report
from .timing import time_interleaved

__all__ = [
    "DEFAULT_RECIPES", "BASELINES", "SLOW_INT8_RATIO", "SLOW_BF16_RATIO", "CandidateResult", "DemoResult", "run_demo", "format_demo",
    "resolve_recipes", "uses_int8_matmul", "int8_matmul_slowdown", "bf16_matmul_slowdown",
    "skip_slow_int8",
]

#: The presets the demo shows by default: the fastest (w8a8) and the most faithful 4-bit one.
DEFAULT_RECIPES: tuple[str, ...] = ("w8a8", "w4a16-gptq")
#: The baselines every run measures; ratios are taken against the first.
BASELINES: tuple[str, ...] = ("Inductor fp32", "Inductor bf16")

#: A recipe with int8 activations is skipped where ``torch._int_mm`` takes longer than this many
#: times a float32 matmul of the same shape: torch's CPU int8 GEMM is fast with AVX-512 VNNI /
#: AMX and a plain loop without (about 70x slower than float32 on an AVX2-only CPU).
SLOW_INT8_RATIO = 3.0
#: Above this, the output notes that bfloat16 matmuls are slower than float32 on this CPU (no
#: AVX-512 BF16 or AMX): about 5x on an AVX2-only CPU, about 0.5x with AVX-512 BF16.
SLOW_BF16_RATIO = 1.5

_HOW_BASELINE = {
    "Inductor fp32": "torch.compile(model)",
    "Inductor bf16": "torch.compile(copy.deepcopy(model).to(torch.bfloat16))",
}


@dataclass
class CandidateResult:
    """One row of the demo: a compiled model, its fidelity, size and speed.

    ``speedup`` is Inductor fp32's median latency over this candidate's (> 1: faster), both
    from the same interleaved timing. ``setup_s`` is the one-time cost before the first
    result: Dynamo + Inductor compilation, and for qcompile rows capture, calibration and
    quantization too. ``reports``: for qcompile rows, the report of each graph Dynamo handed
    the backend (empty for the baselines).
    """

    name: str
    how: str
    cosine_mean: float
    cosine_min: float
    model_bytes: int
    linear_bytes: int
    latency_ms: float
    speedup: float
    setup_s: float
    recipe: Recipe | None = None
    reports: list[Report] = field(default_factory=list, repr=False)


@dataclass
class DemoResult:
    rows: list[CandidateResult]  # the baselines first, then one row per recipe
    n_calib: int
    n_eval: int
    batch: int
    seq: int
    real_tokens: int  # tokens of the timing batch that are text, not padding
    rounds: int
    threads: int
    seconds: float  # wall time of run_demo, setup included
    notes: list[str] = field(default_factory=list)  # e.g. recipes skipped, and why

    @property
    def baseline(self) -> CandidateResult:
        return self.rows[0]


def _status(progress: bool, text: str) -> None:
    if progress:
        print(f"[demo] {text}", file=sys.stderr, flush=True)


def _model_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _linear_bytes(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, torch.nn.Linear))


def _fixed_shape_batches(tokenizer: Any, texts: Sequence[str], batch: int, seq: int) -> list[tuple[dict, int]]:
    """``texts`` in chunks of ``batch``, each padded/truncated to exactly ``seq`` tokens, as
    ``(encoding, n_real)``. A short last chunk is filled up with its own texts again (its
    first ``n_real`` rows are the real ones), so that every batch has the compiled shape."""
    out = []
    for start in range(0, len(texts), batch):
        chunk = list(texts[start:start + batch])
        n_real = len(chunk)
        chunk = (chunk * math.ceil(batch / n_real))[:batch]
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        out.append(({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}, n_real))
    return out


def _embed(fn: Callable[..., Any], evals: list[tuple[dict, int]]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for enc, n_real in evals:
            hidden = fn(**enc).last_hidden_state.float()
            out.append(mean_pooled_embeddings(hidden, enc["attention_mask"])[:n_real])
    return torch.cat(out)


@contextlib.contextmanager
def _transformers_progress_bars_off():
    """Hide transformers' own "Loading weights" bar while the model loads (the demo says what it does)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def uses_int8_matmul(recipe: Recipe) -> bool:
    """Whether the recipe's linears run as ``torch._int_mm`` under Inductor (int8 weights and activations)."""
    return (recipe.budget is None and recipe.weight_bits == 8 and recipe.activation_bits == 8
            and recipe.activation_format != "fp8")


def int8_matmul_slowdown(m: int = 128, k: int = 384, n: int = 384, reps: int = 3) -> float:
    """How many times as long ``torch._int_mm`` (int8 x int8 -> int32) takes as a float32
    ``torch.mm`` of the same shape on this CPU (fastest of ``reps`` runs each, after one warm-up)."""
    return _matmul_slowdown(torch.int8, m, k, n, reps)


def bf16_matmul_slowdown(m: int = 128, k: int = 384, n: int = 384, reps: int = 3) -> float:
    """How many times as long a bfloat16 ``torch.mm`` takes as a float32 one of the same shape on
    this CPU (fastest of ``reps`` runs each, after one warm-up)."""
    return _matmul_slowdown(torch.bfloat16, m, k, n, reps)


def _matmul_slowdown(dtype: torch.dtype, m: int, k: int, n: int, reps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
    fn = torch._int_mm if dtype == torch.int8 else torch.mm
    fastest = {}
    for name, f, x, y in (("other", fn, a.to(dtype), b.to(dtype)), ("fp32", torch.mm, a.float(), b.float())):
        f(x, y)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(x, y)
            times.append(time.perf_counter() - t0)
        fastest[name] = min(times)
    return fastest["other"] / max(fastest["fp32"], 1e-9)


def skip_slow_int8(recipes: list[Recipe]) -> tuple[list[Recipe], list[str]]:
    """``(recipes to run, notes)``: without the recipes with int8 activations where this CPU's int8
    matmul is slow (:func:`int8_matmul_slowdown` over :data:`SLOW_INT8_RATIO`; measured only if
    one is asked for), with a note naming them and why."""
    if not any(uses_int8_matmul(r) for r in recipes):
        return recipes, []
    slowdown = int8_matmul_slowdown()
    if slowdown <= SLOW_INT8_RATIO:
        return recipes, []
    skipped = [r.name for r in recipes if uses_int8_matmul(r)]
    note = (f"skipped {', '.join(skipped)}: on this CPU (torch CPU capability {torch.backends.cpu.get_cpu_capability()}) "
            f"torch's int8 matmul takes {slowdown:.0f}x as long as a float32 one (it is fast with AVX-512 VNNI or "
            "AMX, which BENCHMARKS.md's figures had); --no-cpu-check runs it anyway")
    return [r for r in recipes if not uses_int8_matmul(r)], [note]


def resolve_recipes(recipes: Sequence[str]) -> list[Recipe]:
    """The presets named in ``recipes`` (a :class:`RecipeError` naming the presets for an unknown
    or repeated name, or an empty list)."""
    names = [r.strip() for r in recipes]
    if not names or any(not n for n in names):
        raise RecipeError(f"the demo needs one or more preset names, got {list(recipes)!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RecipeError(f"recipe(s) {', '.join(repeated)} named twice")
    return [resolve_recipe(n) for n in names]


def run_demo(
    recipes: Sequence[str] = DEFAULT_RECIPES,
    *,
    n_calib: int = 32,
    n_eval: int = 64,
    batch: int = 16,
    seq: int = 64,
    rounds: int = 5,
    check_cpu: bool = True,
    progress: bool = True,
) -> DemoResult:
    """Compile the baselines and one qcompile candidate per preset in ``recipes``; measure each.

    ``n_calib`` calibration texts and ``n_eval`` other, held-out texts, in batches of ``batch``
    texts x ``seq`` tokens; latency: median of ``rounds`` interleaved runs of one such batch
    (after one warm-up run each). With ``check_cpu``, recipes with int8 activations are skipped
    (with a note saying why) where this CPU has no fast int8 GEMM (:func:`int8_matmul_slowdown`
    over :data:`SLOW_INT8_RATIO`), and a note says so where bfloat16 matmuls are slow
    (:func:`bf16_matmul_slowdown` over :data:`SLOW_BF16_RATIO`). ``progress``: status lines on
    stderr, and the qcompile backend's progress bars.
    """
    for name, value, least in (("n_calib", n_calib, 1), ("n_eval", n_eval, 1), ("batch", batch, 1),
                               ("seq", seq, 2), ("rounds", rounds, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    resolved = resolve_recipes(recipes)
    start = time.perf_counter()
    notes: list[str] = []
    if check_cpu:
        resolved, notes = skip_slow_int8(resolved)
        bf16_slowdown = bf16_matmul_slowdown()
        if bf16_slowdown > SLOW_BF16_RATIO:
            notes.append(
                f"on this CPU (torch CPU capability {torch.backends.cpu.get_cpu_capability()}) a bfloat16 matmul "
                f"takes {bf16_slowdown:.1f}x as long as a float32 one (bf16 is fast with AVX-512 BF16 or AMX): the "
                "bf16 baseline and the recipes with 16-bit activations, which compute in bf16 on CPU, are slow here")
        for note in notes:
            _status(progress, note)
    _status(progress, "loading all-MiniLM-L6-v2 (bundled) and standard-library docstrings")
    with _transformers_progress_bars_off():
        model, tokenizer = load_minilm()
    calib_texts, eval_texts = calibration_and_heldout(n_calib, n_eval)
    calib = [enc for enc, _ in _fixed_shape_batches(tokenizer, calib_texts, batch, seq)]
    evals = _fixed_shape_batches(tokenizer, eval_texts, batch, seq)
    timing_batch = evals[0][0]
    _status(progress, f"fp32 reference embeddings of {len(eval_texts)} held-out texts (eager)")
    reference = _embed(model, evals)
    fp32_bytes, fp32_linear_bytes = _model_bytes(model), _linear_bytes(model)

    prepared: list[dict[str, Any]] = []
    callables: dict[str, Callable[[], Any]] = {}

    def prepare(name: str, how: str, compiled: Callable[..., Any], model_bytes: Callable[[], int],
                linear_bytes: Callable[[], int], recipe: Recipe | None = None,
                reports: list[Report] | None = None) -> None:
        _status(progress, f"{name}: compiling, then embedding the held-out texts ({how})")
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(**timing_batch)  # compiles (and for qcompile, captures, calibrates and quantizes)
        setup_s = time.perf_counter() - t0
        cos = embedding_cosine(_embed(compiled, evals), reference)
        row = dict(name=name, how=how, cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                   model_bytes=model_bytes(), linear_bytes=linear_bytes(), setup_s=setup_s, recipe=recipe,
                   reports=reports or [])
        prepared.append(row)
        callables[name] = lambda: compiled(**timing_batch)
        _status(progress, f"{name}: ready in {setup_s:.1f} s, cosine to fp32 {row['cosine_mean']:.5f} mean")

    # Each candidate compiles its own copy of the model; Dynamo keeps one cache entry per copy
    # (and backend) on BertModel.forward, so allow one per candidate beyond its default.
    limit = max(torch._dynamo.config.recompile_limit, 8 + len(BASELINES) + len(resolved))
    with torch._dynamo.config.patch(recompile_limit=limit):
        prepare("Inductor fp32", _HOW_BASELINE["Inductor fp32"], torch.compile(copy.deepcopy(model)),
                lambda: fp32_bytes, lambda: fp32_linear_bytes)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        prepare("Inductor bf16", _HOW_BASELINE["Inductor bf16"], torch.compile(bf16),
                lambda: _model_bytes(bf16), lambda: _linear_bytes(bf16))
        for recipe in resolved:
            reports: list[Report] = []
            compiled = torch.compile(copy.deepcopy(model), backend="qcompile",
                                     options={"recipe": recipe, "calibration": calib, "progress": progress,
                                              "on_report": reports.append})

            def linear_bytes(reports=reports) -> int:
                return sum(r.quantized_bytes for r in reports)

            def model_bytes(reports=reports) -> int:
                # the float model with the weights the reports cover replaced by their stored form
                return fp32_bytes - sum(r.float_bytes for r in reports) + linear_bytes(reports)

            prepare(f"qcompile {recipe.name}",
                    f'torch.compile(model, backend="qcompile", options={{"recipe": "{recipe.name}", '
                    f'"calibration": batches}})',
                    compiled, model_bytes, linear_bytes, recipe=recipe, reports=reports)

        _status(progress, f"timing {len(callables)} candidates: {rounds} interleaved rounds of one batch of "
                          f"{batch} x {seq} tokens")
        timings = time_interleaved(callables, warmup=1, repeat=rounds)

    base_s = timings[BASELINES[0]].median_s
    rows = [
        CandidateResult(latency_ms=timings[p["name"]].median_ms, speedup=base_s / timings[p["name"]].median_s, **p)
        for p in prepared
    ]
    return DemoResult(
        rows=rows,
        n_calib=len(calib_texts),
        n_eval=len(eval_texts),
        batch=batch,
        seq=seq,
        real_tokens=int(timing_batch["attention_mask"].sum()),
        rounds=rounds,
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def format_demo(result: DemoResult) -> str:
    """The demo's table: one line per candidate, then how each was made."""
    mib = 1 / 2**20
    base = result.baseline
    lines = [
        "all-MiniLM-L6-v2 (real weights): sentence embeddings of held-out standard-library docstrings",
        f"calibration: {result.n_calib} texts; evaluation: {result.n_eval} other texts, cosine to the eager fp32 "
        "model's embeddings",
        f"latency: one batch of {result.batch} x {result.seq} tokens ({result.real_tokens} of them text), "
        f"{result.threads} threads, median of {result.rounds} interleaved rounds; speed = {base.name} ms / model ms",
        "",
        f"{'model':<22} {'cos mean':>9} {'cos min':>9} {'size MiB':>9} {'linears MiB':>12} {'ms/batch':>9} "
        f"{'speed':>7} {'setup s':>8}",
    ]
    for r in result.rows:
        lines.append(
            f"{r.name:<22} {r.cosine_mean:>9.5f} {r.cosine_min:>9.5f} {r.model_bytes * mib:>9.1f} "
            f"{r.linear_bytes * mib:>12.1f} {_fmt_ms(r.latency_ms):>9} {r.speedup:>6.2f}x {r.setup_s:>8.1f}"
        )
    lines.append("")
    width = max(len(r.name) for r in result.rows)
    for r in result.rows:
        what = f"  ({r.recipe.weight_format}: {_recipe_summary(r.recipe)})" if r.recipe is not None else ""
        lines.append(f"{r.name:<{width}}  {r.how}{what}")
    lines.append(
        f"(size: every weight; linears: the nn.Linear weights as stored, codes + scales; setup: the first call, "
        f"i.e. compilation, and for qcompile capture, calibration and quantization; total {result.seconds:.0f} s)"
    )
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _fmt_ms(ms: float) -> str:
    """Milliseconds with at least three significant digits (one decimal from 100 ms)."""
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _recipe_summary(recipe: Recipe) -> str:
    """A few words on what a recipe does to weights and activations."""
    if recipe.budget is not None:
        return "per-layer weight precision chosen under a budget"
    weights = f"int{recipe.weight_bits} weights" if recipe.activation_format != "fp8" else "fp8 weights"
    weights += f" in groups of {recipe.group_size}" if recipe.group_size else " per channel"
    if recipe.method == "gptq":
        weights += " rounded by GPTQ"
    if recipe.activation_bits == 16:
        acts = "16-bit activations"
    elif recipe.activation_format == "fp8":
        acts = "fp8 activations"
    else:
        acts = f"int{recipe.activation_bits} activations ({'static' if recipe.activation_scale == 'static' else 'per token'})"
    extras = []
    if recipe.smooth != "off":
        extras.append("smoothing")
    if recipe.rotate != "off":
        extras.append("Hadamard rotations")
    return ", ".join([weights, acts, *extras])
