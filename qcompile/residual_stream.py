"""Find residual streams that can be rotated offline (QuaRot's residual rotation), from the graph.

A *residual stream* here is a set of tensors with one channel width ``d`` that can all be
replaced by their rotation ``x Q`` (``Q`` orthogonal, ``d x d``) while every op outside
the set computes exactly what it did. Such a set exists when each tensor in it is

* **produced** by something that can emit the rotated value for free: an embedding lookup
  (rotate the table's rows), a linear (rotate its output: ``W -> Qᵀ W``, ``b -> b Q``), a
  constant (rotate it), or an op that commutes with the rotation applied to other members
  (``a + b``, ``a - b``, concatenation or slicing along other dimensions, views that keep
  the last dimension, dtype casts, a product with a per-row or scalar factor);
* and **read** only by ops that work as well on the rotated value: those same commuting
  ops; the RMS statistic ``mean(x², -1)`` (``‖x Q‖ = ‖x‖``), which makes RMS norms
  rotation-invariant; a linear (``W -> W Q``); or a norm's per-channel weight ``x * g``
  whose result reaches linears only, through views — ``g`` is folded into those linears
  (``W -> W diag(g) Q``) and the multiply disappears.

LayerNorm subtracts the mean over the channels, which does not commute with a rotation.
When LayerNorms are the stream's only readers (pre-norm LayerNorm decoders: GPT-2, OPT,
GPT-NeoX) the stream can be made zero-mean first — every producer centered (embedding rows,
writers' output rows, constants), which no LayerNorm can see — and each LayerNorm then
computes ``x * rsqrt(mean(x²) + eps) * w + b``, an RMS norm; ``w`` and ``b`` are folded
into the linears reading it (``W diag(w)``, bias ``+ W b``), as QuaRot does for OPT.

The search starts at every embedding output and every input of a normalization and grows
the set in both directions; the first op that breaks a rule rejects the stream and the
reason names it. Pre-norm decoders pass: their stream runs from the embedding through
every residual add to the final norm, and no online op is needed on it. Post-norm encoders
(BERT) fail: the normalized tensor is added back into the stream. A stream that is a graph
output fails (users would see rotated values), and so does one produced by an op with no
rule here (a convolution: ViT's patch embedding).

This module only reads the graph; :mod:`qcompile.passes.rotate_residual` rewrites it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from qcompile.graph_utils import get_constant
from qcompile.smoothing_groups import constant_value

__all__ = [
    "LINEAR",
    "Rejected",
    "Reader",
    "LayerNormReader",
    "ResidualStream",
    "StreamSearch",
    "find_residual_streams",
]

aten = torch.ops.aten

# Ops that read a tensor only for its metadata (shape, dtype): they commute with anything.
_META_READERS = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default,
                 aten.sym_stride.int}
# Unary ops that act on each row (last dimension) as a whole, or not on values at all.
_ROW_COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
               aten._to_copy.default, aten.to.dtype, aten.lift_fresh_copy.default, aten.neg.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
_ADDS = {aten.add.Tensor, aten.sub.Tensor}
_SCALES = {aten.mul.Tensor, aten.div.Tensor}
_STAT_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}
_EMBEDDINGS = {aten.embedding.default}
LINEAR = aten.linear.default


class Rejected(Exception):
    """Why a candidate stream cannot be rotated (internal to the search)."""


@dataclass
class Reader:
    """A linear reading the stream; ``scale``: the norm weight folded into it (None: no
    weight), ``scale_node`` the multiply that disappears; ``shift``: a LayerNorm's bias,
    folded into the linear's bias (``b + W shift``)."""

    linear: fx.Node
    scale: torch.Tensor | None = None
    scale_node: fx.Node | None = None
    shift: torch.Tensor | None = None


@dataclass
class LayerNormReader:
    """A LayerNorm reading the stream; it becomes an RMS norm once the stream is zero-mean."""

    node: fx.Node
    eps: float


