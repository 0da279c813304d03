"""The pass manager: ordered passes over the canonical graph, verified after each one.

A pass is a function ``(gm, ctx) -> PassResult(gm, modified)`` wrapped in a
:class:`GraphPass` that says whether it preserves the model's function. After every pass
the manager runs the verifier (``qcompile.verify``): ``graph.lint()``, shape/dtype
metadata on every node, and for function-preserving passes a float64 equivalence check
against the graph as it was before the pass. A failure names the pass and the first
stage (a decoder's layer) whose output differs.

The check keeps no copy of the graph: the float64 outputs of the graph before a
function-preserving pass are computed before it runs (or are the previous check's), and
the float64 runs promote one constant at a time, so verifying a model costs about its
float64 activations, not copies of its weights.

Per-pass wall time, node counts, and the check's time and peak resident memory go into
``ctx.pass_log`` (and from there into the report). With ``dump_dir`` set (or the
environment variable ``QCOMPILE_DUMP_DIR``) the readable graph is written after every
pass as ``NN_<pass>.txt``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from .decisions import Decisions
from .errors import VerificationError
from .recipe import Recipe
from .resident import PeakWatch
from .verify import (
    StageBoundary,
    check_equivalence,
    check_structure,
    drop_exact_values,
    float64_run,
    has_exact_values,
    stage_boundaries,
)

__all__ = ["PassResult", "GraphPass", "PassRecord", "PassContext", "run_passes"]


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


@dataclass(frozen=True)
class GraphPass:
    """A named graph transform and whether it leaves the model's function unchanged.

    ``keeps_stage_values``: whether a function-preserving pass also leaves the values
    between stages unchanged (False for one that rotates the residual stream), so that a
    failed check can name the first stage whose output differs.
    """

    name: str
    run: Callable[[fx.GraphModule, "PassContext"], PassResult]
    preserves_function: bool
    keeps_stage_values: bool = True


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    verified: str  # "none", "structure" or "structure+float64"
    verify_seconds: float = 0.0  # the checks after the pass (and the float64 run before it)
    verify_peak_bytes: int | None = None  # resident memory at its highest during those checks


@dataclass
class PassContext:
    """What passes read and record: the recipe, inputs, analyses, and per-layer results."""

    recipe: Recipe
    example_inputs: list[Any]
    calibration: list[list[Any]] = field(default_factory=list)
    analyses: dict[str, Any] = field(default_factory=dict)  # cached read-only analyses
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-layer report rows
    notes: list[str] = field(default_factory=list)  # model-level findings of passes, for the report
    pass_log: list[PassRecord] = field(default_factory=list)
    verify: bool = True
    dump_dir: Path | None = None
    progress: bool = True
    # the data-dependent choices (smoothing scales, precisions, rounded weights): recorded on
    # a model's first graph, replayed on its others (``qcompile.decisions``)
    decisions: Decisions = field(default_factory=lambda: Decisions(recording=False))

    def check_inputs(self) -> list[list[Any]]:
        """The inputs the float64 check runs on: the example plus up to two calibration
        batches (a batch equal to the example, as when the example is the first calibration
        batch, is checked once)."""
        sets = [self.example_inputs]
        for batch in self.calibration[:2]:
            if not any(_same_inputs(batch, other) for other in sets):
                sets.append(batch)
        return sets


def _same_inputs(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x is not y and (x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y)):
                return False
        elif x is not y and x != y:
            return False
    return True


def _count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def run_passes(gm: fx.GraphModule, passes: list[GraphPass], ctx: PassContext) -> fx.GraphModule:
    """Run ``passes`` in order, verifying after each; return the final graph."""
    dump_dir = ctx.dump_dir or (Path(os.environ["QCOMPILE_DUMP_DIR"]) if os.environ.get("QCOMPILE_DUMP_DIR") else None)
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        _dump(dump_dir / "00_captured.txt", gm)
    reference = None  # float64 runs of the current graph on ctx.check_inputs(), when known
    boundaries: list[StageBoundary] | None = None  # found once, on the first graph checked
    for index, graph_pass in enumerate(passes, start=1):
        check_function = ctx.verify and graph_pass.preserves_function
        verify_seconds, verify_peak = 0.0, None
        if check_function and reference is None:
            with PeakWatch() as watch:
                start = time.perf_counter()
                if boundaries is None:
                    boundaries = stage_boundaries(gm)
                reference = [float64_run(gm, inputs, [b.node for b in boundaries]) for inputs in ctx.check_inputs()]
                verify_seconds += time.perf_counter() - start
            verify_peak = watch.peak
        nodes_before = _count_nodes(gm)
        start = time.perf_counter()
        result = graph_pass.run(gm, ctx)
        seconds = time.perf_counter() - start
        gm = result.graph_module
        verified = "none"
        if ctx.verify:
            with PeakWatch() as watch:
                start = time.perf_counter()
                try:
                    check_structure(gm)
                    verified = "structure"
                    if check_function:
                        runs = check_equivalence(None, gm, ctx.check_inputs(), reference=reference,
                                                 boundaries=boundaries, locate=graph_pass.keeps_stage_values)
                        verified = "structure+float64"
                except VerificationError as exc:
                    unlocated = "" if graph_pass.keeps_stage_values or not check_function else (
                        " (the pass changes the values between stages by design, so no stage is named)")
                    raise VerificationError(f"pass {graph_pass.name!r} failed verification: {exc}{unlocated}") from exc
                verify_seconds += time.perf_counter() - start
            verify_peak = watch.peak if verify_peak is None else max(verify_peak, watch.peak or 0)
        # The next function-preserving pass starts from this graph: its float64 runs are
        # known, unless constants stood for exact values that are now forgotten.
        reference = runs if check_function and not has_exact_values(gm) else None
        drop_exact_values(gm)
        ctx.pass_log.append(PassRecord(graph_pass.name, seconds, nodes_before, _count_nodes(gm), result.modified,
                                       verified, verify_seconds, verify_peak))
        if dump_dir is not None:
            _dump(dump_dir / f"{index:02d}_{graph_pass.name}.txt", gm)
    return gm


def _dump(path: Path, gm: fx.GraphModule) -> None:
    path.write_text(gm.print_readable(print_output=False, include_stride=False, include_device=False))
