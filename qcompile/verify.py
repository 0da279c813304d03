"""Checks the pass manager runs after every pass.

``check_structure``: ``graph.lint()`` and shape/dtype metadata (``meta['val']``) on every
node that produces a tensor. ``check_equivalence``: the graph before and after a
function-preserving pass compute the same outputs in float64 on the given inputs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import VerificationError
from .graph_utils import get_constant

# float64 keeps rounding error near 1e-16 per op; a function-preserving rewrite that
# re-associates a few products (e.g. folds a scale into a weight) moves results by a few
# ulps times the depth of the graph, far below 1e-9 relative. A real bug moves them by
# orders of magnitude more.
EQUIVALENCE_RTOL = 1e-9

_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def check_structure(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError/AssertionError; report which
        raise VerificationError(f"graph.lint() failed: {exc}") from exc
    for node in gm.graph.nodes:
        if node.op in ("call_function", "get_attr", "placeholder") and "val" not in node.meta and _returns(node):
            raise VerificationError(f"node {node.name!r} ({node.op} {node.target}) has no shape/dtype metadata")
        if node.op == "get_attr":
            val = node.meta["val"]
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(val, torch.Tensor) and isinstance(obj, torch.Tensor):
                if tuple(val.shape) != tuple(obj.shape) or val.dtype != obj.dtype:
                    raise VerificationError(
                        f"constant {node.target!r} is {tuple(obj.shape)} {obj.dtype} but its metadata says "
                        f"{tuple(val.shape)} {val.dtype}"
                    )


def _returns(node: fx.Node) -> bool:
    """Whether a node produces a value (asserts such as ``aten._assert_tensor_metadata`` do not)."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or len(schema.returns) > 0


def _fold_constant_expressions(gm: fx.GraphModule) -> None:
    """Evaluate elementwise ops whose inputs are all constants (e.g. Gemma's ``1 + norm.weight``) at
    the precision the model computes them, and make the results constants.

    The model computes such an expression in float32 once; promoted to float64 it would be
    computed more exactly, so a pass that folds the float32 value (``(1 + w) / s``) would
    seem to change the function by float32's rounding of ``1 + w``.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
        if not inputs or any(a.op != "get_attr" for a in inputs) or node.target._schema.is_mutable:
            continue
        if torch.Tag.pointwise not in node.target.tags and node.target != torch.ops.aten._to_copy.default:
            continue  # only elementwise maps of constants (1 + w, w.float()), nothing shape-dependent
        env = {a: get_constant(gm, a) for a in inputs}
        if any(v is None for v in env.values()):
            continue
        args, kwargs = pytree.tree_map(lambda a: env.get(a, a) if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        name = f"_qcompile_folded_{node.name}"
        gm.register_buffer(name, value.clone())
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def to_float64(gm: fx.GraphModule) -> fx.GraphModule:
    """A float64 copy of ``gm``: constants, and dtype arguments of ops, promoted.

    Expressions of constants alone are first evaluated at the model's own precision
    (:func:`_fold_constant_expressions`).
    """
    gm64 = copy.deepcopy(gm)
    _fold_constant_expressions(gm64)
    for name, buf in list(gm64.named_buffers()):
        if buf.is_floating_point():
            module_path, _, attr = name.rpartition(".")
            owner = gm64.get_submodule(module_path) if module_path else gm64
            setattr(owner, attr, buf.to(torch.float64))

    def promote(a: Any) -> Any:
        return torch.float64 if a in _LOW_PRECISION else a

    for node in gm64.graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map(promote, node.args)
            node.kwargs = pytree.tree_map(promote, node.kwargs)
    gm64.recompile()
    return gm64


def _inputs64(inputs: list[Any]) -> list[Any]:
    return [x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]


def run_float64(gm: fx.GraphModule, inputs: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = to_float64(gm)(*_inputs64(inputs))
    return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]


def check_equivalence(before: fx.GraphModule, after: fx.GraphModule, input_sets: list[list[Any]]) -> None:
    before64 = to_float64(before)
    after64 = to_float64(after)
    for k, inputs in enumerate(input_sets):
        with torch.no_grad():
            ref = pytree.tree_leaves(before64(*_inputs64(inputs)))
            got = pytree.tree_leaves(after64(*_inputs64(inputs)))
        if len(ref) != len(got):
            raise VerificationError(f"the graph has {len(got)} outputs, it had {len(ref)}")
        for i, (r, g) in enumerate(zip(ref, got)):
            if not isinstance(r, torch.Tensor):
                continue
            if r.shape != g.shape:
                raise VerificationError(f"output {i} changed shape {tuple(r.shape)} -> {tuple(g.shape)}")
            if not r.is_floating_point():
                if not torch.equal(r, g):
                    raise VerificationError(f"integer output {i} changed on input set {k}")
                continue
            scale = r.abs().max().clamp_min(1e-300)
            err = ((r - g).abs().max() / scale).item()
            if not err <= EQUIVALENCE_RTOL:
                raise VerificationError(
                    f"output {i} differs from the pre-pass graph by {err:.3e} (relative to its max) in float64 "
                    f"on input set {k}; a function-preserving pass must stay within {EQUIVALENCE_RTOL:g}"
                )
