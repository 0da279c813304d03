"""Insert Hadamard rotations in front of quantized linears (QuaRot-style; function-preserving).

An orthogonal ``Q`` spreads each activation's outlier channels over all channels, so a
per-token grid covers the rotated activation with far less rounding error (4-bit
activations need it); the weight's columns are mixed the same way. For every activation X
read by quantized linears (found from the graph: the linears' shared input node), the
pass rewrites ``X Wᵀ`` as ``(X Q)(W Q)ᵀ``:

* one ``qcompile::hadamard(X, small, signs, block)`` node computes ``X Q`` at run time
  ("online"), ``Q = diag(signs) H / sqrt(block)`` with H the (block-diagonal) Hadamard
  matrix of :func:`qcompile.hadamard.rotation_plan` and random ±1 signs
  (``recipe.rotation_seed``); every linear reading X reads it instead;
* each such linear's weight becomes ``W Q`` (computed in float64, stored at the weight's
  precision; the float64 value rides along for the pass manager's equivalence check).

When X is an online-smoothing multiply ``X0 * (1/s)`` (``fold_smoothing``), the rotation
reads X0 and takes ``signs / s`` as its per-channel factor: one op divides by the smoothing
scale and rotates.

A dimension with no Hadamard matrix built here is rotated block-diagonally, and the
report row says so (``rotation``). Linears that read a residual stream already rotated
offline by ``rotate_residual`` (``RESIDUAL_META``) are skipped: their input is rotated.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qcompile.graph_utils import (
    RESIDUAL_META,
    ROTATION_META,
    SMOOTHING_META,
    add_constant,
    eliminate_dead_constants,
    get_constant,
    infer_meta,
    layer_name,
    linear_weight,
    linears_to_quantize,
)
from qcompile.hadamard import RotationPlan, apply_hadamard, random_signs, rotation_plan
from qcompile.kernels.hadamard import hadamard_args
from qcompile.pipeline import GraphPass, PassContext, PassResult

__all__ = ["HADAMARD_OP", "insert_rotations"]

HADAMARD_OP = torch.ops.qcompile.hadamard.default


def _groups(gm: fx.GraphModule, linears: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """The rotated linears grouped by the activation they read, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in linears:
        groups.setdefault(node.args[0], []).append(node)
    return groups


def _rotation_input(gm: fx.GraphModule, x: fx.Node, signs: torch.Tensor) -> tuple[fx.Node, torch.Tensor]:
    """(the node to rotate, its per-channel factor): an online-smoothing multiply
    ``x0 * (1/s)`` is absorbed into the factor (exact: s is a power of two, signs are ±1)."""
    if x.op == "call_function" and SMOOTHING_META in x.meta:
        inverse = get_constant(gm, x.args[1])
        return x.args[0], signs * inverse.to(torch.float64)
    return x, signs


def _insert_rotation(gm: fx.GraphModule, x: fx.Node, plan: RotationPlan, signs: torch.Tensor,
                     consumers: list[fx.Node]) -> fx.Node:
    first = consumers[0]
    source, factor = _rotation_input(gm, x, signs)
    small, block = hadamard_args(plan)
    hint = f"{layer_name(first)}_rotation"
    small_node = None if small is None else add_constant(gm, small, f"{hint}_h{plan.small_order}", before=first)
    factor_node = add_constant(gm, factor.to(torch.float32), f"{hint}_signs", before=first)
    with gm.graph.inserting_before(first):
        rotated = gm.graph.call_function(HADAMARD_OP, (source, small_node, factor_node, block))
    rotated.meta[ROTATION_META] = plan.description
    infer_meta(gm, rotated)
    for consumer in consumers:
        consumer.args = (rotated, *consumer.args[1:])
    return rotated


def _rotate_weight(gm: fx.GraphModule, node: fx.Node, plan: RotationPlan, signs: torch.Tensor) -> None:
    old = node.args[1]
    weight = linear_weight(gm, node)
    def exact() -> torch.Tensor:
        return apply_hadamard(weight.to(torch.float64), plan, signs)  # W Q, row by row

    source = old.meta.get("qcompile.source")
    new = add_constant(gm, exact().to(weight.dtype), source or f"{node.name}_weight", before=node, exact=exact,
                       origin=old)
    node.args = (node.args[0], new, *node.args[2:])


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.recipe
    linears = [n for n in linears_to_quantize(gm, recipe) if RESIDUAL_META not in n.meta]
    groups = _groups(gm, linears)
    for x, consumers in tqdm(list(groups.items()), desc="rotating", unit="activation",
                             disable=not ctx.progress, leave=False):
        k = linear_weight(gm, consumers[0]).shape[1]
        plan = rotation_plan(k)
        signs = random_signs(k, recipe.rotation_seed + k)
        for consumer in consumers:
            _rotate_weight(gm, consumer, plan, signs)
        rotated = _insert_rotation(gm, x, plan, signs, consumers)
        for consumer in consumers:
            name = layer_name(consumer)
            row = ctx.layers.setdefault(name, {"layer": name, "shape": tuple(linear_weight(gm, consumer).shape)})
            row["rotation"] = f"online input ({rotated.name}): {plan.description}"
    if groups:
        eliminate_dead_constants(gm)
    return PassResult(gm, bool(groups))


insert_rotations = GraphPass("insert_rotations", _run, preserves_function=True)
