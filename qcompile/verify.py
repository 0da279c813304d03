"""Checks the pass manager runs after every pass.

``check_structure``: ``graph.lint()`` and shape/dtype metadata (``meta['val']``) on every
node that produces a tensor. ``check_equivalence``: the graph before and after a
function-preserving pass compute the same outputs in float64 on the given inputs.

The float64 runs hold no float64 copy of the model: an interpreter promotes each constant
as an op reads it and frees it after (:func:`run_float64`), so a check costs the model's
own memory plus float64 activations and one promoted weight. The runs record the value
after each stage (``qcompile.stages``: a decoder's layers), so a failure names the first
stage whose output differs, not only the pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import VerificationError
from .graph_utils import EXACT_META, get_constant, layer_name

__all__ = [
    "EQUIVALENCE_RTOL",
    "check_structure",
    "to_float64",
    "has_exact_values",
    "drop_exact_values",
    "Float64Run",
    "float64_run",
    "run_float64",
    "StageBoundary",
    "stage_boundaries",
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
        if not _folds(node):
            continue  # only elementwise maps of constants (1 + w, w.float()), nothing shape-dependent
        inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
        if not inputs or any(a.op != "get_attr" for a in inputs):
            continue
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
    """A float64 copy of ``gm``: constants, and dtype arguments of ops, promoted (the whole
    model in float64: for small graphs and the bodies of higher-order ops; the pass manager
    runs graphs through :func:`run_float64`, which promotes one constant at a time).

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
        _set_buffer(gm64, name, _checked_exact(name, value(), stored))
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


