"""Assign precision: choose each linear's format by an integer linear program.

Runs only for recipes with a ``budget`` (``qcompile.Budget``). For every quantizable
linear and every candidate format of ``recipe.candidates`` (``qcompile.weight_formats``:
weight-only, or with the input quantized per token to INT8 / INT4),
the sensitivity ``Ω_l(c)`` (``qcompile.sensitivity``, method ``recipe.sensitivity``, cached
in ``ctx.analyses``) and the costs (``qcompile.cost_model``: nominal bits, stored bytes,
BOPs, roofline or measured latency) are computed; ``qcompile.precision_ilp`` then picks one format per
layer minimizing ``Σ Ω`` under the budget's limits, linears that read the same activation
taking the same activation width (:func:`activation_ties`). Layers the recipe keeps float
(``keep_float``, ``min_in_features``) and layers matched by ``recipe.precision_pins`` are
fixed to their format and count in the totals (when every layer is fixed, no sensitivity is
measured and the report's Ω are 0). An infeasible budget raises
:class:`qcompile.precision_ilp.BudgetInfeasibleError` with the smallest feasible value.

The choice is recorded as ``node.meta['qcompile.precision']`` (a ``WeightFormat``), which
``quantize_weights`` rounds to; each layer's report row gets the chosen format, the Ω of
every candidate and the chosen format's costs; ``ctx.analyses['precision']`` keeps the
whole problem and solution (for a budget sweep, say). The graph itself is not changed.
The choices are recorded in ``ctx.decisions`` too; a model's other graphs (generation's
prefill and decode steps) replay them instead of solving again (``qcompile.decisions``).
"""
from __future__ import annotations

import fnmatch

import numpy as np
import torch.fx as fx

from qcompile.cost_model import DEVICE_PROFILES, linear_costs
from qcompile.errors import CalibrationError
from qcompile.graph_utils import layer_name, linear_weight, quantizable_linears
from qcompile.latency_table import measure_latency_table
from qcompile.pipeline import GraphPass, PassContext, PassResult
from qcompile.precision_ilp import BudgetConstraint, BudgetInfeasibleError, solve_assignment
from qcompile.sensitivity import SensitivityTable, layer_sensitivity
from qcompile.weight_formats import PRECISION_META, candidate_formats

__all__ = ["budget_constraints", "activation_ties", "assign_precision"]


def _sensitivity(gm: fx.GraphModule, ctx: PassContext, nodes, formats):
    recipe = ctx.recipe
    key = ("sensitivity", recipe.sensitivity, tuple(formats), recipe.clip_ratios, recipe.clip_objective,
           recipe.hutchinson_samples,
           recipe.sensitivity_loss, tuple(n.name for n in nodes))
    if key not in ctx.analyses:
        ctx.analyses[key] = layer_sensitivity(
            gm, ctx.calibration, nodes, formats, method=recipe.sensitivity, clip_ratios=recipe.clip_ratios or None,
            samples=recipe.hutchinson_samples, loss=recipe.sensitivity_loss,
            clip_weighted=recipe.clip_objective == "output", progress=ctx.progress,
        )
    return ctx.analyses[key]


def _pin(recipe, name: str, in_features: int) -> str | None:
    """The format a layer is fixed to, or None when the ILP chooses."""
    if recipe.float_reason(name, in_features):
        return "float"
    for pattern, fmt in recipe.precision_pins:
        if fnmatch.fnmatchcase(name, pattern):
            return fmt
    return None


def budget_constraints(budget, costs, formats, sizes, allowed=None, progress: bool = False) -> list[BudgetConstraint]:
    """The budget's limits as ILP constraints over ``[layers, formats]`` cost tables
    (``allowed``: the formats each layer may take, the only ones a measured latency table
    times)."""
    sizes = dict(sizes)
    for name in ("batch", "seq"):
        if getattr(budget, name) is not None:
            sizes[name] = getattr(budget, name)
    out = []
    limits = budget.limits()
    if "avg_bits" in limits:
        numel = np.array([c.out_features * c.in_features for c in costs], dtype=float)
        table = np.array([[n * f.bits(c.float_bits) for f in formats] for n, c in zip(numel, costs)])
        out.append(BudgetConstraint("avg_bits", table, limits["avg_bits"] * numel.sum(), 1.0 / numel.sum()))
    if "bytes" in limits:
        table = np.array([[c.weight_bytes(f) for f in formats] for c in costs], dtype=float)
        out.append(BudgetConstraint("bytes", table, limits["bytes"]))
    if "bops" in limits:
        table = np.array([[c.evaluate(c.bops(f), sizes) for f in formats] for c in costs])
        out.append(BudgetConstraint("bops", table, limits["bops"]))
    if "latency_ms" in limits and budget.device == "measured":
        table = measure_latency_table(costs, formats, sizes, allowed=allowed, progress=progress)
        out.append(BudgetConstraint("latency_ms", table, limits["latency_ms"]))
    elif "latency_ms" in limits:
        device = DEVICE_PROFILES[budget.device]
        table = np.array([[c.evaluate(c.latency(f, device), sizes) * 1e3 for f in formats] for c in costs])
        out.append(BudgetConstraint("latency_ms", table, limits["latency_ms"]))
    return out


