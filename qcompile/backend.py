"""The ``torch.compile`` backend: ``torch.compile(model, backend="qcompile", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="qcompile"``
works in a fresh interpreter without ``import qcompile``. Dynamo hands the backend each
captured graph with parameters as placeholders; ``freeze_dynamo_graph`` freezes them and
converges on the canonical graph that ``qcompile.quantize`` produces, the recipe's passes
run, and the rest of the graph goes to Inductor (``"inner": "inductor"``, the default) or
runs eagerly (``"inner": "eager"``).

Options: ``recipe`` (preset name, Recipe or dict; default ``"w8a16"``), ``calibration``
(batches of model inputs: dicts are matched to graph inputs by argument name, tuples by
position), ``inner``, ``verify``, ``dump_dir``, ``progress``, and ``on_report`` (a
callable that receives each graph's :class:`qcompile.report.Report`).

Dynamo hands the backend a new graph whenever a guard fails — for ``generate()``, as the
KV cache grows, until it marks the length dynamic — and at every graph break. Such graphs
share one ``qcompile.decisions`` store per recipe and calibration data: a weight already
rounded for an earlier graph is not rounded again (its fingerprint is checked), and each
graph's report notes how long its quantization took.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.fx as fx

from qcompile.passes.decompose_w8a8 import decompose_w8a8

from .api import quantize_graph
from .calibration import normalize_batch
from .capture import FrozenDynamoGraph, freeze_dynamo_graph
from .decisions import Decisions
from .errors import CalibrationError, InputMismatchError, RecipeError
from .pipeline import PassContext, run_passes
from .recipe import Recipe, resolve_recipe
from .report import Report

__all__ = ["BackendOptions", "qcompile_backend"]

_INNER = ("inductor", "eager")


@dataclass
class BackendOptions:
    recipe: Any = "w8a16"
    calibration: Any = None
    inner: str = "inductor"
    verify: bool = True
    dump_dir: Any = None
    progress: bool = False
    on_report: Callable[[Report], None] | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise RecipeError(f"unknown qcompile backend option(s) {sorted(unknown)}; known: {sorted(known)}")
        opts = cls(**options)
        if opts.inner not in _INNER:
            raise RecipeError(f"option inner must be one of {_INNER}, got {opts.inner!r}")
        return opts


def _graph_calibration(batches: Any, user_names: list[str]) -> list[list[Any]]:
    """Map model-level calibration batches onto the Dynamo graph's user inputs."""
    if batches is None:
        return []
    out = []
    for i, batch in enumerate(batches):
        args, kwargs = normalize_batch(batch)
        if kwargs:
            flat = []
            for name in user_names:
                key = next((k for k in kwargs if name.endswith(f"['{k}']")), None)
                if key is None:
                    raise CalibrationError(
                        f"calibration batch {i} has keys {sorted(kwargs)}, none of which feeds graph input {name}"
                    )
                flat.append(kwargs[key])
        else:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len(tensors) != len(user_names):
                raise CalibrationError(
                    f"calibration batch {i} has {len(tensors)} tensors; the compiled graph takes {len(user_names)} "
                    f"({', '.join(user_names)}); pass dicts keyed by argument name"
                )
            flat = tensors
        out.append(flat)
    return out


# One Decisions store per (recipe, calibration data) in use: every graph Dynamo hands the
# backend for it (a recompilation as the KV cache grows, the other side of a graph break)
# replays the rounded weights already made instead of rounding them again. Held weakly: the
# compiled graphs hold their store, and it goes when they go.
_SHARED: "weakref.WeakValueDictionary[tuple, Decisions]" = weakref.WeakValueDictionary()


