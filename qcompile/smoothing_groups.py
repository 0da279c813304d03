"""Smoothing groups, found from graph structure alone (read-only analysis).

A *smoothing group* is one activation ``X`` read by one or more linears (the
*consumers*, e.g. q/k/v after a norm). SmoothQuant/AWQ multiply the consumers' weight
columns by a per-channel scale ``s`` and divide ``X`` by ``s``; the division is free when
a *producer* upstream of ``X`` can absorb it into a constant:

* ``aten.linear`` with a constant weight (its output rows and bias are divided by s);
* ``aten.layer_norm`` / ``aten.rms_norm`` with a constant weight (weight and bias);
* a multiply by a constant per-channel vector (the RMS-norm weight ``w * x_hat``, also
  when the vector is computed from constants, as Gemma's ``1 + w``).

Between the producer and ``X`` only ops that act on each channel linearly and keep the
channel order may sit: reshapes that split or merge the channel dimension, transposes,
copies and casts, slices along other dimensions, ReLU (positively homogeneous; the
scales are positive), an elementwise multiply by another tensor (SwiGLU's ``act(gate) *
up`` is linear in ``up``), and scaled-dot-product attention through its *value* input
(attention mixes tokens, not channels) — so the value path V projection -> attention
-> output projection is found as a group. The channel layout is followed through every
step (which dimensions hold the channel, in which order) and the group is accepted only
if channel j of the producer's output arrives as channel j of ``X``. Every node on the
path must have a single reader, so nothing else sees the scaled values (a decoder's
KV cache, which returns V, or a residual connection, disqualifies the path).

Where no producer absorbs the scale (post-norm encoders such as BERT, whose norm output
also feeds the residual; GELU between the FFN linears; GQA's repeated value heads) the
group is *online*: the scale has to be applied where ``X`` is quantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .graph_utils import get_constant, linear_weight

aten = torch.ops.aten

__all__ = ["SmoothingGroup", "find_smoothing_groups", "constant_value", "PRODUCER_KINDS"]

# What kind of producer absorbs a group's scale ("online": none does).
PRODUCER_KINDS = ("linear", "layer_norm", "rms_norm", "scale", "online")

_MAX_PATH = 24  # nodes between producer and X; transformer value paths need about 8

_COPY_OPS = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten._to_copy.default, aten.type_as.default, aten.to.dtype, aten.lift_fresh_copy.default,
    aten.relu.default,
}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SDPA_OPS = {aten.scaled_dot_product_attention.default}


@dataclass
class SmoothingGroup:
    """One activation, the linears reading it, and what can absorb its smoothing scale.

    ``kind`` is one of :data:`PRODUCER_KINDS`; ``producer`` is the absorbing node (None for
    ``"online"``); ``path`` lists the nodes from just after the producer up to and
    including ``activation``; ``reason`` says why a group is online.
    """

    activation: fx.Node
    consumers: list[fx.Node]
    kind: str
    producer: fx.Node | None = None
    path: list[fx.Node] = field(default_factory=list)
    reason: str = ""

    @property
    def channels(self) -> int:
        return int(self.activation.meta["val"].shape[-1])

    def describe(self) -> str:
        if self.kind == "online":
            return f"online ({self.reason})"
        return f"fold into {self.kind} {self.producer.name}"


def constant_value(gm: fx.GraphModule, node: Any, depth: int = 4) -> torch.Tensor | None:
    """The value of ``node`` if it is computed from constants only (a ``get_attr``, or a
    small expression of them such as ``1 + w``), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return get_constant(gm, node)
    if node.op != "call_function" or depth == 0 or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if not any(isinstance(a, fx.Node) for a in node.args):
        return None
    values = []
    for a in node.args:
        if isinstance(a, fx.Node):
            v = constant_value(gm, a, depth - 1)
            if v is None:
                return None
            values.append(v)
        else:
            values.append(a)
    with torch.no_grad():
        out = node.target(*values, **node.kwargs)
    return out if isinstance(out, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _trailing_block(shape: tuple, k: int) -> tuple[int, ...] | None:
    """The trailing dimensions of ``shape`` whose (static) sizes multiply to ``k``."""
    prod, dims = 1, []
    for d in range(len(shape) - 1, -1, -1):
        if not is_concrete_int(shape[d]):
            return None
        prod *= int(shape[d])
        dims.insert(0, d)
        if prod == k:
            return tuple(dims)
        if prod > k:
            return None
    return None


def _step(node: fx.Node, src: fx.Node, cd: tuple[int, ...], k: int) -> tuple[int, ...] | None:
    """Channel dimensions of ``node``'s output, given those of its tracked input ``src``.

    None when ``node`` is not linear per channel in ``src`` or scrambles the channel order.
    """
    target, args = node.target, node.args
    in_shape, out_shape = _shape(src), _shape(node)
    if in_shape is None or out_shape is None:
        return None
    ndim = len(in_shape)
    if target in _COPY_OPS:
        return cd if args[0] is src and _same_shape(in_shape, out_shape) else None
    if target in _VIEW_OPS:
        if args[0] is src and _same_shape(in_shape, out_shape):
            return cd  # a view to the same shape
        if args[0] is not src or cd != tuple(range(ndim - len(cd), ndim)):
            return None
        return _trailing_block(out_shape, k)
    if target == aten.transpose.int:
        d0, d1 = (int(d) % ndim for d in args[1:3])
        perm = list(range(ndim))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return tuple(perm.index(d) for d in cd)
    if target == aten.permute.default:
        perm = [int(d) % ndim for d in args[1]]
        return tuple(perm.index(d) for d in cd)
    if target == aten.slice.Tensor:
        dim = int(args[1]) % ndim if len(args) > 1 else 0
        return cd if dim not in cd else None
    if target in (aten.mul.Tensor, aten.div.Tensor):
        others = [a for a in args if a is not src]
        if len(others) != 1 or (target == aten.div.Tensor and args[0] is not src):
            return None  # x * x, or s / x
        return cd if _same_shape(in_shape, out_shape) else None
    if target in _SDPA_OPS:
        if len(args) < 3 or args[2] is not src or args[0] is src or args[1] is src:
            return None
        if not _same_shape(in_shape, out_shape) or (ndim - 2) in cd:
            return None
        return cd
    return None


def _per_channel_constant(gm: fx.GraphModule, node: fx.Node, k: int) -> int | None:
    """For ``mul(a, b)``: the index of an operand that is a constant broadcast along the
    last dimension only (shape ``[k]`` or ``[1, ..., 1, k]``), else None."""
    if node.target != aten.mul.Tensor:
        return None
    for i, a in enumerate(node.args[:2]):
        other = node.args[1 - i]
        if not isinstance(other, fx.Node):
            continue
        value = constant_value(gm, a)
        if value is None or value.dim() == 0 or value.shape[-1] != k or any(s != 1 for s in value.shape[:-1]):
            continue
        other_shape = _shape(other)
        if other_shape is None or other_shape[-1] != k:
            continue
        return i
    return None


def _producer_kind(gm: fx.GraphModule, node: fx.Node, k: int) -> str | None:
    """What kind of producer ``node`` is for a scale along its output's last dimension."""
    if node.op != "call_function":
        return None
    shape = _shape(node)
    if shape is None or not is_concrete_int(shape[-1]) or int(shape[-1]) != k:
        return None
    if node.target == aten.linear.default and linear_weight(gm, node) is not None:
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is None or get_constant(gm, bias) is not None:
            return "linear"
    if node.target in (aten.layer_norm.default, aten.rms_norm.default):
        normalized = node.args[1]
        weight = node.args[2] if len(node.args) > 2 else None
        bias = node.args[3] if node.target == aten.layer_norm.default and len(node.args) > 3 else None
        if len(normalized) == 1 and get_constant(gm, weight) is not None and (
            bias is None or get_constant(gm, bias) is not None
        ):
            return "layer_norm" if node.target == aten.layer_norm.default else "rms_norm"
    if _per_channel_constant(gm, node, k) is not None:
        return "scale"
    return None


def _single_reader(node: fx.Node, reader: fx.Node) -> bool:
    return list(node.users) == [reader]


def _trace(gm: fx.GraphModule, x: fx.Node, k: int) -> tuple[str, fx.Node, list[fx.Node]] | None:
    """Search upstream of ``x`` for a producer that absorbs a scale on x's channels."""

    def forward_ok(producer: fx.Node, path: list[fx.Node]) -> bool:
        cd: tuple[int, ...] | None = (len(_shape(producer)) - 1,)
        src = producer
        for node in path:
            cd = _step(node, src, cd, k)
            if cd is None:
                return False
            src = node
        return cd == (len(_shape(x)) - 1,)

    def search(node: fx.Node, path: list[fx.Node]) -> tuple[str, fx.Node, list[fx.Node]] | None:
        if len(path) > _MAX_PATH or node.op != "call_function":
            return None
        kind = _producer_kind(gm, node, k) if path else None  # x itself was checked first
        if kind is not None and forward_ok(node, path):
            return kind, node, path
        candidates: list[fx.Node] = []
        if node.target in _SDPA_OPS and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
            candidates = [node.args[2]]
        elif node.target in (aten.mul.Tensor, aten.div.Tensor):
            candidates = [a for a in node.args[:1 if node.target == aten.div.Tensor else 2] if isinstance(a, fx.Node)]
        elif node.target in _COPY_OPS | _VIEW_OPS | {aten.transpose.int, aten.permute.default, aten.slice.Tensor}:
            candidates = [node.args[0]] if isinstance(node.args[0], fx.Node) else []
        for cand in candidates:
            if not _single_reader(cand, node) or sum(a is cand for a in node.args) != 1:
                continue
            found = search(cand, [node, *path])
            if found is not None:
                return found
        return None

    # x itself may be the producer (e.g. a pre-norm block's norm output read only by q/k/v)
    kind = _producer_kind(gm, x, k)
    if kind is not None:
        return kind, x, []
    return search(x, [])


def find_smoothing_groups(
    gm: fx.GraphModule, linears: list[fx.Node], *, is_member: Callable[[fx.Node], bool] | None = None
) -> list[SmoothingGroup]:
    """The smoothing groups of ``gm``'s ``linears`` (each linear in exactly one group).

    Linears reading the same activation form one group. ``is_member(user)`` tells which
    other readers of an activation are harmless (default: none), e.g. linears that are
    not quantized but are smoothed too; any other reader makes the group online.
    """
    by_activation: dict[fx.Node, list[fx.Node]] = {}
    for lin in linears:
        x = lin.args[0]
        if isinstance(x, fx.Node):
            by_activation.setdefault(x, []).append(lin)
    groups = []
    for x, consumers in by_activation.items():
        shape = _shape(x)
        if shape is None or not is_concrete_int(shape[-1]):
            continue
        k = int(shape[-1])
        others = [u for u in x.users if u not in consumers and not (is_member and is_member(u))]
        if others:
            reason = "the activation is also read by " + ", ".join(sorted({_op_label(u) for u in others}))
            groups.append(SmoothingGroup(x, consumers, "online", reason=reason))
            continue
        if any(sum(a is x for a in c.args) != 1 for c in consumers):
            groups.append(SmoothingGroup(x, consumers, "online", reason="a linear reads the activation twice"))
            continue
        found = _trace(gm, x, k)
        if found is None:
            groups.append(SmoothingGroup(x, consumers, "online", reason=_why_online(x)))
        else:
            kind, producer, path = found
            groups.append(SmoothingGroup(x, consumers, kind, producer=producer, path=path))
    return groups


def _op_label(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    return str(node.target).replace("aten.", "").split(".")[0]


def _why_online(x: fx.Node) -> str:
    return f"no producer upstream of {_op_label(x)} absorbs a per-channel scale"
