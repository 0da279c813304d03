"""Rotate residual streams offline (QuaRot's residual rotation; function-preserving).

For every stream :func:`qcompile.residual_stream.find_residual_streams` accepts (pre-norm
decoders: from the embedding through every residual add to the final norm), the whole
stream is carried in a rotated basis ``x Q``, ``Q = diag(signs) H / sqrt(n)`` a randomized
Hadamard matrix of the stream's width, and no op is added to the graph:

* embedding tables ``E -> E Q`` (rows) and constants added to the stream ``c -> c Q``;
* linears writing to it (attention output and MLP down projections): ``W -> Qᵀ W``, ``b -> b Q``;
* RMS norms are left as they are (``mean((x Q)²) = mean(x²)``); each norm's per-channel
  weight ``g`` is folded into the linears reading the norm, and its multiply removed;
* linears reading it (Q/K/V, gate/up, the LM head): ``W -> W diag(g) Q``.

The rotated constants are computed in float64 and stored at the weight's precision; their
float64 values ride along for the pass manager's equivalence check. Tied weights (an
embedding table that is also the LM head) get one rotated copy per use.

Linears whose input is not on a stream (attention output and MLP down projections read
the attention / MLP activations) are left to ``insert_rotations``, which gives them online
input rotations; it skips the linears marked here (``RESIDUAL_META``). The pass records
on each linear's report row what it got, and in ``ctx.notes`` why a candidate stream was
not rotated (e.g. post-norm BERT, LayerNorm models), so those fall back to online input
rotations for every linear.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from qcompile.graph_utils import (
    RESIDUAL_META,
    ExactValue,
    add_constant,
    eliminate_dead_constants,
    exact_source,
    get_constant,
    infer_meta,
    layer_name,
    linear_weight,
)
from qcompile.hadamard import RotationPlan, apply_hadamard, random_signs, rotation_plan
from qcompile.pipeline import GraphPass, PassContext, PassResult
from qcompile.residual_stream import Reader, ResidualStream, find_residual_streams

__all__ = ["rotate_residual"]

aten = torch.ops.aten

# keeps the residual rotation's signs apart from the input rotations' (seeded rotation_seed + width)
_SEED_SALT = 1_000_003


class _Rotation:
    def __init__(self, plan: RotationPlan, signs: torch.Tensor):
        self.plan, self.signs = plan, signs

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x Q`` along the last dimension, in float64."""
        return apply_hadamard(x.to(torch.float64), self.plan, self.signs)


def _replace_arg(gm: fx.GraphModule, node: fx.Node, index: int, exact: ExactValue, like: torch.Tensor,
                 hint: str) -> None:
    """Replace constant argument ``index`` by ``exact()`` stored in ``like``'s dtype; the
    function, not its float64 value, is kept for the pass manager's check."""
    old = node.args[index]
    new = add_constant(gm, exact().to(like.dtype), hint, before=node, exact=exact,
                       origin=old if isinstance(old, fx.Node) else None)
    args = list(node.args)
    args[index] = new
    node.args = tuple(args)


def _rows(rot: "_Rotation", center: Callable[[torch.Tensor], torch.Tensor], value: ExactValue) -> ExactValue:
    """``center(value) Q`` along the last dimension, in float64, as a function computing it."""
    return lambda: rot.rows(center(value()))


def _columns(rot: "_Rotation", center: Callable[[torch.Tensor], torch.Tensor], value: ExactValue) -> ExactValue:
    """A writer's weight ``W [N, K]`` rotated along N (``(center(Wᵀ) Q)ᵀ``), as a function."""
    return lambda: rot.rows(center(value().T)).T.contiguous()


def _source(node: fx.Node, fallback: str) -> str:
    source = node.meta.get("qcompile.source") if isinstance(node, fx.Node) else None
    return source or fallback


