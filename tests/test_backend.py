"""The torch.compile backend: registration, options, Inductor, calibration mapping."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.backend import BackendOptions, _graph_calibration
from qcompile.errors import CalibrationError, RecipeError
from qcompile.testing import relative_error
from tests.models.zoo import ARCHITECTURES


def test_backend_name_works_in_a_fresh_interpreter_without_import():
    code = textwrap.dedent(
        """
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
        compiled = torch.compile(model, backend="qcompile", options={"inner": "eager", "recipe": "w4a16"})
        x = torch.randn(4, 64)
        with torch.no_grad():
            err = ((compiled(x) - model(x)).norm() / model(x).norm()).item()
        import sys
        print("qcompile imported by the entry point:", "qcompile" in sys.modules, "err", err)
        assert err < 0.3
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "qcompile imported by the entry point: True" in out.stdout


def test_default_recipe_is_w8a16_and_inductor_runs_the_rest():
    entry = ARCHITECTURES["bert"]
    model = entry.build(0)
    args, kwargs = entry.inputs(0)
    reports = []
    compiled = torch.compile(model, backend="qcompile", options={"on_report": reports.append})
    with torch.no_grad():
        got = compiled(*args, **kwargs)
        expected = qcompile.quantize(model, args, kwargs, recipe="w8a16", progress=False)(*args, **kwargs)
    assert reports[0].recipe.name == "w8a16"
    # Inductor fuses the float ops around the quantized linears and may reorder float32
    # reductions (layer norm, softmax): differences of float32 rounding, not of quantization
    assert relative_error(expected, got) < 1e-4


def test_unknown_option_and_bad_inner_are_rejected():
    with pytest.raises(RecipeError, match="unknown qcompile backend option"):
        BackendOptions.from_dict({"recipie": "w4a16"})
    with pytest.raises(RecipeError, match="inner"):
        BackendOptions.from_dict({"inner": "tvm"})


def test_calibration_batches_are_mapped_to_graph_inputs_by_name():
    names = ["L['input_ids']", "L['kwargs']['attention_mask']"]
    ids, mask = torch.randint(0, 9, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    assert _graph_calibration([{"attention_mask": mask, "input_ids": ids}], names) == [[ids, mask]]
    assert _graph_calibration([(ids, mask)], names) == [[ids, mask]]
    with pytest.raises(CalibrationError, match="attention_mask"):
        _graph_calibration([{"input_ids": ids}], names)
    with pytest.raises(CalibrationError, match="2"):
        _graph_calibration([(ids,)], names)


def test_calibration_reaches_the_report():
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    calib = [(torch.randn(3, 32),) for _ in range(4)]
    reports = []
    compiled = torch.compile(
        model, backend="qcompile", options={"inner": "eager", "calibration": calib, "on_report": reports.append}
    )
    with torch.no_grad():
        compiled(torch.randn(3, 32))
    assert "4 calibration batch" in reports[0].error_inputs


def test_generate_rounds_each_weight_once_across_the_graphs_dynamo_hands_over(monkeypatch):
    """``generate()`` under the backend: Dynamo recompiles as the KV cache grows (and at the
    switch from prefill to decode), handing over several graphs; each weight is rounded once,
    for the first, and the later graphs replay those codes (``qcompile.decisions``)."""
    import qcompile.passes.quantize_weights as qw

    rounded = []
    real = qw._round_linear
    monkeypatch.setattr(qw, "_round_linear", lambda gm, node, *a, **k: rounded.append(node) or real(gm, node, *a, **k))
    entry = ARCHITECTURES["qwen2"]
    model = entry.build(0)
    reports = []
    model.forward = torch.compile(model.forward, backend="qcompile",
                                  options={"inner": "eager", "recipe": "w4a16", "on_report": reports.append})
    ids = torch.randint(4, 600, (8, 6))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape == (8, 12)
    linears = len(reports[0].layers)
    # prefill, the first decode step, then the decode step with the cache length dynamic
    assert 2 <= len(reports) <= 3 and len(rounded) == linears
    assert all("replayed" in " ".join(r.notes) for r in reports[1:])
    assert [row["bytes"] for row in reports[-1].layers] == [row["bytes"] for row in reports[0].layers]


def test_another_instance_or_changed_weights_are_quantized_for_what_the_call_passes():
    """Dynamo passes a module's parameters as graph inputs and reuses a compiled graph for
    another instance of the same class: the backend's frozen, quantized graph must not run
    with the first instance's weights (it did: a silently wrong result), nor with weights
    changed in place since. Both instances also share one decisions store (same recipe): the
    second one's weights have other fingerprints, so they are rounded for it."""
    entry = ARCHITECTURES["qwen2"]
    x = entry.inputs(0)[1]
    options = {"inner": "eager", "recipe": "w8a16"}

    def expected(model):
        return qcompile.quantize(model, (), x, progress=False, generation=False)(**x).logits

    first, second = entry.build(0), entry.build(1)
    with torch.no_grad():
        got_first = torch.compile(first, backend="qcompile", options=options)(**x).logits
        compiled_second = torch.compile(second, backend="qcompile", options=options)
        got_second = compiled_second(**x).logits
        assert relative_error(expected(first), got_first) < 1e-6
        assert relative_error(expected(second), got_second) < 1e-6
        second.lm_head.weight.mul_(2.0)
        assert relative_error(expected(second), compiled_second(**x).logits) < 1e-6
