"""The pass manager: ordered passes over the canonical graph, verified after each one.

A pass is a function ``(gm, ctx) -> PassResult(gm, modified)`` wrapped in a
:class:`GraphPass` that says whether it preserves the model's function. After every pass
the manager runs the verifier (``qcompile.verify``): ``graph.lint()``, shape/dtype
metadata on every node, and for function-preserving passes a float64 equivalence check
against the graph as it was before the pass. A failure names the pass.

Per-pass wall time and node counts go into ``ctx.pass_log`` (and from there into the
report). With ``dump_dir`` set (or the environment variable ``QCOMPILE_DUMP_DIR``) the
readable graph is written after every pass as ``NN_<pass>.txt``.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.fx as fx

from .errors import VerificationError
from .recipe import Recipe
from .verify import check_equivalence, check_structure


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


@dataclass(frozen=True)
class GraphPass:
    """A named graph transform and whether it leaves the model's function unchanged."""

    name: str
    run: Callable[[fx.GraphModule, "PassContext"], PassResult]
    preserves_function: bool


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    verified: str  # "structure" or "structure+float64"


@dataclass
class PassContext:
    """What passes read and record: the recipe, inputs, analyses, and per-layer results."""

    recipe: Recipe
    example_inputs: list[Any]
    calibration: list[list[Any]] = field(default_factory=list)
    analyses: dict[str, Any] = field(default_factory=dict)  # cached read-only analyses
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-layer report rows
    pass_log: list[PassRecord] = field(default_factory=list)
    verify: bool = True
    dump_dir: Path | None = None
    progress: bool = True

    def check_inputs(self) -> list[list[Any]]:
        """The inputs the float64 check runs on: the example plus up to two calibration batches."""
        return [self.example_inputs, *self.calibration[:2]]


def _count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def run_passes(gm: fx.GraphModule, passes: list[GraphPass], ctx: PassContext) -> fx.GraphModule:
    """Run ``passes`` in order, verifying after each; return the final graph."""
    dump_dir = ctx.dump_dir or (Path(os.environ["QCOMPILE_DUMP_DIR"]) if os.environ.get("QCOMPILE_DUMP_DIR") else None)
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        _dump(dump_dir / "00_captured.txt", gm)
    for index, graph_pass in enumerate(passes, start=1):
        before = copy.deepcopy(gm) if (ctx.verify and graph_pass.preserves_function) else None
        nodes_before = _count_nodes(gm)
        start = time.perf_counter()
        result = graph_pass.run(gm, ctx)
        seconds = time.perf_counter() - start
        gm = result.graph_module
        verified = "none"
        if ctx.verify:
            try:
                check_structure(gm)
                verified = "structure"
                if before is not None:
                    check_equivalence(before, gm, ctx.check_inputs())
                    verified = "structure+float64"
            except VerificationError as exc:
                raise VerificationError(f"pass {graph_pass.name!r} failed verification: {exc}") from exc
        ctx.pass_log.append(
            PassRecord(graph_pass.name, seconds, nodes_before, _count_nodes(gm), result.modified, verified)
        )
        if dump_dir is not None:
            _dump(dump_dir / f"{index:02d}_{graph_pass.name}.txt", gm)
    return gm


def _dump(path: Path, gm: fx.GraphModule) -> None:
    path.write_text(gm.print_readable(print_output=False, include_stride=False, include_device=False))
