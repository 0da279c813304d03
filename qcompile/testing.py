"""Helpers for users' own tests of quantized graphs."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .graph_utils import op_name

__all__ = ["count_ops", "assert_op_counts", "output_tensors", "relative_error", "assert_close_to_float"]


def _graph_module(obj: Any) -> fx.GraphModule:
    gm = getattr(obj, "graph_module", obj)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"expected a torch.fx.GraphModule or a QuantizedModel, got {type(obj).__name__}")
    return gm


def count_ops(gm: Any) -> dict[str, int]:
    """Calls per op in a graph, e.g. ``{"qcompile.linear_w4a16": 14, "aten.gelu": 6}``."""
    counts = Counter(
        op_name(n.target) for n in _graph_module(gm).graph.nodes if n.op == "call_function"
    )
    return dict(sorted(counts.items()))


def assert_op_counts(gm: Any, expected: Mapping[str, int]) -> None:
    """Assert the graph calls each named op exactly the given number of times (0 = absent)."""
    counts = count_ops(gm)
    wrong = {op: (n, counts.get(op, 0)) for op, n in expected.items() if counts.get(op, 0) != n}
    if wrong:
        lines = "\n".join(f"  {op}: expected {n}, found {got}" for op, (n, got) in sorted(wrong.items()))
        raise AssertionError(f"op counts differ:\n{lines}\nall ops: {counts}")


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (any pytree, incl. HF ModelOutput)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(reference: Any, actual: Any) -> float:
    """max over output tensors of ‖actual − reference‖ / ‖reference‖ (in float64)."""
    ref, got = output_tensors(reference), output_tensors(actual)
    if len(ref) != len(got):
        raise AssertionError(f"outputs differ in number of tensors: {len(ref)} vs {len(got)}")
    worst = 0.0
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            raise AssertionError(f"output shapes differ: {tuple(r.shape)} vs {tuple(g.shape)}")
        r64, g64 = r.detach().double(), g.detach().double()
        worst = max(worst, float((g64 - r64).norm() / r64.norm().clamp_min(1e-300)))
    return worst


def assert_close_to_float(model: Any, quantized: Any, *args: Any, rtol: float, **kwargs: Any) -> float:
    """Run both models on the same inputs; assert the relative output error is at most ``rtol``."""
    with torch.no_grad():
        err = relative_error(model(*args, **kwargs), quantized(*args, **kwargs))
    if not err <= rtol:
        raise AssertionError(f"quantized output differs from float by {err:.3e} (relative), allowed {rtol:.3e}")
    return err
