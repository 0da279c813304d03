"""The Pareto frontier of a budget recipe's precision choice: least Σ Ω against one budget.

``passes/assign_precision.py`` keeps its whole problem in the report (``report.precision``):
the sensitivity table, the cost tables of the budget's limits, which formats each layer may
take and the activation-width ties. :func:`pareto_frontier` re-solves that problem for a
sweep of limits of one budget (by default the recipe's first: average bits, bytes, BOPs or
latency) from the cheapest to the most expensive assignment, without the other limits;
:func:`plot_frontier` draws it with the recipe's own choice marked (matplotlib, optional
dependency: ``pip install "qcompile[plot]"``).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QcompileError, RecipeError
from .precision_ilp import BudgetConstraint, budget_sweep

__all__ = ["Frontier", "pareto_frontier", "plot_frontier"]

UNITS = {"avg_bits": "average bits per weight", "bytes": "weight bytes", "bops": "bit operations",
         "latency_ms": "roofline latency (ms)"}


@dataclass(frozen=True)
class Frontier:
    """``points``: ``(limit, least Σ Ω or None if infeasible, total used or None)`` in the
    budget's unit; ``chosen``: the recipe's own ``(total used, Σ Ω)``."""

    budget: str
    method: str
    points: list[tuple[float, float | None, float | None]]
    chosen: tuple[float, float]

    @property
    def unit(self) -> str:
        return UNITS.get(self.budget, self.budget)


def pareto_frontier(problem: dict[str, Any] | None, points: int, budget: str | None = None) -> Frontier:
    """Sweep ``points`` limits of ``budget`` (default: the recipe's first) over the range
    its totals can take. ``problem`` is ``report.precision``."""
    if problem is None:
        raise RecipeError("a Pareto frontier needs a recipe with a budget (e.g. --recipe auto)")
    if points < 2:
        raise ValueError(f"a frontier needs at least 2 points, got {points}")
    constraints: list[BudgetConstraint] = problem["constraints"]
    names = [c.name for c in constraints]
    name = budget or names[0]
    if name not in names:
        raise RecipeError(f"the recipe's budget has no {name!r} limit; it has {names}")
    con = constraints[names.index(name)]
    allowed = problem["allowed"]
    lo = float(con.costs.min(1, where=allowed, initial=np.inf).sum() * con.scale)
    hi = float(con.costs.max(1, where=allowed, initial=-np.inf).sum() * con.scale)
    limits = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    sweep = budget_sweep(problem["sensitivity"].omega, con, limits, allowed, problem.get("ties", ()),
                         problem.get("tie_classes"))
    assignment = problem["assignment"]
    return Frontier(name, problem["sensitivity"].method, sweep, (assignment.totals[name], assignment.objective))


def plot_frontier(frontier: Frontier, path: str | os.PathLike) -> Path:
    """Save the frontier as a PNG at ``path`` (written atomically: a temporary file in the
    same folder, renamed). Raises QcompileError when matplotlib is missing or the folder does
    not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise QcompileError(f"{path}: folder {path.parent} does not exist")
    try:
        import matplotlib  # noqa: PLC0415  (optional dependency)

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise QcompileError('plotting the frontier needs matplotlib: pip install "qcompile[plot]"') from exc
    feasible = [(used, obj) for _, obj, used in frontier.points if obj is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    try:
        if feasible:
            xs, ys = zip(*feasible)
            ax.step(xs, ys, where="post", marker="o", markersize=3, label="least Σ Ω (ILP)")
        ax.plot(*frontier.chosen, marker="*", markersize=12, linestyle="none", color="C3", label="recipe's choice")
        ax.set_xlabel(frontier.unit)
        ax.set_ylabel(f"Σ Ω ({frontier.method} sensitivity)")
        ax.set_yscale("log" if feasible and min(ys) > 0 else "linear")
        ax.set_title("Per-layer precision: Pareto frontier")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path
