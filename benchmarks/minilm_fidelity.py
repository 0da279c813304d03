"""Fidelity and size of quantized all-MiniLM-L6-v2 on held-out text.

    .venv/bin/python benchmarks/minilm_fidelity.py [--recipes KEY,KEY,...] [--quick] [--threads N] [--calib N] [--list]

Calibration: the 64 calibration texts of ``calibration_and_heldout(64, 256)`` (batches of
16; ``--calib N`` takes N instead, the held-out texts staying the same). Evaluation: the 256 held-out texts (never seen in calibration), embedded as
sentence-transformers does (mean pooling over the attention mask, L2 normalization); the
figure is the cosine between each text's quantized and float32 embedding (mean and worst).

Rows (``--recipes`` picks a subset by key; ``--list`` prints the keys):

* weight-only: w8a16 (int8 per-channel symmetric); the w4a16 preset (int4 group 128
  asymmetric, range search ``clip_ratios`` weighted by the calibration inputs' E[x²],
  ``clip_objective="output"``); w4a16 with ``clip_objective="weight"`` (plain squared weight
  error: the preset's previous behaviour); w4a16 without range search, symmetric, group 64;
  w4a16-awq (w4a16 plus a per-group searched smoothing scale).
* GPTQ against RTN at W4 g128 and W3 g128, same everything else: the w4a16-gptq preset
  (int4 g128 asymmetric, GPTQ in activation order on grids range-searched with diag H
  weights) and its variants without range search, in column order, with act order inside
  groups visited by decreasing Σ H_ii (``gptq_static_groups=False``), symmetric, with
  ``gptq_damp=0.1``; int3 g128 (a 3-bit grid in the 4-bit container) with RTN and GPTQ,
  with and without range search; w4a16-gptq with its linears' inputs Hadamard-rotated.
* Rotation and GPTQ with quantized activations (``--recipes`` keys ``w4a8-rtn-norot``,
  ``w4a8-rtn``, ``w4a8-norot``, ``w4a8``, ``w4a8-smooth`` and the same for ``w4a4``): RTN or
  GPTQ int4 g128 weights, with or without the online Hadamard rotation of every linear's
  input, and the presets (GPTQ + rotation) with searched smoothing in front.
* 8-bit activations: the w8a8 preset (int8 per-channel weights rounded by GPTQ, dynamic
  per-token int8 activations, smoothing exponent searched per group) and with round-to-nearest
  weights (``w8a8-rtn``); without smoothing, GPTQ or RTN (RTN: the numerics of torchao's
  ``Int8DynamicActivationInt8WeightConfig``); SmoothQuant's fixed alpha 0.5; w8a8-static
  (one static activation scale per tensor); fp8 (e4m3 weights and activations); w8a8 (GPTQ
  and RTN) applied to a bfloat16 copy of the model (its embeddings cast to float32 and
  compared with the float32 model's).
* checks: fake-quant copies of the float model (the recipe's numerics without qcompile's
  graph or kernels), and torchao's own int8 dynamic-activation quantization if ``torchao``
  imports.

A bf16 copy of the model (no quantization) is always shown for scale. Sizes: bytes of every
tensor held by ``qm.graph_module`` (parameters, buffers and constants) and of the linear
weights (codes + scales + zero points) against float32.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import qcompile
from qcompile.data import batches, calibration_and_heldout, embed_texts, embedding_cosine, load_minilm
from qcompile.quantizers import dequantize_weight, quantize_weight_rtn
from qcompile.recipe import PRESETS, Recipe, resolve_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import CpuShare, emit, header, markdown_table  # noqa: E402  (shared report helpers)

N_CALIB, N_EVAL = 64, 256
TORCHAO_INSTALL = ".venv/bin/pip install torchao --no-deps"


# --------------------------------------------------------------------------- reporting helpers

def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def log(msg: str) -> None:
    print(f"  [fidelity] {msg}", file=sys.stderr, flush=True)


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


def linear_weight_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


# --------------------------------------------------------------------------- checks without qcompile

def fake_quantized(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """A copy of the float model whose ``nn.Linear`` weights are quantized with ``recipe``'s
    weight settings and dequantized back to float32, with no qcompile graph, ops or bf16 kernels:
    what the recipe's numerics alone do. The range search here is data-free (plain squared
    weight error), i.e. ``clip_objective="weight"``; qcompile's result should match it closely."""
    fq = copy.deepcopy(model)
    for module in fq.modules():
        if isinstance(module, torch.nn.Linear):
            k = module.in_features
            group = recipe.group_size if recipe.group_size is not None and k % recipe.group_size == 0 else None
            q = quantize_weight_rtn(module.weight.data, recipe.weight_storage_bits, group, recipe.symmetric,
                                    clip_ratios=recipe.clip_ratios or None, grid_bits=recipe.weight_bits)
            module.weight.data = dequantize_weight(q)
    return fq


