"""Small helpers for reading and editing canonical ATen ``torch.fx`` graphs.

Numerics live elsewhere; these helpers only know about graph structure: where a
constant comes from, how to add one, how to (re)compute a node's fake-tensor metadata.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

__all__ = [
    "QWEIGHT_META",
    "ACTQ_META",
    "ACT_BITS_META",
    "SMOOTHING_META",
    "ROTATION_META",
    "RESIDUAL_META",
    "EXACT_META",
    "ALIASES_META",
    "SOURCE_META",
    "get_constant",
    "resolve_matrix",
    "ExactValue",
    "exact_value",
    "exact_source",
    "add_constant",
    "graph_fake_mode",
    "infer_meta",
    "users_of",
    "call_nodes",
    "op_name",
    "eliminate_dead_constants",
    "linear_weight",
    "layer_name",
    "quantizable_linears",
    "linears_to_quantize",
]

aten = torch.ops.aten

# node.meta key of the QuantizedWeight that quantize_weights attaches to a linear
QWEIGHT_META = "qcompile.qweight"
# node.meta key of the ActQuantWeight that quantize_weights attaches to a W8A8 / FP8 linear
ACTQ_META = "qcompile.act_quant"
# node.meta key of the activation bits (8 or 4) of a linear whose 4-bit QuantizedWeight
# meets quantized activations (lowered to qcompile::linear_w4a8 / linear_w4a4)
ACT_BITS_META = "qcompile.act_bits"
# node.meta key of the smoothing scale s on an online-smoothing multiply (x * (1/s))
SMOOTHING_META = "qcompile.smoothing"
# node.meta key of a rotated linear's rotation (a qcompile.hadamard.RotationPlan description)
ROTATION_META = "qcompile.rotation"
# node.meta key of a linear that reads a residual stream rotated offline (passes/rotate_residual):
# its input is already rotated, so insert_rotations leaves it alone
RESIDUAL_META = "qcompile.residual_rotation"
SOURCE_META = "qcompile.source"  # the model's name of a constant (its parameter or buffer)
ALIASES_META = "qcompile.aliases"  # every name of a tied weight (capture), when it has several
# node.meta key, on a get_attr node, of the float64 value a constant stands for when it was
# rounded to the model's precision by a function-preserving rewrite (a rotated weight W Q):
# a zero-argument function that computes it (so no float64 copy of the model is held while
# the passes run); the pass manager's float64 check calls it, then drops it (qcompile.verify)
EXACT_META = "qcompile.exact"

# Ops that only reinterpret a 2-D constant as its transpose.
_TRANSPOSE_OPS = (aten.t.default, aten.permute.default, aten.transpose.int, aten.numpy_T.default)


def get_constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node refers to, or None if ``node`` is not a constant."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def resolve_matrix(gm: fx.GraphModule, node: Any) -> tuple[torch.Tensor, bool] | None:
    """Follow a 2-D constant through transposes.

    Returns ``(tensor, transposed)``: the constant itself and whether ``node`` is its
    transpose. None if ``node`` is not a (possibly transposed) 2-D constant.
    """
    transposed = False
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSE_OPS:
        if node.target == aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2], [-1, 0], [1, -2]):
            return None
        if node.target == aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) != [0, 1]:
            return None
        transposed = not transposed
        node = node.args[0]
    tensor = get_constant(gm, node)
    if tensor is None or tensor.dim() != 2:
        return None
    return tensor, transposed


def _attr_name(gm: fx.GraphModule, hint: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint) or "const"
    if base[0].isdigit():
        base = "_" + base
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


_PROVENANCE = (SOURCE_META, ALIASES_META)


ExactValue = Callable[[], torch.Tensor]


def exact_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """A constant's float64 value: the exact value a rewrite recorded for it
    (``meta[EXACT_META]``), else the constant itself in float64."""
    exact = node.meta.get(EXACT_META)
    if exact is not None:
        return exact()
    return get_constant(gm, node).to(torch.float64)


def exact_source(gm: fx.GraphModule, node: fx.Node) -> ExactValue:
    """A function computing :func:`exact_value` later, holding no float64 tensor meanwhile (it
    keeps the constant itself alive, which the model holds anyway)."""
    exact = node.meta.get(EXACT_META)
    if exact is not None:
        return exact
    tensor = get_constant(gm, node)
    return lambda: tensor.to(torch.float64)


def add_constant(
    gm: fx.GraphModule, tensor: torch.Tensor, hint: str, *, before: fx.Node,
    exact: ExactValue | None = None, origin: fx.Node | None = None,
) -> fx.Node:
    """Register ``tensor`` on ``gm`` as a buffer and insert a ``get_attr`` node for it.

    ``exact``: a function computing the float64 value ``tensor`` rounds (same shape), when a
    function-preserving pass computed the constant in float64 and stored it at the model's
    precision; kept in ``meta[EXACT_META]`` for the pass manager's float64 check only. A
    function, not the tensor: a float64 copy of every rewritten weight would be twice a
    float32 model (four times a bfloat16 one) held until the check.
    ``origin``: the constant this one replaces (a rotated, smoothed or transposed weight):
    its names in the model (``meta[SOURCE_META]``, ``meta[ALIASES_META]``) carry over, so
    layer names and the report stay those of the model.
    """
    name = _attr_name(gm, hint)
    gm.register_buffer(name, tensor, persistent=True)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    if origin is not None:
        node.meta.update({k: origin.meta[k] for k in _PROVENANCE if origin.meta.get(k)})
    if exact is not None:
        if not callable(exact):
            raise TypeError(f"exact value of {name!r} must be a function returning the float64 tensor, "
                            f"got {type(exact).__name__}")
        node.meta[EXACT_META] = exact
    fake_mode = graph_fake_mode(gm)
    if fake_mode is not None:
        node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
    return node


def graph_fake_mode(gm: fx.GraphModule):
    """The FakeTensorMode whose tensors fill ``meta['val']`` in this graph (None if there are none)."""
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals) if vals else None


def infer_meta(gm: fx.GraphModule, node: fx.Node) -> None:
    """Compute ``node.meta['val']`` by running its target on its inputs' fake values."""
    fake_mode = graph_fake_mode(gm)
    if fake_mode is None:
        return

    def fake(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if "val" not in a.meta:
                raise KeyError(f"node {a.name!r} (input of {node.name!r}) has no shape metadata")
            return a.meta["val"]
        return a

    args = fx.node.map_aggregate(node.args, fake)
    kwargs = fx.node.map_aggregate(node.kwargs, fake)
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)


