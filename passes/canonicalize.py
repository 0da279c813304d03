"""Canonicalize: every matmul with a constant weight becomes ``aten.linear(x, W[N, K], b)``.

Handled forms (weights found by following transposes of 2-D constants, never by name):

* ``aten.addmm(b, x, Wᵀ)`` and ``aten.addmm(b, x, M)`` with ``M`` a ``[K, N]`` constant
  (Hugging Face GPT-2 ``Conv1D``),
* ``aten.mm(x, Wᵀ)`` / ``aten.mm(x, M)``,
* ``aten.matmul(x, Wᵀ)`` / ``aten.matmul(x, M)`` for any rank of ``x``,
* ``aten.linear(x, t(M), b)`` — a linear whose weight is itself a transposed constant.

Function-preserving: the pass manager checks it in float64.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qcompile.graph_utils import add_constant, eliminate_dead_constants, get_constant, infer_meta, resolve_matrix
from qcompile.pipeline import GraphPass, PassContext, PassResult

__all__ = ["canonicalize"]

aten = torch.ops.aten


def _weight_node(gm: fx.GraphModule, rhs: fx.Node, node: fx.Node) -> fx.Node | None:
    """A get_attr node holding the linear weight [N, K] for ``x @ rhs``; None if rhs is not constant."""
    resolved = resolve_matrix(gm, rhs)
    if resolved is None:
        return None
    tensor, transposed = resolved
    source = _source_of(rhs)
    if transposed:  # rhs = Wᵀ with W [N, K] stored: use W as it is
        return _root_constant(rhs)
    return add_constant(gm, tensor.t().contiguous(), f"{source or node.name}_t", before=node,
                        origin=_root_constant(rhs))


def _root_constant(node: fx.Node) -> fx.Node:
    while node.op != "get_attr":
        node = node.args[0]
    return node


def _source_of(node: fx.Node) -> str | None:
    return _root_constant(node).meta.get("qcompile.source") if isinstance(node, fx.Node) else None


def _is_plain_addmm(node: fx.Node) -> bool:
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> bool:
    target = node.target
    if target == aten.addmm.default and _is_plain_addmm(node):
        bias, x, rhs = node.args[:3]
    elif target in (aten.mm.default, aten.matmul.default):
        (x, rhs), bias = node.args[:2], None
    elif target == aten.linear.default:
        x, rhs = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if get_constant(gm, rhs) is not None or resolve_matrix(gm, rhs) is None:
            return False
        # linear(x, Wl) = x @ Wlᵀ: feed the transpose of Wl as the right-hand side
        rhs = _transpose_view(gm, rhs, node)
    else:
        return False
    if bias is not None and isinstance(bias, fx.Node):
        val = bias.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 1:
            return False
    weight = _weight_node(gm, rhs, node)
    if weight is None:
        return False
    with gm.graph.inserting_before(node):
        linear = gm.graph.call_function(aten.linear.default, (x, weight, bias))
    # same output as the node it replaces (the pass preserves the function), so the same
    # shape/dtype metadata; no re-inference needed
    linear.meta = dict(node.meta)
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
    return True


def _transpose_view(gm: fx.GraphModule, weight: fx.Node, before: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(before):
        t = gm.graph.call_function(aten.t.default, (weight,))
    infer_meta(gm, t)
    return t


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function":
            modified |= _rewrite(gm, node)
    if modified:
        eliminate_dead_constants(gm)
    return PassResult(gm, modified)


canonicalize = GraphPass("canonicalize", _run, preserves_function=True)
