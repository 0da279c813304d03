"""``passes/decompose_w8a8`` merges sibling W8A8 linears into one integer matmul.

Linears that read the same activation with the same smoothing vector (and dynamic
per-token scales) quantize it to the same codes, so the decomposition runs them as one
``torch._int_mm`` against their concatenated weights and slices the result. The merge
must not change a bit of the eager result; with static per-linear activation scales
nothing merges.
"""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.passes.decompose_w8a8 import decompose_w8a8
from qcompile.pipeline import PassContext, run_passes
from qcompile.recipe import PRESETS

aten = torch.ops.aten
ops = torch.ops.qcompile


class _Siblings(torch.nn.Module):
    """Three linears of odd widths on one normalized input (one without a bias), and a
    fourth that reads the first one's output (not a sibling)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(9)
        self.a = torch.nn.Linear(9, 5)
        self.b = torch.nn.Linear(9, 7, bias=False)
        self.c = torch.nn.Linear(9, 3)
        self.d = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return torch.cat([self.d(self.a(h)), self.b(h), self.c(h)], dim=-1)


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset, matmuls", [("w8a8", 2), ("w8a8-static", 4)])
def test_siblings_share_one_matmul_and_the_same_bits(dtype, preset, matmuls):
    torch.manual_seed(0)
    model = _Siblings().eval().to(dtype)
    x = torch.randn(3, 11, 9, dtype=dtype)
    calib = [(torch.randn(3, 11, 9, dtype=dtype),) for _ in range(2)]
    recipe = {"preset": preset, "smooth": "alpha", "smooth_alpha": 0.5}
    qm = qcompile.quantize(model, (x,), recipe=recipe, calibration=calib, progress=False)
    opaque = qm.graph_module
    assert _count(opaque, ops.linear_w8a8.default) == 4
    flat = qm.captured.flatten_inputs((x,), {})
    others = [qm.captured.flatten_inputs((torch.randn(2, 5, 9, dtype=dtype),), {}), flat]
    with torch.no_grad():
        want = [opaque(*inputs)[0] for inputs in others]
    gm = run_passes(opaque, [decompose_w8a8], PassContext(PRESETS[preset], flat, verify=True, progress=False))
    assert _count(gm, ops.linear_w8a8.default) == 0
    # dynamic: a, b and c share one matmul (N = 5 + 7 + 3), d has its own; static: each
    # linear has its own calibrated activation scale, so their codes differ and none merge
    assert _count(gm, aten._int_mm.default) == matmuls
    widths = sorted(n.meta["val"].shape[-1] for n in gm.graph.nodes
                    if n.op == "call_function" and n.target == aten._int_mm.default)
    assert widths == ([4, 15] if matmuls == 2 else [3, 4, 5, 7])
    with torch.no_grad():
        for inputs, expected in zip(others, want):
            got = gm(*inputs)[0]
            assert got.dtype == dtype and got.shape == expected.shape
            # the same integer matmul and float32 epilogue per element: identical bits
            assert torch.equal(got, expected)
