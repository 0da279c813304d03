"""Per-layer format choice as an integer linear program: pure numerics, no graphs.

Given ``omega[l, c]`` (sensitivity of layer ``l`` to candidate ``c``) and budgets
``Σ_l cost_k[l, c_l] ≤ limit_k``, choose one candidate per layer minimizing ``Σ_l
omega[l, c_l]``. Variables are one-hot binaries ``x[l, c]`` (``Σ_c x[l, c] = 1``);
candidates a layer may not take (pinned layers, formats that do not apply) have upper bound
0; tie groups force their layers to the same candidate (``x[a, c] = x[b, c]``) or, with
``tie_classes`` (a class per candidate, e.g. its activation format), to candidates of the
same class (``Σ_{c ∈ k} x[a, c] = Σ_{c ∈ k} x[b, c]`` for every class ``k``). Solved by
``scipy.optimize.milp`` (HiGHS branch and cut) to within a relative optimality gap
(``mip_rel_gap``, HiGHS's default 1e-4; 0 proves the exact optimum) or a time limit, after
which the best assignment found is used and :attr:`Assignment.gap` says how far from proven
optimal it may be.

Budgets are never exceeded: every constraint row is scaled to a right-hand side of 1, and
the rounded solution's totals are checked against the limits (to within a relative
:data:`LIMIT_RTOL` = 1e-12, the rounding of converting a budget between units, e.g. average
bits to total bits; far below one byte or one bit of any real total); if the solver's
feasibility tolerance let a total slip past its limit, the problem is solved again with that
limit tightened. An infeasible problem raises
:class:`BudgetInfeasibleError` naming, for each budget, the smallest value that is feasible
with the other budgets as given.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .errors import RecipeError

LIMIT_RTOL = 1e-12

__all__ = ["LIMIT_RTOL", "budget_sweep", "BudgetConstraint", "Assignment", "BudgetInfeasibleError", "solve_assignment"]


class BudgetInfeasibleError(RecipeError):
    """No assignment of formats meets the budget(s); the message gives the smallest feasible value."""

    def __init__(self, message: str, smallest: dict[str, float | None]):
        super().__init__(message)
        self.smallest = smallest


@dataclass(frozen=True)
class BudgetConstraint:
    """``Σ_l costs[l, c_l] ≤ limit``; ``scale`` converts a total into the budget's unit
    (e.g. total bits -> average bits) for messages: ``value = total * scale``."""

    name: str
    costs: np.ndarray
    limit: float
    scale: float = 1.0

    def total(self, choice: np.ndarray) -> float:
        return float(self.costs[np.arange(len(choice)), choice].sum())

    def exceeded(self, total: float) -> bool:
        return total > self.limit + LIMIT_RTOL * abs(self.limit)


@dataclass(frozen=True)
class Assignment:
    """The chosen candidate per layer, its objective, the budgets' totals, the solve time and
    the relative gap to the solver's lower bound (0: proven optimal)."""

    choice: np.ndarray
    objective: float
    totals: dict[str, float]
    seconds: float
    gap: float = 0.0


def _tie_rows(ties, tie_classes, layers: int, cands: int) -> list[np.ndarray]:
    """Equality rows (right-hand side 0) tying each group's layers' candidate classes."""
    classes = np.arange(cands) if tie_classes is None else np.asarray(tie_classes)
    kinds = np.unique(classes)
    rows = []
    for group in ties:
        for a, b in zip(group[:-1], group[1:]):
            tie = np.zeros((len(kinds), layers * cands))
            for r, kind in enumerate(kinds):
                members = np.flatnonzero(classes == kind)
                tie[r, a * cands + members], tie[r, b * cands + members] = 1.0, -1.0
            rows.append(tie)
    return rows


def _solve(omega, constraints, allowed, ties, shrink, options=None, tie_classes=None):
    layers, cands = omega.shape
    n = layers * cands
    rows, lo, hi = [], [], []
    onehot = np.zeros((layers, n))
    for l in range(layers):
        onehot[l, l * cands:(l + 1) * cands] = 1.0
    rows.append(onehot), lo.append(np.ones(layers)), hi.append(np.ones(layers))
    for k, con in enumerate(constraints):
        limit = con.limit
        row = con.costs.reshape(1, n) / (abs(limit) if limit else 1.0)
        rhs = (limit / (abs(limit) if limit else 1.0)) * (1 + LIMIT_RTOL) - shrink[k]
        rows.append(row), lo.append(np.array([-np.inf])), hi.append(np.array([rhs]))
    for tie in _tie_rows(ties, tie_classes, layers, cands):
        rows.append(tie), lo.append(np.zeros(len(tie))), hi.append(np.zeros(len(tie)))
    constraint = LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi))
    upper = allowed.reshape(n).astype(float)
    return milp(omega.reshape(n), constraints=constraint, integrality=np.ones(n), bounds=Bounds(np.zeros(n), upper),
                options=options)


def _feasible_minimum(constraint_index, omega, constraints, allowed, ties, tie_classes) -> float | None:
    """The least total of constraint ``constraint_index`` subject to the others (None if none)."""
    others = [c for i, c in enumerate(constraints) if i != constraint_index]
    target = constraints[constraint_index]
    result = _solve(target.costs, others, allowed, ties, [0.0] * len(others), tie_classes=tie_classes)
    if result.status != 0:
        return None
    choice = _choice(result.x, omega.shape)
    return target.total(choice)