def _rotate_stream(gm: fx.GraphModule, stream: ResidualStream, rot: _Rotation, ctx: PassContext) -> None:
    label = f"residual stream ({rot.plan.description})"
    # a stream read by LayerNorms is made zero-mean: every producer centered over the channels
    center = (lambda x: x - x.mean(-1, keepdim=True)) if stream.centered else (lambda x: x)
    for node in stream.embeddings:
        table = get_constant(gm, node.args[0])
        _replace_arg(gm, node, 0, _rows(rot, center, exact_source(gm, node.args[0])), table,
                     _source(node.args[0], f"{node.name}_table") + "_rotated")
    for node in stream.constants:
        value = get_constant(gm, node)
        exact = _rows(rot, center, exact_source(gm, node))
        new = add_constant(gm, exact().to(value.dtype), f"{node.name}_rotated", before=node, exact=exact)
        node.replace_all_uses_with(new)
    for reader in stream.readers:
        _rotate_reader(gm, reader, rot, ctx, label)
    for node in stream.writers:
        weight = linear_weight(gm, node)
        # a linear that also reads the stream was rotated above: start from its exact value
        _replace_arg(gm, node, 1, _columns(rot, center, exact_source(gm, node.args[1])), weight,
                     _source(node.args[1], f"{node.name}_weight"))
        bias = get_constant(gm, node.args[2]) if len(node.args) > 2 else None
        if bias is not None:
            _replace_arg(gm, node, 2, _rows(rot, center, exact_source(gm, node.args[2])), bias,
                         _source(node.args[2], f"{node.name}_bias"))
        _row(ctx, gm, node)["rotation_out"] = "writes the rotated " + label
    for mul in {r.scale_node for r in stream.readers if r.scale_node is not None}:
        stream_input = next(a for a in mul.args[:2] if isinstance(a, fx.Node) and a in stream.members)
        mul.replace_all_uses_with(stream_input)
        gm.graph.erase_node(mul)
    for norm in stream.layer_norms:
        _as_rms_norm(gm, norm.node, norm.eps)


def _rotate_reader(gm: fx.GraphModule, reader: Reader, rot: _Rotation, ctx: PassContext, label: str) -> None:
    """``W -> W diag(g) Q``; a LayerNorm's bias ``b`` becomes part of the linear's bias (``+ W b``)."""
    node = reader.linear
    weight = linear_weight(gm, node)
    scale, shift = reader.scale, reader.shift

    def scaled() -> torch.Tensor:
        original = weight.to(torch.float64)
        return original * scale if scale is not None else original

    _replace_arg(gm, node, 1, lambda: rot.rows(scaled()), weight, _source(node.args[1], f"{node.name}_weight"))
    if shift is not None:
        old = node.args[2] if len(node.args) > 2 else None
        old_bias = exact_source(gm, old) if old is not None else (lambda: 0.0)
        if old is None:
            node.args = (*node.args[:2], None)
        _replace_arg(gm, node, 2, lambda: weight.to(torch.float64) @ shift + old_bias(), weight,
                     f"{layer_name(node)}.bias_folded")
    node.meta[RESIDUAL_META] = label
    folded = " and bias" if reader.shift is not None else ""
    _row(ctx, gm, node)["rotation"] = "reads the rotated " + label + (
        f", norm weight{folded} folded in" if reader.scale is not None or reader.shift is not None else "")


def _as_rms_norm(gm: fx.GraphModule, ln: fx.Node, eps: float) -> None:
    """``layer_norm(x)`` of a zero-mean ``x`` (weight and bias folded into its readers) is
    ``x * rsqrt(mean(x²) + eps)``: written in ATen ops, which commute with the rotation."""
    x = ln.args[0]
    graph = gm.graph
    with graph.inserting_before(ln):
        square = graph.call_function(aten.pow.Tensor_Scalar, (x, 2))
        mean = graph.call_function(aten.mean.dim, (square, [-1], True))
        shifted = graph.call_function(aten.add.Tensor, (mean, eps))
        inverse = graph.call_function(aten.rsqrt.default, (shifted,))
        normed = graph.call_function(aten.mul.Tensor, (x, inverse))
    for node in (square, mean, shifted, inverse, normed):
        infer_meta(gm, node)
    ln.replace_all_uses_with(normed)
    graph.erase_node(ln)


def _row(ctx: PassContext, gm: fx.GraphModule, node: fx.Node) -> dict:
    name = layer_name(node)
    return ctx.layers.setdefault(name, {"layer": name, "shape": tuple(linear_weight(gm, node).shape)})


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    search = find_residual_streams(gm)
    if not search.streams and search.rejected:
        others = len(search.rejected) - 1
        ctx.notes.append(
            f"rotate_residual: no residual stream rotated: {search.rejected[0]}"
            + (f" (and {others} other candidate(s))" if others else "")
            + "; every quantized linear gets an online input rotation instead"
        )
    for stream in search.streams:
        plan = rotation_plan(stream.width)
        rot = _Rotation(plan, random_signs(stream.width, ctx.recipe.rotation_seed + _SEED_SALT + stream.width))
        _rotate_stream(gm, stream, rot, ctx)
        ctx.notes.append(f"rotate_residual: rotated the residual stream, {stream.describe()}")
    if search.streams:
        eliminate_dead_constants(gm)
    return PassResult(gm, bool(search.streams))


rotate_residual = GraphPass("rotate_residual", _run, preserves_function=True, keeps_stage_values=False)
