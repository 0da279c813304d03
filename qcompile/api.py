"""The public entry point: ``qcompile.quantize`` and the model it returns."""
from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

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
from .decisions import Decisions
from .errors import CalibrationError, CaptureError, InputMismatchError
from .generation import GenerationGraphs, GenerationPlan, generation_plan, generation_shell
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

    A transformers causal LM also generates: ``qm.generate(...)`` is transformers'
    ``generate`` running the quantized prefill and decode steps, and ``qm(next_ids,
    attention_mask=mask, cache=out.cache)`` runs one step on a KV cache
    (``qm.generation.prefill`` / ``.decode``: their graphs; ``qcompile.generation``). The
    steps are captured and quantized with the same weights on first use (or in
    ``quantize(..., generation=True)``).
    """

    def __init__(self, captured: CapturedGraph, report: Report,
                 build_generation: Callable[[], GenerationGraphs] | None = None, no_generation: str = ""):
        super().__init__()
        self.graph_module: fx.GraphModule = captured.graph_module
        self._captured = captured
        self._report = report
        self._build_generation = build_generation
        self._generation: GenerationGraphs | None = None
        self._no_generation = no_generation or "the model was quantized with generation=False"

    @property
    def generation(self) -> GenerationGraphs | None:
        """The quantized prefill and decode steps (built on first access), or None when the
        model has none (the report's notes say why)."""
        if self._generation is None and self._build_generation is not None:
            self._generation = self._build_generation()
            self._build_generation = None  # drops the float model it held
        return self._generation

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if _passes_cache(kwargs):
            return self._steps()(*args, **kwargs)
        flat = self._captured.flatten_inputs(args, kwargs)
        return self._captured.unflatten_outputs(self.graph_module(*flat))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` on the quantized prefill and decode steps (any batch,
        greedy or sampled, the default ``DynamicCache`` or ``cache_implementation="static"``)."""
        return self._steps().shell.generate(*args, **kwargs)

    def _steps(self) -> GenerationGraphs:
        steps = self.generation
        if steps is None:
            raise InputMismatchError(f"this quantized model has no generation steps: {self._no_generation}")
        return steps

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
    decisions: Decisions | None = None,
) -> Report:
    """Run the recipe's passes on a captured graph in place; return the report.

    ``decisions``: where the data-dependent choices are recorded (``qcompile.decisions``),
    for the model's other graphs to replay."""
    ctx = PassContext(
        recipe=recipe,
        example_inputs=example_flat,
        calibration=calibration,
        verify=verify,
        dump_dir=Path(dump_dir) if dump_dir is not None else None,
        progress=progress,
        decisions=decisions if decisions is not None else Decisions(recording=False),
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


def _quantize_generation(model: torch.nn.Module, plan: GenerationPlan, recipe: Recipe, decisions: Decisions,
                         report: Report, *, verify: bool, dump_dir: str | Path | None,
                         progress: bool) -> GenerationGraphs:
    """Capture the prefill and decode steps of ``model`` and run the recipe's passes on each,
    replaying ``decisions`` (the call graph's choices: the same rounded weights)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        steps = plan.capture(model)
        captured_at = time.perf_counter()
        for step in steps:
            ctx = PassContext(
                recipe=recipe,
                example_inputs=step.example_flat,
                verify=verify,
                dump_dir=Path(dump_dir) / step.name if dump_dir is not None else None,
                progress=progress,
                decisions=decisions.replay(f"the {step.name} step of generation"),
            )
            step.captured.graph_module = run_passes(step.captured.graph_module, build_pipeline(recipe), ctx)
    finally:
        model.train(was_training)
    prefill, decode = (step.captured for step in steps)
    graphs = GenerationGraphs(plan, prefill, decode, generation_shell(model, None), captured_at - start,
                              time.perf_counter() - captured_at)
    report.notes.append(
        f"generation: prefill and decode steps captured in {graphs.capture_seconds:.1f} s and quantized with the "
        f"same weights in {graphs.passes_seconds:.1f} s (the choices above replayed; "
        f"{'function-preserving passes verified' if verify else 'verification off'})"
    )
    return graphs


def _passes_cache(kwargs: Mapping[str, Any]) -> bool:
    return any(kwargs.get(name) is not None for name in ("cache", "past_key_values"))


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
    generation: bool | None = None,
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
        generation: the prefill and decode steps of generation with a KV cache
            (``qcompile.generation``), for ``qm.generate(...)`` and ``qm(ids, cache=...)``,
            for a transformers causal LM called with ``input_ids`` (and ``attention_mask``)
            of at least 2 tokens. ``None`` (default): captured and quantized on first use,
            holding a reference to ``model`` until then; ``True``: now (an error says why
            they cannot be), and ``model`` is not held; ``False``: never.
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
    if generation not in (None, True, False):
        raise TypeError(f"generation must be None, True or False, got {generation!r}")
    was_training = model.training
    model.eval()
    try:
        plan, why = generation_plan(model, args, kwargs) if generation is not False else (None, "generation=False")
        if plan is None and generation is True:
            raise CaptureError(f"generation=True, but the generation steps cannot be captured: {why}")
        captured = capture(model, args, kwargs)
    finally:
        model.train(was_training)
    batches = flatten_calibration(captured, calibration)
    example_flat = captured.flatten_inputs(args, kwargs)
    decisions = Decisions(recording=plan is not None)  # recorded only where the steps will replay it
    report = quantize_graph(captured, recipe_obj, batches, example_flat, verify=verify, dump_dir=dump_dir,
                            progress=progress, decisions=decisions)
    build = None
    if plan is not None:
        build = functools.partial(_quantize_generation, model, plan, recipe_obj, decisions, report, verify=verify,
                                  dump_dir=dump_dir, progress=progress)
    elif generation is None and callable(getattr(model, "generate", None)):
        report.notes.append(f"generation steps not built: {why}")
    qm = QuantizedModel(captured, report, build, why)
    if generation is True:
        qm.generation  # noqa: B018  (built now: the float model is not held)
    return qm
