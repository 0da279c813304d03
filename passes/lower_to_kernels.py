"""Lower to kernels: each linear carrying quantized weights becomes a ``qcompile::`` op.

* ``aten.linear(x, W, b)`` with ``meta['qcompile.qweight']`` (weight-only) becomes
  ``qcompile.linear_w{bits}a16(x, qweight, scales, zeros, b, group_size)``;
* with ``meta['qcompile.qweight']`` and ``meta['qcompile.act_bits']`` (8 or 4: a 4-bit
  weight with quantized activations) it becomes ``qcompile.linear_w4a{8,4}(x, qweight,
  scales, zeros, b, smooth, group_size)``;
* with ``meta['qcompile.act_quant']`` it becomes ``qcompile.linear_w8a8(x, qweight,
  wscales, b, smooth, act_scale)`` or ``qcompile.linear_fp8(x, qweight, wscales, b,
  smooth)``. When x is an online-smoothing multiply ``x0 * (1/s)`` inserted by
  ``fold_smoothing`` (``meta['qcompile.smoothing'] = s``), the op reads x0 and takes s as
  its ``smooth`` argument, so the division happens inside the activation quantization
  and the multiply disappears once no other op reads it.

New constants hold the packed weights and scales; the float weight is dropped when
nothing else reads it (a tied embedding keeps it).
"""
from __future__ import annotations

import torch.fx as fx

from qcompile.graph_utils import (
    ACT_BITS_META,
    ACTQ_META,
    QWEIGHT_META,
    SMOOTHING_META,
    add_constant,
    eliminate_dead_constants,
    infer_meta,
)
from qcompile.kernels import ACTIVATION_QUANT_LINEAR_OPS, W4_ACT_QUANT_LINEAR_OPS, WEIGHT_ONLY_LINEAR_OPS
from qcompile.pipeline import GraphPass, PassContext, PassResult

__all__ = ["lower_to_kernels"]


def _constants(gm: fx.GraphModule, node: fx.Node, source: str, tensors: dict) -> dict:
    out = {}
    for suffix, tensor in tensors.items():
        if tensor is None:
            out[suffix] = None
            continue
        const = add_constant(gm, tensor, f"{source}_{suffix}", before=node)
        const.meta["qcompile.source"] = source
        out[suffix] = const
    return out


def _weight_only_call(gm: fx.GraphModule, node: fx.Node, x, bias, source: str):
    qw = node.meta[QWEIGHT_META]
    c = _constants(gm, node, source, {f"q{qw.bits}": qw.qweight, "scales": qw.scales, "zeros": qw.zeros})
    args = (x, c[f"q{qw.bits}"], c["scales"], c["zeros"], bias, qw.group_size)
    return WEIGHT_ONLY_LINEAR_OPS[qw.bits], args


def _w4_act_quant_call(gm: fx.GraphModule, node: fx.Node, x, bias, source: str, cache: dict):
    qw = node.meta[QWEIGHT_META]
    act_bits = node.meta[ACT_BITS_META]
    x, smooth = _smoothing_input(gm, x, node, cache)
    c = _constants(gm, node, source, {"q4": qw.qweight, "scales": qw.scales, "zeros": qw.zeros})
    args = (x, c["q4"], c["scales"], c["zeros"], bias, smooth, qw.group_size)
    return W4_ACT_QUANT_LINEAR_OPS[act_bits], args


def _smoothing_input(gm: fx.GraphModule, x, node: fx.Node, cache: dict) -> tuple:
    """(input, smooth constant or None): absorb an online-smoothing multiply."""
    if not (isinstance(x, fx.Node) and x.op == "call_function" and SMOOTHING_META in x.meta):
        return x, None
    if x not in cache:
        cache[x] = add_constant(gm, x.meta[SMOOTHING_META].float(), f"{x.name}_smooth", before=node)
    return x.args[0], cache[x]


def _act_quant_call(gm: fx.GraphModule, node: fx.Node, x, bias, source: str, cache: dict):
    aq = node.meta[ACTQ_META]
    x, smooth = _smoothing_input(gm, x, node, cache)
    c = _constants(gm, node, source, {f"q8{aq.format}": aq.qweight, "wscales": aq.wscales, "act_scale": aq.act_scale})
    if aq.format == "fp8":
        return ACTIVATION_QUANT_LINEAR_OPS["fp8"], (x, c["q8fp8"], c["wscales"], bias, smooth)
    return ACTIVATION_QUANT_LINEAR_OPS["int8"], (x, c["q8int8"], c["wscales"], bias, smooth, c["act_scale"])


def _lower(gm: fx.GraphModule, node: fx.Node, cache: dict) -> fx.Node:
    x, weight = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    source = weight.meta.get("qcompile.source") or node.name
    if ACTQ_META in node.meta:
        op, args = _act_quant_call(gm, node, x, bias, source, cache)
    elif ACT_BITS_META in node.meta:
        op, args = _w4_act_quant_call(gm, node, x, bias, source, cache)
    else:
        op, args = _weight_only_call(gm, node, x, bias, source)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, args)
    new.meta = {k: v for k, v in node.meta.items() if k != "val"}
    infer_meta(gm, new)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    lowered = 0
    cache: dict = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and (QWEIGHT_META in node.meta or ACTQ_META in node.meta):
            new = _lower(gm, node, cache)
            for row in ctx.layers.values():
                if row.get("node") == node.name:
                    row["node"] = new.name
                    row["op"] = str(new.target).replace("::", ".").removesuffix(".default")
            lowered += 1
    if lowered:
        eliminate_dead_constants(gm)
    return PassResult(gm, lowered > 0)


lower_to_kernels = GraphPass("lower_to_kernels", _run, preserves_function=False)
