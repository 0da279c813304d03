"""Recipes with smoothing and activation quantization, end to end on real architectures.

Graph structure (which op each linear became, where the smoothing vectors went) and
numerics (against the float model, and against a float64 recomputation of what the
quantized ops compute) are asserted; see test_smoothing_groups for the groups themselves.
"""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.errors import CalibrationError
from qcompile.graph_utils import SMOOTHING_META, get_constant
from qcompile.passes.decompose_w8a8 import decompose_w8a8
from qcompile.pipeline import PassContext, run_passes
from qcompile.testing import count_ops, relative_error
from qcompile.recipe import PRESETS
from tests.models import zoo

aten = torch.ops.aten
ops = torch.ops.qcompile
# SmoothQuant's fixed alpha, so every group gets a scale (the preset searches, and may choose none)
W8A8_ALPHA = {"preset": "w8a8", "smooth": "alpha", "smooth_alpha": 0.5}


@pytest.fixture(scope="module")
def bert():
    model, (args, kwargs), (args2, kwargs2) = zoo.build("bert")
    calib = [kwargs2, zoo.ARCHITECTURES["bert"].inputs(seed=5)[1]]
    return model, kwargs, calib


def _calls(qm, target):
    return [n for n in qm.graph_module.graph.nodes if n.op == "call_function" and n.target == target]


def _float_out(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).last_hidden_state


def test_w8a8_lowers_every_linear_and_absorbs_online_smoothing(bert):
    model, kwargs, calib = bert
    qm = qcompile.quantize(model, kwargs=kwargs, recipe=W8A8_ALPHA, calibration=calib, progress=False)
    counts = count_ops(qm)
    assert counts["qcompile.linear_w8a8"] == 13 and counts.get("aten.linear", 0) == 0  # 2 x 6 + pooler
    # BERT is post-norm: 11 of 13 linears read an activation no producer can absorb a scale
    # into, so their smoothing vector went into the op; V -> attention -> O folded (2 layers).
    calls = _calls(qm, ops.linear_w8a8.default)
    smooth = [c for c in calls if c.args[4] is not None]
    assert len(smooth) == 11
    assert not [n for n in qm.graph_module.graph.nodes if SMOOTHING_META in n.meta], "online multiplies must be absorbed"
    for c in smooth:
        s = get_constant(qm.graph_module, c.args[4])
        assert s.dtype == torch.float32 and bool((s > 0).all())
        assert torch.equal(torch.exp2(torch.round(torch.log2(s))), s)  # powers of two
    # the q/k/v projections read the same activation and share one smoothing vector
    by_input: dict = {}
    for c in smooth:
        by_input.setdefault(c.args[0], set()).add(c.args[4])
    assert sorted(len(v) for v in by_input.values()) == [1] * len(by_input)
    assert sorted(sum(1 for c in smooth if c.args[0] is x) for x in by_input).count(3) == 2
    rows = {r["layer"]: r for r in qm.report().layers}
    assert "fold into linear" in rows["encoder.layer.0.attention.output.dense"]["smoothing"]
    assert "online" in rows["encoder.layer.0.attention.self.query"]["smoothing"]
    # int8 x int8 on every layer: the last hidden state stays within a few percent
    err = relative_error(_float_out(model, kwargs), qm(**kwargs).last_hidden_state)
    assert err < 0.03, err  # measured ~0.01: 4 int8 layers in series, ~0.5% each


def test_w8a8_op_computes_what_its_constants_say(bert):
    """One lowered linear recomputed in float64 from its constants (codes, scales, smoothing)."""
    model, kwargs, calib = bert
    qm = qcompile.quantize(model, kwargs=kwargs, recipe=W8A8_ALPHA, calibration=calib, progress=False)
    gm = qm.graph_module
    call = next(c for c in _calls(qm, ops.linear_w8a8.default) if c.args[4] is not None)
    x = torch.randn(3, 5, get_constant(gm, call.args[1]).shape[1])  # fresh input, odd shape
    qweight, wscales, bias, smooth = (get_constant(gm, a) for a in call.args[1:5])
    got = ops.linear_w8a8(x, qweight, wscales, bias, smooth, None)
    xs = x.double() / smooth.double()
    scale = xs.abs().amax(-1, keepdim=True) / 127
    codes = torch.clamp(torch.round(xs / scale), -127, 127)
    want = (codes @ qweight.double().T) * scale * wscales.double() + bias.double()
    # float32 rounding of x/s, the scale and the epilogue: a code on a rounding boundary
    # may differ by one step, i.e. up to scale * |w| per element; 1e-5 relative covers it.
    assert relative_error(want, got) < 1e-5


