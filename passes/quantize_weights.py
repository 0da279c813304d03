"""Quantize weights: choose each linear's weight format and round its weight (RTN or GPTQ).

Round-to-nearest on a min/max grid, or on the grid whose range (searched per group over
``recipe.clip_ratios``) gives the least squared weight error. With ``recipe.method ==
"gptq"`` the weights are rounded by GPTQ (``qcompile.gptq``) against the Hessian
``H = Σ x xᵀ`` of each linear's input over the calibration batches (as this pass sees the
graph, i.e. after smoothing), for the weight-only formats and for the INT8 weights of
8-bit activations (fp8 weights are cast, not rounded, and stay as they are). The report
row then also holds the proxy losses ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` — the output error
energy on the calibration inputs relative to the output's — of GPTQ (``gptq_loss``) and
of the RTN the same recipe would have done (``rtn_loss``). Hessians are float64
``[K, K]`` per linear (a 1.1B Llama's: about 10 GB in all), so they are collected stage
by stage (``qcompile.stages``: a decoder's layers) on the float graph and each stage's
linears rounded before the next stage's statistics are gathered: one stage's Hessians
are held at a time, and the statistics are the same as from one pass over the whole
graph (:func:`_run_by_stage`).

Weight-only recipes attach a :class:`qcompile.quantizers.QuantizedWeight` to each linear
they quantize (``node.meta['qcompile.qweight']``); so do recipes with 4-bit (or 3-bit)
weights and 8- or 4-bit activations, which also set ``node.meta['qcompile.act_bits']``
(lowered to ``qcompile::linear_w4a8`` / ``linear_w4a4``). Recipes with 8-bit weights and 8-bit
activations attach an :class:`qcompile.act_quant.ActQuantWeight` instead (``node.meta['qcompile.act_quant']``):
symmetric per-channel INT8 (or fp8 e4m3) weights, and for static INT8 activations the
per-tensor activation scale, ``absmax / 127`` of the linear's input over the calibration
batches (after smoothing: the input then is ``X / s``). Every linear gets a report row;
the graph's ops are rewritten later by ``lower_to_kernels``. The rounding itself is pure
numerics in ``qcompile.quantizers`` and ``qcompile.act_quant``.

With ``recipe.sequential`` (weight-only recipes) the graph is cut into stages
(``qcompile.stages``) and quantized stage by stage (:func:`quantize_stage`, driven by
``qcompile.sequential.run_stages``): each stage's statistics come from the outputs of the
earlier stages with their weights already quantized (dequantized in float), and only
one stage's Hessians are held at a time. Streaming (``qcompile.streaming``) runs the same
:func:`quantize_stage` on stages whose weights are read from disk.

A linear carrying ``node.meta['qcompile.precision']`` (a ``WeightFormat`` chosen by
``assign_precision`` under a budget) is rounded to that format instead of the recipe's
``weight_bits`` / ``group_size`` / ``symmetric`` (int8 per-channel symmetric, a 3/4-bit
grid in groups, or left float); a format that also quantizes activations gets per-token
dynamic INT8 / INT4 activations as above (``linear_w8a8``, ``linear_w4a8`` / ``linear_w4a4``).
Method and range search stay the recipe's.

Every linear's result (the attached metadata, the report row, a fingerprint of the float
weight it rounded) is recorded in ``ctx.decisions``; on a model's other graphs
(generation's prefill and decode steps) the pass attaches the recorded results, the same
tensors, after checking each weight's fingerprint, and gathers no statistics
(``qcompile.decisions``).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qcompile.act_quant import INT8_QMAX, ActQuantWeight, quantize_weight_fp8
from qcompile.calibration import collect_linear_stats
from qcompile.decisions import Decisions
from qcompile.errors import CalibrationError
from qcompile.fake_quant import weight_group_size
from qcompile.gptq import GPTQResult, gptq_quantize, proxy_loss, rtn_proxy_loss
from qcompile.graph_utils import ACT_BITS_META, ACTQ_META, QWEIGHT_META, layer_name, linear_weight, quantizable_linears
from qcompile.pipeline import GraphPass, PassContext, PassResult
from qcompile.quantizers import QuantizedWeight, dequantize_weight, quantize_weight_rtn, weight_grid
from qcompile.recipe import Recipe
from qcompile.sequential import run_stages
from qcompile.stages import find_stages, stage_module
from qcompile.weight_formats import PRECISION_META, effective_group

__all__ = ["quantize_stage", "quantize_weights"]


def _input_stats(gm: fx.GraphModule, ctx: PassContext):
    """Calibration statistics of every linear's input, as this pass sees the graph (after
    smoothing), or None when the recipe needs none or there is no calibration data."""
    recipe = ctx.recipe
    static = recipe.activation_bits == 8 and recipe.activation_scale == "static"
    output_clip = bool(recipe.clip_ratios) and recipe.clip_objective in ("output", "hessian")
    gptq = _uses_gptq(recipe)
    if (static or gptq or _hessian_clip(recipe)) and not ctx.calibration:
        raise CalibrationError(
            f"recipe {recipe.name!r} needs calibration data ({recipe.needs_calibration}); "
            "pass calibration=[batch, ...] to qcompile.quantize"
        )
    if not ((static or output_clip or gptq) and ctx.calibration):
        return None
    return collect_linear_stats(gm, ctx.calibration, hessian=gptq or _hessian_clip(recipe), progress=ctx.progress).layers


def _hessian_clip(recipe: Recipe) -> bool:
    """The range search weighs each group's error by its block of Σ x xᵀ (needs Hessians)."""
    return bool(recipe.clip_ratios) and recipe.clip_objective == "hessian"


