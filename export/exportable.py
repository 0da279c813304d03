"""The quantized graph in the form ``torch.onnx.export`` takes, with names and example inputs.

``QuantizedModel.graph_module`` is qcompile's canonical graph: flat placeholders (some may
be non-tensor values that capture specialized on), a flat tuple of outputs that may
repeat a value or hold sizes (a KV cache's length is a SymInt). ONNX needs tensor inputs
and distinct tensor outputs, so :func:`exportable_graph` makes a copy where

* non-tensor inputs are replaced by the constant value the graph was captured with;
* a size output becomes a 0-d int64 tensor, a Python number a 0-d constant tensor;
* an output that repeats an earlier one (or is an input or a constant) is cloned, so
  each ONNX output is its own value;

and :func:`export_program` re-exports it with ``torch.export`` (``Dim.AUTO`` on every
dimension that is symbolic in the captured graph, traced size-obliviously as capture
does), using example inputs made from the placeholders' metadata: the graph is already
captured, so only shapes and dtypes matter.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.fx.experimental._config  # noqa: F401  (size-oblivious tracing switch)
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from qcompile.errors import ExportError

from .context import ConstantTensor
from .naming import axis_names, output_names

__all__ = ["ExportableGraph", "exportable_graph", "export_program", "graph_constants", "input_names"]

_SYMBOLIC_DTYPES = {torch.SymInt: torch.int64, torch.SymFloat: torch.float32, torch.SymBool: torch.bool}
_PYTHON_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float32}


@dataclass
class ExportableGraph:
    """A graph ready for torch.export -> ONNX, with everything needed to name its ONNX form."""

    graph_module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, Any] | None, ...]
    input_names: list[str]
    output_names: list[str]
    axis_names: list[dict[int, str]] = field(default_factory=list)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def input_names(qm: Any) -> list[str]:
    """The ONNX input names of a quantized model: its tensor inputs' argument names, in order."""
    captured = qm.captured
    return [
        node.name
        for node, const in zip(_placeholders(qm.graph_module), captured.constant_inputs)
        if const is None and isinstance(node.meta.get("val"), torch.Tensor)
    ]


def _size_hint(size: Any) -> int | None:
    if is_concrete_int(size):
        return int(size)
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    if hint is None and node is not None and getattr(node, "shape_env", None) is not None:
        hint = node.shape_env.size_hint(node.expr, allow_none=True)
    return int(hint) if hint is not None else None


def _example(val: torch.Tensor, sizes: list[int], seed: int) -> torch.Tensor:
    if val.dtype.is_floating_point:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(sizes, generator=gen, dtype=torch.float32).to(val.dtype)
    return torch.ones(sizes, dtype=val.dtype)


def _replace_uses(node: fx.Node, value: Any) -> None:
    for user in list(node.users):
        user.args = pytree.tree_map(lambda a: value if a is node else a, user.args)
        user.kwargs = pytree.tree_map(lambda a: value if a is node else a, user.kwargs)


def _copy_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(gm.graph, env)
    return fx.GraphModule(gm, graph, class_name="ExportableGraph"), outputs


def _output_value(graph: fx.Graph, value: Any, seen: set, name: str) -> fx.Node:
    """A node computing output ``value`` as its own tensor."""
    aten = torch.ops.aten
    if isinstance(value, fx.Node):
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            if value in seen or value.op in ("placeholder", "get_attr"):
                new = graph.call_function(aten.clone.default, (value,))
                new.meta["val"] = val
                return new
            return value
        for kind, dtype in _SYMBOLIC_DTYPES.items():
            if isinstance(val, kind):
                return graph.call_function(aten.scalar_tensor.default, (value,), {"dtype": dtype})
        raise ExportError(f"output {name} ({value.name}) is neither a tensor nor a size; ONNX outputs are tensors")
    if isinstance(value, (bool, int, float)):
        return graph.call_function(aten.scalar_tensor.default, (value,), {"dtype": _PYTHON_DTYPES[type(value)]})
    raise ExportError(f"output {name} is the constant {value!r}, which an ONNX graph cannot return")


def exportable_graph(qm: Any, *, dynamic: bool = True) -> ExportableGraph:
    """The ONNX-ready copy of ``qm.graph_module`` (see the module docstring)."""
    captured = qm.captured
    gm, outputs = _copy_graph(qm.graph_module)
    dim_low = {(i, d): low for i, d, low, _ in captured.dim_ranges}
    dim_high = {(i, d): high for i, d, _, high in captured.dim_ranges}
    examples, shapes, names, axis_info = [], [], [], []
    for i, (node, const) in enumerate(zip(_placeholders(gm), captured.constant_inputs)):
        val = node.meta.get("val")
        if const is not None or not isinstance(val, torch.Tensor):
            if const is None:
                raise ExportError(
                    f"input {captured.input_paths[i]} is a {type(val).__name__}, not a tensor, and the captured graph "
                    "did not fix its value; ONNX inputs are tensors"
                )
            _replace_uses(node, const)
            gm.graph.erase_node(node)
            continue
        sizes, dynamic_dims = [], {}
        for d, size in enumerate(val.shape):
            hint = _size_hint(size)
            if is_concrete_int(size):
                sizes.append(int(size))
                continue
            low = max(dim_low.get((i, d), 0), 2)
            example = max(hint if hint is not None else low, low)
            high = dim_high.get((i, d))
            if high is not None:
                example = min(example, high)
            sizes.append(example)
            dynamic_dims[d] = example
        examples.append(_example(val, sizes, seed=i))
        shapes.append({d: torch.export.Dim.AUTO for d in dynamic_dims} if dynamic and dynamic_dims else None)
        names.append(node.name)
        axis_info.append((node.name, val.dtype, val.dim(), dynamic_dims if dynamic else {}))

    out_names = output_names(captured.out_spec, taken=names)
    if len(out_names) != len(outputs):
        raise ExportError(f"the graph returns {len(outputs)} values but its output structure has {len(out_names)}")
    seen: set = set()
    values = []
    for value, name in zip(outputs, out_names):
        node = _output_value(gm.graph, value, seen, name)
        seen.add(node)
        values.append(node)
    gm.graph.output(tuple(values))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return ExportableGraph(gm, tuple(examples), tuple(shapes), names, out_names, axis_names(axis_info))


def _size_oblivious() -> contextlib.AbstractContextManager:
    """Trace without specializing sizes 0/1, as capture does (where torch supports it)."""
    config = torch.fx.experimental._config
    if hasattr(config, "backed_size_oblivious"):
        return config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def export_program(graph: ExportableGraph) -> ExportedProgram:
    """``torch.export`` of the exportable graph (what torch.onnx then translates)."""
    try:
        with torch.no_grad(), _size_oblivious():
            return torch.export.export(
                graph.graph_module, graph.example_inputs, dynamic_shapes=graph.dynamic_shapes, strict=False
            )
    except Exception as exc:  # re-raised with the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.export of the quantized graph failed: {type(exc).__name__}: {reason}") from exc


def graph_constants(ep: ExportedProgram) -> dict[str, ConstantTensor]:
    """ExportedProgram placeholder name (the ONNX value name during translation) -> constant."""
    out: dict[str, ConstantTensor] = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        target = spec.target
        tensor = ep.state_dict.get(target) if target in ep.state_dict else ep.constants.get(target)
        if isinstance(tensor, torch.Tensor):
            out[spec.arg.name] = ConstantTensor(source=target, tensor=tensor)
    return out
