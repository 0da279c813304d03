"""Higher-order ops in captured graphs: ops whose operands include a graph (a body).

Dynamo and ``torch.export`` keep some Python constructs as higher-order ops whose bodies
are submodules of the graph module (``wrap_body_0``, ``true_graph_0``, ...):

* wrappers that compute exactly their body at inference — ``wrap``,
  ``tag_activation_checkpoint`` (``torch.utils.checkpoint``), ``wrap_with_set_grad_enabled``,
  ``invoke_subgraph``. :func:`inline_wrappers` replaces each call by its body's nodes, so
  the linears inside are found, quantized and verified like any other
  (``torch.export`` cannot trace ``tag_activation_checkpoint`` at all);
* control flow and the rest (``cond``, ``while_loop``, ``map``, ``scan``, flex attention's
  score functions, ...): carried through unchanged. Their bodies keep float weights;
  :func:`weights_in_bodies` lists them so the report can say so.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

__all__ = ["INLINED", "inline_wrappers", "subgraph_attrs", "weights_in_bodies"]

_hop = torch.ops.higher_order


def _hop_if_present(name: str) -> Any:
    return getattr(_hop, name, None)


# For each wrapper: (argument index of its body, index of its first operand).
_WRAPPERS: dict[Any, tuple[int, int]] = {
    op: where
    for op, where in (
        (_hop_if_present("wrap"), (0, 1)),
        (_hop_if_present("tag_activation_checkpoint"), (0, 1)),
        (_hop_if_present("wrap_with_set_grad_enabled"), (1, 2)),
        (_hop_if_present("invoke_subgraph"), (0, 2)),
    )
    if op is not None
}

#: The higher-order ops whose bodies :func:`inline_wrappers` inlines.
INLINED = tuple(str(op) for op in _WRAPPERS)


def _resolve(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fresh_name(root: torch.nn.Module, base: str) -> str:
    name, k = base, 0
    while hasattr(root, name):
        k += 1
        name = f"{base}_{k}"
    return name


def inline_wrappers(gm: fx.GraphModule) -> bool:
    """Inline the bodies of wrapper higher-order ops (nested ones too); return whether any was."""
    changed = False
    while True:
        node = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target in _WRAPPERS), None)
        if node is None:
            break
        _inline_one(gm, node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        _drop_unused_submodules(gm)
        gm.recompile()
    return changed


def _inline_one(gm: fx.GraphModule, node: fx.Node) -> None:
    body_index, first_operand = _WRAPPERS[node.target]
    body_node = node.args[body_index]
    if not (isinstance(body_node, fx.Node) and body_node.op == "get_attr"):
        raise TypeError(f"{node.target} node {node.name!r}: its body is not a submodule ({body_node!r})")
    body: fx.GraphModule = _resolve(gm, body_node.target)
    operands = list(node.args[first_operand:])
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        raise TypeError(
            f"{node.target} node {node.name!r} passes {len(operands)} operands to a body of {len(placeholders)} inputs"
        )
    env: dict[fx.Node, Any] = dict(zip(placeholders, operands))
    result: Any = None
    with gm.graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                result = fx.node.map_arg(inner.args[0], lambda n: env[n])
                continue
            if inner.op in ("get_attr", "call_module"):
                # a nested body or a constant of the body: give it a home in the outer module
                name = _fresh_name(gm, inner.target.replace(".", "_"))
                value = _resolve(body, inner.target)
                if isinstance(value, torch.nn.Module):
                    gm.add_submodule(name, value)
                else:
                    setattr(gm, name, value)
                copy = gm.graph.create_node(inner.op, name, fx.node.map_arg(inner.args, lambda n: env[n]),
                                            fx.node.map_arg(inner.kwargs, lambda n: env[n]), name=inner.name)
                copy.meta = dict(inner.meta)
                env[inner] = copy
                continue
            env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
    _replace_result(node, result)
    gm.graph.erase_node(node)


def _replace_result(node: fx.Node, result: Any) -> None:
    """Point the users of a wrapper call at its body's outputs (tuples are read with getitem)."""
    if isinstance(result, (tuple, list)):
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                user.replace_all_uses_with(result[user.args[1]])
        if node.users:  # the tuple itself is used: rebuild it
            graph = node.graph
            with graph.inserting_before(node):
                packed = graph.call_function(tuple, (tuple(result),))
            node.replace_all_uses_with(packed)
        for user in [u for u in node.users]:
            node.graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)


def subgraph_attrs(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``get_attr`` nodes of ``gm`` that name a graph (a body of a higher-order op)."""
    return [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(_resolve(gm, n.target), fx.GraphModule)]


def _drop_unused_submodules(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, child in list(gm.named_children()):
        if isinstance(child, fx.GraphModule) and name not in used:
            delattr(gm, name)


def weights_in_bodies(gm: fx.GraphModule, get_constant: Callable[[fx.GraphModule, fx.Node], Any]) -> list[tuple[str, str, int]]:
    """``(constant name, higher-order op, bytes)`` of every floating constant with at least two
    dimensions that a higher-order op takes as an operand (so its body computes with it)."""
    bodies = {n for n in subgraph_attrs(gm)}
    out = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(a in bodies for a in node.all_input_nodes):
            continue
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" or arg in bodies or arg.target in seen:
                continue
            value = get_constant(gm, arg)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
                seen.add(arg.target)
                source = arg.meta.get("qcompile.source", arg.target)
                out.append((str(source), str(getattr(node.target, "__name__", node.target)),
                            value.numel() * value.element_size()))
    return out
