"""Smoothing groups are found from graph structure, and folding them preserves the function.

For every architecture of the zoo: the groups (which producer kind absorbs the scale, how
many linears read the activation, which producer feeds which consumer) are asserted as
structure, never by module name; then canonicalize + fold_smoothing run under the pass
manager, whose float64 check must hold.
"""
from __future__ import annotations

import pytest
import torch

from qcompile.capture import capture
from qcompile.graph_utils import SMOOTHING_META, get_constant, layer_name, quantizable_linears
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.fold_smoothing import fold_smoothing
from qcompile.pipeline import PassContext, run_passes
from qcompile.recipe import PRESETS
from qcompile.smoothing_groups import find_smoothing_groups
from tests.models import zoo

W8A8_ALPHA = PRESETS["w8a8"].replace(smooth="alpha", smooth_alpha=0.5)

aten = torch.ops.aten

# Per architecture: the groups in graph order as (producer kind, number of linears).
# Two transformer blocks each, then the head.
_RMS_SWIGLU = [("scale", 3), ("online", 1), ("scale", 2), ("linear", 1)] * 2 + [("scale", 1)]
EXPECTED = {
    # RMSNorm weight * x absorbs q/k/v and gate/up; up_proj absorbs down_proj through
    # act(gate) * up; o_proj is online (the KV cache returns V, and GQA repeats it).
    "llama": _RMS_SWIGLU,
    "qwen2": _RMS_SWIGLU,
    "qwen3": _RMS_SWIGLU,
    "mistral": _RMS_SWIGLU,
    "gemma": _RMS_SWIGLU,  # (1 + w) * x: a constant computed from a constant
    # fused gate_up_proj: the "up" half is a slice of one linear's output, not absorbed
    "phi3": [("scale", 1), ("online", 1), ("scale", 1), ("online", 1)] * 2 + [("scale", 1)],
    "gpt2": [("layer_norm", 1), ("online", 1), ("layer_norm", 1), ("online", 1)] * 2 + [("layer_norm", 1)],
    # ReLU is positively homogeneous: fc1 absorbs fc2's scale
    "opt": [("layer_norm", 3), ("online", 1), ("layer_norm", 1), ("linear", 1)] * 2 + [("layer_norm", 1)],
    "gpt_neox": [("layer_norm", 1), ("online", 1), ("layer_norm", 1), ("online", 1)] * 2 + [("layer_norm", 1)],
    # post-norm: the norm output also feeds the residual; only V -> attention -> O folds
    "bert": [("online", 3), ("linear", 1), ("online", 1), ("online", 1)] * 2 + [("online", 1)],
    "roberta": [("online", 3), ("linear", 1), ("online", 1), ("online", 1)] * 2 + [("online", 1)] * 2,
    "vit": [("layer_norm", 3), ("linear", 1), ("layer_norm", 1), ("online", 1)] * 2 + [("online", 1)],
}


@pytest.fixture(params=sorted(zoo.ARCHITECTURES))
def canonical(request, canonical_zoo):
    return (request.param, *canonical_zoo(request.param))


def _path_ops(group) -> set:
    return {n.target for n in group.path}


def test_groups_are_found_from_structure(canonical):
    name, gm, _, _ = canonical
    assert set(EXPECTED) == set(zoo.ARCHITECTURES), "every zoo architecture needs its expected groups"
    linears = quantizable_linears(gm)
    groups = find_smoothing_groups(gm, linears)
    assert [(g.kind, len(g.consumers)) for g in groups] == EXPECTED[name]
    assert sorted(c.name for g in groups for c in g.consumers) == sorted(n.name for n in linears)
    for i, g in enumerate(groups):
        for c in g.consumers:
            assert c.args[0] is g.activation
        if g.kind == "online":
            assert g.producer is None and g.reason
            continue
        # nothing but the path reads the scaled values
        chain = [g.producer, *g.path]
        for a, b in zip(chain, chain[1:]):
            assert list(a.users) == [b]
        assert set(g.activation.users) == set(g.consumers)
        if g.kind == "linear":
            # the absorbing linear is one of the linears of the group just before
            assert g.producer in groups[i - 1].consumers
            assert aten.linear.default in {c.target for c in groups[i - 1].consumers}
            via = _path_ops(g)
            if name in ("bert", "roberta", "vit"):
                assert aten.scaled_dot_product_attention.default in via  # V -> attention -> O
            elif name == "opt":
                assert aten.relu.default in via
            else:
                assert aten.mul.Tensor in via  # act(gate) * up
        elif g.kind in ("layer_norm", "rms_norm"):
            assert g.producer.target in (aten.layer_norm.default, aten.rms_norm.default)
        else:
            assert g.producer.target == aten.mul.Tensor


def test_folding_preserves_function_on_every_architecture(canonical):
    """The pass manager's float64 check holds, and the scales really went somewhere."""
    name, gm, example, other = canonical
    ctx = PassContext(W8A8_ALPHA, example, calibration=[other], progress=False)
    before = {n: get_constant(gm, n.args[1]).clone() for n in quantizable_linears(gm)}
    groups = find_smoothing_groups(gm, quantizable_linears(gm))
    out = run_passes(gm, [fold_smoothing], ctx)
    (record,) = ctx.pass_log
    assert record.verified == "structure+float64" and record.modified
    after = {layer_name(n): get_constant(out, n.args[1]) for n in out.graph.nodes
             if n.op == "call_function" and n.target == aten.linear.default and get_constant(out, n.args[1]) is not None}
    changed = [layer_name(n) for n, w in before.items() if not torch.equal(w, after[layer_name(n)])]
    assert len(changed) >= len(before) - 2, f"{name}: smoothing left most weights unchanged: {changed}"
    online_muls = [n for n in out.graph.nodes if SMOOTHING_META in n.meta]
    assert len(online_muls) == sum(g.kind == "online" for g in groups)
    for mul in online_muls:
        inverse = get_constant(out, mul.args[1])
        s = mul.meta[SMOOTHING_META]
        assert torch.equal(inverse.double() * s.double(), torch.ones_like(s, dtype=torch.float64))
        assert all(u.target == aten.linear.default for u in mul.users)
    rows = [r for r in ctx.layers.values() if "smoothing" in r]
    assert len(rows) == len(before) and all(r["smoothing"].startswith(("alpha 0.5", "none")) for r in rows)


def test_gemma_computed_norm_scale_folds_exactly():
    """Gemma's norm multiplies by (1 + w): folding divides the float32 value of 1 + w by s.
    The float64 check evaluates constant expressions at the model's precision, so it holds
    with random (non-zero) norm weights too."""
    model, (args, kwargs), (args2, kwargs2) = zoo.build("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    cap = capture(model, args, kwargs)
    ctx = PassContext(W8A8_ALPHA, cap.flatten_inputs(args, kwargs), calibration=[cap.flatten_inputs(args2, kwargs2)],
                      progress=False)
    run_passes(cap.graph_module, [canonicalize, fold_smoothing], ctx)
    assert [p.verified for p in ctx.pass_log] == ["structure+float64"] * 2 and ctx.pass_log[1].modified
