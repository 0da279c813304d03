"""Decompose ``qcompile::linear_w8a8`` into ATen ops, so Inductor fuses the quantization.

As one opaque op, a W8A8 linear costs its own passes over memory: the activation is read
to find each token's abs-max, read again to round it to int8, and the int32 result is
read again for the scale epilogue — on top of the pass its producer (a norm, GELU, a
residual add) already made. Written as ATen ops, the elementwise and reduction parts are
ordinary code to Inductor, which fuses them with their neighbours (producer + smoothing
+ abs-max + rounding in one generated kernel; epilogue + the next op in another), and
only the integer matmul stays an external call:

    xs     = x.float() / smooth                     (if smooth)
    scale  = max(|xs|, dim=-1) / 127, 1.0 where < tiny   (dynamic; static: act_scale)
    codes  = clamp(round(xs / scale), -127, 127).to(int8)
    acc    = torch._int_mm(codes [M, K], W [K, N])  (W: a contiguous [K, N] int8 constant)
    y      = acc.float() * scale * wscales + bias, cast to x's dtype

These are the float32 operations of the op's CPU path in the same order, so run eagerly
the decomposed graph gives the same bits; compiled, Inductor may contract or reorder
float operations (e.g. multiply by a reciprocal), which can move a code that sits
exactly on a rounding boundary by one step.

Applied by the ``backend="qcompile"`` Dynamo backend before Inductor compiles the graph
(CPU only, and only where ``torch._int_mm`` applies: 2 <= K <= ``INT_MM_MAX_K``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from qcompile.act_quant import INT8_QMAX
from qcompile.graph_utils import add_constant, eliminate_dead_constants, get_constant, infer_meta
from qcompile.kernels.linear_w8a8 import INT_MM_CPU_MIN_K, INT_MM_MAX_K
from qcompile.pipeline import GraphPass, PassContext, PassResult

aten = torch.ops.aten
_TINY = torch.finfo(torch.float32).tiny


def _applies(gm: fx.GraphModule, node: fx.Node) -> bool:
    x = node.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    qweight = get_constant(gm, node.args[1])
    if val is None or qweight is None or val.device.type != "cpu":
        return False
    return INT_MM_CPU_MIN_K <= qweight.shape[1] <= INT_MM_MAX_K


class _Builder:
    """Appends ATen calls before ``anchor``, with shape metadata."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.anchor = gm, anchor

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_function(target, args, kwargs)
        infer_meta(self.gm, node)
        return node


def _decompose(gm: fx.GraphModule, node: fx.Node, kn_cache: dict) -> None:
    x, qweight, wscales, bias, smooth, act_scale = (list(node.args) + [None] * 6)[:6]
    op = _Builder(gm, node)
    out_dtype = x.meta["val"].dtype
    k = get_constant(gm, qweight).shape[1]
    if qweight not in kn_cache:
        kn_cache[qweight] = add_constant(gm, get_constant(gm, qweight).t().contiguous(),
                                         f"{qweight.target}_kn", before=node)
    w_kn = kn_cache[qweight]
    rows = op(aten.view.default, x, [-1, k])
    xs = op(aten._to_copy.default, rows, dtype=torch.float32) if out_dtype != torch.float32 else rows
    if smooth is not None:
        xs = op(aten.div.Tensor, xs, smooth)
    if act_scale is None:
        absmax = op(aten.amax.default, op(aten.abs.default, xs), [-1], True)
        raw = op(aten.div.Tensor, absmax, float(INT8_QMAX))
        scale = op(aten.where.ScalarSelf, op(aten.lt.Scalar, raw, _TINY), 1.0, raw)
    else:
        guarded = op(aten.where.ScalarSelf, op(aten.lt.Scalar, act_scale, _TINY), 1.0, act_scale)
        scale = op(aten.view.default, guarded, [1, 1])
    codes = op(aten._to_copy.default,
               op(aten.clamp.default, op(aten.round.default, op(aten.div.Tensor, xs, scale)), -INT8_QMAX, INT8_QMAX),
               dtype=torch.int8)
    acc = op(aten._int_mm.default, codes, w_kn)
    y = op(aten.mul.Tensor, op(aten.mul.Tensor, op(aten._to_copy.default, acc, dtype=torch.float32), scale), wscales)
    if bias is not None:
        y = op(aten.add.Tensor, y, bias)
    if out_dtype != torch.float32:
        y = op(aten._to_copy.default, y, dtype=out_dtype)
    n = get_constant(gm, qweight).shape[0]
    out = op(aten.view.default, y, [*_leading_sizes(op, x), n])
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _leading_sizes(op: _Builder, x: fx.Node) -> list:
    """x's leading sizes as graph values (symbolic ones through ``aten.sym_size``)."""
    sizes = []
    for d, size in enumerate(x.meta["val"].shape[:-1]):
        sizes.append(int(size) if isinstance(size, int) else op(aten.sym_size.int, x, d))
    return sizes


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    kn_cache: dict = {}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.qcompile.linear_w8a8.default and _applies(gm, node):
            _decompose(gm, node, kn_cache)
            count += 1
    if count:
        eliminate_dead_constants(gm)
    return PassResult(gm, count > 0)


decompose_w8a8 = GraphPass("decompose_w8a8", _run, preserves_function=False)