@dataclass
class ResidualStream:
    """A rotatable residual stream of width ``width``: the tensors in its basis (``members``)
    and what the rotation is folded into."""

    width: int
    members: set[fx.Node] = field(default_factory=set)
    embeddings: list[fx.Node] = field(default_factory=list)  # aten.embedding nodes: rotate the table rows
    writers: list[fx.Node] = field(default_factory=list)  # linears whose output is a member: W -> Qᵀ W
    constants: list[fx.Node] = field(default_factory=list)  # get_attr members: rotate the constant
    readers: list[Reader] = field(default_factory=list)  # linears reading a member: W -> W diag(g) Q
    # LayerNorms reading it: the producers are centered (the stream made zero-mean, which
    # LayerNorm cannot see) and each LayerNorm rewritten as an RMS norm, which commutes
    layer_norms: list[LayerNormReader] = field(default_factory=list)

    @property
    def centered(self) -> bool:
        return bool(self.layer_norms)

    def describe(self) -> str:
        scales = sum(r.scale is not None for r in self.readers)
        norms = f", {len(self.layer_norms)} LayerNorm(s) made RMS norms (stream centered)" if self.layer_norms else ""
        return (f"width {self.width}: {len(self.embeddings)} embedding(s), {len(self.writers)} writer linear(s), "
                f"{len(self.readers)} reader linear(s) ({scales} with a norm weight folded in), "
                f"{len(self.constants)} constant(s){norms}")


@dataclass
class StreamSearch:
    """Every rotatable stream found, and for every rejected candidate the reason."""

    streams: list[ResidualStream]
    rejected: list[str]  # in graph order of the candidates' seeds; the first is the embedding's when there is one


def _shape(node: Any) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _last(node: Any) -> Any:
    shape = _shape(node)
    return shape[-1] if shape else None


def _is_width(node: Any, width: int) -> bool:
    last = _last(node)
    return last is not None and str(last) == str(width)


def _dim(node: fx.Node, index: int, default: int = 0) -> int:
    ndim = len(_shape(node.args[0]) or ())
    value = node.args[index] if len(node.args) > index else node.kwargs.get("dim", default)
    return int(value) % max(ndim, 1)


