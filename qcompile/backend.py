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
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.fx as fx

from qcompile.passes.decompose_w8a8 import decompose_w8a8

from .api import quantize_graph
from .calibration import normalize_batch
from .capture import FrozenDynamoGraph, freeze_dynamo_graph
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
    compiled: list[Callable[..., Any]] = []

    def run(*all_inputs: Any) -> Any:
        if not compiled:
            compiled.append(_compile(frozen, list(all_inputs), recipe, opts))
        return compiled[0](*all_inputs)

    return run


def _compile(frozen: FrozenDynamoGraph, inputs: list[Any], recipe: Recipe,
             opts: BackendOptions) -> Callable[..., Any]:
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
    report = quantize_graph(captured, recipe, batches, example_flat, verify=opts.verify,
                            dump_dir=opts.dump_dir, progress=opts.progress)
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
