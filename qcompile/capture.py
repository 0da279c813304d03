"""Capture a model as ONE canonical ATen ``torch.fx`` graph.

Two entry points converge here:

* :func:`capture` — ``torch.export`` (non-strict) of a user's ``nn.Module`` called with
  ``(args, kwargs)`` exactly as the user calls it;
* :func:`freeze_dynamo_graph` — the graph Dynamo hands a ``torch.compile`` backend,
  whose parameters and buffers arrive as placeholders: they are frozen into constants
  and the frozen graph goes through the same ``torch.export`` path.

The canonical graph: placeholders for the flattened user inputs only, parameters and
buffers as ``get_attr`` constants (buffers of the GraphModule, with the source name of
each in ``node.meta['qcompile.source']``), functional ATen ops (``run_decompositions({})``
keeps composite ops such as ``aten.linear`` and ``aten.layer_norm``; ``aten.view`` is
written as ``aten.reshape``, which holds under any strides), the bodies of wrapper
higher-order ops (checkpointing, ``wrap``) inlined and others (``cond``) carried along
(:mod:`qcompile.higher_order`), a flat tuple output, and ``meta['val']`` (shape/dtype) on every node. Batch and sequence dimensions
stay symbolic (``Dim.AUTO`` on every input dimension), so the captured graph accepts
every shape the model accepts.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.fx.experimental._config  # noqa: F401  (size-oblivious tracing switch)
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .errors import CaptureError, InputMismatchError
from .graph_utils import ALIASES_META, _attr_name
from .higher_order import inline_wrappers

__all__ = [
    "CapturedGraph",
    "register_output_types",
    "dynamic_shapes_for",
    "capture",
    "freeze_exported_program",
    "FrozenDynamoGraph",
    "freeze_dynamo_graph",
]

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
_LEAF_TYPES = (torch.Tensor, int, float, bool, str, complex, type(None), torch.dtype, torch.device)


@dataclass
class CapturedGraph:
    """A canonical graph plus what is needed to call it like the original model."""

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    # For each flat input: None for a tensor, else the value export specialized on.
    constant_inputs: list[Any] = field(default_factory=list)
    # Human-readable path of each flat input (``kwargs['input_ids']``).
    input_paths: list[str] = field(default_factory=list)
    # (flat input index, dimension, smallest size, largest size or None) the graph is valid for.
    dim_ranges: list[tuple[int, int, int, int | None]] = field(default_factory=list)
    # torch.export's other guards on the input shapes (``seq % chunk == 0`` where the traced
    # branch needs it), a function of the flat inputs that raises AssertionError; None if none.
    guards: Callable[..., None] | None = None

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        """Flatten call arguments and check them against the captured structure."""
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise InputMismatchError(
                "the inputs' structure differs from the one the model was captured with:\n"
                f"  captured: {self.in_spec}\n  got:      {spec}\n"
                "Call the quantized model with the same arguments (positional vs keyword, "
                "same keys) as the example inputs, or capture again with the new structure."
            )
        for i, (value, const) in enumerate(zip(flat, self.constant_inputs)):
            if const is not None and (isinstance(value, torch.Tensor) or value != const):
                raise InputMismatchError(
                    f"input {self.input_paths[i]} was {const!r} at capture and is {value!r} now; "
                    "torch.export specializes non-tensor inputs, so capture again with this value."
                )
        self.check_shapes(flat)
        return flat

    def check_shapes(self, flat: list[Any]) -> None:
        """Raise InputMismatchError unless the flat inputs fit the captured graph's shapes."""
        placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        for i, (node, value) in enumerate(zip(placeholders, flat)):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            if not isinstance(value, torch.Tensor):
                raise InputMismatchError(f"input {self.input_paths[i]} must be a tensor, got {type(value).__name__}")
            if value.dim() != val.dim():
                raise InputMismatchError(
                    f"input {self.input_paths[i]} has {value.dim()} dimensions; the model was captured with {val.dim()}"
                )
            for d, size in enumerate(val.shape):
                if not is_concrete_int(size):
                    continue
                if value.shape[d] != int(size):
                    raise InputMismatchError(
                        f"input {self.input_paths[i]} dimension {d} is {value.shape[d]}, but the captured graph "
                        f"is specialized to {int(size)} (torch.export makes a dimension static when the example has "
                        "size 0 or 1 there, or the model's code requires it): capture with an example of size >= 2 "
                        "in that dimension"
                    )

        for i, d, low, high in self.dim_ranges:
            size = flat[i].shape[d]
            if size < low or (high is not None and size > high):
                bound = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise InputMismatchError(
                    f"input {self.input_paths[i]} dimension {d} is {size}; the captured graph is valid for sizes "
                    f"{bound} (a constraint torch.export found in the model's code)"
                )
        if self.guards is not None:
            try:
                self.guards(*flat)
            except AssertionError as exc:
                shapes = ", ".join(f"{p} {tuple(v.shape)}" for p, v in zip(self.input_paths, flat)
                                   if isinstance(v, torch.Tensor))
                raise InputMismatchError(
                    f"the inputs ({shapes}) break a condition torch.export found in the model's code while "
                    f"capturing ({exc}): the model takes another code path for these shapes. Capture with an "
                    "example of these shapes, or quantize through torch.compile(model, backend=\"qcompile\"), "
                    "which captures each code path it meets"
                ) from exc

    def unflatten_outputs(self, flat_out: Any) -> Any:
        return pytree.tree_unflatten(list(flat_out), self.out_spec)