def _label(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


def _is_stat_reader(node: fx.Node, ndim: int) -> bool:
    """``pow(x, 2)`` whose every user reduces over the last dimension only."""
    if node.target != aten.pow.Tensor_Scalar or node.args[1] != 2 or not node.users:
        return False
    for user in node.users:
        if user.target not in _STAT_REDUCTIONS:
            return False
        dims = [int(d) % ndim for d in user.args[1]] if len(user.args) > 1 and user.args[1] is not None else None
        if dims != [ndim - 1]:
            return False
    return True


def _keeps_rows(node: fx.Node, width: int) -> bool:
    """A view / slice / select / permute that moves whole rows (the last dimension intact)."""
    src = node.args[0]
    in_shape, out_shape = _shape(src), _shape(node)
    if in_shape is None or out_shape is None or not _is_width(node, width):
        return False
    ndim = len(in_shape)
    if node.target in _VIEWS or node.target in _ROW_COPIES:
        return True
    if node.target in (aten.slice.Tensor, aten.select.int):
        return _dim(node, 1) != ndim - 1
    if node.target == aten.transpose.int:
        return all(int(d) % ndim != ndim - 1 for d in node.args[1:3])
    if node.target == aten.permute.default:
        return int(node.args[1][-1]) % ndim == ndim - 1
    return False


def _per_row(node: Any) -> bool:
    """A scalar, or a tensor broadcast along the last dimension (one value per row)."""
    if not isinstance(node, fx.Node):
        return isinstance(node, (int, float))
    shape = _shape(node)
    return shape is not None and (len(shape) == 0 or str(shape[-1]) == "1")


class _Search:
    def __init__(self, gm: fx.GraphModule, seed: fx.Node, width: int):
        self.gm = gm
        self.stream = ResidualStream(width)
        self.pending = [seed]
        self.scale_nodes: set[fx.Node] = set()
        self.direct_reads: list[str] = []  # readers that would see the stream's mean (not LayerNorms)

    def run(self) -> ResidualStream:
        while self.pending:
            node = self.pending.pop()
            if node in self.stream.members:
                continue
            if not _is_width(node, self.stream.width):
                raise Rejected(f"{_label(node)} would join the stream but its last dimension is {_last(node)}, "
                               f"not {self.stream.width}")
            self.stream.members.add(node)
            self._check_producer(node)
            for user in list(node.users):
                self._check_reader(node, user)
        if not self.stream.readers:
            raise Rejected("no linear reads it")
        if self.stream.layer_norms and self.direct_reads:
            raise Rejected(f"LayerNorm {self.stream.layer_norms[0].node.name} reads it, so it would have to be "
                           f"made zero-mean, but {self.direct_reads[0]} reads it too and would see the change")
        return self.stream

    def _join(self, *nodes: Any) -> None:
        self.pending.extend(n for n in nodes if isinstance(n, fx.Node) and n not in self.stream.members)

    # -- how a member is produced -------------------------------------------------------
    def _check_producer(self, node: fx.Node) -> None:
        stream = self.stream
        if node.op == "placeholder":
            raise Rejected(f"it is the graph input {node.name}")
        if node.op == "get_attr":
            if get_constant(self.gm, node) is None:
                raise Rejected(f"{node.name} is not a tensor constant")
            stream.constants.append(node)
            return
        if node.op != "call_function":
            raise Rejected(f"{_label(node)} produces it")
        target = node.target
        if target in _EMBEDDINGS:
            if get_constant(self.gm, node.args[0]) is None:
                raise Rejected(f"{_label(node)} looks up a computed table")
            stream.embeddings.append(node)
        elif target == LINEAR:
            if get_constant(self.gm, node.args[1]) is None:
                raise Rejected(f"{_label(node)} writes to it with a computed weight")
            stream.writers.append(node)
        elif target in _ADDS:
            if not all(isinstance(a, fx.Node) and _is_width(a, stream.width) for a in node.args[:2]):
                raise Rejected(f"{_label(node)} adds a value that is not a full-width tensor "
                               "(a shift along every channel does not commute with a rotation)")
            self._join(*node.args[:2])
        elif target == aten.cat.default:
            ndim = len(_shape(node))
            if (int(node.args[1]) if len(node.args) > 1 else 0) % ndim == ndim - 1:
                raise Rejected(f"{_label(node)} concatenates along the channel dimension")
            self._join(*node.args[0])
        elif target in _SCALES:
            tensor, factor = self._scaled_operand(node)
            self._join(tensor)
        elif target == aten.type_as.default or _keeps_rows(node, stream.width):
            self._join(node.args[0])
        else:
            raise Rejected(f"{_label(node)} produces it and does not commute with a rotation")

    def _scaled_operand(self, node: fx.Node) -> tuple[fx.Node, Any]:
        """For ``a * f`` / ``a / f`` in the stream: (a, f) with f per-row or scalar."""
        a, b = node.args[:2]
        if isinstance(a, fx.Node) and _is_width(a, self.stream.width) and _per_row(b):
            return a, b
        if node.target == aten.mul.Tensor and isinstance(b, fx.Node) and _is_width(b, self.stream.width) \
                and _per_row(a):
            return b, a
        raise Rejected(f"{_label(node)} scales it by a per-channel factor that no linear absorbs")

    # -- how a member is read -----------------------------------------------------------
    def _check_reader(self, node: fx.Node, user: fx.Node) -> None:
        stream = self.stream
        if user.op == "output":
            raise Rejected(f"{node.name} is a graph output")
        if user.op != "call_function":
            raise Rejected(f"{_label(user)} reads it")
        target = user.target
        if target in _META_READERS:
            return
        if target == aten.type_as.default and user.args[0] is not node:
            return  # reads only the dtype
        if target == LINEAR:
            if user.args[0] is not node or any(a is node for a in user.args[1:]):
                raise Rejected(f"{_label(user)} uses it as a weight or bias")
            if get_constant(self.gm, user.args[1]) is None:
                raise Rejected(f"{_label(user)} reads it with a computed weight")
            stream.readers.append(Reader(user))
            self.direct_reads.append(_label(user))
            return
        if _is_stat_reader(user, len(_shape(node))):
            self.direct_reads.append(_label(user))
            return  # mean(x²) over the channels: rotation-invariant
        if target == aten.layer_norm.default and user.args[0] is node:
            self._layer_norm(user)
            return
        if target in _SCALES and user not in self.scale_nodes:
            scale = self._norm_weight(user, node)
            if scale is not None:
                self._fold_scale(user, scale)
                self.direct_reads.append(_label(user))
                return
        if target in _ADDS or target in _SCALES or target == aten.cat.default or target == aten.type_as.default \
                or _keeps_rows(user, stream.width):
            self._join(user)  # commutes with the rotation if its other inputs join too
            return
        raise Rejected(f"{_label(user)} reads {node.name} and does not commute with a rotation")

    def _norm_weight(self, user: fx.Node, node: fx.Node) -> torch.Tensor | None:
        """The per-channel factor g of ``x * g`` / ``x / g`` (g computed from constants)."""
        other = [a for a in user.args[:2] if a is not node]
        if len(other) != 1 or (user.target == aten.div.Tensor and user.args[0] is not node):
            return None
        value = constant_value(self.gm, other[0])
        if value is None or value.dim() == 0 or not value.is_floating_point():
            return None
        if value.shape[-1] != self.stream.width or any(s != 1 for s in value.shape[:-1]):
            return None
        value = value.reshape(-1).to(torch.float64)
        return 1.0 / value if user.target == aten.div.Tensor else value

    def _fold_scale(self, mul: fx.Node, scale: torch.Tensor) -> None:
        """``x * g`` must reach linears only (through row-preserving views and casts)."""
        readers = self._linear_readers(mul, f"the norm weight {_label(mul)}")
        self.scale_nodes.add(mul)
        self.stream.readers.extend(Reader(r, scale, mul) for r in readers)

    def _layer_norm(self, ln: fx.Node) -> None:
        """``layer_norm(x, [d], w, b, eps)``: w and b constants (or absent), read by linears only."""
        args = list(ln.args) + [None] * (5 - len(ln.args))
        shape, weight, bias, eps = args[1], args[2], args[3], args[4]
        if [int(s) for s in shape] != [self.stream.width]:
            raise Rejected(f"{_label(ln)} normalizes over {list(shape)}, not the channels")
        values = []
        for name, arg in (("weight", weight), ("bias", bias)):
            value = None if arg is None else get_constant(self.gm, arg)
            if arg is not None and (value is None or tuple(value.shape) != (self.stream.width,)):
                raise Rejected(f"{_label(ln)} has a computed or misshapen {name}")
            values.append(None if value is None else value.to(torch.float64))
        readers = self._linear_readers(ln, f"the output of {_label(ln)}")
        self.stream.layer_norms.append(LayerNormReader(ln, 1e-5 if eps is None else float(eps)))
        self.stream.readers.extend(Reader(r, scale=values[0], shift=values[1]) for r in readers)

    def _linear_readers(self, start: fx.Node, what: str) -> list[fx.Node]:
        """The linears ``start`` reaches through row-preserving views and casts; anything else
        among its readers rejects the stream."""
        mul = start
        readers, frontier = [], [(user, mul) for user in mul.users]
        while frontier:
            user, src = frontier.pop()
            if user.op == "call_function" and user.target in _META_READERS:
                continue
            if user.op == "call_function" and user.target == aten.type_as.default and user.args[0] is not src:
                continue  # reads only the dtype
            if user.op == "call_function" and user.target == LINEAR and user.args[0] is src \
                    and all(a is not src for a in user.args[1:]) and get_constant(self.gm, user.args[1]) is not None:
                readers.append(user)
                continue
            if user.op == "call_function" and user.args and user.args[0] is src and (
                    user.target == aten.type_as.default or _keeps_rows(user, self.stream.width)):
                frontier.extend((u, user) for u in user.users)
                continue
            raise Rejected(f"{what} reaches {_label(user)}, not only linears, so it cannot be folded away")
        if not readers:
            raise Rejected(f"{what} reaches no linear")
        return readers


def _seeds(gm: fx.GraphModule) -> list[tuple[fx.Node, int]]:
    """Embedding outputs and inputs of normalizations (RMS statistics, LayerNorms)."""
    seeds = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _EMBEDDINGS:
            seeds.append(node)
        elif node.target in (aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default):
            seeds.append(node.args[0])
        elif node.target == aten.pow.Tensor_Scalar and isinstance(node.args[0], fx.Node) \
                and _shape(node.args[0]) and _is_stat_reader(node, len(_shape(node.args[0]))):
            seeds.append(node.args[0])
    out = []
    for seed in seeds:
        width = _last(seed)
        if isinstance(seed, fx.Node) and width is not None and str(width).isdigit():
            out.append((seed, int(str(width))))
    return out


def find_residual_streams(gm: fx.GraphModule) -> StreamSearch:
    """Every rotatable residual stream of ``gm`` (see the module docstring)."""
    streams, rejected, seen = [], [], set()
    for seed, width in _seeds(gm):
        if seed in seen:
            continue
        search = _Search(gm, seed, width)
        try:
            stream = search.run()
        except Rejected as exc:
            seen |= search.stream.members | {seed}
            rejected.append(f"stream at {seed.name} (width {width}): {exc}")
            continue
        seen |= stream.members
        streams.append(stream)
    return StreamSearch(streams, rejected)