def users_of(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def call_nodes(gm: fx.GraphModule, target: Any) -> list[fx.Node]:
    """All ``call_function`` nodes of ``gm`` with the given target (an OpOverload)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def op_name(target: Any) -> str:
    """A readable name for a call target: ``aten.linear``, ``qcompile.linear_w4a16``."""
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        return f"{ns}.{target._schema.name.split('::')[-1]}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def eliminate_dead_constants(gm: fx.GraphModule) -> None:
    """Drop dead nodes and the buffers no ``get_attr`` node refers to any more."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in gm.named_buffers(recurse=False) if name not in used]:
        delattr(gm, name)
    gm.recompile()


def linear_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The constant weight of an ``aten.linear`` node, or None if the weight is computed."""
    if node.op != "call_function" or node.target != aten.linear.default:
        return None
    weight = get_constant(gm, node.args[1])
    return weight if weight is not None and weight.dim() == 2 else None


def layer_name(node: fx.Node) -> str:
    """A readable layer name: the weight's source name without ``.weight`` (else the node name).

    A tied weight has several names (``meta[ALIASES_META]``); the one of the module that
    calls this linear (the innermost entry of ``nn_module_stack``) is chosen, so an LM head
    that shares the embedding's tensor is named ``lm_head``, not after the embedding.
    """
    weight = node.args[1] if len(node.args) > 1 else None
    source = weight.meta.get("qcompile.source") if isinstance(weight, fx.Node) else None
    if not source:
        return node.name
    stack = node.meta.get("nn_module_stack") or {}
    caller = list(stack.values())[-1][0] if stack else None
    if caller and f"{caller}.weight" in weight.meta.get(ALIASES_META, ()):
        return caller
    return source[: -len(".weight")] if source.endswith(".weight") else source


def quantizable_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """``aten.linear`` nodes whose weight is a 2-D floating-point constant, in graph order."""
    out = []
    for node in gm.graph.nodes:
        weight = linear_weight(gm, node)
        if weight is not None and weight.is_floating_point():
            out.append(node)
    return out


def linears_to_quantize(gm: fx.GraphModule, recipe: Any) -> list[fx.Node]:
    """The quantizable linears a recipe quantizes (``recipe.float_reason`` empty), in graph order."""
    return [
        n for n in quantizable_linears(gm)
        if not recipe.float_reason(layer_name(n), linear_weight(gm, n).shape[1])
    ]
