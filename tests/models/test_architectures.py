"""Every zoo architecture, unchanged code, through qcompile.quantize and torch.compile(backend="qcompile").

The graph finds the linears (no module-name tables); the report's layer names are checked
against the model's own modules only to prove that every linear was found, and nothing else.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import qcompile
from qcompile.graph_utils import QWEIGHT_META
from qcompile.quantizers import dequantize_weight
from qcompile.testing import count_ops, relative_error
from tests.models.zoo import ARCHITECTURES, linear_in_features

NAMES = sorted(ARCHITECTURES)

# The CPU kernels compute with bfloat16 activations ("a16"): each rounding of an
# activation to bf16 is off by up to 2^-9 relative, a layer rounds a few times, and two
# blocks plus the head compound it; 3% relative is several times what that gives and far
# below what a wrong scale, zero point or packing order gives (order 1).
BF16_ACTIVATION_RTOL = 3e-2


def _fake_quantized(model: torch.nn.Module, qm: qcompile.QuantizedModel) -> torch.nn.Module:
    """A float copy of the model whose linear weights are the dequantized quantized weights."""
    ref = copy.deepcopy(model)
    qweights = {
        row["layer"]: n.meta[QWEIGHT_META]
        for n in qm.graph_module.graph.nodes
        if QWEIGHT_META in n.meta
        for row in qm.report().layers
        if row.get("node") == n.name
    }
    for name, qw in qweights.items():
        module = ref.get_submodule(name)
        weight = dequantize_weight(qw)
        # a new Parameter, so a tied embedding keeps its float weight, as in the quantized graph
        module.weight = torch.nn.Parameter(weight.t().contiguous() if isinstance(module, Conv1D) else weight)
    return ref


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16"])
@pytest.mark.parametrize("name", NAMES)
def test_quantize(quantized_zoo, name, recipe):
    entry = ARCHITECTURES[name]
    model = entry.build(0)
    qm = quantized_zoo(name, recipe)  # qcompile.quantize(entry.build(0), *entry.inputs(0), recipe=recipe)

    linears = linear_in_features(model)
    ops = count_ops(qm)
    op = f"qcompile.linear_{recipe}"
    assert ops.get(op, 0) == len(linears), ops
    assert "aten.linear" not in ops and "aten.addmm" not in ops
    report = qm.report()
    assert sorted(r["layer"] for r in report.layers) == sorted(linears)
    group = qcompile.PRESETS[recipe].group_size
    for row in report.layers:
        k = linears[row["layer"]]
        if group and k % group:
            assert "per-channel" in row["format"] and "not divisible" in row["note"]
        assert 0 <= row["output_error"] < (0.02 if recipe == "w8a16" else 0.25)

    # another batch size and sequence length than the example's
    args2, kwargs2 = entry.other_inputs(1)
    with torch.no_grad():
        got = qm(*args2, **kwargs2)
        ref = model(*args2, **kwargs2)
        fake = _fake_quantized(model, qm)(*args2, **kwargs2)
    assert type(got) is type(ref)
    assert relative_error(fake, got) < BF16_ACTIVATION_RTOL
    # and against the float model: INT8 moves these random-weight models by ~1%, INT4 by ~10-25%
    assert relative_error(ref, got) < (0.05 if recipe == "w8a16" else 0.4)


# Dynamo's capture against torch.export's, one architecture of each structural kind (each
# compile costs ~6 s; quantize itself runs on every architecture above): RMSNorm + gated MLP
# + GQA, fused qkv / gate_up, Conv1D weights, parallel residual, post-LN encoder, vision.
BACKEND_NAMES = ["llama", "phi3", "gpt2", "gpt_neox", "bert", "vit"]


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_torch_compile_backend_converges_with_quantize(quantized_zoo, name):
    entry = ARCHITECTURES[name]
    model = entry.build(0)
    args, kwargs = entry.inputs(0)
    reports = []
    compiled = torch.compile(model, backend="qcompile", options={"inner": "eager", "on_report": reports.append})
    qm = quantized_zoo(name, "w8a16")  # the same model and example, quantized by qcompile.quantize
    with torch.no_grad():
        got = compiled(*args, **kwargs)
        expected = qm(*args, **kwargs)
    assert type(got) is type(expected)
    # one canonical graph and the same quantized weights: both paths compute the same thing
    assert relative_error(expected, got) < 1e-5
    assert len(reports) == 1
    # same layers (a tied head may be named after the embedding it shares a tensor with:
    # Dynamo passes one placeholder for both)
    assert sorted(r["shape"] for r in reports[0].layers) == sorted(r["shape"] for r in qm.report().layers)


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_torch_compile_backend_follows_new_shapes(name):
    entry = ARCHITECTURES[name]
    model = entry.build(0)
    compiled = torch.compile(model, backend="qcompile", options={"inner": "eager"})
    with torch.no_grad():
        for make in (entry.inputs, entry.other_inputs):
            args, kwargs = make(2)
            assert relative_error(model(*args, **kwargs), compiled(*args, **kwargs)) < 0.05
