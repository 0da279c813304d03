"""Fold SmoothQuant/AWQ smoothing scales into the graph (function-preserving).

For every smoothing group (an activation X and the quantized linears reading it, found
from graph structure by :mod:`qcompile.smoothing_groups`) the pass computes a
per-channel scale s from calibration statistics (:mod:`qcompile.smoothing`) and rewrites
``X Wᵀ`` as ``(X / s) (W s)ᵀ``:

* the consumers' weight columns are multiplied by s (new constants);
* the division by s is folded into the producer the analysis found — a linear's output
  rows and bias, a norm's weight and bias, or a per-channel constant multiply;
* where no producer can absorb it (``kind == "online"``) and the recipe allows online
  smoothing, an explicit ``aten.mul(X, 1/s)`` is inserted in front of the group's
  linears, tagged ``meta['qcompile.smoothing'] = s``; the lowering pass absorbs it into
  the activation-quantizing op (``qcompile::linear_w8a8``'s ``smooth`` argument), and
  with 16-bit activations it stays a multiply. Otherwise the group is left alone.

``smooth="alpha"`` uses the recipe's α everywhere; ``smooth="search"`` picks α per group
(or no smoothing) by the group's quantized output error on calibration samples — or, with
``smooth_objective="stage"`` (weight-only), by the error of the outputs of the whole stage
(``qcompile.stages``: a transformer layer) holding the group's linears
(:mod:`qcompile.stage_smoothing`; a group whose linears span two stages, or a graph without
a stage cut, keeps the group objective and its report row says why). With 8-bit
(or 4-bit) activations the candidates are SmoothQuant's scales ``max|X|^α / max|W|^(1-α)``
rounded to powers of two, so the rewrite is exact in the model's precision. With 16-bit
activations (weight-only, AWQ) they are AWQ's scales ``mean|X|^α / mean|Ŵ|^(1-α)``
(:func:`qcompile.smoothing.awq_scales`), not rounded; every new constant then records its
float64 value (``EXACT_META``) and the pass manager's float64 check proves the rewrite
exact in float64 while the stored constants carry float32 (bf16) rounding. Either way
the check holds on every architecture. Every consumer's report row says what happened
(``smoothing``: α and where the scale went).

Each group's choice is recorded in ``ctx.decisions`` (keyed by its linears' names); on a
model's other graphs (generation's prefill and decode steps) the pass replays it, with no
calibration data, so every graph folds the same scales (``qcompile.decisions``).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qcompile.calibration import collect_input_samples, collect_linear_stats
from qcompile.errors import CalibrationError
from qcompile.fake_quant import activation_fake_quant, weight_fake_quant, weight_group_size
from qcompile.graph_utils import (
    EXACT_META,
    SMOOTHING_META,
    ExactValue,
    add_constant,
    eliminate_dead_constants,
    get_constant,
    infer_meta,
    layer_name,
    linear_weight,
    linears_to_quantize,
)
from qcompile.hadamard import apply_hadamard, random_signs, rotation_plan
from qcompile.pipeline import GraphPass, PassContext, PassResult
from qcompile.smoothing import (
    awq_scales,
    candidate_scales,
    search_scales,
    smoothing_scales,
    weight_column_absmax,
    weight_group_absmean,
)
from qcompile.smoothing_groups import SmoothingGroup, constant_value, find_smoothing_groups
from qcompile.stage_smoothing import plan_stage_search, search_on_stages

__all__ = ["SEARCH_ROWS", "fold_smoothing"]

aten = torch.ops.aten

# Calibration tokens per group the α search measures errors on.
SEARCH_ROWS = 2048


def _scaled(value: ExactValue, factor: torch.Tensor, *, divide: bool) -> ExactValue:
    """``value * factor`` or ``value / factor`` in float64 (exact for a power-of-two factor;
    :func:`_replace_arg` stores it in the model's dtype), as a function computing it: the
    float64 value is computed to store the constant and again by the pass manager's check,
    never held in between."""
    f = factor.detach().to(torch.float64, copy=True)
    return lambda: value() / f if divide else value() * f


def _value(gm: fx.GraphModule, arg) -> ExactValue:
    """A constant argument's float64 value: the exact value an earlier rewrite in this pass
    recorded (a V projection is scaled as a consumer, then as a producer), else the constant."""
    if isinstance(arg, fx.Node) and arg.meta.get(EXACT_META) is not None:
        return arg.meta[EXACT_META]
    tensor = constant_value(gm, arg)
    return lambda: tensor.to(torch.float64)


def _replace_arg(gm: fx.GraphModule, node: fx.Node, index: int, exact: ExactValue, hint: str) -> None:
    """Replace constant argument ``index`` of ``node`` by ``exact()`` (float64) stored in the old
    constant's dtype, recording how to compute the float64 value for the pass manager's check."""
    old = node.args[index]
    source = old.meta.get("qcompile.source") if isinstance(old, fx.Node) else None
    dtype = old.meta["val"].dtype  # a constant, or a constant expression (Gemma's 1 + w)
    new = add_constant(gm, exact().to(dtype), source or hint, before=node, exact=exact,
                       origin=old if isinstance(old, fx.Node) else None)
    args = list(node.args)
    args[index] = new
    node.args = tuple(args)


def _fold_into_producer(gm: fx.GraphModule, group: SmoothingGroup, s: torch.Tensor) -> None:
    producer = group.producer
    name = producer.name
    if group.kind == "linear":
        _replace_arg(gm, producer, 1, _scaled(_value(gm, producer.args[1]), s[:, None], divide=True), f"{name}_weight")
        bias = get_constant(gm, producer.args[2]) if len(producer.args) > 2 else None
        if bias is not None:
            _replace_arg(gm, producer, 2, _scaled(_value(gm, producer.args[2]), s, divide=True), f"{name}_bias")
    elif group.kind in ("layer_norm", "rms_norm"):
        _replace_arg(gm, producer, 2, _scaled(_value(gm, producer.args[2]), s, divide=True), f"{name}_weight")
        if group.kind == "layer_norm" and len(producer.args) > 3 and producer.args[3] is not None:
            _replace_arg(gm, producer, 3, _scaled(_value(gm, producer.args[3]), s, divide=True), f"{name}_bias")
    elif group.kind == "scale":
        for i, arg in enumerate(producer.args[:2]):
            value = constant_value(gm, arg)
            if value is not None and value.dim() >= 1 and value.shape[-1] == s.numel():
                _replace_arg(gm, producer, i, _scaled(_value(gm, arg), s, divide=True), f"{name}_scale")
                break
    else:
        raise ValueError(f"cannot fold into a producer of kind {group.kind!r}")


def _insert_online(gm: fx.GraphModule, group: SmoothingGroup, s: torch.Tensor) -> fx.Node:
    x = group.activation
    inverse = _scaled(lambda: torch.ones(s.shape, dtype=torch.float64), s, divide=True)
    first = min(group.consumers, key=lambda n: list(gm.graph.nodes).index(n))
    const = add_constant(gm, inverse().to(x.meta["val"].dtype), f"{layer_name(first)}_smooth_inv", before=first,
                         exact=inverse)
    with gm.graph.inserting_before(first):
        mul = gm.graph.call_function(aten.mul.Tensor, (x, const))
    mul.meta[SMOOTHING_META] = s
    infer_meta(gm, mul)
    for consumer in group.consumers:
        consumer.args = (mul, *consumer.args[1:])
    return mul


def _scale_consumers(gm: fx.GraphModule, group: SmoothingGroup, s: torch.Tensor) -> None:
    for consumer in group.consumers:
        _replace_arg(gm, consumer, 1, _scaled(_value(gm, consumer.args[1]), s[None, :], divide=False),
                     f"{consumer.name}_weight")


def _following_rotation(recipe, group: SmoothingGroup):
    """``t -> t Q`` for a recipe that rotates after smoothing: the randomized Hadamard rotation
    ``insert_rotations`` gives an activation of this width (a residual-stream rotation uses
    other signs, which the search cannot tell from these). None without rotations."""
    if recipe.rotate == "off":
        return None
    k = group.channels
    plan, signs = rotation_plan(k), random_signs(k, recipe.rotation_seed + k, torch.float32)
    return lambda t: apply_hadamard(t, plan, signs)


def _candidate_stats(recipe, gm: fx.GraphModule, group: SmoothingGroup, stats):
    """The activation statistic and the ``search_scales`` / ``candidate_scales`` keyword
    arguments (weight statistic, scale function) of a group's candidates.

    With 16-bit activations (weight-only, AWQ) AWQ's mean statistics and unrounded scales;
    otherwise SmoothQuant's abs-max and power-of-two scales."""
    weights = [linear_weight(gm, c) for c in group.consumers]
    act = stats.layers[layer_name(group.consumers[0])]
    if recipe.activation_bits == 16:  # weight-only: AWQ's mean statistics, scales not rounded
        group_size, _ = weight_group_size(recipe, group.channels)
        stat_args = dict(weight_stat=weight_group_absmean(weights, group_size), scale_fn=awq_scales)
        act_stat = act.absmean
    else:
        stat_args, act_stat = {}, act.absmax
    return act_stat, stat_args


def _stage_searches(ctx: PassContext, gm: fx.GraphModule, groups: list[SmoothingGroup], stats):
    """``smooth_objective="stage"``: ({group index: ScaleSearch}, {group index: why it falls back})
    over the groups the search covers (online groups only with ``smooth_online``)."""
    recipe = ctx.recipe
    searched = [i for i, g in enumerate(groups) if g.kind != "online" or recipe.smooth_online]
    subset = [groups[i] for i in searched]
    plan = plan_stage_search(gm, subset)

    def candidates(group: SmoothingGroup):
        act_stat, stat_args = _candidate_stats(recipe, gm, group, stats)
        weights = [linear_weight(gm, c) for c in group.consumers]
        cands = candidate_scales(weights, act_stat, recipe.smooth_alphas, **stat_args)
        return cands, weight_fake_quant(recipe, group.channels)

    found = search_on_stages(gm, subset, plan, ctx.calibration, candidates, progress=ctx.progress)
    staged = {searched[j]: (search, plan.stage_of[j]) for j, search in found.items()}
    fallback = {searched[j]: why for j, why in plan.fallback.items()}
    return staged, fallback


def _choose_scale(ctx: PassContext, gm: fx.GraphModule, group: SmoothingGroup, stats, samples,
                  staged=None, fallback: str = ""):
    """(alpha or None, scale or None, note, (error without smoothing, chosen error) or None).

    ``staged`` is the stage objective's ``(ScaleSearch, stage index)`` for this group;
    ``fallback`` why a stage-objective recipe scored this group by its own outputs."""
    recipe = ctx.recipe
    weights = [linear_weight(gm, c) for c in group.consumers]
    act = stats.layers[layer_name(group.consumers[0])]
    if recipe.smooth == "alpha":
        s = smoothing_scales(act.absmax, weight_column_absmax(weights), recipe.smooth_alpha)
        return recipe.smooth_alpha, s, "", None
    if staged is not None:
        found, stage_index = staged
        how = f"stage {stage_index} search"
    else:
        act_stat, stat_args = _candidate_stats(recipe, gm, group, stats)
        found = search_scales(
            samples[group.consumers[0]], weights, act_stat, recipe.smooth_alphas,
            weight_fake_quant(recipe, group.channels), activation_fake_quant(recipe),
            _following_rotation(recipe, group), **stat_args,
        )
        how = f"search (group objective: {fallback})" if fallback else "search"
    base = found.errors[None]
    best = found.errors[found.alpha]
    note = f"{how}: err {base:.2e} -> {best:.2e}"
    return found.alpha, found.scale, note, (base, best)


def _chooser(ctx: PassContext, gm: fx.GraphModule, groups: list[SmoothingGroup]):
    """``choose(index, group) -> (alpha, s, note, errors)``: computed from the calibration
    statistics and recorded, or (replaying, ``qcompile.decisions``) the recorded choice."""
    decisions = ctx.decisions
    if decisions.replaying:
        found = [decisions.replay_smoothing(_group_key(g), _weights(gm, g)) for g in groups]
        if all(ok for ok, _ in found):
            return lambda index, group: found[index][1]
    recipe = ctx.recipe
    if not ctx.calibration:
        raise CalibrationError(
            f"recipe {recipe.name!r} needs calibration data ({recipe.needs_calibration}); "
            "pass calibration=[batch, ...] to qcompile.quantize"
        )
    stats = collect_linear_stats(gm, ctx.calibration, progress=ctx.progress)
    staged, fallback = {}, {}
    if recipe.smooth == "search" and recipe.smooth_objective == "stage":
        staged, fallback = _stage_searches(ctx, gm, groups, stats)
    samples = {}
    sampled = [g.consumers[0] for i, g in enumerate(groups)
               if (g.kind != "online" or recipe.smooth_online) and i not in staged]
    if recipe.smooth == "search" and sampled:
        samples = collect_input_samples(gm, ctx.calibration, sampled, max_rows=SEARCH_ROWS, progress=ctx.progress)

    def choose(index: int, group: SmoothingGroup):
        chosen = _choose_scale(ctx, gm, group, stats, samples, staged.get(index), fallback.get(index, ""))
        decisions.record_smoothing(_group_key(group), _weights(gm, group), chosen)
        return chosen

    return choose


def _group_key(group: SmoothingGroup) -> tuple[str, ...]:
    return tuple(layer_name(c) for c in group.consumers)


def _weights(gm: fx.GraphModule, group: SmoothingGroup) -> list[torch.Tensor]:
    return [linear_weight(gm, c) for c in group.consumers]


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.recipe
    linears = linears_to_quantize(gm, recipe)
    groups = find_smoothing_groups(gm, linears)
    choose = _chooser(ctx, gm, groups)
    ctx.analyses["smoothing_groups"] = groups
    modified = False
    for index, group in enumerate(tqdm(groups, desc="smoothing", unit="group", disable=not ctx.progress, leave=False)):
        rows = [
            ctx.layers.setdefault(layer_name(c), {"layer": layer_name(c), "shape": tuple(linear_weight(gm, c).shape)})
            for c in group.consumers
        ]
        if group.kind == "online" and not recipe.smooth_online:
            for row in rows:
                row["smoothing"] = f"none ({group.reason}; smooth_online=False)"
            continue
        alpha, s, note, errors = choose(index, group)
        where = group.describe()
        for row in rows:
            row["smoothing_alpha"] = alpha
            if errors is not None:
                row["smoothing_errors"] = errors
        if s is None or bool((s == 1).all()):
            for row in rows:
                row["smoothing"] = "none" + (f" ({note})" if note else "")
            continue
        _scale_consumers(gm, group, s)
        if group.kind == "online":
            _insert_online(gm, group, s)
        else:
            _fold_into_producer(gm, group, s)
        for row in rows:
            row["smoothing"] = f"alpha {alpha:g}, {where}" + (f"; {note}" if note else "")
        modified = True
    if modified:
        eliminate_dead_constants(gm)
    return PassResult(gm, modified)


fold_smoothing = GraphPass("fold_smoothing", _run, preserves_function=True)
