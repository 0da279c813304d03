"""Quantize weights: choose each linear's weight format and round its weight (RTN).

Round-to-nearest on a min/max grid, or on the grid whose range (searched per group over
``recipe.clip_ratios``) gives the least squared weight error.

Weight-only recipes attach a :class:`qcompile.quantizers.QuantizedWeight` to each linear
they quantize (``node.meta['qcompile.qweight']``). Recipes with 8-bit activations attach
an :class:`qcompile.act_quant.ActQuantWeight` instead (``node.meta['qcompile.act_quant']``):
symmetric per-channel INT8 (or fp8 e4m3) weights, and for static INT8 activations the
per-tensor activation scale, ``absmax / 127`` of the linear's input over the calibration
batches (after smoothing: the input then is ``X / s``). Every linear gets a report row;
the graph's ops are rewritten later by ``lower_to_kernels``. The rounding itself is pure
numerics in ``qcompile.quantizers`` and ``qcompile.act_quant``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qcompile.act_quant import INT8_QMAX, ActQuantWeight, quantize_weight_fp8
from qcompile.calibration import collect_linear_stats
from qcompile.errors import CalibrationError
from qcompile.fake_quant import weight_group_size
from qcompile.graph_utils import ACTQ_META, QWEIGHT_META, layer_name, linear_weight, quantizable_linears
from qcompile.pipeline import GraphPass, PassContext, PassResult
from qcompile.quantizers import quantize_weight_rtn
from qcompile.recipe import Recipe


def _input_stats(gm: fx.GraphModule, ctx: PassContext):
    """Calibration statistics of every linear's input, as this pass sees the graph (after
    smoothing), or None when the recipe needs none or there is no calibration data."""
    recipe = ctx.recipe
    static = recipe.activation_bits == 8 and recipe.activation_scale == "static"
    output_clip = bool(recipe.clip_ratios) and recipe.clip_objective == "output"
    if static and not ctx.calibration:
        raise CalibrationError(
            f"recipe {recipe.name!r} needs calibration data ({recipe.needs_calibration}); "
            "pass calibration=[batch, ...] to qcompile.quantize"
        )
    if not ((static or output_clip) and ctx.calibration):
        return None
    return collect_linear_stats(gm, ctx.calibration, progress=ctx.progress).layers


def _act_quant_weight(recipe: Recipe, weight: torch.Tensor, stats) -> ActQuantWeight:
    if recipe.activation_format == "fp8":
        return ActQuantWeight(*quantize_weight_fp8(weight), format="fp8")
    qw = quantize_weight_rtn(weight, 8, None, True, clip_ratios=recipe.clip_ratios or None,
                             importance=_importance(recipe, stats))
    static = recipe.activation_scale == "static"
    act_scale = (stats.absmax.max().float() / INT8_QMAX).reshape(()) if static else None
    return ActQuantWeight(qw.qweight, qw.scales.reshape(-1), "int8", act_scale)


def _importance(recipe: Recipe, stats):
    """Per-input-channel weights of the range search's error: E[x²] for clip_objective="output"."""
    if stats is None or not recipe.clip_ratios or recipe.clip_objective != "output":
        return None
    return stats.mean_square


def _clip_label(recipe: Recipe, stats) -> str:
    if not recipe.clip_ratios:
        return ""
    return " clip-search(output)" if _importance(recipe, stats) is not None else " clip-search"


def _act_format(recipe: Recipe) -> str:
    if recipe.activation_format == "fp8":
        return "fp8 e4m3 w per-channel, a per-token"
    scale = "per-tensor static" if recipe.activation_scale == "static" else "per-token"
    return f"int8 w per-channel, a {scale}"


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.recipe
    modified = False
    linears = quantizable_linears(gm)
    stats = _input_stats(gm, ctx) if linears else None
    for node in tqdm(linears, desc="quantizing weights", unit="layer", disable=not ctx.progress, leave=False):
        weight = linear_weight(gm, node)
        name = layer_name(node)
        out_features, in_features = weight.shape
        row = ctx.layers.setdefault(name, {"layer": name, "shape": (out_features, in_features)})
        row["node"] = node.name
        reason = recipe.float_reason(name, in_features)
        if reason:
            row.update(format="float", bits=weight.element_size() * 8, note=reason)
            continue
        row["float_bytes"] = weight.numel() * weight.element_size()
        if recipe.activation_bits == 8:
            aq = _act_quant_weight(recipe, weight, stats[name] if stats else None)
            node.meta[ACTQ_META] = aq
            row.update(format=_act_format(recipe), bits=8, bytes=aq.nbytes, note="")
            modified = True
            continue
        group, note = weight_group_size(recipe, in_features)
        layer_stats = stats[name] if stats else None
        qweight = quantize_weight_rtn(weight, recipe.weight_bits, group, recipe.symmetric,
                                      clip_ratios=recipe.clip_ratios or None,
                                      importance=_importance(recipe, layer_stats))
        node.meta[QWEIGHT_META] = qweight
        row.update(
            format=f"int{recipe.weight_bits} " + (f"g{group}" if group else "per-channel")
            + (" sym" if recipe.symmetric else " asym") + _clip_label(recipe, layer_stats),
            bits=recipe.weight_bits,
            group_size=group,
            bytes=qweight.nbytes,
            note=note,
        )
        modified = True
    return PassResult(gm, modified)


quantize_weights = GraphPass("quantize_weights", _run, preserves_function=False)
