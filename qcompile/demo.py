"""The main job: quantize the real all-MiniLM-L6-v2 and report fidelity, size and speed.

Calibration and evaluation use disjoint sets of standard-library docstrings; fidelity is
the cosine between the quantized and the fp32 model's normalized mean-pooled sentence
embeddings on the held-out texts. Speed is the latency of one batch, timed interleaved
with the fp32 model (and a bf16 copy) in the same run, reported as ratios.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from .api import QuantizedModel, quantize
from .data import batches, calibration_and_heldout, embedding_cosine, load_minilm, mean_pooled_embeddings, tokenize
from .timing import time_interleaved


@dataclass
class RecipeResult:
    recipe: str
    cosine_mean: float
    cosine_min: float
    model_bytes: int
    linear_bytes: int
    latency_ms: float
    speedup_vs_fp32: float
    speedup_vs_bf16: float
    quantized: QuantizedModel = field(repr=False)


@dataclass
class DemoResult:
    fp32_ms: float
    bf16_ms: float
    fp32_model_bytes: int
    fp32_linear_bytes: int
    rows: list[RecipeResult]
    n_calib: int
    n_eval: int
    batch: int
    seq: int
    threads: int


def _embed(model: Any, encs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for enc in encs:
            hidden = model(**enc).last_hidden_state.float()
            out.append(mean_pooled_embeddings(hidden, enc["attention_mask"]))
    return torch.cat(out)


def _model_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_demo(
    recipes: tuple[str, ...] = ("w8a16", "w4a16"),
    *,
    n_calib: int = 64,
    n_eval: int = 256,
    batch: int = 32,
    seq: int = 128,
    repeat: int = 5,
    progress: bool = True,
) -> DemoResult:
    model, tokenizer = load_minilm()
    calib_texts, eval_texts = calibration_and_heldout(n_calib, n_eval)
    calib = list(batches(calib_texts, tokenizer, batch_size=16, max_length=seq))
    evals = list(batches(eval_texts, tokenizer, batch_size=batch, max_length=seq))
    reference = _embed(model, evals)
    timing_batch = tokenize(tokenizer, (eval_texts * (batch // max(len(eval_texts), 1) + 1))[:batch], max_length=seq)
    timing_batch = {k: v[:, :seq] for k, v in timing_batch.items()}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))

    quantized: dict[str, QuantizedModel] = {}
    rows: list[RecipeResult] = []
    for name in recipes:
        qm = quantize(model, kwargs=calib[0], recipe=name, calibration=calib, progress=progress)
        quantized[name] = qm
    candidates = {"fp32": lambda: model(**timing_batch), "bf16": lambda: bf16(**timing_batch)}
    candidates.update({name: (lambda qm=qm: qm(**timing_batch)) for name, qm in quantized.items()})
    timings = time_interleaved(candidates, warmup=2, repeat=repeat)
    for name, qm in quantized.items():
        cos = embedding_cosine(_embed(qm, evals), reference)
        report = qm.report()
        rows.append(
            RecipeResult(
                recipe=name,
                cosine_mean=float(cos.mean()),
                cosine_min=float(cos.min()),
                model_bytes=_model_bytes(qm.graph_module),
                linear_bytes=report.quantized_bytes,
                latency_ms=timings[name].median_ms,
                speedup_vs_fp32=timings["fp32"].median_s / timings[name].median_s,
                speedup_vs_bf16=timings["bf16"].median_s / timings[name].median_s,
                quantized=qm,
            )
        )
    return DemoResult(
        fp32_ms=timings["fp32"].median_ms,
        bf16_ms=timings["bf16"].median_ms,
        fp32_model_bytes=_model_bytes(model),
        fp32_linear_bytes=linear_bytes,
        rows=rows,
        n_calib=len(calib_texts),
        n_eval=len(eval_texts),
        batch=batch,
        seq=int(timing_batch["input_ids"].shape[1]),
        threads=torch.get_num_threads(),
    )


def format_demo(result: DemoResult) -> str:
    mib = 1 / 2**20
    lines = [
        "all-MiniLM-L6-v2 (real weights), sentence embeddings on held-out standard-library docstrings",
        f"calibration: {result.n_calib} texts; evaluation: {result.n_eval} other texts; "
        f"latency: batch {result.batch} x {result.seq} tokens, {result.threads} threads, eager, median of interleaved runs",
        "",
        f"{'model':<8} {'cos mean':>9} {'cos min':>9} {'size MiB':>9} {'linears MiB':>12} {'ms/batch':>9} "
        f"{'vs fp32':>8} {'vs bf16':>8}",
        f"{'fp32':<8} {1.0:>9.5f} {1.0:>9.5f} {result.fp32_model_bytes * mib:>9.1f} "
        f"{result.fp32_linear_bytes * mib:>12.1f} {result.fp32_ms:>9.1f} {1.0:>7.2f}x {result.fp32_ms / result.bf16_ms:>7.2f}x",
    ]
    for r in result.rows:
        lines.append(
            f"{r.recipe:<8} {r.cosine_mean:>9.5f} {r.cosine_min:>9.5f} {r.model_bytes * mib:>9.1f} "
            f"{r.linear_bytes * mib:>12.1f} {r.latency_ms:>9.1f} {r.speedup_vs_fp32:>7.2f}x {r.speedup_vs_bf16:>7.2f}x"
        )
    lines.append(f"(bf16 copy of the model: {result.bf16_ms:.1f} ms/batch)")
    return "\n".join(lines)