def test_static_scales_come_from_calibration(bert):
    model, kwargs, calib = bert
    qm = qcompile.quantize(model, kwargs=kwargs, recipe="w8a8-static", calibration=calib, progress=False)
    calls = _calls(qm, ops.linear_w8a8.default)
    assert len(calls) == 13 and all(c.args[5] is not None for c in calls)
    scales = [float(get_constant(qm.graph_module, c.args[5])) for c in calls]
    assert all(s > 0 for s in scales) and len(set(scales)) > 5
    err = relative_error(_float_out(model, kwargs), qm(**kwargs).last_hidden_state)
    assert err < 0.06, err  # one scale per tensor is coarser than per token: measured ~0.02


def test_fp8_recipe_uses_e4m3_weights(bert):
    model, kwargs, calib = bert
    qm = qcompile.quantize(model, kwargs=kwargs, recipe="fp8", calibration=calib, progress=False)
    calls = _calls(qm, ops.linear_fp8.default)
    assert len(calls) == 13
    assert all(get_constant(qm.graph_module, c.args[1]).dtype == torch.float8_e4m3fn for c in calls)
    err = relative_error(_float_out(model, kwargs), qm(**kwargs).last_hidden_state)
    assert err < 0.08, err  # e4m3 keeps 3 mantissa bits (~3% per element, averaging out): measured ~0.03


def test_smoothing_off_leaves_no_smoothing(bert):
    model, kwargs, _ = bert
    # round-to-nearest weights: with neither smoothing nor GPTQ, w8a8 needs no calibration
    qm = qcompile.quantize(model, kwargs=kwargs, recipe={"preset": "w8a8", "smooth": "off", "method": "rtn"},
                           progress=False)
    calls = _calls(qm, ops.linear_w8a8.default)
    assert len(calls) == 13 and all(c.args[4] is None for c in calls)
    assert "fold_smoothing" not in [p.name for p in qm.report().passes]


def test_awq_search_keeps_online_multiplies_for_16_bit_activations():
    model, (_, kwargs), (_, kwargs2) = zoo.build("llama")
    recipe = {"preset": "w4a16-awq", "group_size": 32, "smooth_alphas": [0.25, 0.5, 0.75]}
    qm = qcompile.quantize(model, kwargs=kwargs, recipe=recipe, calibration=[kwargs2], progress=False)
    gm = qm.graph_module
    assert count_ops(qm)["qcompile.linear_w4a16"] == 15
    muls = [n for n in gm.graph.nodes if SMOOTHING_META in n.meta]
    # only o_proj is online in Llama (2 layers); a group whose search chose "none" has no multiply
    assert len(muls) <= 2
    for mul in muls:
        assert {u.target for u in mul.users} == {ops.linear_w4a16.default}
    rows = [r for r in qm.report().layers if "smoothing" in r]
    assert len(rows) == 15 and all("search: err" in r["smoothing"] for r in rows)
    for r in rows:
        before, after = r["smoothing_errors"]
        assert after <= before  # the search never picks worse than no smoothing
    with torch.no_grad():
        ref = model(**kwargs).logits
        got = qm(**kwargs).logits
    assert relative_error(ref, got) < 0.2  # 4-bit weights, tiny random model


def test_recipes_needing_calibration_say_so(bert):
    model, kwargs, _ = bert
    for recipe in ("w8a8", "w8a8-static", "w4a16-awq"):
        with pytest.raises(CalibrationError, match="needs calibration data"):
            qcompile.quantize(model, kwargs=kwargs, recipe=recipe, progress=False)