# --------------------------------------------------------------------------------------
# Output objects that are not pytrees (e.g. a Hugging Face KV cache)


def _is_container(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict)) or type(value) in pytree.SUPPORTED_NODES


def _contains_tensor(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > 8:
        return False
    if isinstance(value, dict):
        return any(_contains_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_tensor(v, depth + 1) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return any(_contains_tensor(v, depth + 1) for v in vars(value).values())
    return False


def _register_state_class(cls: type) -> None:
    """Make ``cls`` a pytree node whose children are the tensor-holding attributes.

    This is what ``pickle`` does by default (rebuild with ``cls.__new__`` and restore
    ``__dict__``), so any plain Python state object — such as a Hugging Face cache —
    can leave an exported graph without code that knows its class.
    """

    def flatten(obj: Any):
        state = vars(obj)
        # Tensors, and sizes that are symbolic while tracing (a cache's length), are
        # children; everything else rides along unchanged in the context.
        keys = tuple(sorted(k for k, v in state.items() if _contains_tensor(v) or isinstance(v, _SYMBOLIC)))
        static = tuple((k, state[k]) for k in sorted(state) if k not in keys)
        return [state[k] for k in keys], (cls, keys, static)

    def flatten_with_keys(obj: Any):
        children, context = flatten(obj)
        return [(pytree.GetAttrKey(k), c) for k, c in zip(context[1], children)], context

    def unflatten(children: Any, context: Any):
        klass, keys, static = context
        obj = klass.__new__(klass)
        obj.__dict__.update(dict(static))
        obj.__dict__.update(zip(keys, children))
        return obj

    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )


def register_output_types(output: Any) -> list[type]:
    """Register every non-pytree object class found in ``output`` (recursively)."""
    registered: list[type] = []
    for _ in range(16):
        leaves = pytree.tree_leaves(output)
        unknown = {
            type(leaf)
            for leaf in leaves
            if not isinstance(leaf, _LEAF_TYPES) and hasattr(leaf, "__dict__") and _contains_tensor(leaf)
        }
        if not unknown:
            return registered
        for cls in unknown:
            if cls not in pytree.SUPPORTED_NODES:
                _register_state_class(cls)
                registered.append(cls)
    return registered


# --------------------------------------------------------------------------------------
# torch.export path


def _auto_dims(value: Any) -> Any:
    def one(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d in range(leaf.dim())} if leaf.dim() else None
        return None

    return pytree.tree_map(one, value)


def dynamic_shapes_for(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``Dim.AUTO`` for every dimension of every tensor input, keyed by argument name."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    return {name: _auto_dims(value) for name, value in bound.arguments.items()}


def _size_oblivious() -> contextlib.AbstractContextManager:
    """Trace dynamic dimensions size-obliviously where torch supports it.

    Plain ``Dim.AUTO`` assumes every dynamic size is >= 2 (0/1 specialization), so a graph
    captured at batch 8 would refuse batch 1. Size-oblivious tracing proves the graph for
    every size and keeps only the bounds the model's code really needs.
    """
    config = torch.fx.experimental._config
    if hasattr(config, "backed_size_oblivious"):
        return config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic: bool = True,
            dynamic_shapes: Any = None, source_prefix: str = "") -> CapturedGraph:
    """Capture ``model(*args, **kwargs)`` as a canonical graph (see the module docstring).

    ``dynamic_shapes``: torch.export's, instead of ``Dim.AUTO`` on every dimension.
    ``source_prefix``: removed from the front of every weight's name (and module path), for
    a wrapper module that holds the user's model as its attribute (``"model."``), so that
    the graph names its weights as the model does.
    """
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qcompile.quantize expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    # torch.export marks the tensors it traces (dynamic-dimension hints); give it aliases so
    # the caller's tensors, which Dynamo may be guarding, are left as they were.
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), (args, kwargs))
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise InputMismatchError(f"example input {pytree.keystr(path)} holds NaN/Inf; give finite example inputs")
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    except Exception as exc:  # re-raised: the model itself fails on these inputs
        raise CaptureError(
            f"{type(model).__name__} raised {type(exc).__name__} on its example inputs, before any capture: {exc}"
        ) from exc
    register_output_types(output)
    if dynamic_shapes is None and dynamic:
        dynamic_shapes = dynamic_shapes_for(model.forward, args, kwargs)
    try:
        with torch.no_grad(), _size_oblivious():
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
            ep = ep.run_decompositions({})
    except Exception as exc:  # re-raised with the reason and what to do instead
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {reason}\n"
            "If the model has data-dependent control flow or Python side effects, use the torch.compile "
            'path instead, which quantizes each graph Dynamo captures between graph breaks:\n'
            '    torch.compile(model, backend="qcompile", options={"recipe": ...})'
        ) from exc
    captured = freeze_exported_program(ep, _state_aliases(model), source_prefix)
    captured.guards = getattr(ep.module(check_guards=True), "_guards_fn", None)
    return captured


