"""CPU speed of qcompile's weight-only linears and of the whole all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/minilm_cpu.py [--quick] [--threads N] [--skip-ops] [--skip-model]
                                              [--models SUBSTR,...]

Part A — the ops ``qcompile::linear_w8a16`` (int8, per-channel symmetric) and
``qcompile::linear_w4a16`` (int4, group 128 asymmetric) against ``F.linear`` in float32 and
in bfloat16, at MiniLM's linear shapes and at K = N = 4096. The quantized ops get float32
activations (what a float32 model's graph hands them; they cast to bfloat16 inside: "a16").
bf16 ``F.linear`` gets bfloat16 activations and a bfloat16 weight.

Part B — the whole model on one batch of 32 held-out texts padded/truncated to exactly 128
tokens: eager fp32, an eager bf16 copy, ``qcompile.quantize`` w8a16 / w4a16 / w8a8 (eager
graph), Inductor fp32 and bf16, ``torch.compile(backend="qcompile")`` (inner Inductor) with
w8a16, w4a16 and w8a8 on the fp32 model and w8a8 on a bf16 copy, and, if ``torchao`` imports,
torchao's ``Int8DynamicActivationInt8WeightConfig`` on the fp32 model and on a bf16 copy, then
``torch.compile`` (Inductor). qcompile calibrates on batches of the timing batch's shape (the
backend needs them: Dynamo traces the first call with static shapes). Compiled candidates are
warmed up (compile time excluded from the latency, reported separately).

Every latency is the median of interleaved runs (A, B, C, A, B, C, ...) and every ratio
is taken between medians of the same run: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch._inductor.config
import torch.nn.functional as F

import qcompile
from qcompile.data import calibration_and_heldout, load_minilm
from qcompile.kernels._common import MANY_ROWS
from qcompile.quantizers import quantize_weight_rtn
from qcompile.timing import Timing, time_interleaved

MINILM_SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (K, N)
MINILM_ROWS = [1, 8, 128, 4096]
LARGE_SHAPE = (4096, 4096)
LARGE_ROWS = [1, 8, 32]
W4_GROUP = 128
# Texts the whole-model candidates calibrate on (2 batches of 32 x 128).
N_CALIB_TEXTS = 64
# Other processes using this many cores' worth of CPU during a measurement make it suspect.
CONTENDED = 0.15


# --------------------------------------------------------------------------- reporting helpers

def command_line() -> str:
    exe = sys.executable
    rel = os.path.relpath(exe)
    if not rel.startswith(".."):
        exe = rel
    return shlex.join([exe, *sys.argv])


def cpu_model() -> str:
    """CPU model name (lscpu, else /proc/cpuinfo, else platform.processor()), family/model, ISA."""
    name = family = model = None
    flags: list[str] = []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        name, family, model = fields.get("Model name"), fields.get("CPU family"), fields.get("Model")
        flags = fields.get("Flags", "").split()
    except (OSError, subprocess.CalledProcessError):
        pass
    if not name:
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        except OSError:
            pass
    name = name or platform.processor() or platform.machine()
    extra = []
    if family and model:
        extra.append(f"family {family} model {model}")
    isa = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    if isa:
        extra.append(", ".join(isa))
    return f"{name} ({'; '.join(extra)})" if extra else name


def header(title: str, threads: int) -> str:
    return "\n".join([
        f"# {title}", "", "```", command_line(), "```", "",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, threads: torch.set_num_threads({threads})",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; load average at start: {load_average()}",
        "",
    ])


class CpuShare:
    """How much of the machine's CPU time other processes used between construction and ``report()``.

    Read from /proc/stat (all CPUs' busy time) minus this process's own time (/proc/self/stat,
    all threads). On these shared 2-core machines a few percent of foreign load already
    stalls 2-thread kernels at their barriers, so every section states it.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                cpu = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            tick = os.sysconf("SC_CLK_TCK")
            busy = (sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)) / tick  # minus idle, iowait
            mine = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            return time.perf_counter(), busy, mine
        except (OSError, ValueError, IndexError):
            return None

    def other_cores(self) -> float | None:
        """Cores' worth of CPU time other processes used since construction."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        return max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / max(end[0] - self.start[0], 1e-9)

    def report(self) -> str:
        end = self._sample()
        if self.start is None or end is None:
            return "CPU time of other processes: unknown (no /proc)"
        wall = end[0] - self.start[0]
        other = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        mine = end[2] - self.start[2]
        ncpu = os.cpu_count() or 1
        return (f"CPU time used during this section: this benchmark {mine / wall:.2f} cores, other processes "
                f"{other / wall:.2f} cores, of {ncpu} ({wall:.0f} s wall)")


def quietest_timings(calls, waiter, *, attempts: int = 3, first_warmup: int = 3, **timing_kwargs):
    """``time_interleaved(calls, ...)`` re-run up to ``attempts`` times while other processes
    disturbed it (>= CONTENDED cores), keeping the quietest run; waits for a quiet machine
    (``waiter``) before each. Returns ``(timings, CpuShare report, other cores)``."""
    best = None
    for attempt in range(attempts):
        waiter.wait()
        share = CpuShare()
        timings = time_interleaved(calls, warmup=first_warmup if attempt == 0 else 1, **timing_kwargs)
        other = share.other_cores()
        if best is None or (other is not None and best[2] is not None and other < best[2]):
            best = (timings, share.report(), other)
        if other is None or other < CONTENDED:
            break
    return best


class QuietWaiter:
    """Before a measurement, wait (within a total budget of seconds) until other processes use
    less than ``threshold`` cores over a 1 s window. These machines are shared; other sessions'
    jobs come and go, and a 2-thread kernel whose second thread is preempted waits a whole
    scheduler slice at every barrier."""

    def __init__(self, budget_s: float, threshold: float = 0.1):
        self.left = budget_s
        self.threshold = threshold
        self.waited = 0.0

    def wait(self) -> None:
        while self.left > 0:
            share = CpuShare()
            time.sleep(1.0)
            self.left -= 1.0
            other = share.other_cores()
            if other is None or other < self.threshold:
                return
            self.waited += 1.0


def run_cases(cases: Sequence[object], bench: Callable, *, label: str, name: Callable[[object], str],
              prefix: str, head: Sequence[str], align: str) -> None:
    """Run ``bench(case, folder, waiter) -> (table rows, CPU-share note)`` for every case, with one
    temporary folder for the files and one :class:`QuietWaiter`; emit the joined table, each
    case's CPU share and the time waited for a quiet machine."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    waiter = QuietWaiter(budget_s=60)
    table, shares = [], []
    for case in cases:
        rows, share = bench(case, folder, waiter)
        table += rows
        shares.append(f"{name(case)}: {share}")
        print(f"  [{label}] {name(case)}: done", file=sys.stderr, flush=True)
    emit(markdown_table(head, table, align=align))
    emit("")
    for line in shares:
        emit(f"- {line}")
    emit(f"- waited {waiter.waited:.0f} s for a quiet machine before timing; files in {folder}")


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "unknown"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one character per column, 'l' or 'r' (default: l then r)."""
    align = align or ("l" + "r" * (len(head) - 1))
    cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]

    def fmt(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    sep = "|" + "|".join(":" + "-" * (w + 1) if a == "l" else "-" * (w + 1) + ":" for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])


def emit(text: str = "") -> None:
    print(text, flush=True)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


# --------------------------------------------------------------------------- part A: ops

def _batched(fn: Callable[[], object], inner: int) -> Callable[[], object]:
    """``fn`` called ``inner`` times per sample (short ops: fewer timer/scheduler artifacts)."""
    if inner == 1:
        return fn

    def run():
        for _ in range(inner):
            fn()
    return run


def bench_ops(quick: bool, waiter: QuietWaiter) -> str:
    torch.manual_seed(0)
    cases = [(k, n, m) for k, n in MINILM_SHAPES for m in MINILM_ROWS]
    cases += [(LARGE_SHAPE[0], LARGE_SHAPE[1], m) for m in LARGE_ROWS]
    w8, w4 = torch.ops.qcompile.linear_w8a16, torch.ops.qcompile.linear_w4a16
    rows = []
    for k, n, m in cases:
        w = torch.randn(n, k) / k**0.5
        x = torch.randn(m, k)
        wb, xb = w.to(torch.bfloat16), x.to(torch.bfloat16)
        q8 = quantize_weight_rtn(w, 8, group_size=None, symmetric=True)
        q4 = quantize_weight_rtn(w, 4, group_size=W4_GROUP, symmetric=False)
        fns = {
            "fp32": lambda: F.linear(x, w),
            "bf16": lambda: F.linear(xb, wb),
            "w8a16": lambda: w8(x, q8.qweight, q8.scales, q8.zeros, None, q8.group_size),
            "w4a16": lambda: w4(x, q4.qweight, q4.scales, q4.zeros, None, q4.group_size),
            "w8a16 bf16-x": lambda: w8(xb, q8.qweight, q8.scales, q8.zeros, None, q8.group_size),
            "w4a16 bf16-x": lambda: w4(xb, q4.qweight, q4.scales, q4.zeros, None, q4.group_size),
        }
        with torch.no_grad():
            for fn in fns.values():  # first call builds the int4 layout cache
                fn()
            t0 = time.perf_counter()
            fns["fp32"]()
            one = time.perf_counter() - t0
        # Each sample lasts at least ~2 ms (several calls of a short op).
        inner = max(1, min(200, int(2e-3 / max(one, 1e-6))))
        batched = {name: _batched(fn, inner) for name, fn in fns.items()}
        # re-time a row that other processes disturbed
        t, _, other = quietest_timings(batched, waiter, attempts=1 if quick else 3, first_warmup=2 if quick else 3,
                                       repeat=7 if quick else 21, min_seconds=0.2 if quick else 1.0)
        s = {name: t[name].median_s / inner for name in fns}
        path8 = "dq+bf16" if m >= MANY_ROWS[8] else "int8pack"
        path4 = "dq+bf16" if m >= MANY_ROWS[4] else "int4pack"
        rows.append([
            f"{k}x{n}", m, fmt_ms(s["fp32"]), fmt_ms(s["bf16"]), fmt_ms(s["w8a16"]), fmt_ms(s["w4a16"]),
            *(f"{s['fp32'] / s[c]:.2f}x" for c in ("bf16", "w8a16", "w4a16", "w8a16 bf16-x", "w4a16 bf16-x")),
            f"{path8} / {path4}", "?" if other is None else f"{other:.2f}",
        ])
        print(f"  [ops] K x N = {k}x{n}, M = {m}: done", file=sys.stderr, flush=True)
    head = ["K x N", "M", "fp32 ms", "bf16 ms", "w8a16 ms", "w4a16 ms", "bf16 speedup", "w8a16 speedup",
            "w4a16 speedup", "w8a16 speedup, bf16 x", "w4a16 speedup, bf16 x", "path (w8 / w4)", "other CPU"]
    return markdown_table(head, rows, "lr" + "r" * 9 + "lr")


# --------------------------------------------------------------------------- part B: whole model

def timing_batch(tokenizer, batch: int = 32, seq: int = 128) -> dict[str, torch.Tensor]:
    """``batch`` held-out texts, padded/truncated to exactly ``seq`` tokens."""
    _, heldout = calibration_and_heldout(0, batch)
    enc = tokenizer(heldout, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    assert enc["input_ids"].shape == (batch, seq), enc["input_ids"].shape
    return enc


def _clean_rounds(candidates: dict[str, Callable[[], object]], *, warmup: int, repeat: int,
                  waiter: QuietWaiter) -> tuple[dict, int, int, int, float | None]:
    """Interleaved rounds (each: every candidate once, via ``time_interleaved``) until ``repeat``
    rounds ran while other processes used < CONTENDED cores, or 2 * repeat rounds were tried;
    then the medians over the clean rounds (over all rounds if fewer than 3 were clean)."""
    with torch.no_grad():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
    rounds: list[tuple[dict, float | None]] = []
    for _ in range(2 * repeat):
        waiter.wait()
        share = CpuShare()
        r = time_interleaved(candidates, warmup=0, repeat=1)
        rounds.append((r, share.other_cores()))
        if sum(1 for _, o in rounds if o is None or o < CONTENDED) >= repeat:
            break
    clean = [(r, o) for r, o in rounds if o is None or o < CONTENDED]
    used = clean if len(clean) >= 3 else rounds
    medians = {
        name: Timing(name, statistics.median(r[name].median_s for r, _ in used), [r[name].median_s for r, _ in used])
        for name in candidates
    }
    others = [o for _, o in used if o is not None]
    return medians, len(used), len(rounds), len(clean), (sum(others) / len(others) if others else None)


def timing_shaped_batches(tokenizer, texts: Sequence[str], batch: int = 32, seq: int = 128) -> list[dict]:
    """``texts`` in chunks of ``batch``, each padded/truncated to exactly ``seq`` tokens: calibration
    batches of the timing batch's shape (Dynamo traces the first call with static shapes, and the
    qcompile backend checks its calibration batches against that graph)."""
    out = []
    for i in range(0, len(texts) - batch + 1, batch):
        enc = tokenizer(list(texts[i:i + batch]), padding="max_length", truncation=True, max_length=seq,
                        return_tensors="pt")
        out.append({k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)})
    if not out:
        raise ValueError(f"need at least {batch} calibration texts, got {len(texts)}")
    return out


def torchao_status() -> tuple[str | None, str]:
    """(torchao version, '') if torchao's int8 dynamic-activation config imports, else (None, why not)."""
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except Exception as exc:  # ImportError, or a torchao built for another torch failing at import
        return None, f"{type(exc).__name__}: {exc}"
    return getattr(torchao, "__version__", "?"), ""


