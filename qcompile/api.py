"""The public entry point: ``qcompile.quantize`` and the model it returns."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx as fx

from qcompile.passes.assign_precision import assign_precision
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.fold_smoothing import fold_smoothing
from qcompile.passes.insert_rotations import insert_rotations
from qcompile.passes.lower_to_kernels import lower_to_kernels
from qcompile.passes.quantize_weights import quantize_weights
from qcompile.passes.rotate_residual import rotate_residual

from .calibration import flatten_calibration
from .capture import CapturedGraph, capture
from .errors import CalibrationError
from .graph_utils import get_constant
from .higher_order import weights_in_bodies
from .layer_error import layer_output_errors
from .pipeline import PassContext, run_passes
from .recipe import Recipe, resolve_recipe
from .report import Report, format_bytes

__all__ = ["QuantizedModel", "build_pipeline", "quantize_graph", "quantize"]


class QuantizedModel(torch.nn.Module):
    """A quantized model: called like the original, with its rewritten graph inspectable.

    ``qm(*args, **kwargs)`` takes the inputs the original model took (any batch size and
    sequence length) and returns the same output structure. ``qm.graph_module`` is the
    rewritten ``torch.fx.GraphModule``; ``qm.report()`` the per-layer table.
    """

    def __init__(self, captured: CapturedGraph, report: Report):
        super().__init__()
        self.graph_module: fx.GraphModule = captured.graph_module
        self._captured = captured
        self._report = report

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._captured.flatten_inputs(args, kwargs)
        return self._captured.unflatten_outputs(self.graph_module(*flat))

    def report(self) -> Report:
        return self._report

    @property
    def captured(self) -> CapturedGraph:
        return self._captured


def build_pipeline(recipe: Recipe) -> list:
    """The passes a recipe runs, in order."""
    smoothing = [fold_smoothing] if recipe.smooth != "off" else []
    rotations = {"off": [], "input": [insert_rotations], "residual": [rotate_residual, insert_rotations]}[recipe.rotate]
    precision = [assign_precision] if recipe.budget is not None else []
    return [canonicalize, *smoothing, *rotations, *precision, quantize_weights, lower_to_kernels]


def quantize_graph(
    captured: CapturedGraph,
    recipe: Recipe,
    calibration: list[list[Any]],
    example_flat: list[Any],
    *,
    verify: bool = True,
    dump_dir: str | Path | None = None,
    progress: bool = True,
) -> Report:
    """Run the recipe's passes on a captured graph in place; return the report."""
    ctx = PassContext(
        recipe=recipe,
        example_inputs=example_flat,
        calibration=calibration,
        verify=verify,
        dump_dir=Path(dump_dir) if dump_dir is not None else None,
        progress=progress,
    )
    ctx.notes.extend(_body_weight_notes(captured.graph_module))
    passes = build_pipeline(recipe)
    split = passes.index(lower_to_kernels)
    gm = run_passes(captured.graph_module, passes[:split], ctx)
    error_batches = calibration[:8] if calibration else [example_flat]
    for name, err in layer_output_errors(gm, error_batches).items():
        ctx.layers[name]["output_error"] = err
    gm = run_passes(gm, passes[split:], ctx)
    captured.graph_module = gm
    return Report(
        recipe,
        list(ctx.layers.values()),
        ctx.pass_log,
        error_inputs=f"{len(error_batches)} calibration batch(es)" if calibration else "example inputs",
        notes=list(ctx.notes),
        precision=ctx.analyses.get("precision"),
    )


def _body_weight_notes(gm: fx.GraphModule) -> list[str]:
    """Weights that only the body of a higher-order op (``torch.cond``, ...) computes with: the
    passes do not rewrite inside such bodies, so they stay float, and the report says so."""
    rows = weights_in_bodies(gm, get_constant)
    if not rows:
        return []
    listed = ", ".join(f"{name} ({op}, {format_bytes(nbytes)})" for name, op, nbytes in rows)
    return [f"{len(rows)} weight(s) used inside higher-order ops stay float (passes do not rewrite inside "
            f"control-flow bodies): {listed}"]


def quantize(
    model: torch.nn.Module,
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    recipe: "str | Recipe | dict[str, Any] | None" = "w8a16",
    calibration: Iterable[Any] | None = None,
    verify: bool = True,
    dump_dir: str | Path | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """Capture ``model(*args, **kwargs)``, rewrite and quantize it per ``recipe``.

    Args:
        model: the ``nn.Module`` to quantize (left unchanged).
        args, kwargs: example inputs, exactly as you call the model.
        recipe: a preset name (``"w8a16"``, ``"w4a16"``, ``"w4a16-awq"``, ``"w8a8"``,
            ``"w8a8-static"``, ``"fp8"``), a :class:`qcompile.Recipe`, or a dict of Recipe
            fields (``{"preset": "w4a16", "group_size": 64}``).
        calibration: an iterable of batches, each a tuple of positional args or a dict of
            keyword args (what a tokenizer returns); used to measure per-layer error now
            and for statistics by recipes that need them.
        verify: run the verifier after each pass (float64 equivalence for
            function-preserving passes).
        dump_dir: write the readable graph after every pass into this folder.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"qcompile.quantize expects a torch.nn.Module, got {type(model).__name__}")
    recipe_obj = resolve_recipe(recipe)
    if recipe_obj.needs_calibration and calibration is None:
        raise CalibrationError(
            f"recipe {recipe_obj.name!r} needs calibration data: {recipe_obj.needs_calibration}; "
            "pass calibration=[batch, ...] (e.g. a few tokenized batches of representative text)"
        )
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    was_training = model.training
    model.eval()
    try:
        captured = capture(model, args, kwargs)
    finally:
        model.train(was_training)
    batches = flatten_calibration(captured, calibration)
    example_flat = captured.flatten_inputs(args, kwargs)
    report = quantize_graph(captured, recipe_obj, batches, example_flat, verify=verify, dump_dir=dump_dir,
                            progress=progress)
    return QuantizedModel(captured, report)