def _state_aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every name of each parameter/buffer: a tied weight (an LM head sharing the embedding)
    has several, and torch.export keeps only the first."""
    by_tensor: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: tuple(names) for names in by_tensor.values() for name in names}


def freeze_exported_program(ep: ExportedProgram, aliases: dict[str, tuple[str, ...]] | None = None,
                            source_prefix: str = "") -> CapturedGraph:
    """Turn an ExportedProgram into the canonical graph with its weights as constants.

    ``aliases``: every name of each parameter (:func:`_state_aliases`), kept in
    ``meta[ALIASES_META]`` so a layer is named after the module that calls it.
    ``source_prefix``: stripped from those names and from the module paths (see :func:`capture`).
    """

    def strip(name: str) -> str:
        return name[len(source_prefix):] if source_prefix and name.startswith(source_prefix) else name

    gm = ep.graph_module
    sig = ep.graph_signature
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    root = torch.nn.Module()
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    constant_inputs: list[Any] = []
    user_nodes: list[fx.Node] = []
    first_non_placeholder = None

    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            new = new_graph.placeholder(node.name)
            new.meta = dict(node.meta)
            env[node] = new
            user_nodes.append(node)
            val = node.meta.get("val")
            constant_inputs.append(None if isinstance(val, torch.Tensor) else _specialized_value(val))
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            tensor = ep.constants[spec.target]
        else:
            raise CaptureError(
                f"graph input {node.name!r} is a {spec.kind.name}, which qcompile cannot freeze into a constant"
            )
        name = _attr_name(root, spec.target)
        root.register_buffer(name, tensor.detach(), persistent=True)
        new = new_graph.get_attr(name)
        new.meta = dict(node.meta)
        new.meta["qcompile.source"] = strip(spec.target)
        if aliases and len(aliases.get(spec.target, ())) > 1:
            new.meta[ALIASES_META] = tuple(strip(a) for a in aliases[spec.target])
        env[node] = new

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outs = node.args[0]
            kinds = [s.kind for s in sig.output_specs]
            if any(k != OutputKind.USER_OUTPUT for k in kinds):
                bad = [s.target for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
                raise CaptureError(
                    f"the model mutates state during forward ({', '.join(map(str, bad))}); "
                    "qcompile captures inference graphs without side effects"
                )
            new_graph.output(tuple(fx.node.map_arg(o, lambda n: env[n]) for o in outs))
            continue
        if node.op == "get_attr":
            body = getattr(gm, node.target, None)
            if not isinstance(body, fx.GraphModule):
                raise CaptureError(f"unexpected submodule or attribute {node.target!r} in the exported graph")
            # the body of a higher-order op (torch.cond's branches, ...): carried along
            root.add_module(node.target, body)
        new = new_graph.node_copy(node, lambda n: env[n])
        if source_prefix and "nn_module_stack" in new.meta:
            new.meta["nn_module_stack"] = _strip_module_paths(new.meta["nn_module_stack"], source_prefix)
        if new.target == torch.ops.aten.view.default:
            # The decomposition of ``reshape`` chose ``view`` for the strides seen while
            # tracing; a re-trace (Inductor) can give a tensor other strides (cat, permute),
            # where the view is invalid. The canonical graph is functional, so a reshape
            # computes the same values under any strides.
            new.target = torch.ops.aten.reshape.default
        env[node] = new
        if first_non_placeholder is None:
            first_non_placeholder = new

    out = fx.GraphModule(root, new_graph, class_name="CanonicalGraph")
    inline_wrappers(out)
    out.graph.lint()
    in_spec = ep.call_spec.in_spec
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten([0] * in_spec.num_leaves, in_spec))[0]]
    return CapturedGraph(out, in_spec, ep.call_spec.out_spec, constant_inputs, paths, _dim_ranges(ep, user_nodes))


def _strip_module_paths(stack: dict, prefix: str) -> dict:
    """``nn_module_stack`` with ``prefix`` (``"model."``) removed from every module path; the
    wrapper's own entry for the model (path ``"model"``) is dropped."""
    out = {}
    for key, (path, cls) in stack.items():
        if path == prefix.rstrip("."):
            continue
        out[key] = (path[len(prefix):] if path.startswith(prefix) else path, cls)
    return out