# torchao's own recommended Inductor settings for its quantized models (what
# Int8DynamicActivationInt8WeightConfig(set_inductor_config=True) would set process-wide),
# applied only while the torchao candidates compile so that the other candidates keep the defaults.
TORCHAO_INDUCTOR_CONFIG = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "force_fuse_int_mm_with_mul": True,
}


def bench_model(quick: bool, waiter: QuietWaiter, only: Sequence[str] | None = None) -> tuple[str, str, list[str]]:
    """Part B. ``only``: substrings of candidate names to run (besides the baselines eager fp32 and
    Inductor fp32); it overrides ``quick``'s skipping of compiled candidates."""
    # Each compiled candidate is its own copy of the model; Dynamo keeps one cache entry per
    # copy and backend on BertModel.forward, so allow more entries than the default.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    model, tokenizer = load_minilm()
    enc = timing_batch(tokenizer)
    real_tokens = int(enc["attention_mask"].sum())
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    calib_texts, _ = calibration_and_heldout(N_CALIB_TEXTS, 256)
    calib = timing_shaped_batches(tokenizer, calib_texts)
    ao_version, ao_missing = torchao_status()
    notes: list[str] = []

    candidates: dict[str, Callable[[], object]] = {}
    setup: list[list[str]] = []

    def wanted(name: str, compiled: bool) -> bool:
        if name in ("eager fp32", "Inductor fp32") and (not quick or only):
            return True
        if only:
            return name == "eager fp32" or any(o in name for o in only)
        return not (quick and compiled)

    def add(name: str, how: str, prepare: Callable[[], tuple[Callable[[], object], float | None]], *,
            compiled: bool, config: dict | None = None):
        """``prepare`` returns (the timed callable, seconds of its quantization step or None)."""
        if not wanted(name, compiled):
            return
        print(f"  [model] {name}: preparing ...", file=sys.stderr, flush=True)
        patch = torch._inductor.config.patch(config) if config else contextlib.nullcontext()
        with patch:
            t0 = time.perf_counter()
            fn, quantize_s = prepare()
            with torch.no_grad():
                t1 = time.perf_counter()
                fn()
                first = time.perf_counter() - t1
        q = "-" if quantize_s is None else f"{quantize_s:.2f}" if quantize_s < 1 else f"{quantize_s:.1f}"
        setup.append([name, how, q, f"{first:.1f}"])
        candidates[name] = fn
        print(f"  [model] {name}: ready (prepare {t1 - t0:.1f} s, first call {first:.1f} s)", file=sys.stderr,
              flush=True)

    def call(m):
        return lambda: m(**enc)

    def timed(make):
        t0 = time.perf_counter()
        out = make()
        return out, time.perf_counter() - t0

    def qcompile_quantize(recipe):
        def prepare():
            qm, s = timed(lambda: qcompile.quantize(model, kwargs=calib[0], recipe=recipe, calibration=calib,
                                                    progress=False))
            return call(qm), s
        return prepare

    def backend(recipe, source):
        def prepare():
            c = torch.compile(copy.deepcopy(source), backend="qcompile",
                              options={"recipe": recipe, "calibration": calib, "inner": "inductor",
                                       "progress": False})
            return call(c), None
        return prepare

    def torchao(source):
        def prepare():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            m = copy.deepcopy(source)
            _, s = timed(lambda: quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)))
            return call(torch.compile(m)), s
        return prepare

    add("eager fp32", "the Hugging Face model", lambda: (call(model), None), compiled=False)
    add("eager bf16", "deepcopy(model).to(bfloat16)", lambda: (call(bf16), None), compiled=False)
    for recipe in ("w8a16", "w4a16", "w8a8"):
        add(f"qcompile.quantize {recipe}", f'qcompile.quantize(model, recipe="{recipe}"), eager graph',
            qcompile_quantize(recipe), compiled=False)
    add("Inductor fp32", "torch.compile(model)", lambda: (call(torch.compile(copy.deepcopy(model))), None),
        compiled=True)
    add("Inductor bf16", "torch.compile(bf16 copy)", lambda: (call(torch.compile(copy.deepcopy(bf16))), None),
        compiled=True)
    for recipe in ("w8a16", "w4a16", "w8a8"):
        add(f"backend=qcompile {recipe}",
            f'torch.compile(model, backend="qcompile", options={{"recipe": "{recipe}", "calibration": ...}})',
            backend(recipe, model), compiled=True)
    add("backend=qcompile w8a8 (bf16 model)",
        'torch.compile(bf16 copy, backend="qcompile", options={"recipe": "w8a8", "calibration": ...})',
        backend("w8a8", bf16), compiled=True)
    ao_names = ("torchao int8 dyn act + int8 weight", "torchao int8 dyn act + int8 weight (bf16 model)")
    if ao_version is None:
        if any(wanted(n, True) for n in ao_names):
            msg = (f"torchao candidates skipped: torchao does not import ({ao_missing}). Install it with "
                   "`.venv/bin/pip install torchao --no-deps` (torchao 0.18.0 imports with torch 2.13 CPU; "
                   "its CUDA-only extensions print load warnings, which are harmless on CPU).")
            notes.append(msg)
            print(f"  [model] {msg}", file=sys.stderr, flush=True)
    else:
        add(ao_names[0], "quantize_(deepcopy(model), Int8DynamicActivationInt8WeightConfig()), torch.compile",
            torchao(model), compiled=True, config=TORCHAO_INDUCTOR_CONFIG)
        add(ao_names[1], "the same on the bf16 copy", torchao(bf16), compiled=True, config=TORCHAO_INDUCTOR_CONFIG)
        if any(n in candidates for n in ao_names):
            notes.append(
                f"torchao {ao_version}: `quantize_(copy.deepcopy(m), Int8DynamicActivationInt8WeightConfig("
                "set_inductor_config=False))` (int8 per-channel weights, dynamic per-token int8 activations, no "
                "smoothing), then `torch.compile` (Inductor) with torchao's recommended Inductor settings ("
                + ", ".join(f"{k}={v}" for k, v in TORCHAO_INDUCTOR_CONFIG.items())
                + ") patched in only while it compiles.")

    t, kept, attempted, clean, other = _clean_rounds(candidates, warmup=1 if quick else 2, repeat=3 if quick else 11,
                                              waiter=waiter)
    fp32 = t["eager fp32"].median_s
    ind = t["Inductor fp32"].median_s if "Inductor fp32" in t else None
    rows = []
    for name in candidates:
        s = t[name].median_s
        rows.append([name, f"{s * 1e3:.0f}", f"{fp32 / s:.2f}x", f"{ind / s:.2f}x" if ind else "-"])
    head = ["model", "ms / batch", "speedup vs eager fp32", "speedup vs Inductor fp32"]
    table = markdown_table(head, rows)
    setup_table = markdown_table(["model", "how", "quantize s", "first call s"], setup, "llrr")
    note = (f"batch: 32 held-out docstrings x 128 tokens ({real_tokens} of 4096 tokens are real text, the rest padding); "
            f"medians of {kept} interleaved rounds after warm-up ({clean} of the {attempted} rounds timed were "
            f"undisturbed, i.e. other processes used < {CONTENDED} cores; "
            f"{'only those are used' if kept == clean else 'too few, so all are used'}); other processes used "
            f"{'?' if other is None else f'{other:.2f}'} cores (of {os.cpu_count()}) on average during the rounds used. "
            f"qcompile.quantize and backend=\"qcompile\" calibrate on {len(calib_texts)} other texts in "
            f"{len(calib)} batches of 32 x 128 tokens (the timing batch's shape, which the backend needs: Dynamo "
            "traces the first call with static shapes); the backend runs with inner=\"inductor\", which decomposes "
            "`qcompile::linear_w8a8` into ATen ops (with `torch._int_mm`) so that Inductor fuses the activation "
            "quantization. w8a8 (the preset): int8 per-channel weights rounded by GPTQ, dynamic per-token int8 "
            "activations, smoothing exponent searched per group.")
    return table + "\n\n" + note, setup_table, notes


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats; in part B skip the torch.compile candidates (Inductor, the qcompile "
                        "backend, torchao) unless --models names them")
    p.add_argument("--models", default=None, metavar="SUBSTR,...",
                   help="part B: run only the candidates whose name contains one of these substrings (plus the "
                        "baselines eager fp32 and Inductor fp32), e.g. --models 'w8a8,torchao'")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--skip-ops", action="store_true", help="skip part A (linear ops)")
    p.add_argument("--skip-model", action="store_true", help="skip part B (whole model)")
    p.add_argument("--inductor-cache", action="store_true",
                   help="let Inductor use its on-disk caches (default: disabled, so compile times are cold)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="SECONDS",
                   help="total seconds the run may wait, before each measurement, for other processes to "
                        "use < 0.1 cores (default 240; 0 with --quick)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    waiter = QuietWaiter(args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 240.0))
    if not args.inductor_cache:
        import torch._inductor.config as inductor_config
        inductor_config.force_disable_caches = True
    start = time.perf_counter()

    emit(header("qcompile CPU speed: weight-only linears and all-MiniLM-L6-v2", args.threads))
    if not args.skip_ops:
        emit("## A. Weight-only linear ops vs F.linear")
        emit()
        emit("`y = x @ W.T`, x `[M, K]`, W `[N, K]` random. Speedup = fp32 `F.linear` median / candidate median "
             "(> 1 is faster). w8a16: `qcompile::linear_w8a16`, int8 per-channel symmetric; w4a16: "
             "`qcompile::linear_w4a16`, int4 group 128 asymmetric; both called with float32 x (as in a float32 "
             "model's graph; the op casts x to bf16 and the result back), and in the `bf16 x` columns with bf16 x "
             "(no casts). bf16: `F.linear` on bf16 x and bf16 W. Path: what the op's CPU dispatch runs "
             f"(`MANY_ROWS` = {MANY_ROWS}: from that many rows it dequantizes the weight to bf16 on every call "
             "and runs a bf16 GEMM; below, the packed-integer kernels `_weight_int8pack_mm` / "
             "`_weight_int4pack_mm_for_cpu`).")
        emit()
        share = CpuShare()
        emit(bench_ops(args.quick, waiter))
        emit()
        emit(share.report() + ". other CPU: cores' worth of CPU time that other processes used while that "
             f"row was timed (this machine has 2; a row disturbed by >= {CONTENDED} is re-timed up to twice, keeping the least "
             "disturbed attempt; above ~0.1 the 2-thread timings of that row are suspect).")
        emit()
    if not args.skip_model:
        emit("## B. Whole all-MiniLM-L6-v2, batch 32 x 128 tokens")
        emit()
        share = CpuShare()
        only = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        table, setup_table, notes = bench_model(args.quick, waiter, only)
        emit(table)
        emit()
        for line in notes:
            emit(line)
            emit()
        emit(share.report() + " (includes quantization and compilation)")
        emit()
        emit("One-time costs, not in the latencies above. quantize s: `qcompile.quantize` (capture, passes, "
             "verification, per-layer errors on the calibration batch). first call s: for `torch.compile` "
             "candidates this is Dynamo + Inductor compilation (and, for `backend=\"qcompile\"`, capture and "
             "quantization with its calibration batches, which that backend does on the first call); for the "
             "others, one-time layout work. For torchao, quantize s is the time of `quantize_`.")
        emit()
        emit(setup_table)
        emit()
    emit(f"(total wall time {time.perf_counter() - start:.0f} s, of which {waiter.waited:.0f} s waiting for other "
         f"processes to go quiet; load average at end: {load_average()}; "
         f"Inductor on-disk caches {'allowed' if args.inductor_cache else 'disabled: compile times are cold'})")


if __name__ == "__main__":
    main()