def test_degenerate_calibration_channels_give_finite_scales():
    """All-zero and constant input channels: no division by zero, finite outputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8)).eval()
    with torch.no_grad():
        model[0].weight[:, 3] = 0.0  # a weight column of zeros too
    batches = []
    for _ in range(2):
        x = torch.randn(6, 24)
        x[:, 0] = 0.0  # an all-zero channel
        x[:, 1] = 2.5  # a constant channel
        batches.append((x,))
    qm = qcompile.quantize(model, (batches[0][0],), recipe="w8a8", calibration=batches, progress=False)
    for c in _calls(qm, ops.linear_w8a8.default):
        if c.args[4] is not None:
            s = get_constant(qm.graph_module, c.args[4])
            assert bool(torch.isfinite(s).all()) and float(s[0]) == 1.0  # zero channel: s = 1
    # fresh inputs of the calibration's distribution (GPTQ fits the weights to it: on inputs
    # whose channels 0 and 1 vary, which calibration never showed, it is off by ~0.13)
    x = torch.randn(5, 24)
    x[:, 0], x[:, 1] = 0.0, 2.5
    out = qm(x)
    assert bool(torch.isfinite(out).all())
    assert relative_error(model(x), out) < 0.05  # int8 weights and per-token activations: measured ~0.007


def test_nan_in_calibration_is_reported():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16)).eval()
    bad = torch.randn(4, 16)
    bad[1, 2] = float("nan")
    with pytest.raises(CalibrationError, match="NaN"):
        qcompile.quantize(model, (torch.randn(4, 16),), recipe="w8a8", calibration=[(bad,)], progress=False)


def test_decomposed_w8a8_graph_gives_the_same_bits(bert):
    """The Inductor-facing decomposition, run eagerly, equals the op (same float32 steps)."""
    model, kwargs, calib = bert
    for preset in ("w8a8", "w8a8-static"):
        # a fixed alpha (the search is not what this tests): every group smoothed
        recipe = {**W8A8_ALPHA, "preset": preset}
        qm = qcompile.quantize(model, kwargs=kwargs, recipe=recipe, calibration=calib, progress=False)
        flat = qm.captured.flatten_inputs((), kwargs)
        with torch.no_grad():
            want = qm.graph_module(*flat)
        ctx = PassContext(PRESETS[preset], flat, verify=True, progress=False)
        gm = run_passes(qm.graph_module, [decompose_w8a8], ctx)
        counts = {}
        for n in gm.graph.nodes:
            if n.op == "call_function":
                counts[n.target] = counts.get(n.target, 0) + 1
        # 13 linears. Dynamic: the Q, K and V projections of each of the 2 layers read the same
        # input with the same smoothing vector and share one matmul, 2 * (1 + 3) + 1 (the pooler);
        # static: each has its own calibrated activation scale, so none merge.
        matmuls = 9 if preset == "w8a8" else 13
        assert counts.get(ops.linear_w8a8.default, 0) == 0 and counts[aten._int_mm.default] == matmuls
        other = zoo.ARCHITECTURES["bert"].other_inputs(seed=3)[1]
        for inputs in (flat, qm.captured.flatten_inputs((), other)):
            with torch.no_grad():
                got = gm(*inputs)
            if inputs is flat:
                assert torch.equal(got[0], want[0])
            assert bool(torch.isfinite(got[0]).all())


def test_backend_w8a8_with_calibration_matches_quantize(bert):
    model, kwargs, calib = bert
    same_shape = [kwargs]
    compiled = torch.compile(model, backend="qcompile", options={
        "recipe": W8A8_ALPHA, "calibration": same_shape, "inner": "eager", "progress": False})
    qm = qcompile.quantize(model, kwargs=kwargs, recipe=W8A8_ALPHA, calibration=same_shape, progress=False)
    with torch.no_grad():
        got = compiled(**kwargs).last_hidden_state
    assert torch.equal(got, qm(**kwargs).last_hidden_state)


def test_backend_rejects_calibration_of_other_shapes(bert):
    model, kwargs, calib = bert
    compiled = torch.compile(model, backend="qcompile", options={
        "recipe": "w8a8", "calibration": calib, "inner": "eager", "progress": False})
    with pytest.raises(Exception, match="does not fit the graph Dynamo compiled"):
        compiled(**kwargs)
