"""Calibration analyses: statistics of each linear's input over a set of batches.

Read-only: runs the graph with an ``fx.Interpreter`` and hands each quantizable
linear's input to accumulators; nothing is written into the graph. Statistics are
accumulated batch by batch (only running sums are kept, never all activations), so the
same code can later stream block by block or reduce across processes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Callable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .capture import CapturedGraph
from .errors import CalibrationError, InputMismatchError
from .graph_utils import layer_name, linear_weight, quantizable_linears

__all__ = [
    "LinearHook",
    "LinearInputInterpreter",
    "LinearStats",
    "CalibrationStats",
    "normalize_batch",
    "flatten_calibration",
    "collect_linear_stats",
    "collect_input_samples",
]

LinearHook = Callable[[fx.Node, torch.Tensor, torch.Tensor], None]


class LinearInputInterpreter(fx.Interpreter):
    """Runs a graph and calls ``hook(node, x, output)`` at every watched linear."""

    def __init__(self, gm: fx.GraphModule, watched: set[fx.Node], hook: LinearHook):
        super().__init__(gm)
        self.watched = watched
        self.hook = hook

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.watched:
            self.hook(n, self.env[n.args[0]], result)
        return result


@dataclass
class LinearStats:
    """Running statistics of one linear's input (last dimension = in-features)."""

    absmax: torch.Tensor
    tokens: int = 0
    hessian: torch.Tensor | None = None  # Σ x xᵀ in float64
    abs_sum: torch.Tensor | None = None  # Σ |x| per channel in float64
    sq_sum: torch.Tensor | None = None  # Σ x² per channel in float64

    @property
    def mean_square(self) -> torch.Tensor:
        """Mean x² per channel over the calibration tokens (float32)."""
        if self.sq_sum is None or self.tokens == 0:
            return torch.zeros_like(self.absmax)
        return (self.sq_sum / self.tokens).float()

    @property
    def absmean(self) -> torch.Tensor:
        """Mean |x| per channel over the calibration tokens (float32)."""
        if self.abs_sum is None or self.tokens == 0:
            return torch.zeros_like(self.absmax)
        return (self.abs_sum / self.tokens).float()

    def update(self, x: torch.Tensor, with_hessian: bool) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        magnitude = flat.abs()
        self.absmax = torch.maximum(self.absmax, magnitude.amax(dim=0).float())
        column_sum = magnitude.sum(dim=0, dtype=torch.float64)
        self.abs_sum = column_sum if self.abs_sum is None else self.abs_sum + column_sum
        square_sum = flat.double().pow(2).sum(dim=0)
        self.sq_sum = square_sum if self.sq_sum is None else self.sq_sum + square_sum
        self.tokens += flat.shape[0]
        if with_hessian:
            f64 = flat.double()
            update = f64.T @ f64
            if self.hessian is None:
                self.hessian = update
            else:  # in place: the same sum, without a third [K, K] float64 matrix
                self.hessian.add_(update)


@dataclass
class CalibrationStats:
    """Per-layer input statistics, keyed by layer name."""

    layers: dict[str, LinearStats] = field(default_factory=dict)
    batches: int = 0


def normalize_batch(batch: Any) -> tuple[tuple, dict]:
    """A calibration entry as ``(args, kwargs)``: a tuple/list of args, a mapping of kwargs, or one tensor."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise CalibrationError(
        f"a calibration entry must be a tuple of positional args, a dict of keyword args, or a tensor; "
        f"got {type(batch).__name__}"
    )


def flatten_calibration(captured: CapturedGraph, calibration: Iterable[Any] | None) -> list[list[Any]]:
    """Check every calibration batch against the captured inputs and flatten it."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise CalibrationError(
            "calibration must be an iterable of batches (e.g. a list of dicts from a tokenizer), "
            f"not a single {type(calibration).__name__}; wrap a single batch in a list"
        )
    flat_batches = []
    for i, batch in enumerate(calibration):
        args, kwargs = normalize_batch(batch)
        try:
            flat = captured.flatten_inputs(args, kwargs)
        except InputMismatchError as exc:
            raise CalibrationError(f"calibration batch {i} does not match the example inputs: {exc}") from exc
        for path, value in zip(captured.input_paths, flat):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise CalibrationError(f"calibration batch {i}, input {path}: {bad} NaN/Inf value(s)")
        flat_batches.append(flat)
    if not flat_batches:
        raise CalibrationError("calibration is empty: give at least one batch, or calibration=None")
    return flat_batches


def collect_linear_stats(
    gm: fx.GraphModule, batches: list[list[Any]], *, hessian: bool = False, progress: bool = True,
    group: Any = None,
) -> CalibrationStats:
    """Abs-max (and optionally Σ xxᵀ) of every quantizable linear's input over ``batches``.

    With a ``torch.distributed`` process ``group``, ``batches`` are this rank's share and
    the statistics are reduced over the group (``qcompile.distributed.all_reduce_stats``).
    """
    linears = quantizable_linears(gm)
    names = {node: layer_name(node) for node in linears}
    stats = CalibrationStats()
    for node in linears:
        stats.layers[names[node]] = LinearStats(absmax=torch.zeros(linear_weight(gm, node).shape[1]))

    def hook(node: fx.Node, x: torch.Tensor, _out: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise CalibrationError(f"the input of layer {names[node]} holds NaN/Inf during calibration")
        stats.layers[names[node]].update(x, hessian)

    interp = LinearInputInterpreter(gm, set(linears), hook)
    with torch.no_grad():
        for flat in tqdm(batches, desc="calibrating", unit="batch", disable=not progress, leave=False):
            interp.run(*flat)
            stats.batches += 1
    if group is not None:
        from .distributed import all_reduce_stats  # noqa: PLC0415  (distributed imports this module)

        all_reduce_stats(stats, group, hessian=hessian)
    return stats


def collect_input_samples(
    gm: fx.GraphModule, batches: list[list[Any]], nodes: list[fx.Node], *, max_rows: int = 2048,
    seed: int = 0, progress: bool = True,
) -> dict[fx.Node, torch.Tensor]:
    """Up to ``max_rows`` rows (tokens) of each linear's input, drawn uniformly from every batch.

    Rows are drawn with a seeded generator, so a run is reproducible. Returns float32
    ``[rows, K]`` per node.
    """
    per_batch = max(1, -(-max_rows // max(len(batches), 1)))
    generator = torch.Generator().manual_seed(seed)
    chunks: dict[fx.Node, list[torch.Tensor]] = {node: [] for node in nodes}

    def hook(node: fx.Node, x: torch.Tensor, _out: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        if not torch.isfinite(flat).all():
            raise CalibrationError(f"the input of layer {layer_name(node)} holds NaN/Inf during calibration")
        take = torch.randperm(flat.shape[0], generator=generator)[:per_batch]
        chunks[node].append(flat[take].float())

    interp = LinearInputInterpreter(gm, set(nodes), hook)
    with torch.no_grad():
        for flat in tqdm(batches, desc="sampling activations", unit="batch", disable=not progress, leave=False):
            interp.run(*flat)
    return {node: torch.cat(parts)[:max_rows] for node, parts in chunks.items()}