def _uses_gptq(recipe: Recipe) -> bool:
    return recipe.method == "gptq" and not (recipe.activation_bits == 8 and recipe.activation_format == "fp8")


def _round(recipe: Recipe, weight: torch.Tensor, bits: int, group: int | None, symmetric: bool, stats,
           row: dict) -> QuantizedWeight:
    """Round ``weight`` per the recipe's method; GPTQ also records its losses in ``row``."""
    storage = 4 if bits == 3 else bits
    rtn_args = dict(clip_ratios=recipe.clip_ratios or None, importance=_importance(recipe, stats), grid_bits=bits)
    if recipe.method != "gptq":
        return quantize_weight_rtn(weight, storage, group, symmetric, **rtn_args)
    hessian = stats.hessian
    if hessian is None:  # every linear ran in calibration, so this is a bug, not bad input
        raise RuntimeError(f"layer {row['layer']}: no Hessian was collected for GPTQ")
    # RTN's grid (range-searched once): the RTN baseline rounds onto it, and with static
    # groups GPTQ uses it as its group grids
    grid = weight_grid(weight, storage, group, symmetric, **rtn_args)
    static = recipe.gptq_act_order and recipe.gptq_static_groups
    result: GPTQResult = gptq_quantize(
        weight, hessian, bits, group, symmetric, damp=recipe.gptq_damp, act_order=recipe.gptq_act_order,
        block_size=recipe.gptq_block_size, clip_ratios=recipe.clip_ratios or None,
        clip_weighted=recipe.clip_objective == "output", static_groups=static, grid=grid if static else None,
    )
    reference = proxy_loss(weight, None, hessian)  # tr(W H Wᵀ)
    scale = reference if reference > 0 else 1.0
    row["gptq_loss"] = result.loss / scale
    row["rtn_loss"] = rtn_proxy_loss(weight, grid, hessian) / scale
    notes = []
    if result.dead_channels:
        notes.append(f"{result.dead_channels} dead input channel(s) zeroed")
    if result.damp_raised:
        notes.append(f"GPTQ damp raised to {result.damp:g}")
    row["gptq_note"] = "; ".join(notes)
    return result.qweight


def _act_quant_weight(recipe: Recipe, weight: torch.Tensor, stats, row: dict) -> ActQuantWeight:
    if recipe.activation_format == "fp8":
        return ActQuantWeight(*quantize_weight_fp8(weight), format="fp8")
    qw = _round(recipe, weight, 8, None, True, stats, row)
    static = recipe.activation_scale == "static"
    act_scale = (stats.absmax.max().float() / INT8_QMAX).reshape(()) if static else None
    return ActQuantWeight(qw.qweight, qw.scales.reshape(-1), "int8", act_scale)


