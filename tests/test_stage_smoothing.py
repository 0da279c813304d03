"""smooth_objective="stage": candidate smoothing scales scored on the outputs of the whole
stage holding a group's linears, against a float64 reference written with the model's own
modules; the fold_smoothing pass with it (float64 check, report rows); the fallbacks to
the group objective; recipe validation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qcompile.capture import capture
from qcompile.errors import RecipeError
from qcompile.fake_quant import weight_fake_quant
from qcompile.graph_utils import get_constant, layer_name, quantizable_linears
from qcompile.passes.fold_smoothing import fold_smoothing
from qcompile.pipeline import PassContext, run_passes
from qcompile.quantizers import dequantize_weight, quantize_weight_rtn
from qcompile.recipe import PRESETS, resolve_recipe
from qcompile.smoothing_groups import find_smoothing_groups
from qcompile.stage_smoothing import plan_stage_search, search_on_stages

GROUP = 8
RECIPE = resolve_recipe({"preset": "w4a16-awq", "group_size": GROUP})


class TwoBlocks(torch.nn.Module):
    """An input projection, then two residual MLP blocks: stages [inp], [block 0], [block 1]."""

    def __init__(self, k=24, d=40, h=72):
        super().__init__()
        self.inp = torch.nn.Linear(k, d)
        self.ln0, self.up0, self.down0 = torch.nn.LayerNorm(d), torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        self.ln1, self.up1, self.down1 = torch.nn.LayerNorm(d), torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def block0(self, x):
        return x + self.down0(F.gelu(self.up0(self.ln0(x))))

    def block1(self, x):
        return x + self.down1(torch.relu(self.up1(self.ln1(x))))

    def forward(self, x):
        return self.block1(self.block0(self.inp(x)))


class SharedInput(torch.nn.Module):
    """``a`` and ``b`` read the same activation but lie in different stages (``a`` only feeds
    the output, so the input projection's output alone is live between them)."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.c = (torch.nn.Linear(24, 32), torch.nn.Linear(32, 16), torch.nn.Linear(32, 48),
                                            torch.nn.Linear(48, 8))

    def forward(self, x):
        h = self.inp(x)
        return self.a(h), self.c(F.gelu(self.b(h)))


def _batches(gen, dtype, k=24, tokens=(5, 7, 3)):
    spread = torch.linspace(0.2, 6.0, k, dtype=dtype)  # uneven channels, as smoothing expects
    return [[torch.randn(2, t, k, generator=gen, dtype=dtype) * spread] for t in tokens]


