"""What every zoo architecture is checked for, shared by test_architectures.py (the core zoo)
and the wider zoo's test_zoo_*.py files: ``qcompile.quantize`` (the session fixture
``quantized_zoo``, tests/conftest.py), ``torch.compile(backend="qcompile")`` against it, and the
quantized model exported to ONNX ("ort") and run in stock ONNX Runtime.

The graph finds the linears (no module-name tables); the report's layer names are checked
against the model's own modules only to prove that every linear was found, and nothing else.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import qcompile
from qcompile.graph_utils import QWEIGHT_META
from qcompile.quantizers import dequantize_weight
from qcompile.testing import count_ops, relative_error
from tests.models.zoo import ALL_ARCHITECTURES, linear_calls, linear_in_features

# The CPU kernels compute with bfloat16 activations ("a16"): each rounding of an
# activation to bf16 is off by up to 2^-9 relative, a layer rounds a few times, and two
# blocks plus the head compound it; 3% relative is several times what that gives and far
# below what a wrong scale, zero point or packing order gives (order 1).
BF16_ACTIVATION_RTOL = 3e-2
# Per-layer output error of the report (relative, on the example): INT8 weights with group 32
# move a random-weight linear's output by ~0.5%; 2% leaves room, a wrong scale gives order 1.
# INT4 (step 16x coarser) by ~5-15%.
LAYER_ERROR_BOUND = {"w8a16": 0.02, "w4a16": 0.25}
# Whole model against the float model: INT8 moves these random-weight models by ~1%, INT4 by
# ~10-25% (the errors of every layer compound).
MODEL_ERROR_BOUND = {"w8a16": 0.05, "w4a16": 0.4}
# torch.compile's graph and torch.export's are canonicalized to the same graph and get the same
# quantized weights and kernels: only the order of a few float ops may differ.
BACKEND_RTOL = 1e-5

# Architectures whose forward Dynamo splits into two graphs (a graph break in transformers' code:
# HubertForSequenceClassification calls transformers.distributed.fsdp.is_fsdp_managed_module).
GRAPH_BREAKS = {"hubert"}


def xfail(reason: str):
    """A known failure of qcompile itself (strict: an unexpected pass fails the run, so the mark
    goes when the fix lands)."""
    return pytest.mark.xfail(strict=True, reason=reason)


def cases(names, marks: dict[str, Any] | None = None) -> list:
    """``pytest.param(name)`` for each name, with its mark from ``marks`` where it has one."""
    marks = marks or {}
    return [pytest.param(name, marks=[marks[name]] if name in marks else []) for name in names]


def zoo_tests(names: list[str]) -> tuple[Callable[..., None], Callable[..., None], Callable[..., None]]:
    """The three tests every wider-zoo architecture gets, parametrized over ``names``: a test file
    binds them to module-level ``test_*`` names, so that its architectures' tests sit in the one
    file (and so one xdist worker) that quantizes each model once."""
    each = pytest.mark.parametrize("name", cases(names))

    @each
    def test_quantize_w8a16(quantized_zoo, name):  # noqa: ANN001, ANN202
        check_quantize(quantized_zoo, name, "w8a16")

    @each
    def test_torch_compile_backend_converges_with_quantize(quantized_zoo, name):  # noqa: ANN001, ANN202
        check_backend_converges(quantized_zoo, name)

    @each
    def test_ort_export_w8a16_matches_quantized_model(quantized_zoo, name, tmp_path):  # noqa: ANN001, ANN202
        check_onnx_parity(quantized_zoo, name, tmp_path)

    return test_quantize_w8a16, test_torch_compile_backend_converges_with_quantize, \
        test_ort_export_w8a16_matches_quantized_model


def fake_quantized(model: torch.nn.Module, qm: qcompile.QuantizedModel) -> torch.nn.Module:
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


def check_quantize(quantized_zoo: Callable[[str, str], Any], name: str, recipe: str) -> None:
    """``qcompile.quantize(entry.build(0), *entry.inputs(0), recipe=recipe)``: one quantized op per
    linear call, one report row per linear named after its module, per-layer errors, and the
    model at another batch size and sequence length than the example's against the float model
    and against a float model with the dequantized weights."""
    entry = ALL_ARCHITECTURES[name]
    model = entry.build(0)
    qm = quantized_zoo(name, recipe)

    # Only nn.Linear / Conv1D count (convolutions and embeddings stay float today). A module
    # shared by several layers (ALBERT) is one linear op per call in the graph, one report row;
    # an unused one (a pooler a task head skips) is not in the graph.
    linears = linear_in_features(model)
    calls = linear_calls(model, *entry.inputs(0))
    called = sorted(layer for layer, n in calls.items() if n)
    ops = count_ops(qm)
    op = f"qcompile.linear_{recipe}"
    assert ops.get(op, 0) == sum(calls.values()), (ops, calls)
    assert "aten.linear" not in ops and "aten.addmm" not in ops
    report = qm.report()
    assert sorted(r["layer"] for r in report.layers) == called
    group = qcompile.PRESETS[recipe].group_size
    for row in report.layers:
        k = linears[row["layer"]]
        if group and k % group:
            assert "per-channel" in row["format"] and "not divisible" in row["note"]
        assert 0 <= row["output_error"] < LAYER_ERROR_BOUND[recipe]

    # another batch size and sequence length than the example's
    args2, kwargs2 = entry.other_inputs(1)
    with torch.no_grad():
        got = qm(*args2, **kwargs2)
        ref = model(*args2, **kwargs2)
        fake = fake_quantized(model, qm)(*args2, **kwargs2)
    assert type(got) is type(ref)
    assert relative_error(fake, got) < BF16_ACTIVATION_RTOL
    assert relative_error(ref, got) < MODEL_ERROR_BOUND[recipe]


def check_backend_converges(quantized_zoo: Callable[[str, str], Any], name: str) -> None:
    """``torch.compile(model, backend="qcompile")`` (inner "eager": no Inductor) computes what
    ``qcompile.quantize`` of the same model and example computes, with the same layers."""
    entry = ALL_ARCHITECTURES[name]
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
    assert relative_error(expected, got) < BACKEND_RTOL
    # One graph, except where transformers' own code breaks Dynamo's graph (GRAPH_BREAKS): each
    # graph is quantized and reported on its own, and together they hold the model's linears.
    assert len(reports) == (2 if name in GRAPH_BREAKS else 1)
    # same layers (a tied head may be named after the embedding it shares a tensor with:
    # Dynamo passes one placeholder for both)
    shapes = sorted(r["shape"] for report in reports for r in report.layers)
    assert shapes == sorted(r["shape"] for r in qm.report().layers)


def check_onnx_parity(quantized_zoo: Callable[[str, str], Any], name: str, folder: Path,
                      preset: str = "w8a16", flavor: str = "ort") -> None:
    """The quantized model exported with ``qcompile.export.to_onnx`` and run in stock ONNX
    Runtime at the other shape: tests/export/test_parity.py's ``check_parity``, with its
    tolerances (tests/export/helpers.py: the float32 reference path within EXACT_RTOL, 1e-5,
    as only float summation order differs; ``qm(...)``, bfloat16 activations on its CPU fast
    path, within BF16_RTOL, 2e-2) and its structure checks (one MatMulNBits per quantized
    linear, no float copy of a quantized weight left)."""
    from qcompile.export import to_onnx
    from tests.export.test_parity import check_parity

    qm = quantized_zoo(name, preset)
    result = to_onnx(qm, folder / f"{name}_{preset}_{flavor}.onnx", flavor=flavor)
    check_parity(lambda *_: (qm, result), name, preset, flavor)