def _importance(recipe: Recipe, stats):
    """Weights of the range search's error: per input channel E[x²] for clip_objective="output",
    the matrix Σ x xᵀ (its group blocks) for "hessian"."""
    if stats is None or not recipe.clip_ratios or recipe.clip_objective == "weight":
        return None
    return stats.hessian if recipe.clip_objective == "hessian" else stats.mean_square


def _clip_label(recipe: Recipe, stats) -> str:
    if not recipe.clip_ratios:
        return ""
    if _importance(recipe, stats) is None:
        return " clip-search"
    return " clip-search(hessian)" if recipe.clip_objective == "hessian" else " clip-search(output)"


def _method_label(recipe: Recipe) -> str:
    if recipe.method != "gptq":
        return ""
    if not recipe.gptq_act_order:
        return " gptq"
    return " gptq act-order" + ("" if recipe.gptq_static_groups else " (grouped)")


def _grid_label(recipe: Recipe, stats, bits: int, group: int | None, symmetric: bool) -> str:
    """The report's name of a rounded weight: grid, grouping, symmetry, range search, method."""
    return (f"int{bits} " + (f"g{group}" if group else "per-channel") + (" sym" if symmetric else " asym")
            + _clip_label(recipe, stats) + _method_label(recipe))


def _act_format(recipe: Recipe) -> str:
    if recipe.activation_format == "fp8":
        return "fp8 e4m3 w per-channel, a per-token"
    scale = "per-tensor static" if recipe.activation_scale == "static" else "per-token"
    return f"int8 w per-channel{_method_label(recipe)}, a {scale}"


def _join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


_DECIDED_META = (QWEIGHT_META, ACTQ_META, ACT_BITS_META)


def _quantize_linear(gm: fx.GraphModule, node: fx.Node, recipe: Recipe, stats, layers: dict[str, dict],
                     target: fx.Node | None = None, decisions: Decisions | None = None) -> bool:
    """Round one linear's weight (read from ``gm``) and attach the result to ``target``
    (default ``node``; a stage module's copy quantizes its parent's node); fill its report
    row in ``layers``; record the choice in ``decisions`` when given. Returns whether the
    linear was quantized."""
    target = node if target is None else target
    done = _round_linear(gm, node, recipe, stats, layers, target)
    if decisions is not None:
        name = layer_name(node)
        meta = {key: target.meta[key] for key in _DECIDED_META if key in target.meta}
        decisions.record_weight(name, linear_weight(gm, node), meta, layers[name])
    return done


def _replayed(gm: fx.GraphModule, ctx: PassContext) -> PassResult | None:
    """Attach the rounded weights recorded on the model's first graph (``qcompile.decisions``):
    the same tensors, after checking that this graph's float weight is the one they round.
    None (nothing attached) when a lenient store misses one or holds another weight."""
    nodes = quantizable_linears(gm)
    found = [ctx.decisions.replay_weight(layer_name(node), linear_weight(gm, node)) for node in nodes]
    if any(decision is None for decision in found):
        return None
    for node, decision in zip(nodes, found):
        node.meta.update(decision.meta)
        ctx.layers[layer_name(node)] = {**decision.row, "node": node.name}
    return PassResult(gm, any(bool(decision.meta) for decision in found))


