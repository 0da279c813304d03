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

Siblings share one matmul: linears that read the same activation with the same smoothing
vector and the same activation scale (attention's Q, K and V projections) quantize it to
the same codes and scales, so they become one quantization, one ``torch._int_mm`` against
their weights concatenated along N (``[K, N1 + N2 + ...]``) and one epilogue, whose result
is sliced back into each linear's output. Every output element is computed by the same
integer and float32 operations as before, so the merge changes no bits; it saves the
repeated abs-max and rounding passes and writing the codes more than once.

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

__all__ = ["decompose_w8a8"]

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


def _operand_key(gm: fx.GraphModule, node: Any) -> Any:
    """What identifies a smoothing vector or activation scale: the attribute a constant
    reads (two ``get_attr`` nodes of one buffer are the same value), else the node."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return ("attr", node.target)
    return ("node", node)


# Bias dtypes that float32 holds exactly, so that merged biases can be one float32 constant.
_MERGEABLE_BIAS = (torch.float32, torch.bfloat16, torch.float16)


def _mergeable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s scales and bias are constants that concatenate without change."""
    bias = (list(node.args) + [None] * 4)[3]
    if get_constant(gm, node.args[2]) is None:
        return False
    if bias is None:
        return True
    value = get_constant(gm, bias)
    return value is not None and value.dtype in _MERGEABLE_BIAS


def _sibling_groups(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """``nodes`` grouped by (activation, smoothing vector, activation scale), in graph order:
    the linears of one group quantize their input to the same codes and scales. A linear
    whose scales or bias are not mergeable constants stays alone."""
    groups: dict[Any, list[fx.Node]] = {}
    for node in nodes:
        x, _, _, _, smooth, act_scale = (list(node.args) + [None] * 6)[:6]
        key = (x, _operand_key(gm, smooth), _operand_key(gm, act_scale)) if _mergeable(gm, node) else node
        groups.setdefault(key, []).append(node)
    return list(groups.values())


def _merged_constants(gm: fx.GraphModule, group: list[fx.Node], anchor: fx.Node, kn_cache: dict):
    """The int8 ``[K, N]`` weight, float32 ``[N]`` scales and bias (or None) of ``group``'s
    linears side by side along N (a single linear: its own, the weight transposed once)."""
    if len(group) == 1:
        node = group[0]
        qweight, wscales, bias = node.args[1], node.args[2], (list(node.args) + [None] * 4)[3]
        if qweight not in kn_cache:
            kn_cache[qweight] = add_constant(gm, get_constant(gm, qweight).t().contiguous(),
                                             f"{qweight.target}_kn", before=anchor)
        return kn_cache[qweight], wscales, bias
    weights = [get_constant(gm, n.args[1]) for n in group]
    scales = [get_constant(gm, n.args[2]) for n in group]
    biases = [get_constant(gm, (list(n.args) + [None] * 4)[3]) for n in group]
    name = "_".join([group[0].args[1].target, "merged"])
    w_kn = add_constant(gm, torch.cat(weights, dim=0).t().contiguous(), f"{name}_kn", before=anchor)
    s_n = add_constant(gm, torch.cat(scales).to(torch.float32), f"{name}_wscales", before=anchor)
    if all(b is None for b in biases):
        return w_kn, s_n, None
    # float32 holds every bf16 / fp16 bias exactly, and y + 0.0 == y for a linear without one
    full = [torch.zeros(w.shape[0]) if b is None else b.to(torch.float32) for w, b in zip(weights, biases)]
    return w_kn, s_n, add_constant(gm, torch.cat(full), f"{name}_bias", before=anchor)


def _decompose(gm: fx.GraphModule, group: list[fx.Node], kn_cache: dict) -> None:
    """Replace the linears of one sibling group (see :func:`_sibling_groups`) by ATen ops."""
    node = group[0]
    x, _, _, _, smooth, act_scale = (list(node.args) + [None] * 6)[:6]
    op = _Builder(gm, node)
    out_dtype = x.meta["val"].dtype
    k = get_constant(gm, node.args[1]).shape[1]
    w_kn, wscales, bias = _merged_constants(gm, group, node, kn_cache)
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
    lead = _leading_sizes(op, x)
    outputs, start = [], 0
    for member in group:  # every output before the anchor (group[0]) is erased
        n = get_constant(gm, member.args[1]).shape[0]
        part = y if len(group) == 1 else op(aten.slice.Tensor, y, 1, start, start + n)
        outputs.append(op(aten.view.default, part, [*lead, n]))
        start += n
    for member, out in zip(group, outputs):
        member.replace_all_uses_with(out)
        gm.graph.erase_node(member)


def _leading_sizes(op: _Builder, x: fx.Node) -> list:
    """x's leading sizes as graph values (symbolic ones through ``aten.sym_size``)."""
    sizes = []
    for d, size in enumerate(x.meta["val"].shape[:-1]):
        sizes.append(int(size) if isinstance(size, int) else op(aten.sym_size.int, x, d))
    return sizes


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    kn_cache: dict = {}
    nodes = [node for node in gm.graph.nodes
             if node.op == "call_function" and node.target == torch.ops.qcompile.linear_w8a8.default
             and _applies(gm, node)]
    for group in _sibling_groups(gm, nodes):
        _decompose(gm, group, kn_cache)
    count = len(nodes)
    if count:
        eliminate_dead_constants(gm)
    return PassResult(gm, count > 0)


decompose_w8a8 = GraphPass("decompose_w8a8", _run, preserves_function=False)