def shared_decisions(recipe: Recipe, calibration: Any) -> Decisions:
    """The store the backend's graphs quantized with ``recipe`` and ``calibration`` share.

    Replayed leniently (``qcompile.decisions``): each weight's rounding is reused only where
    the graph's weight has the fingerprint of the one rounded, so graphs of another model
    (or of changed weights) are quantized afresh, never paired with another model's codes."""
    key = (repr(recipe), id(calibration) if calibration is not None else None)
    decisions = _SHARED.get(key)
    if decisions is None:
        decisions = Decisions()
        _SHARED[key] = decisions
    return decisions


def qcompile_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                     **kwargs: Any) -> Callable[..., Any]:
    """Return the callable Dynamo runs in place of ``gm``; it quantizes on its first call.

    Parameters are frozen now, while Dynamo still says where each input comes from. But
    ``torch.export`` cannot run inside Dynamo's own compilation: it would trace under
    Dynamo's active tracing context and corrupt the guards Dynamo is building for this
    frame. So the frozen graph is captured, quantized and compiled on the first call, with
    that call's real inputs.
    """
    if kwargs:
        raise RecipeError(f"unexpected keyword(s) {sorted(kwargs)} for the qcompile backend; pass options={{...}}")
    opts = BackendOptions.from_dict(options)
    recipe: Recipe = resolve_recipe(opts.recipe)
    frozen = freeze_dynamo_graph(gm, list(example_inputs))
    first_key = frozen.state_key(list(example_inputs))
    decisions = shared_decisions(recipe, opts.calibration)
    compiled: dict[tuple, Callable[..., Any]] = {}

    def run(*all_inputs: Any) -> Any:
        # Dynamo reuses this graph for another instance of the model's class, or after an
        # in-place update of its weights (parameters are graph inputs to it): the graph is
        # frozen and quantized again for the parameters this call passes (the latest only).
        key = frozen.state_key(list(all_inputs))
        if key not in compiled:
            source = frozen.with_state(list(all_inputs)) if compiled or key != first_key else frozen
            compiled.clear()
            compiled[key] = _compile(source, list(all_inputs), recipe, opts, decisions)
        return compiled[key](*all_inputs)

    return run


def _compile(frozen: FrozenDynamoGraph, inputs: list[Any], recipe: Recipe,
             opts: BackendOptions, decisions: Decisions) -> Callable[..., Any]:
    captured = frozen.capture(inputs)
    example_flat = frozen.user_inputs(inputs)
    batches = _graph_calibration(opts.calibration, frozen.user_names)
    for i, flat in enumerate(batches):
        try:
            captured.check_shapes(flat)
        except InputMismatchError as exc:
            raise CalibrationError(
                f"calibration batch {i} does not fit the graph Dynamo compiled: {exc}. Dynamo traced the first "
                "call with its shapes baked in; give calibration batches of the first call's shapes, or compile "
                "with torch.compile(model, dynamic=True, ...)"
            ) from exc
    started = time.perf_counter()
    report = quantize_graph(captured, recipe, batches, example_flat, verify=opts.verify,
                            dump_dir=opts.dump_dir, progress=opts.progress, decisions=decisions)
    replayed = decisions.replaying
    decisions.replay("a graph torch.compile handed the backend", strict=False)
    report.notes.append(
        f"backend: graph quantized in {time.perf_counter() - started:.1f} s"
        + (" (the rounded weights of an earlier graph replayed where its weights are the same)" if replayed else "")
    )
    if opts.on_report is not None:
        opts.on_report(report)
    qgm = captured.graph_module
    if opts.inner == "inductor":
        # Let Inductor fuse the activation quantization with its neighbours (see the pass).
        ctx = PassContext(recipe, example_flat, verify=opts.verify, progress=False)
        qgm = run_passes(qgm, [decompose_w8a8], ctx)
    # Inductor gets the graph through torch.compile rather than compile_fx, so that it
    # recompiles (or goes dynamic) for every shape that passes the outer Dynamo guards.
    inner = torch.compile(qgm, backend="inductor") if opts.inner == "inductor" else qgm
    def call(*all_inputs: Any) -> Any:
        return inner(*frozen.user_inputs(list(all_inputs)))

    return call