def _round_linear(gm: fx.GraphModule, node: fx.Node, recipe: Recipe, stats, layers: dict[str, dict],
                  target: fx.Node) -> bool:
    weight = linear_weight(gm, node)
    name = layer_name(node)
    out_features, in_features = weight.shape
    row = layers.setdefault(name, {"layer": name, "shape": (out_features, in_features)})
    row["node"] = target.name
    reason = recipe.float_reason(name, in_features)
    if reason:
        row.update(format="float", bits=weight.element_size() * 8, note=reason)
        return False
    row["float_bytes"] = weight.numel() * weight.element_size()
    layer_stats = stats[name] if stats else None
    chosen = target.meta.get(PRECISION_META)  # the per-layer choice of assign_precision (on the graph's node)
    if chosen is not None and chosen.quantizes_activations and not chosen.is_float:
        return _quantize_chosen_w_a(recipe, weight, chosen, layer_stats, row, target)
    if recipe.activation_bits != 16 and recipe.weight_storage_bits == 8:
        aq = _act_quant_weight(recipe, weight, layer_stats, row)
        target.meta[ACTQ_META] = aq
        row.update(format=_act_format(recipe), bits=8, bytes=aq.nbytes, note=row.pop("gptq_note", ""))
        return True
    bits, symmetric = recipe.weight_bits, recipe.symmetric
    group, note = weight_group_size(recipe, in_features)
    if chosen is not None and chosen.is_float:
        row.update(format="float", bits=weight.element_size() * 8, bytes=row["float_bytes"],
                   note="kept float by the precision budget")
        return False
    if chosen is not None:
        bits, symmetric = chosen.grid_bits, chosen.symmetric
        if bits == 8:
            group, note = None, ""
    qweight = _round(recipe, weight, bits, group, symmetric, layer_stats, row)
    target.meta[QWEIGHT_META] = qweight
    activations = ""
    if recipe.activation_bits != 16:  # 4-bit weights with int8 / int4 per-token activations
        target.meta[ACT_BITS_META] = recipe.activation_bits
        activations = f", a int{recipe.activation_bits} per-token"
    row.update(
        format=_grid_label(recipe, layer_stats, bits, group, symmetric) + activations,
        bits=bits,
        group_size=group,
        bytes=qweight.nbytes,
        note=_join_notes(note, row.pop("gptq_note", "")),
    )
    return True


def _quantize_chosen_w_a(recipe: Recipe, weight: torch.Tensor, chosen, stats, row: dict, target: fx.Node) -> bool:
    """A linear whose chosen format (assign_precision) also quantizes its input per token:
    8-bit weights with INT8 activations (``ActQuantWeight``, lowered to ``linear_w8a8``) or a
    3/4-bit grid with INT8 / INT4 activations (lowered to ``linear_w4a8`` / ``linear_w4a4``)."""
    if chosen.grid_bits == 8:
        qw = _round(recipe, weight, 8, None, True, stats, row)
        target.meta[ACTQ_META] = aq = ActQuantWeight(qw.qweight, qw.scales.reshape(-1), "int8", None)
        row.update(format=f"int8 w per-channel{_method_label(recipe)}, a int8 per-token", bits=8, bytes=aq.nbytes,
                   note=row.pop("gptq_note", ""))
        return True
    in_features = weight.shape[1]
    group = effective_group(chosen, in_features)
    note = "" if group == chosen.group_size else \
        f"in_features {in_features} not divisible by group {chosen.group_size}: per-channel"
    qweight = _round(recipe, weight, chosen.grid_bits, group, chosen.symmetric, stats, row)
    target.meta[QWEIGHT_META] = qweight
    target.meta[ACT_BITS_META] = chosen.act_bits
    row.update(
        format=_grid_label(recipe, stats, chosen.grid_bits, group, chosen.symmetric)
        + f", a int{chosen.act_bits} per-token",
        bits=chosen.grid_bits, group_size=group, bytes=qweight.nbytes, note=_join_notes(note, row.pop("gptq_note", "")),
    )
    return True


def _needs_stats(recipe: Recipe) -> bool:
    static = recipe.activation_bits == 8 and recipe.activation_scale == "static"
    return static or (bool(recipe.clip_ratios) and recipe.clip_objective != "weight") or _uses_gptq(recipe)


