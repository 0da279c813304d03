"""Fidelity and size of quantized all-MiniLM-L6-v2 on held-out text.

    .venv/bin/python benchmarks/minilm_fidelity.py [--quick] [--threads N]

Calibration: the 64 calibration texts of ``calibration_and_heldout(64, 256)`` (batches of
16). Evaluation: the 256 held-out texts (never seen in calibration), embedded as
sentence-transformers does (mean pooling over the attention mask, L2 normalization); the
figure is the cosine between each text's quantized and float32 embedding (mean and worst).

Recipes: w8a16 (int8 per-channel symmetric), the w4a16 preset (int4 group 128 asymmetric
with range search ``clip_ratios``), and three w4a16 variants: no range search (plain
min/max RTN), symmetric, group 64. A bf16 copy of the model (no quantization) is shown
for scale. Sizes: bytes of every tensor held by ``qm.graph_module`` (parameters, buffers
and constants) and of the linear weights (codes + scales + zero points) against float32.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

import qcompile
from qcompile.data import batches, calibration_and_heldout, embed_texts, embedding_cosine, load_minilm
from qcompile.quantizers import dequantize_weight, quantize_weight_rtn
from qcompile.recipe import PRESETS, Recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import CpuShare, emit, header, markdown_table  # noqa: E402  (shared report helpers)

N_CALIB, N_EVAL = 64, 256


# --------------------------------------------------------------------------- reporting helpers

def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


# --------------------------------------------------------------------------- sizes

def module_tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct tensor a module holds: parameters, buffers and plain tensor
    attributes (a captured graph keeps frozen weights and quantized codes as constants)."""
    tensors: dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        tensors[id(t)] = t
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor):
                tensors[id(value)] = value
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "get_attr":
                obj = module
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, torch.Tensor):
                    tensors[id(obj)] = obj
    return sum(t.numel() * t.element_size() for t in tensors.values())


def linear_weight_bytes_fp32(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))


# --------------------------------------------------------------------------- a check on the lowering

