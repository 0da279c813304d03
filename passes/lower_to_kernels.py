"""Lower to kernels: each linear carrying a quantized weight becomes a ``qcompile::`` op.

``aten.linear(x, W, b)`` with ``meta['qcompile.qweight']`` becomes
``qcompile.linear_w{bits}a16(x, qweight, scales, zeros, b, group_size)`` with the packed
weight, scales and zero points as new constants; the float weight is dropped when
nothing else reads it (a tied embedding keeps it).
"""
from __future__ import annotations

import torch.fx as fx

from qcompile.graph_utils import QWEIGHT_META, add_constant, eliminate_dead_constants, infer_meta
from qcompile.kernels import WEIGHT_ONLY_LINEAR_OPS
from qcompile.pipeline import GraphPass, PassContext, PassResult




def _lower(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    qw = node.meta[QWEIGHT_META]
    x, weight = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    source = weight.meta.get("qcompile.source") or node.name
    qweight = add_constant(gm, qw.qweight, f"{source}_q{qw.bits}", before=node)
    scales = add_constant(gm, qw.scales, f"{source}_scales", before=node)
    zeros = add_constant(gm, qw.zeros, f"{source}_zeros", before=node) if qw.zeros is not None else None
    for const in (qweight, scales, zeros):
        if const is not None:
            const.meta["qcompile.source"] = source
    op = WEIGHT_ONLY_LINEAR_OPS[qw.bits]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, (x, qweight, scales, zeros, bias, qw.group_size))
    new.meta = {k: v for k, v in node.meta.items() if k != "val"}
    infer_meta(gm, new)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    lowered = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and QWEIGHT_META in node.meta:
            new = _lower(gm, node)
            for row in ctx.layers.values():
                if row.get("node") == node.name:
                    row["node"] = new.name
                    row["op"] = str(new.target).replace("::", ".").removesuffix(".default")
            lowered += 1
    if lowered:
        eliminate_dead_constants(gm)
    return PassResult(gm, lowered > 0)


lower_to_kernels = GraphPass("lower_to_kernels", _run, preserves_function=False)