def quantize_stage(module: fx.GraphModule, pairs: list[tuple[fx.Node, fx.Node]], batches: list[list],
                   recipe: Recipe, layers: dict[str, dict], *, group=None,
                   decisions: Decisions | None = None) -> list[fx.Node]:
    """Quantize the linears of one stage (``qcompile.stages``) of a weight-only recipe.

    ``module`` is the stage's GraphModule, ``pairs`` its ``(linear, target)`` nodes (the
    quantized weight is attached to ``target``), ``batches`` the stage's inputs. Statistics
    are collected on ``module`` (reduced over the process ``group`` when given), the weights
    rounded, and every quantized linear's weight in ``module`` replaced by its dequantized
    value, so that running ``module`` afterwards gives the quantized stage's outputs.
    Returns the targets that were quantized.
    """
    if recipe.activation_bits != 16:
        raise ValueError(f"stage-by-stage quantization needs a weight-only recipe, got {recipe.name!r}")
    stats = None
    if _needs_stats(recipe) and batches:
        stats = collect_linear_stats(module, batches, hessian=_uses_gptq(recipe) or _hessian_clip(recipe), progress=False,
                                     group=group).layers
    quantized = []
    for node, target in pairs:
        done = _quantize_linear(module, node, recipe, stats, layers, target, decisions)
        if stats:
            stats.pop(layer_name(node), None)  # this linear's Hessian is no longer needed: free it now
        if done:
            weight_node = node.args[1]
            old = linear_weight(module, node)
            setattr(module, weight_node.target, dequantize_weight(target.meta[QWEIGHT_META], old.dtype))
            quantized.append(target)
    return quantized


def _run_sequential(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """``recipe.sequential``: stage by stage, each calibrated on the quantized earlier stages."""
    stages = find_stages(gm)
    modified = False

    def load(stage):
        return stage_module(gm, stage)

    def process(stage, module, node_map, batches):
        nonlocal modified
        pairs = [(node_map[n], n) for n in stage.linears]
        modified |= bool(quantize_stage(module, pairs, batches, ctx.recipe, ctx.layers, decisions=ctx.decisions))

    run_stages(gm, stages, ctx.calibration, load=load, process=process, progress=ctx.progress)
    return PassResult(gm, modified)


def _run_by_stage(gm: fx.GraphModule, ctx: PassContext, stages: list) -> bool:
    """Statistics with Hessians, one stage at a time: each stage's module runs on the float
    outputs of the stages before it (the weights are only annotated here, so the graph still
    computes in float), its linears' statistics are collected and its linears rounded, and
    the Hessians are freed before the next stage. The statistics are those of one pass over
    the whole graph (the same ops on the same inputs); only one stage's are held."""
    modified = False
    done: set[fx.Node] = set()

    def load(stage):
        return stage_module(gm, stage)

    def process(stage, module, node_map, batches):
        nonlocal modified
        stats = collect_linear_stats(module, batches, hessian=True, progress=False).layers
        for node in stage.linears:
            modified |= _quantize_linear(gm, node, ctx.recipe, stats, ctx.layers, decisions=ctx.decisions)
            stats.pop(layer_name(node), None)
            done.add(node)

    run_stages(gm, stages, ctx.calibration, load=load, process=process, progress=ctx.progress)
    missed = [layer_name(n) for n in quantizable_linears(gm) if n not in done]
    if missed:
        raise RuntimeError(f"linears outside every stage were not quantized: {missed}")
    return modified


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.recipe
    if ctx.decisions.replaying and (replayed := _replayed(gm, ctx)) is not None:
        return replayed
    linears = quantizable_linears(gm)
    if recipe.sequential and linears:
        if _uses_gptq(recipe) and not ctx.calibration:
            raise CalibrationError(
                f"recipe {recipe.name!r} needs calibration data ({recipe.needs_calibration}); "
                "pass calibration=[batch, ...] to qcompile.quantize"
            )
        return _run_sequential(gm, ctx)
    if linears and ctx.calibration and (_uses_gptq(recipe) or _hessian_clip(recipe)):
        stages = find_stages(gm)
        if len(stages) > 1:
            return PassResult(gm, _run_by_stage(gm, ctx, stages))
    modified = False
    stats = _input_stats(gm, ctx) if linears else None
    desc = "GPTQ rounding" if _uses_gptq(recipe) else "quantizing weights"
    for node in tqdm(linears, desc=desc, unit="layer", disable=not ctx.progress, leave=False):
        modified |= _quantize_linear(gm, node, recipe, stats, ctx.layers, decisions=ctx.decisions)
    return PassResult(gm, modified)


quantize_weights = GraphPass("quantize_weights", _run, preserves_function=False)