def _fake_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def fake_quantized_w8a8(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy that does W8A8-without-smoothing numerics in plain torch, independently of
    qcompile: each ``nn.Linear`` weight rounded to int8 per output channel (symmetric, scale
    absmax / 127) and dequantized; each linear's input rounded to int8 per token (scale
    absmax / 127 over the features of that token) and dequantized by a forward pre-hook."""
    fq = copy.deepcopy(model)
    for module in fq.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
            module.weight.data = torch.clamp(torch.round(w / scale), -127, 127) * scale
            module.register_forward_pre_hook(lambda _m, args: (_fake_int8_per_token(args[0]), *args[1:]))
    return fq


def torchao_available() -> str:
    """'' if torchao's int8 dynamic-activation config imports, else why not."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except Exception as exc:  # an ImportError, or a torchao built for another torch failing at import
        return f"{type(exc).__name__}: {exc}"
    return ""


def torchao_w8a8(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    tq = copy.deepcopy(model)
    quantize_(tq, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return tq


# --------------------------------------------------------------------------- the rows

A16 = "16-bit (bf16 in the CPU kernels)"
A8_TOKEN = "int8, dynamic per-token"


@dataclass(frozen=True)
class Variant:
    key: str            # what --recipes selects
    label: str          # the table's first column
    recipe: Any         # for qcompile rows: a preset name, a dict or a Recipe
    weights: str
    activations: str
    dtype: torch.dtype = torch.float32  # the dtype of the model handed to qcompile.quantize
    kind: str = "qcompile"              # "qcompile" | "fake-quant" | "torchao"
    check: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # for non-qcompile rows


def variants() -> list[Variant]:
    w4 = PRESETS["w4a16"]
    w4_weight_clip = w4.replace(clip_objective="weight")
    return [
        Variant("w8a16", "w8a16", "w8a16", "int8, per-channel, symmetric", A16),
        Variant("w4a16", "w4a16 (preset)", "w4a16", "int4, g128, asym, range search (output-weighted)", A16),
        Variant("w4a16-weight-clip", 'w4a16 clip_objective="weight"', {"preset": "w4a16", "clip_objective": "weight"},
                "int4, g128, asym, range search (weight error)", A16),
        Variant("w4a16-no-clip", "w4a16 no range search", {"preset": "w4a16", "clip_ratios": ()},
                "int4, g128, asym, plain min/max RTN", A16),
        Variant("w4a16-sym", "w4a16 symmetric", {"preset": "w4a16", "symmetric": True},
                "int4, g128, sym, range search (output-weighted)", A16),
        Variant("w4a16-g64", "w4a16 g64", {"preset": "w4a16", "group_size": 64},
                "int4, g64, asym, range search (output-weighted)", A16),
        Variant("w4a16-awq", "w4a16-awq (preset)", "w4a16-awq", "int4, g128, asym, range search (output error, H blocks)",
                A16),
        # GPTQ against RTN, same everything else (W4 g128 and W3 g128)
        Variant("w4a16-gptq", "w4a16-gptq (preset)", "w4a16-gptq",
                "int4, g128, asym, range search (H-weighted), GPTQ act-order", A16),
        Variant("w4a16-gptq-seq", "w4a16-gptq sequential=True", {"preset": "w4a16-gptq", "sequential": True},
                "int4, g128, asym, range search (H-weighted), GPTQ act-order; calibrated layer by layer on the "
                "quantized earlier layers", A16),
        Variant("w4a16-gptq-no-clip", "w4a16-gptq no range search", {"preset": "w4a16-gptq", "clip_ratios": ()},
                "int4, g128, asym, min/max grid, GPTQ act-order", A16),
        Variant("w4a16-gptq-no-act-order", "w4a16-gptq gptq_act_order=False",
                {"preset": "w4a16-gptq", "gptq_act_order": False},
                "int4, g128, asym, range search (H-weighted), GPTQ in column order", A16),
        Variant("w4a16-gptq-grouped", "w4a16-gptq gptq_static_groups=False",
                {"preset": "w4a16-gptq", "gptq_static_groups": False},
                "int4, g128, asym, range search (H-weighted), GPTQ act-order within groups, grids as reached", A16),
        Variant("w4a16-gptq-sym", "w4a16-gptq symmetric", {"preset": "w4a16-gptq", "symmetric": True},
                "int4, g128, sym, range search (H-weighted), GPTQ act-order", A16),
        Variant("w4a16-gptq-damp0.1", "w4a16-gptq gptq_damp=0.1", {"preset": "w4a16-gptq", "gptq_damp": 0.1},
                "int4, g128, asym, range search (H-weighted), GPTQ act-order", A16),
        Variant("w3a16", "w3a16 RTN", {"preset": "w4a16", "weight_bits": 3},
                "int3, g128, asym, range search (output-weighted)", A16),
        Variant("w3a16-no-clip", "w3a16 RTN no range search", {"preset": "w4a16", "weight_bits": 3, "clip_ratios": ()},
                "int3, g128, asym, plain min/max RTN", A16),
        Variant("w3a16-gptq", "w3a16 GPTQ", {"preset": "w4a16-gptq", "weight_bits": 3},
                "int3, g128, asym, range search (H-weighted), GPTQ act-order", A16),
        Variant("w3a16-gptq-no-clip", "w3a16 GPTQ no range search",
                {"preset": "w4a16-gptq", "weight_bits": 3, "clip_ratios": ()},
                "int3, g128, asym, min/max grid, GPTQ act-order", A16),
        Variant("w4a16-gptq-rot", "w4a16-gptq + rotate=\"input\"", {"preset": "w4a16-gptq", "rotate": "input"},
                "int4, g128, asym, range search (H-weighted), GPTQ act-order; inputs Hadamard-rotated", A16),
        # Rotation (online Hadamard of every linear's input) and GPTQ at W4A8 / W4A4, one
        # change at a time: the presets rotate and use GPTQ
        Variant("w4a8-rtn-norot", "w4a8 RTN, no rotation", {"preset": "w4a8", "method": "rtn", "rotate": "off"},
                "int4, g128, asym, range search", A8_TOKEN),
        Variant("w4a8-rtn", "w4a8 RTN, rotated", {"preset": "w4a8", "method": "rtn"},
                "int4, g128, asym, range search", A8_TOKEN + ", rotated"),
        Variant("w4a8-norot", "w4a8 GPTQ, no rotation", {"preset": "w4a8", "rotate": "off"},
                "int4, g128, asym, range search, GPTQ act-order", A8_TOKEN),
        Variant("w4a8", "w4a8 (preset: GPTQ, rotated)", "w4a8",
                "int4, g128, asym, range search, GPTQ act-order", A8_TOKEN + ", rotated"),
        Variant("w4a8-smooth", "w4a8 + smooth=\"search\"", {"preset": "w4a8", "smooth": "search"},
                "int4, g128, asym, range search, GPTQ act-order", A8_TOKEN + ", smoothed and rotated"),
        Variant("w4a4-rtn-norot", "w4a4 RTN, no rotation", {"preset": "w4a4", "method": "rtn", "rotate": "off"},
                "int4, g128, asym, range search", "int4, dynamic per-token"),
        Variant("w4a4-rtn", "w4a4 RTN, rotated", {"preset": "w4a4", "method": "rtn"},
                "int4, g128, asym, range search", "int4, dynamic per-token, rotated"),
        Variant("w4a4-norot", "w4a4 GPTQ, no rotation", {"preset": "w4a4", "rotate": "off"},
                "int4, g128, asym, range search, GPTQ act-order", "int4, dynamic per-token"),
        Variant("w4a4", "w4a4 (preset: GPTQ, rotated)", "w4a4",
                "int4, g128, asym, range search, GPTQ act-order", "int4, dynamic per-token, rotated"),
        Variant("w4a4-smooth", "w4a4 + smooth=\"search\"", {"preset": "w4a4", "smooth": "search"},
                "int4, g128, asym, range search, GPTQ act-order", "int4, dynamic per-token, smoothed and rotated"),
        # the preset rounds its weights by GPTQ; the RTN rows change that one thing
        Variant("w8a8", "w8a8 (preset)", "w8a8", "int8, per-channel, symmetric, GPTQ act-order", A8_TOKEN),
        Variant("w8a8-rtn", 'w8a8 method="rtn"', {"preset": "w8a8", "method": "rtn"},
                "int8, per-channel, symmetric, round to nearest", A8_TOKEN),
        Variant("w8a8-no-smooth", 'w8a8 smooth="off"', {"preset": "w8a8", "smooth": "off"},
                "int8, per-channel, symmetric, GPTQ act-order", A8_TOKEN),
        Variant("w8a8-no-smooth-rtn", 'w8a8 smooth="off", method="rtn"', {"preset": "w8a8", "smooth": "off", "method": "rtn"},
                "int8, per-channel, symmetric, round to nearest", A8_TOKEN),
        Variant("w8a8-alpha", 'w8a8 smooth="alpha" 0.5 (SmoothQuant)', {"preset": "w8a8", "smooth": "alpha", "smooth_alpha": 0.5},
                "int8, per-channel, symmetric, GPTQ act-order", A8_TOKEN),
        Variant("w8a8-static", "w8a8-static (preset)", "w8a8-static", "int8, per-channel, symmetric",
                "int8, static per-tensor"),
        Variant("fp8", "fp8 (preset)", "fp8", "fp8 e4m3, per-channel", "fp8 e4m3, dynamic per-token"),
        Variant("w8a8-bf16", "w8a8 (preset), bf16 model", "w8a8", "int8, per-channel, symmetric, GPTQ act-order",
                A8_TOKEN, dtype=torch.bfloat16),
        Variant("w8a8-rtn-bf16", 'w8a8 method="rtn", bf16 model', {"preset": "w8a8", "method": "rtn"},
                "int8, per-channel, symmetric, round to nearest", A8_TOKEN, dtype=torch.bfloat16),
        Variant("w8a16-fq", "w8a16, fake-quant check", None, "same quantizer, dequantized into the fp32 model",
                "fp32", kind="fake-quant", check=lambda m: fake_quantized(m, PRESETS["w8a16"])),
        Variant("w4a16-weight-clip-fq", 'w4a16 clip_objective="weight", fake-quant check', None,
                "same quantizer, dequantized into the fp32 model", "fp32", kind="fake-quant",
                check=lambda m: fake_quantized(m, w4_weight_clip)),
        Variant("w8a8-no-smooth-fq", 'w8a8 smooth="off", fake-quant check', None,
                "int8 per-channel sym, dequantized into the fp32 model", "int8 per-token, fake-quantized in fp32",
                kind="fake-quant", check=fake_quantized_w8a8),
        Variant("torchao-w8a8", "torchao Int8DynamicActivationInt8WeightConfig", None,
                "int8, per-channel (PerRow), symmetric", "int8, dynamic per-token (eager torchao)", kind="torchao",
                check=torchao_w8a8),
    ]


def smoothing_summary(recipe: Recipe, report) -> str:
    """What smoothing did, from the report: how many linears got a scale, with which alphas."""
    if recipe.smooth == "off":
        return "off"
    rows = [r for r in report.layers if "float_bytes" in r]
    alphas = []
    for r in rows:
        s = str(r.get("smoothing", ""))
        if s.startswith("alpha "):
            alphas.append(float(s.split()[1].rstrip(",")))
    how = f"alpha {recipe.smooth_alpha:g}" if recipe.smooth == "alpha" else "search"
    out = f"{how}: {len(alphas)}/{len(rows)} linears"
    if recipe.smooth == "search" and alphas:
        lo, hi = min(alphas), max(alphas)
        out += f" (alpha {lo:g})" if lo == hi else f" (alpha {lo:g}-{hi:g})"
    return out


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> None:
    all_variants = variants()
    keys = [v.key for v in all_variants]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=None, metavar="KEY,KEY,...",
                   help="run only these rows (comma-separated keys; default all): " + ", ".join(keys))
    p.add_argument("--list", action="store_true", help="print the row keys and exit")
    p.add_argument("--quick", action="store_true",
                   help="verification off; without --recipes only w8a16, w4a16 and w8a8 (same texts)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--calib", type=int, default=N_CALIB, metavar="N",
                   help=f"calibration texts (default {N_CALIB}); the held-out texts do not depend on it")
    args = p.parse_args(argv)
    if args.list:
        for v in all_variants:
            print(f"{v.key:22s} {v.label}")
        return
    if args.recipes:
        wanted = [k.strip() for k in args.recipes.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in keys]
        if unknown:
            p.error(f"unknown --recipes key(s) {', '.join(unknown)}; known: {', '.join(keys)}")
        chosen = [v for v in all_variants if v.key in wanted]
    elif args.quick:
        chosen = [v for v in all_variants if v.key in ("w8a16", "w4a16", "w8a8")]
    else:
        chosen = all_variants
    ao_missing = torchao_available() if any(v.kind == "torchao" for v in chosen) else ""
    if ao_missing:
        chosen = [v for v in chosen if v.kind != "torchao"]

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    emit(header("qcompile fidelity and size: all-MiniLM-L6-v2 on held-out text", args.threads))

    model, tokenizer = load_minilm()
    if args.calib < 1:
        p.error(f"--calib must be at least 1, got {args.calib}")
    calib_texts, eval_texts = calibration_and_heldout(args.calib, N_EVAL)
    calib = list(batches(calib_texts, tokenizer, batch_size=16))
    log("embedding the held-out texts with the fp32 model and a bf16 copy")
    with torch.no_grad():
        reference = embed_texts(model, tokenizer, eval_texts)
        bf16_cos = embedding_cosine(embed_texts(copy.deepcopy(model).to(torch.bfloat16), tokenizer, eval_texts),
                                    reference)

    def cos_cells(cos: torch.Tensor) -> list[str]:
        return [f"{float(cos.mean()):.6f}", f"{float(cos.min()):.6f}", f"{float((1 - cos).mean()):.2e}"]

    fp32_model = module_tensor_bytes(model)
    fp32_linear = linear_weight_bytes(model)
    rows = [
        ["fp32 (reference)", "fp32", "fp32", "-", "1.000000", "1.000000", "-", mib(fp32_model), "1.00x",
         mib(fp32_linear), "1.00x", "-", "-"],
        ["bf16 copy", "bf16, no quantization", "bf16", "-", *cos_cells(bf16_cos),
         mib(fp32_model // 2), "2.00x", mib(fp32_linear // 2), "2.00x", "-", "-"],
    ]
    progress = sys.stderr.isatty()
    for i, v in enumerate(chosen, 1):
        log(f"({i}/{len(chosen)}) {v.label}: preparing ...")
        t0, share = time.perf_counter(), CpuShare()
        if v.kind != "qcompile":
            with torch.no_grad():
                prepared = v.check(model)
                prepare_s = time.perf_counter() - t0
                cos = embedding_cosine(embed_texts(prepared, tokenizer, eval_texts), reference)
            rows.append([v.label, v.weights, v.activations, "off", *cos_cells(cos), "-", "-", "-", "-",
                         f"{prepare_s:.1f}" if v.kind == "torchao" else "-", "-"])
            log(f"({i}/{len(chosen)}) {v.label}: cos mean {float(cos.mean()):.6f} "
                f"({time.perf_counter() - t0:.0f} s)")
            continue
        recipe = resolve_recipe(v.recipe)
        source = model if v.dtype == torch.float32 else copy.deepcopy(model).to(v.dtype)
        qm = qcompile.quantize(source, kwargs=calib[0], recipe=recipe, calibration=calib,
                               verify=not args.quick, progress=progress)
        quantize_s = time.perf_counter() - t0
        other = share.other_cores()
        quantize_other = "?" if other is None else f"{other:.2f}"
        log(f"({i}/{len(chosen)}) {v.label}: quantized in {quantize_s:.0f} s; evaluating ...")
        with torch.no_grad():
            cos = embedding_cosine(embed_texts(qm, tokenizer, eval_texts), reference)
        report = qm.report()
        expected = linear_weight_bytes(source)
        if report.float_bytes != expected:
            raise RuntimeError(f"{v.label}: report counts {report.float_bytes} float linear-weight bytes, "
                               f"the model has {expected}")
        size = module_tensor_bytes(qm.graph_module)
        lin = report.quantized_bytes
        rows.append([
            v.label, v.weights, v.activations,
            smoothing_summary(recipe, report), *cos_cells(cos),
            mib(size), f"{fp32_model / size:.2f}x", mib(lin), f"{fp32_linear / lin:.2f}x", f"{quantize_s:.0f}",
            quantize_other,
        ])
        log(f"({i}/{len(chosen)}) {v.label}: cos mean {float(cos.mean()):.6f}, quantize {quantize_s:.0f} s, "
            f"total {time.perf_counter() - t0:.0f} s")
        del qm, source

    head = ["model", "weights", "activations", "smoothing", "cos mean", "cos min", "mean 1-cos", "model MiB",
            "vs fp32", "linear weights MiB", "vs fp32", "quantize s", "other CPU"]
    emit(f"Calibration: {len(calib_texts)} texts (batches of 16); evaluation: {len(eval_texts)} other held-out "
         "texts (max 128 tokens, batches of 32). Cosine of normalized mean-pooled embeddings against float32.")
    emit()
    emit(markdown_table(head, rows, "llll" + "r" * 9))
    emit()
    emit("model MiB: every tensor of `qm.graph_module` (the bf16 copy row: half of fp32). Linear weights: the "
         f"{sum(isinstance(m, torch.nn.Linear) for m in model.modules())} `nn.Linear` weights (codes + scales "
         "+ zero points, and for 8-bit activations the per-channel weight scales; biases, embeddings and "
         "LayerNorms stay in the model's float dtype and count in model MiB only); `vs fp32` is always against "
         "the float32 model, also for the bf16 model's row. "
         "activations: 16-bit recipes keep activations in floating point (the CPU kernels compute in bf16); "
         "8-bit ones quantize each linear's input inside the op. smoothing: how many of the quantized linears "
         "got a SmoothQuant/AWQ scale (folded into the producing LayerNorm or linear where one can absorb it, "
         "else applied online), with the alpha or, for `search`, the range of alphas chosen per group. "
         "quantize s: wall time of `qcompile.quantize` (capture, smoothing statistics and search, passes, "
         "verification, per-layer errors on the calibration batches); other CPU: cores' worth of CPU time other "
         f"processes used meanwhile (this machine has {os.cpu_count()}; the machine is shared, so quantize s "
         "varies from run to run; the cosines and sizes are deterministic).")
    emit()
    emit('The "bf16 model" row quantizes `copy.deepcopy(model).to(torch.bfloat16)`; its embeddings are cast to '
         "float32 and compared with the float32 model's.")
    emit()
    emit("fake-quant checks: a float32 copy of the model run by Hugging Face, with each linear weight replaced "
         "by its quantized-then-dequantized value and nothing else of qcompile (no graph, kernels or bf16 "
         'activations). w8a16 and w4a16 clip_objective="weight" use `quantize_weight_rtn` with the recipe\'s '
         '(data-free) settings; w8a8 smooth="off" is written in plain torch in this script (int8 per-channel '
         "symmetric weights; each linear's input rounded to int8 per token by a forward pre-hook), the numerics "
         "torchao's `Int8DynamicActivationInt8WeightConfig` implements. A gap to the qcompile row of the same "
         "name would point at the lowering.")
    emit()
    if ao_missing:
        emit(f"torchao row skipped: torchao does not import ({ao_missing}); install it with `{TORCHAO_INSTALL}`.")
    elif any(v.kind == "torchao" for v in chosen):
        import torchao
        emit(f"torchao row: torchao {torchao.__version__}, `quantize_(deepcopy(model), "
             "Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))`, run eagerly in float32; "
             "quantize s: time of `quantize_`.")
    emit()
    emit(f"(total wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
