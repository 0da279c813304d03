"""canonicalize: every matmul with a constant weight becomes aten.linear, verified in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qcompile.capture import capture
from qcompile.graph_utils import get_constant, layer_name, quantizable_linears
from qcompile.passes.canonicalize import canonicalize
from qcompile.pipeline import PassContext, run_passes
from qcompile.recipe import PRESETS
from qcompile.testing import count_ops
from tests.models.zoo import ARCHITECTURES


def _canonical(model, args, kwargs=None):
    cap = capture(model, args, kwargs or {})
    flat = cap.flatten_inputs(args, kwargs or {})
    ctx = PassContext(PRESETS["w8a16"], flat)
    gm = run_passes(cap.graph_module, [canonicalize], ctx)
    return gm, ctx


class MatmulForms(nn.Module):
    """Every spelling of x @ W that models use."""

    def __init__(self):
        super().__init__()
        self.w_kn = nn.Parameter(torch.randn(24, 40))  # [K, N], GPT-2 Conv1D layout
        self.w_nk = nn.Parameter(torch.randn(40, 24))  # [N, K], nn.Linear layout
        self.b = nn.Parameter(torch.randn(40))

    def forward(self, x):
        flat = x.reshape(-1, 24)
        a = torch.addmm(self.b, flat, self.w_kn)  # Conv1D
        b = torch.addmm(self.b, flat, self.w_nk.t())
        c = torch.mm(flat, self.w_nk.t())
        d = x @ self.w_kn  # matmul on 3-D input
        e = nn.functional.linear(x, self.w_kn.t(), self.b)  # linear of a transposed constant
        act = x @ x.transpose(-1, -2)  # activation x activation: not a linear
        return a, b, c, d, e, act


def test_all_matmul_forms_become_linear_and_stay_exact():
    model = MatmulForms()
    x = torch.randn(3, 7, 24)
    gm, ctx = _canonical(model, (x,))
    ops = count_ops(gm)
    assert ops["aten.linear"] == 5
    assert "aten.addmm" not in ops and "aten.mm" not in ops
    assert ops.get("aten.matmul", 0) == 1  # the activation x activation product is left alone
    assert ctx.pass_log[0].verified == "structure+float64" and ctx.pass_log[0].modified
    for node in quantizable_linears(gm):
        weight = get_constant(gm, node.args[1])
        assert tuple(weight.shape) == (40, 24)  # [N, K]
    # the pass manager already checked float64 equivalence; check float32 outputs on new shapes too
    x2 = torch.randn(2, 5, 24)
    for got, ref in zip(gm(x2), model(x2)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # fp32 GEMMs in a different order


def test_gpt2_conv1d_becomes_linear_fed_by_layer_norm():
    entry = ARCHITECTURES["gpt2"]
    model = entry.build(0)
    args, kwargs = entry.inputs(0)
    gm, _ = _canonical(model, args, kwargs)
    ops = count_ops(gm)
    assert "aten.addmm" not in ops
    linears = quantizable_linears(gm)
    names = [layer_name(n) for n in linears]
    assert len(linears) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp.c_proj per block + lm_head
    for node in linears:
        producer = node.args[0]
        while producer.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
            producer = producer.args[0]
        if layer_name(node).endswith("attn.c_attn") or layer_name(node).endswith("mlp.c_fc"):
            assert producer.target == torch.ops.aten.layer_norm.default, (layer_name(node), producer)
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" in names


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "opt"])
def test_projections_reading_one_activation_share_the_node(name):
    entry = ARCHITECTURES[name]
    model = entry.build(0)
    args, kwargs = entry.inputs(0)
    gm, _ = _canonical(model, args, kwargs)
    readers: dict = {}
    for node in quantizable_linears(gm):
        readers.setdefault(node.args[0], []).append(layer_name(node))
    shared = [sorted(v) for v in readers.values() if len(v) > 1]
    # q/k/v read one normalized activation in every block (Phi-3 fuses them into qkv_proj,
    # and gate/up into gate_up_proj, so nothing is shared there)
    if name == "phi3":
        assert shared == []
    else:
        assert len(shared) >= 2
        for group in shared:
            assert any("q_proj" in n for n in group) or any("gate_proj" in n for n in group)