def _dim_ranges(ep: ExportedProgram, user_nodes: list[fx.Node]) -> list[tuple[int, int, int, int | None]]:
    """The size range export proved for each symbolic input dimension."""
    out = []
    for i, node in enumerate(user_nodes):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            expr = getattr(getattr(size, "node", None), "expr", None)
            vr = ep.range_constraints.get(expr) if expr is not None else None
            if vr is None:
                continue
            low = int(vr.lower) if getattr(vr.lower, "is_Integer", False) else 0
            high = int(vr.upper) if getattr(vr.upper, "is_Integer", False) else None
            out.append((i, d, low, high))
    return out


def _specialized_value(val: Any) -> Any:
    """The Python value export specialized a non-tensor input on (None when it is unknown)."""
    if isinstance(val, (int, float, bool, str)):
        return val
    return None


# --------------------------------------------------------------------------------------
# Dynamo (torch.compile backend) path

_MODULE_SOURCE_NAMES = (
    "ParamBufferSource",
    "UnspecializedParamBufferSource",
    "NNModuleSource",
    "UnspecializedNNModuleSource",
    "UnspecializedBuiltinNNModuleSource",
    "FSDPNNModuleSource",
    "GlobalSource",
)


def _is_model_state(node: fx.Node, example: Any) -> bool:
    """Whether a Dynamo placeholder is a parameter/buffer (or a global tensor), not a user input."""
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    while source is not None:
        if type(source).__name__ in _MODULE_SOURCE_NAMES:
            return True
        source = getattr(source, "base", None)
    return False


@dataclass
class FrozenDynamoGraph:
    """A Dynamo graph with its parameters/buffers frozen, and how to feed it."""

    graph_module: fx.GraphModule  # takes only the user tensors, in order
    user_indices: list[int]  # positions of the user tensors in Dynamo's inputs
    user_names: list[str]  # their source names (``L['input_ids']``, ``L['kwargs']['attention_mask']``)
    # (position in Dynamo's inputs, buffer path in graph_module) of each frozen parameter/buffer
    state: list[tuple[int, str]] = field(default_factory=list)

    def user_inputs(self, all_inputs: list[Any]) -> list[Any]:
        return [all_inputs[i] for i in self.user_indices]

    def state_key(self, all_inputs: list[Any]) -> tuple:
        """Which parameter tensors, at which version, a call passes. Dynamo passes a module's
        parameters as graph inputs and reuses a compiled graph for another instance of the
        same class (or after an in-place update): a frozen graph is valid only for its key."""
        return tuple((id(all_inputs[i]), all_inputs[i]._version) for i, _ in self.state)

    def with_state(self, all_inputs: list[Any]) -> "FrozenDynamoGraph":
        """This graph frozen with the parameters/buffers that ``all_inputs`` carry instead."""
        graph_module = fx.GraphModule(self.graph_module, _copy_graph(self.graph_module.graph))
        for i, path in self.state:
            *mods, leaf = path.split(".")
            owner = graph_module
            for name in mods:
                owner = getattr(owner, name)
            owner._buffers[leaf] = all_inputs[i].detach()
        return FrozenDynamoGraph(graph_module, self.user_indices, self.user_names, self.state)

    def capture(self, all_inputs: list[Any]) -> CapturedGraph:
        """Capture the frozen graph through the torch.export path, with these inputs as the example."""
        return capture(self.graph_module, tuple(self.user_inputs(all_inputs)), {})


