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
from .graph_utils import EXACT_META, get_constant

__all__ = [
    "EQUIVALENCE_RTOL",
    "check_structure",
    "to_float64",
    "has_exact_values",
    "drop_exact_values",
    "run_float64",
    "check_equivalence",
]

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
        obj: Any = _attr(gm, node.target) if node.op == "get_attr" else None
        if isinstance(obj, torch.nn.Module):
            continue  # the body of a higher-order op (a graph, not a value)
        if node.op in ("call_function", "get_attr", "placeholder") and "val" not in node.meta and _returns(node):
            raise VerificationError(f"node {node.name!r} ({node.op} {node.target}) has no shape/dtype metadata")
        if node.op == "get_attr":
            val = node.meta["val"]
            if isinstance(val, torch.Tensor) and isinstance(obj, torch.Tensor):
                if tuple(val.shape) != tuple(obj.shape) or val.dtype != obj.dtype:
                    raise VerificationError(
                        f"constant {node.target!r} is {tuple(obj.shape)} {obj.dtype} but its metadata says "
                        f"{tuple(val.shape)} {val.dtype}"
                    )


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _returns(node: fx.Node) -> bool:
    """Whether a node produces a value (asserts such as ``aten._assert_tensor_metadata`` do not)."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or len(schema.returns) > 0


def _is_assertion(node: fx.Node) -> bool:
    """An op that returns nothing and mutates nothing: a check (``aten._assert_tensor_metadata``,
    ``aten._assert_scalar``, ``aten.sym_constrain_range_for_size``, ...), by its schema."""
    schema = getattr(node.target, "_schema", None)
    return (node.op == "call_function" and schema is not None and not schema.returns and not schema.is_mutable
            and not node.users)


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

    A constant that a function-preserving pass rounded to the model's precision takes the
    float64 value it stands for (``meta[EXACT_META]``, e.g. a rotated weight ``W Q``), so
    the check sees the rewrite in exact arithmetic and not the float32 rounding of its new
    constants (about 1e-7 relative: a separate, stated perturbation). Expressions of constants alone are first evaluated at the model's own precision
    (:func:`_fold_constant_expressions`).
    """
    gm64 = copy.deepcopy(gm)
    exact = {n.target: n.meta[EXACT_META] for n in gm64.graph.nodes if n.op == "get_attr" and EXACT_META in n.meta}
    for name, value in exact.items():
        stored = get_constant(gm64, next(n for n in gm64.graph.nodes if n.op == "get_attr" and n.target == name))
        if not torch.equal(value.to(stored.dtype), stored):
            raise VerificationError(f"constant {name!r} is not its recorded float64 value rounded to {stored.dtype}")
        _set_buffer(gm64, name, value)
    _fold_constant_expressions(gm64)
    for name, buf in list(gm64.named_buffers()):
        if buf.is_floating_point() and name not in exact:
            _set_buffer(gm64, name, buf.to(torch.float64))

    def promote(a: Any) -> Any:
        return torch.float64 if a in _LOW_PRECISION else a

    for module in gm64.modules():  # the graph and the bodies of its higher-order ops
        if not isinstance(module, fx.GraphModule):
            continue
        for node in list(module.graph.nodes):
            if _is_assertion(node):
                # It computes nothing, and what it asserts (``dtype=float32``, a size) is about
                # the graph at the model's precision, which check_structure verifies.
                module.graph.erase_node(node)
            elif node.op == "call_function":
                node.args = pytree.tree_map(promote, node.args)
                node.kwargs = pytree.tree_map(promote, node.kwargs)
        module.recompile()
    return gm64


def _set_buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    setattr(owner, attr, value)


def has_exact_values(gm: fx.GraphModule) -> bool:
    return any(EXACT_META in node.meta for node in gm.graph.nodes)


def drop_exact_values(gm: fx.GraphModule) -> None:
    """Forget the float64 values of rounded constants (``meta[EXACT_META]``) once checked."""
    for node in gm.graph.nodes:
        node.meta.pop(EXACT_META, None)


def _inputs64(inputs: list[Any]) -> list[Any]:
    return [x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]


def run_float64(gm: fx.GraphModule, inputs: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = to_float64(gm)(*_inputs64(inputs))
    return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]


def check_equivalence(
    before: fx.GraphModule | None, after: fx.GraphModule, input_sets: list[list[Any]],
    *, reference: list[list[Any]] | None = None,
) -> list[list[Any]]:
    """Raise VerificationError unless ``after`` computes ``before``'s outputs in float64 on
    every input set; return ``after``'s float64 outputs (flattened, per input set).

    ``reference``: ``before``'s float64 outputs on the same input sets when already known
    (the previous check's return value), which saves running ``before`` (then None).
    """
    if before is None and reference is None:
        raise ValueError("check_equivalence needs the graph before the pass or its float64 outputs")
    before64 = to_float64(before) if reference is None else None
    after64 = to_float64(after)
    outputs = []
    for k, inputs in enumerate(input_sets):
        with torch.no_grad():
            ref = reference[k] if reference is not None else pytree.tree_leaves(before64(*_inputs64(inputs)))
            got = pytree.tree_leaves(after64(*_inputs64(inputs)))
        outputs.append(got)
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
    return outputs