def fake_quantized(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """A copy of the float model whose ``nn.Linear`` weights are quantized with ``recipe``'s
    weight settings and dequantized back to float32, with no qcompile graph, ops or bf16 kernels:
    what the recipe's numerics alone do. qcompile's result should match it closely."""
    fq = copy.deepcopy(model)
    for module in fq.modules():
        if isinstance(module, torch.nn.Linear):
            k = module.in_features
            group = recipe.group_size if recipe.group_size is not None and k % recipe.group_size == 0 else None
            q = quantize_weight_rtn(module.weight.data, recipe.weight_bits, group, recipe.symmetric,
                                    clip_ratios=recipe.clip_ratios or None)
            module.weight.data = dequantize_weight(q)
    return fq


# --------------------------------------------------------------------------- main

def variants() -> list[tuple[str, qcompile.Recipe, str]]:
    w4 = PRESETS["w4a16"]
    return [
        ("w8a16", PRESETS["w8a16"], "int8, per-channel, symmetric"),
        ("w4a16 (preset)", w4, "int4, g128, asymmetric, range search"),
        ("w4a16 no range search", w4.replace(clip_ratios=()), "int4, g128, asymmetric, plain min/max RTN"),
        ("w4a16 symmetric", w4.replace(symmetric=True), "int4, g128, symmetric, range search"),
        ("w4a16 g64", w4.replace(group_size=64), "int4, g64, asymmetric, range search"),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="only w8a16 and the w4a16 preset, with verification off (same texts)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    emit(header("qcompile fidelity and size: all-MiniLM-L6-v2 on held-out text", args.threads))

    model, tokenizer = load_minilm()
    calib_texts, eval_texts = calibration_and_heldout(N_CALIB, N_EVAL)
    calib = list(batches(calib_texts, tokenizer, batch_size=16))
    with torch.no_grad():
        reference = embed_texts(model, tokenizer, eval_texts)
        bf16_cos = embedding_cosine(embed_texts(copy.deepcopy(model).to(torch.bfloat16), tokenizer, eval_texts),
                                    reference)

    fp32_model = module_tensor_bytes(model)
    fp32_linear = linear_weight_bytes_fp32(model)
    rows = [
        ["fp32 (reference)", "-", "1.000000", "1.000000", "-", mib(fp32_model), "1.00x", mib(fp32_linear), "1.00x",
         "-", "-"],
        ["bf16 copy", "all weights bf16, no quantization", f"{float(bf16_cos.mean()):.6f}",
         f"{float(bf16_cos.min()):.6f}", f"{float((1 - bf16_cos).mean()):.2e}",
         mib(fp32_model // 2), "2.00x", mib(fp32_linear // 2), "2.00x", "-", "-"],
    ]
    chosen = variants()[:2] if args.quick else variants()
    for name, recipe, what in chosen:
        t0, share = time.perf_counter(), CpuShare()
        qm = qcompile.quantize(model, kwargs=calib[0], recipe=recipe, calibration=calib,
                               verify=not args.quick, progress=False)
        quantize_s = time.perf_counter() - t0
        other = share.other_cores()
        quantize_other = "?" if other is None else f"{other:.2f}"
        with torch.no_grad():
            cos = embedding_cosine(embed_texts(qm, tokenizer, eval_texts), reference)
        report = qm.report()
        if report.float_bytes != fp32_linear:
            raise RuntimeError(f"{name}: report counts {report.float_bytes} float linear-weight bytes, "
                               f"the model has {fp32_linear}")
        size = module_tensor_bytes(qm.graph_module)
        lin = report.quantized_bytes
        rows.append([
            name, what, f"{float(cos.mean()):.6f}", f"{float(cos.min()):.6f}", f"{float((1 - cos).mean()):.2e}",
            mib(size), f"{fp32_model / size:.2f}x", mib(lin), f"{fp32_linear / lin:.2f}x", f"{quantize_s:.0f}",
            quantize_other,
        ])
        print(f"  [fidelity] {name}: cos mean {float(cos.mean()):.6f}, quantize {quantize_s:.0f} s",
              file=sys.stderr, flush=True)

    for name, recipe in (("w8a16", PRESETS["w8a16"]), ("w4a16 (preset)", PRESETS["w4a16"])):
        with torch.no_grad():
            cos = embedding_cosine(embed_texts(fake_quantized(model, recipe), tokenizer, eval_texts), reference)
        rows.append([
            f"{name}, fake-quant check", "same quantizer, weights dequantized into the fp32 model",
            f"{float(cos.mean()):.6f}", f"{float(cos.min()):.6f}", f"{float((1 - cos).mean()):.2e}",
            "-", "-", "-", "-", "-", "-",
        ])

    head = ["model", "weights", "cos mean", "cos min", "mean 1-cos", "model MiB", "vs fp32",
            "linear weights MiB", "vs fp32", "quantize s", "other CPU"]
    emit(f"Calibration: {len(calib_texts)} texts; evaluation: {len(eval_texts)} other held-out texts "
         f"(max 128 tokens, batches of 32). Cosine of normalized mean-pooled embeddings against float32.")
    emit()
    emit(markdown_table(head, rows, "ll" + "r" * 9))
    emit()
    emit("model MiB: every tensor of `qm.graph_module` (the bf16 row: half of fp32). Linear weights: the "
         f"{sum(isinstance(m, torch.nn.Linear) for m in model.modules())} `nn.Linear` weights (codes + scales "
         "+ zero points; biases, embeddings and LayerNorms stay float32 and count in model MiB only). "
         "quantize s: wall time of `qcompile.quantize` (capture, passes, verification, per-layer errors on "
         "the calibration batches); other CPU: cores' worth of CPU time other processes used meanwhile (this "
         f"machine has {os.cpu_count()}; the machine is shared, so quantize s varies from run to run; the "
         "cosines and sizes are deterministic).")
    emit()
    emit("fake-quant check: the float model with each linear weight replaced by its quantized-then-dequantized "
         "float32 value (`quantize_weight_rtn` with the recipe's settings), run by Hugging Face in fp32: the "
         "recipe's weight numerics without qcompile's graph, kernels or bf16 activations. A gap to the qcompile "
         "row above would point at the lowering.")
    emit()
    emit(f"(total wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