def _summary(table: SensitivityTable, result, constraints, layers: int) -> str:
    """The report's model-level line: how Ω was measured (and how noisy it is), the solve."""
    text = f"precision: {layers} linears, sensitivity {table.method} in {table.seconds:.1f} s"
    if table.traces is not None:
        est = table.traces
        rel = sorted(est.std_errors[n] / abs(est.traces[n]) for n in table.layers if est.traces[n] != 0)
        if rel:
            text += (f" ({est.samples} Hessian-vector products, loss {est.loss}; standard error / |trace| median "
                     f"{rel[len(rel) // 2]:.1%}, max {rel[-1]:.1%}: more hutchinson_samples lower it as 1/sqrt(n))")
    totals = ", ".join(f"{c.name} {result.totals[c.name]:.6g} of {c.limit * c.scale:.6g}" for c in constraints)
    return (f"{text}; ILP Σ Ω {result.objective:.4e} solved in {result.seconds * 1e3:.0f} ms "
            f"(relative gap {result.gap:.1e}); {totals}")


def activation_ties(nodes: list[fx.Node], formats, pins: list[str | None]) -> tuple[list[list[int]], np.ndarray]:
    """Linears reading one activation share its activation format (one quantization of that
    tensor feeds them all): groups of indices into ``nodes`` by their input node, and each
    format's activation width as its tie class. Layers kept float (they read the float
    tensor whatever the others do) and groups of one layer are left out."""
    by_input: dict[fx.Node, list[int]] = {}
    for i, node in enumerate(nodes):
        if pins[i] != "float":
            by_input.setdefault(node.args[0], []).append(i)
    groups = [g for g in by_input.values() if len(g) > 1]
    return groups, np.array([f.act_bits for f in formats])


def _replayed(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Attach the formats chosen on the model's first graph (``qcompile.decisions``); False
    (nothing attached) when a lenient store misses one."""
    nodes = quantizable_linears(gm)
    chosen = [ctx.decisions.lookup("precision", layer_name(node)) for node in nodes]
    if any(fmt is None for fmt in chosen):
        return False
    for node, fmt in zip(nodes, chosen):
        node.meta[PRECISION_META] = fmt
    return True


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.recipe
    if recipe.budget is None:
        return PassResult(gm, False)
    if ctx.decisions.replaying and _replayed(gm, ctx):
        return PassResult(gm, False)
    if not ctx.calibration:
        raise CalibrationError(f"recipe {recipe.name!r} has a budget: its per-layer precision choice needs "
                               "calibration data; pass calibration=[batch, ...] to qcompile.quantize")
    nodes = quantizable_linears(gm)
    if not nodes:
        return PassResult(gm, False)
    names = [layer_name(n) for n in nodes]
    pins = [_pin(recipe, name, linear_weight(gm, n).shape[1]) for name, n in zip(names, nodes)]
    columns = list(dict.fromkeys([*recipe.candidates, *(p for p in pins if p is not None)]))
    formats = candidate_formats(tuple(columns), recipe.group_size, recipe.symmetric)
    allowed = np.array([[(c in recipe.candidates) if pin is None else (c == pin) for c in columns] for pin in pins])
    if allowed.sum(axis=1).max() == 1:  # every layer pinned: nothing to choose, no Ω needed
        table = SensitivityTable(names, formats, np.zeros(allowed.shape), "none (all layers pinned)",
                                 [tuple(linear_weight(gm, n).shape) for n in nodes],
                                 [linear_weight(gm, n).element_size() * 8 for n in nodes])
    else:
        table = _sensitivity(gm, ctx, nodes, formats)
    costs, sizes = linear_costs(gm, nodes)
    constraints = budget_constraints(recipe.budget, costs, formats, sizes, allowed, ctx.progress)
    ties, classes = activation_ties(nodes, formats, pins)
    try:
        result = solve_assignment(table.omega, constraints, allowed, ties, tie_classes=classes)
    except BudgetInfeasibleError as exc:
        pinned = sum(p is not None for p in pins)
        raise BudgetInfeasibleError(
            f"recipe {recipe.name!r}, {len(nodes)} linears ({pinned} pinned), candidates {columns}: {exc}",
            exc.smallest) from exc
    ctx.analyses["precision"] = {"sensitivity": table, "costs": costs, "sizes": sizes, "formats": formats,
                                 "allowed": allowed, "constraints": constraints, "ties": ties,
                                 "tie_classes": classes, "assignment": result}
    ctx.notes.append(_summary(table, result, constraints, len(nodes)))
    for i, (node, name) in enumerate(zip(nodes, names)):
        fmt = formats[result.choice[i]]
        node.meta[PRECISION_META] = fmt
        ctx.decisions.precision[name] = fmt
        row = ctx.layers.setdefault(name, {"layer": name, "shape": (costs[i].out_features, costs[i].in_features)})
        row["precision"] = fmt.name + (" (pinned)" if pins[i] is not None else "")
        row["omega"] = {f.name: float(table.omega[i, j]) for j, f in enumerate(formats) if allowed[i, j] or pins[i] is None}
        row["cost"] = {con.name: float(con.costs[i, result.choice[i]]) for con in constraints if con.name != "avg_bits"}
        row["cost"]["bits"] = fmt.bits(costs[i].float_bits)
        if table.traces is not None:
            row["hessian_trace"] = {"mean": table.traces.traces[name], "std_error": table.traces.std_errors[name]}
    return PassResult(gm, False)


assign_precision = GraphPass("assign_precision", _run, preserves_function=True)