def _quantized_effective(weight: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Q(W diag(s)) diag(1/s), float64: the recipe's int4 g8 asymmetric plain RTN."""
    w = weight.detach().double()
    if s is None:
        return dequantize_weight(quantize_weight_rtn(w.float(), 4, GROUP, False)).double()
    q = dequantize_weight(quantize_weight_rtn((w * s).float(), 4, GROUP, False)).double()
    return q / s


def test_stage_score_equals_float64_reference():
    """Every group's stage error, per candidate, equals the per-token relative error (root
    mean square over tokens) of the model's own blocks (float64 modules) with the group's
    weights replaced by Q(W s)/s, run on the float outputs of the earlier blocks."""
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = TwoBlocks().double().eval()
    batches = _batches(gen, torch.float64)
    gm = capture(model, (batches[0][0],)).graph_module
    groups = find_smoothing_groups(gm, quantizable_linears(gm))
    plan = plan_stage_search(gm, groups)
    assert not plan.fallback and len(plan.stages) == 3
    names = [[layer_name(c) for c in g.consumers] for g in groups]
    assert names == [["inp"], ["up0"], ["down0"], ["up1"], ["down1"]]
    assert [plan.stage_of[i] for i in range(5)] == [0, 1, 1, 2, 2]
    scales = {}
    for i, g in enumerate(groups):
        k = g.channels
        scales[i] = {None: None, 0.3: torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.1,
                     0.7: torch.exp(torch.randn(k, generator=gen, dtype=torch.float64))}
    found = search_on_stages(gm, groups, plan, batches, lambda g: (scales[groups.index(g)],
                                                                    weight_fake_quant(RECIPE, g.channels)),
                             progress=False)

    def stage_fn(m, stage):
        return (m.inp, m.block0, m.block1)[stage]

    with torch.no_grad():
        inputs = {0: [b[0] for b in batches]}
        inputs[1] = [model.inp(x) for x in inputs[0]]
        inputs[2] = [model.block0(h) for h in inputs[1]]
        for i, g in enumerate(groups):
            stage = plan.stage_of[i]
            reference = [stage_fn(model, stage)(x) for x in inputs[stage]]
            errors = {}
            for alpha, s in scales[i].items():
                changed = copy.deepcopy(model)
                linear = getattr(changed, names[i][0])
                linear.weight.copy_(_quantized_effective(linear.weight, s))
                got = [stage_fn(changed, stage)(x) for x in inputs[stage]]
                # root mean square over all tokens of ‖Δ_t‖ / ‖ref_t‖
                per_token = torch.cat([((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten() for a, b in zip(got, reference)])
                errors[alpha] = float(per_token.pow(2).mean().sqrt())
            # float64 throughout: the graph's decomposed ops against the modules' differ by
            # rounding (1e-16 of the outputs); the errors are >= 1e-4 of them
            for alpha in errors:
                assert found[i].errors[alpha] == pytest.approx(errors[alpha], rel=1e-9), (names[i], alpha)
                assert errors[alpha] > 1e-4, (names[i], alpha)  # the candidates really quantize
            best = min(errors, key=lambda a: (errors[a], a is not None))
            assert found[i].alpha == best
            assert found[i].scale is scales[i][best]


def _rows(ctx):
    return {name: row for name, row in ctx.layers.items() if "smoothing" in row}


def test_pass_with_stage_objective_preserves_function_and_reports_stages():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = TwoBlocks(k=20, d=48, h=56).eval()
    batches = _batches(gen, torch.float32, k=20, tokens=(6, 9))
    gm = capture(model, (batches[0][0],)).graph_module
    ctx = PassContext(RECIPE, batches[0], calibration=batches, progress=False)
    run_passes(gm, [fold_smoothing], ctx)
    (record,) = ctx.pass_log
    assert record.verified == "structure+float64"
    rows = _rows(ctx)
    expected = {"inp": 0, "up0": 1, "down0": 1, "up1": 2, "down1": 2}
    assert set(rows) == set(expected)
    for name, stage in expected.items():
        assert f"stage {stage} search: err" in rows[name]["smoothing"], rows[name]
        base, best = rows[name]["smoothing_errors"]
        assert best <= base
    assert record.modified  # with channels spread 30x, some group takes a scale


def test_groups_spanning_stages_fall_back_to_the_group_objective():
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = SharedInput().eval()
    batches = _batches(gen, torch.float32, tokens=(4, 11))
    gm = capture(model, (batches[0][0],)).graph_module
    groups = find_smoothing_groups(gm, quantizable_linears(gm))
    plan = plan_stage_search(gm, groups)
    assert [[layer_name(c) for c in g.consumers] for g in groups] == [["inp"], ["a", "b"], ["c"]]
    assert plan.fallback == {1: "linears span stages 1, 2"} and plan.stage_of == {0: 0, 2: 3}

    def run(recipe):
        ctx = PassContext(recipe, batches[0], calibration=batches, progress=False)
        out = run_passes(copy.deepcopy(gm), [fold_smoothing], ctx)
        assert ctx.pass_log[0].verified == "structure+float64"
        return out, _rows(ctx)

    out, rows = run(RECIPE)
    for name in ("a", "b"):
        assert "search (group objective: linears span stages 1, 2): err" in rows[name]["smoothing"], rows[name]
    assert "stage 0 search" in rows["inp"]["smoothing"] and "stage 3 search" in rows["c"]["smoothing"]
    # the fallback is exactly the group objective: same α, same errors, same weights
    out_group, rows_group = run(RECIPE.replace(smooth_objective="group"))
    for name in ("a", "b"):
        assert rows[name]["smoothing_alpha"] == rows_group[name]["smoothing_alpha"]
        assert rows[name]["smoothing_errors"] == rows_group[name]["smoothing_errors"]
    weights = {layer_name(n): get_constant(out, n.args[1]) for n in quantizable_linears(out)}
    weights_group = {layer_name(n): get_constant(out_group, n.args[1]) for n in quantizable_linears(out_group)}
    for name in ("a", "b"):
        assert torch.equal(weights[name], weights_group[name])


def test_graph_without_a_cut_falls_back_to_the_group_objective():
    gen = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU()).eval()
    batches = _batches(gen, torch.float32, tokens=(5, 13))
    gm = capture(model, (batches[0][0],)).graph_module
    groups = find_smoothing_groups(gm, quantizable_linears(gm))
    plan = plan_stage_search(gm, groups)
    assert len(plan.stages) == 1 and plan.fallback == {0: "no stage cut in the graph"} and not plan.stage_of
    assert search_on_stages(gm, groups, plan, batches, lambda g: pytest.fail("nothing to score"), progress=False) == {}
    ctx = PassContext(RECIPE, batches[0], calibration=batches, progress=False)
    run_passes(gm, [fold_smoothing], ctx)
    (row,) = _rows(ctx).values()
    assert "search (group objective: no stage cut in the graph): err" in row["smoothing"], row


def test_smooth_objective_validation_and_presets():
    assert PRESETS["w4a16-awq"].smooth_objective == "stage"
    for name in ("w8a8", "w8a8-static", "fp8", "w4a16"):
        assert PRESETS[name].smooth_objective == "group", name
    with pytest.raises(RecipeError, match=r"smooth_objective must be one of \('group', 'stage'\), got 'layer'"):
        resolve_recipe({"preset": "w4a16-awq", "smooth_objective": "layer"})
    with pytest.raises(RecipeError, match='scores the candidates of smooth="search", got smooth=\'alpha\''):
        resolve_recipe({"preset": "w4a16-awq", "smooth": "alpha"})
    with pytest.raises(RecipeError, match="needs activation_bits=16, got 8"):
        resolve_recipe({"preset": "w8a8", "smooth_objective": "stage"})
    with pytest.raises(RecipeError, match='needs rotate="off", got \'input\''):
        resolve_recipe({"preset": "w4a16-awq", "rotate": "input"})
    assert resolve_recipe({"preset": "w4a16-awq", "smooth_objective": "group"}).smooth_objective == "group"