def _checked_exact(name: str, exact: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    if tuple(exact.shape) != tuple(stored.shape):
        raise VerificationError(f"constant {name!r} is {tuple(stored.shape)} but its recorded float64 value is "
                                f"{tuple(exact.shape)}")
    if not torch.equal(exact.to(stored.dtype), stored):
        raise VerificationError(f"constant {name!r} is not its recorded float64 value rounded to {stored.dtype}")
    return exact.to(torch.float64)


def _inputs64(inputs: list[Any]) -> list[Any]:
    return [x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]


def _promote_dtype(a: Any) -> Any:
    return torch.float64 if a in _LOW_PRECISION else a


def _folds(node: fx.Node) -> bool:
    """An elementwise op (or a dtype conversion) that, applied to constants alone, the model
    computes once at its own precision (Gemma's ``1 + norm.weight``): evaluated so, not in float64."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target._schema.is_mutable:
        return False
    return torch.Tag.pointwise in node.target.tags or node.target == torch.ops.aten._to_copy.default


class _Float64Interpreter(fx.Interpreter):
    """Runs a graph in float64 without a float64 copy of it.

    Each constant is promoted when an op reads it, and freed with the op's other dead
    values (``fx.Interpreter`` drops a value after its last use), so the run holds the
    model's own constants, the live activations in float64 and one promoted constant at a
    time — not the float64 model :func:`to_float64` builds. A constant that a rewrite rounded
    takes its recorded float64 value (``meta[EXACT_META]``); elementwise expressions of
    constants alone are computed at the model's precision, as the model computes them;
    dtype arguments are promoted; assertion ops are skipped. ``record``: names of nodes
    whose values are kept (:attr:`recorded`), for locating where two graphs part.
    """

    def __init__(self, gm: fx.GraphModule, record: Iterable[str] = ()):
        super().__init__(gm, garbage_collect_values=True)
        self._model_precision: set[fx.Node] = set()  # constants not promoted yet
        self._record = set(record)
        self.recorded: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            if n.op == "get_attr":
                value = self._constant(n)
            elif n.op == "call_function" and _is_assertion(n):
                value = None
            else:
                at_model_precision = _folds(n) and bool(n.all_input_nodes) and all(
                    a in self._model_precision for a in n.all_input_nodes)
                args, kwargs = (n.args, n.kwargs) if at_model_precision else pytree.tree_map(
                    _promote_dtype, (n.args, n.kwargs))
                args, kwargs = fx.node.map_arg((args, kwargs), lambda a: self._value(a, promote=not at_model_precision))
                value = getattr(self, n.op)(n.target, args, kwargs)
                if at_model_precision and isinstance(value, torch.Tensor) and value.is_floating_point():
                    self._model_precision.add(n)
            if n.name in self._record and isinstance(value, torch.Tensor):
                self.recorded[n.name] = value
            return value

    def _value(self, node: fx.Node, *, promote: bool) -> Any:
        value = self.env[node]
        if promote and node in self._model_precision:
            return value.to(torch.float64)
        return value

    def _constant(self, n: fx.Node) -> Any:
        value = self.fetch_attr(n.target)
        if isinstance(value, fx.GraphModule):
            return to_float64(value)  # the body of a higher-order op (a small graph)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        exact = n.meta.get(EXACT_META)
        if exact is not None:
            return _checked_exact(n.target, exact(), value)
        self._model_precision.add(n)
        return value


@dataclass
class Float64Run:
    """A graph's float64 outputs on one input set (flattened), and the recorded values of
    named nodes (the stage boundaries :func:`stage_boundaries` picks)."""

    outputs: list[Any]
    boundaries: dict[str, torch.Tensor] = field(default_factory=dict)


def float64_run(gm: fx.GraphModule, inputs: list[Any], record: Iterable[str] = ()) -> Float64Run:
    interpreter = _Float64Interpreter(gm, record)
    with torch.no_grad():
        out = interpreter.run(*_inputs64(inputs))
    return Float64Run(pytree.tree_leaves(out), interpreter.recorded)


def run_float64(gm: fx.GraphModule, inputs: list[Any]) -> list[torch.Tensor]:
    """``gm``'s outputs on ``inputs`` computed in float64 (see :class:`_Float64Interpreter`)."""
    return [o for o in float64_run(gm, inputs).outputs if isinstance(o, torch.Tensor)]


@dataclass(frozen=True)
class StageBoundary:
    """A value that carries everything one stage hands the next (a residual stream)."""

    stage: int
    node: str
    layers: tuple[str, ...]  # the quantizable linears of the stage that makes it


def stage_boundaries(gm: fx.GraphModule) -> list[StageBoundary]:
    """The main value after each stage of ``gm`` (``qcompile.stages``: a decoder's layers),
    in order; empty for a graph of one stage."""
    from .stages import find_stages  # stages imports graph utilities only; keep verify light to import

    stages = find_stages(gm)
    out = []
    for stage in stages[:-1]:
        if len(stage.outputs) == 1:
            out.append(StageBoundary(stage.index, stage.outputs[0].name,
                                     tuple(layer_name(n) for n in stage.linears)))
    return out


def _relative_error(r: torch.Tensor, g: torch.Tensor) -> float:
    scale = r.abs().max().clamp_min(1e-300)
    return ((r - g).abs().max() / scale).item()


def _locate(reference: Float64Run, got: Float64Run, boundaries: list[StageBoundary], n_stages: int) -> str:
    """Where two runs part: the first stage whose output differs (its input agreed)."""
    for boundary in boundaries:
        r, g = reference.boundaries.get(boundary.node), got.boundaries.get(boundary.node)
        if r is None or g is None or r.shape != g.shape:
            continue
        if not _relative_error(r, g) <= EQUIVALENCE_RTOL:
            return _stage_text(boundary, n_stages)
    if boundaries:
        last = boundaries[-1]
        return f"in the last stage (after {last.node}, the output of stage {last.stage})"
    return ""


def _stage_text(boundary: StageBoundary, n_stages: int) -> str:
    layers = boundary.layers
    parts = [name.split(".") for name in layers]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    if common and len(layers) > 1:
        listed = f"{'.'.join(common)}.* ({len(layers)} linears)"
    else:
        listed = ", ".join(layers[:4]) + (f", ... ({len(layers)} linears)" if len(layers) > 4 else "")
    return f"in stage {boundary.stage} of {n_stages} (its output {boundary.node} differs; layers {listed or 'none'})"


def check_equivalence(
    before: fx.GraphModule | None, after: fx.GraphModule, input_sets: list[list[Any]],
    *, reference: list[Float64Run] | None = None, boundaries: list[StageBoundary] | None = None,
    locate: bool = True,
) -> list[Float64Run]:
    """Raise VerificationError unless ``after`` computes ``before``'s outputs in float64 on
    every input set; return ``after``'s float64 runs (one per input set).

    ``reference``: ``before``'s float64 runs on the same input sets when already known (a
    previous check's return value, or computed before a pass ran), which saves running
    ``before`` (then None). ``boundaries``: stage boundaries whose values the runs record;
    with ``locate``, a failure names the first stage whose output differs.
    """
    if before is None and reference is None:
        raise ValueError("check_equivalence needs the graph before the pass or its float64 outputs")
    boundaries = boundaries or []
    names = [b.node for b in boundaries]
    if reference is None:
        reference = [float64_run(before, inputs, names) for inputs in input_sets]
    runs = []
    for k, inputs in enumerate(input_sets):
        ref = reference[k]
        run = float64_run(after, inputs, names)
        runs.append(run)
        problem = _compare(ref.outputs, run.outputs, k)
        if problem:
            where = _locate(ref, run, boundaries, len(boundaries) + 1) if locate else ""
            raise VerificationError(problem + (f"; the graphs first part {where}" if where else ""))
    return runs


def _compare(ref: list[Any], got: list[Any], k: int) -> str:
    if len(ref) != len(got):
        return f"the graph has {len(got)} outputs, it had {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        if not isinstance(r, torch.Tensor):
            continue
        if r.shape != g.shape:
            return f"output {i} changed shape {tuple(r.shape)} -> {tuple(g.shape)}"
        if not r.is_floating_point():
            if not torch.equal(r, g):
                return f"integer output {i} changed on input set {k}"
            continue
        err = _relative_error(r, g)
        if not err <= EQUIVALENCE_RTOL:
            return (f"output {i} differs from the pre-pass graph by {err:.3e} (relative to its max) in float64 "
                    f"on input set {k}; a function-preserving pass must stay within {EQUIVALENCE_RTOL:g}")
    return ""