def _choice(x: np.ndarray, shape) -> np.ndarray:
    return np.round(x).reshape(shape).argmax(axis=1)


def solve_assignment(
    omega: np.ndarray,
    constraints: list[BudgetConstraint],
    allowed: np.ndarray | None = None,
    ties: list[list[int]] = (),
    *,
    tie_classes: np.ndarray | None = None,
    mip_rel_gap: float = 1e-4,
    time_limit: float | None = None,
) -> Assignment:
    """Minimize ``Σ omega[l, c_l]`` under ``constraints`` (see the module docstring).

    Args:
        omega: ``[L, C]`` finite sensitivities.
        constraints: budgets, each with costs ``[L, C]``.
        allowed: boolean ``[L, C]``; default all.
        ties: groups of layer indices that must take the same candidate, or with
            ``tie_classes`` candidates of the same class.
        tie_classes: ``[C]`` class label per candidate (default: each its own class).
        mip_rel_gap: stop when the objective is proven within this relative gap of optimal.
        time_limit: seconds; then the best feasible assignment found is returned (with its
            gap), or a RuntimeError if none was found.
    """
    start = time.perf_counter()
    omega = np.asarray(omega, dtype=float)
    if omega.ndim != 2 or not np.isfinite(omega).all():
        raise ValueError(f"omega must be a finite [layers, candidates] array, got shape {omega.shape}")
    allowed = np.ones(omega.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if allowed.shape != omega.shape:
        raise ValueError(f"allowed has shape {allowed.shape}, omega {omega.shape}")
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        raise ValueError(f"layer(s) {empty.tolist()} have no allowed candidate")
    for con in constraints:
        if con.costs.shape != omega.shape or not np.isfinite(con.costs).all():
            raise ValueError(f"budget {con.name!r}: costs must be a finite array shaped like omega {omega.shape}")
    if tie_classes is not None and np.asarray(tie_classes).shape != (omega.shape[1],):
        raise ValueError(f"tie_classes must hold one class per candidate ({omega.shape[1]}), "
                         f"got shape {np.asarray(tie_classes).shape}")
    shrink = [0.0] * len(constraints)
    options = {"mip_rel_gap": mip_rel_gap, **({"time_limit": time_limit} if time_limit is not None else {})}
    for _ in range(6):
        result = _solve(omega, constraints, allowed, ties, shrink, options, tie_classes)
        if result.status == 2:  # infeasible
            raise _infeasible(omega, constraints, allowed, ties, tie_classes)
        if result.status not in (0, 1) or result.x is None:  # 1: time limit, with a feasible point
            raise RuntimeError(f"the precision ILP did not solve: {result.message}")
        choice = _choice(result.x, omega.shape)
        over = [k for k, con in enumerate(constraints) if con.exceeded(con.total(choice))]
        if not over:
            totals = {con.name: con.total(choice) * con.scale for con in constraints}
            objective = float(omega[np.arange(len(choice)), choice].sum())
            gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
            return Assignment(choice, objective, totals, time.perf_counter() - start, gap)
        for k in over:  # the solver's feasibility tolerance let a total past its limit: tighten
            shrink[k] = max(shrink[k] * 10, 1e-9)
    raise RuntimeError("the precision ILP kept exceeding a budget by the solver's tolerance")


def _infeasible(omega, constraints, allowed, ties, tie_classes) -> BudgetInfeasibleError:
    smallest: dict[str, float | None] = {}
    parts = []
    for k, con in enumerate(constraints):
        least = _feasible_minimum(k, omega, constraints, allowed, ties, tie_classes)
        if least is None:
            smallest[con.name] = None
            continue
        value = least * con.scale
        smallest[con.name] = value
        if con.exceeded(least):
            parts.append(f"{con.name} = {con.limit * con.scale:.6g} is below the smallest feasible {con.name} "
                         f"{_round_up(value)}" + (" (with the other budgets as given)" if len(constraints) > 1 else ""))
    if not parts:
        parts.append("the budgets cannot be met together: smallest feasible values one at a time: " + ", ".join(
            f"{name} {_round_up(value)}" if value is not None else f"{name} (none)" for name, value in smallest.items()))
    return BudgetInfeasibleError("infeasible precision budget: " + "; ".join(parts), smallest)


def _round_up(value: float, digits: int = 6) -> str:
    """``value`` to ``digits`` significant digits, rounded up (so the number shown is feasible)."""
    if value <= 0:
        return f"{value:.{digits}g}"
    exponent = math.floor(math.log10(value)) - digits + 1
    up = math.ceil(value / 10.0**exponent - 1e-9) * 10.0**exponent
    return f"{up:.{digits}g}"


def budget_sweep(
    omega: np.ndarray, constraint: BudgetConstraint, values: list[float], allowed: np.ndarray | None = None,
    ties: list[list[int]] = (), tie_classes: np.ndarray | None = None,
) -> list[tuple[float, float | None, float | None]]:
    """The Pareto frontier of Σ Ω against one budget: for each limit in ``values`` (in the
    budget's unit, e.g. average bits), ``(value, least Σ Ω, total used in the unit)``, with
    None where the limit is infeasible."""
    out = []
    for value in values:
        con = BudgetConstraint(constraint.name, constraint.costs, value / constraint.scale, constraint.scale)
        try:
            result = solve_assignment(omega, [con], allowed, ties, tie_classes=tie_classes)
        except BudgetInfeasibleError:
            out.append((value, None, None))
            continue
        out.append((value, result.objective, result.totals[con.name]))
    return out
