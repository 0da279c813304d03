"""Inductor fuses the W8A8 activation quantization with its neighbours once decomposed.

``passes/decompose_w8a8`` writes ``qcompile::linear_w8a8`` as ATen ops around
``torch._int_mm``; the generated code is inspected: the opaque op is gone, each linear
is one external integer matmul, and the norm, the abs-max, the rounding and the previous
linear's epilogue share one generated loop nest.
"""
from __future__ import annotations

import re

import torch
from torch._inductor.utils import run_and_get_code

import qcompile
from qcompile.passes.decompose_w8a8 import decompose_w8a8
from qcompile.pipeline import PassContext, run_passes
from qcompile.recipe import PRESETS

W8A8_ALPHA = {"preset": "w8a8", "smooth": "alpha", "smooth_alpha": 0.5}


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        self.fc1 = torch.nn.Linear(64, 96)
        self.fc2 = torch.nn.Linear(96, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def _kernels(code: str) -> int:
    return len(set(re.findall(r"cpp_fused_\w+", code)))



def test_decomposed_quantization_fuses_into_fewer_kernels():
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(4, 9, 64)
    calib = [(torch.randn(4, 9, 64),) for _ in range(2)]
    qm = qcompile.quantize(model, (x,), recipe=W8A8_ALPHA, calibration=calib, progress=False)
    flat = qm.captured.flatten_inputs((x,), {})
    opaque = qm.graph_module
    with torch.no_grad():
        want = opaque(*flat)[0]
        _, (opaque_code, *_) = run_and_get_code(torch.compile(opaque, dynamic=False), *flat)
    decomposed = run_passes(opaque, [decompose_w8a8], PassContext(PRESETS["w8a8"], flat, progress=False))
    torch._dynamo.reset()
    with torch.no_grad():
        got, (code, *_) = run_and_get_code(torch.compile(decomposed, dynamic=False), *flat)
    assert "qcompile.linear_w8a8" in opaque_code and "qcompile.linear_w8a8" not in code
    assert code.count("torch.ops.aten._int_mm") == 2 or code.count("aten._int_mm") >= 2
    names = sorted(set(re.findall(r"cpp_fused_\w+", code)))
    # one generated loop nest per activation: producer + smoothing + abs-max + rounding
    # (the norm for fc1, fc1's epilogue + GELU for fc2), and fc2's epilogue + the residual
    assert len(names) == 3, names
    assert any("native_layer_norm" in n and "amax" in n and "round" in n for n in names), names
    assert any("gelu" in n and "amax" in n and "round" in n for n in names), names
    assert _kernels(opaque_code) == 3  # the same loops, but each opaque op passes over memory again
    # compiled, float operations may be contracted: a code on a rounding boundary can move
    # by one step (one int8 step of one token ~ 1/127 of that token's range in one channel)
    err = float((got[0] - want).norm() / want.norm())
    assert err < 1e-3, err