def freeze_dynamo_graph(gm: fx.GraphModule, example_inputs: list[Any]) -> FrozenDynamoGraph:
    """Freeze a Dynamo graph's parameters and buffers into constants.

    Must run while Dynamo compiles (the placeholders' ``grapharg`` metadata, which says
    where each input comes from, is dropped afterwards). Size placeholders (dynamic
    shapes) become ``sym_size`` of the tensor input they measure.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise CaptureError(f"Dynamo passed {len(example_inputs)} inputs for {len(placeholders)} placeholders")
    # ``gm`` as the root: the submodules its ``get_attr`` nodes name (the bodies of
    # higher-order ops such as ``wrap``, checkpointing, ``cond`` or autograd functions)
    # come along; its parameters do not, since Dynamo passes those as placeholders.
    frozen = fx.GraphModule(gm, _copy_graph(gm.graph))
    frozen_placeholders = [n for n in frozen.graph.nodes if n.op == "placeholder"]
    user_indices: list[int] = []
    user_names: list[str] = []
    state: list[tuple[int, str]] = []
    symint_nodes: list[tuple[fx.Node, Any]] = []
    for i, (node, orig, example) in enumerate(zip(frozen_placeholders, placeholders, example_inputs)):
        if isinstance(example, torch.Tensor) and _is_model_state(orig, example):
            name = _register_nested(frozen, _module_path(_source_name(orig)) or node.name, example.detach())
            state.append((i, name))
            with frozen.graph.inserting_before(node):
                attr = frozen.graph.get_attr(name)
            attr.meta["qcompile.source"] = name
            node.replace_all_uses_with(attr)
            frozen.graph.erase_node(node)
        elif isinstance(example, torch.Tensor):
            user_indices.append(i)
            user_names.append(_source_name(orig) or node.name)
        else:
            symint_nodes.append((node, orig))
    for node, orig in symint_nodes:
        _replace_symint_placeholder(frozen, node, orig, placeholders)
    inline_wrappers(frozen)  # e.g. checkpointing, which torch.export cannot trace
    frozen.recompile()
    return FrozenDynamoGraph(frozen, user_indices, user_names, state)


_SOURCE_STEP = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\['([^']+)'\]|\[(\d+)\]|\.([A-Za-z_]\w*)")


def _module_path(source_name: str | None) -> str | None:
    """``L['self']._modules['enc']._parameters['weight']`` -> ``enc.weight`` (None if not that form)."""
    prefix = "L['self']"
    if not source_name or not source_name.startswith(prefix):
        return None
    rest, parts = source_name[len(prefix):], []
    while rest:
        match = _SOURCE_STEP.match(rest)
        if match is None:
            return None
        parts.append(next(g for g in match.groups() if g is not None))
        rest = rest[match.end():]
    path = ".".join(parts)
    return path if parts and re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", path) else None


def _register_nested(root: torch.nn.Module, path: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer at the dotted ``path`` (creating empty submodules); return the path."""
    *mods, leaf = path.split(".")
    owner = root
    for name in mods:
        child = getattr(owner, name, None)
        if not isinstance(child, torch.nn.Module):
            if child is not None:
                return _register_nested(root, _attr_name(root, path), tensor)
            child = torch.nn.Module()
            owner.add_module(name, child)
        owner = child
    if hasattr(owner, leaf):
        return _register_nested(root, _attr_name(root, path), tensor)
    owner.register_buffer(leaf, tensor, persistent=True)
    return path


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    for old, node in zip(graph.nodes, new.nodes):
        node.meta = dict(old.meta)
    return new


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None or not hasattr(source, "name"):
        return None
    name = source.name  # a property in recent torch, a method in older releases
    return name() if callable(name) else str(name)


def _replace_symint_placeholder(frozen: fx.GraphModule, node: fx.Node, orig: fx.Node, placeholders: list[fx.Node]) -> None:
    """Replace a size placeholder by ``sym_size`` of the tensor input it is a dimension of."""
    sym = orig.meta.get("example_value")
    expr = getattr(getattr(sym, "node", None), "expr", None)
    by_name = {n.name: n for n in frozen.graph.nodes if n.op == "placeholder"}
    for other in placeholders:
        val = other.meta.get("example_value")
        if not isinstance(val, torch.Tensor) or other.name not in by_name:
            continue
        for d, size in enumerate(val.shape):
            if expr is not None and getattr(getattr(size, "node", None), "expr", None) == expr:
                first_op = next(n for n in frozen.graph.nodes if n.op not in ("placeholder", "get_attr"))
                with frozen.graph.inserting_before(first_op):
                    size_node = frozen.graph.call_function(torch.ops.aten.sym_size.int, (by_name[other.name], d))
                node.replace_all_uses_with(size_node)
                frozen.graph.erase_node(node)
                return
    raise CaptureError(
        f"Dynamo graph input {orig.name!r} is a size ({sym}) that is not a dimension of any tensor input; "
        "qcompile cannot make it a function of the inputs"
    )
