"""The precision ILP (qcompile.precision_ilp), Budget / recipe fields, and the
assign_precision pass end to end.

The solver is checked against brute force (every assignment enumerated) on small random
instances with pins and ties, and over many random budgets on a larger synthetic table
(never exceeded, checked in exact arithmetic of the costs); an infeasible budget must name
the smallest feasible value, which must itself be feasible. End to end, the lowered graph's
own tensors are measured against the budget.
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

import qcompile
from qcompile.budget import Budget
from qcompile.errors import CalibrationError, QcompileError, RecipeError
from qcompile.graph_utils import QWEIGHT_META, call_nodes, layer_name, linear_weight, quantizable_linears
from qcompile.kernels import WEIGHT_ONLY_LINEAR_OPS
from qcompile.passes.assign_precision import assign_precision
from qcompile.passes.lower_to_kernels import lower_to_kernels
from qcompile.passes.quantize_weights import quantize_weights
from qcompile.pipeline import PassContext, run_passes
from qcompile.precision_ilp import LIMIT_RTOL, BudgetConstraint, BudgetInfeasibleError, solve_assignment
from qcompile.recipe import PRESETS, Recipe, resolve_recipe
from qcompile.weight_formats import PRECISION_META, weight_bytes


def _rng() -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence().entropy)


def _brute_force(omega, constraints, allowed, ties, classes=None):
    best, best_choice = None, None
    layers, cands = omega.shape
    classes = np.arange(cands) if classes is None else classes
    for choice in itertools.product(range(cands), repeat=layers):
        choice = np.array(choice)
        if not allowed[np.arange(layers), choice].all():
            continue
        if any(len({classes[choice[i]] for i in group}) > 1 for group in ties):
            continue
        if any(c.total(choice) > c.limit for c in constraints):
            continue
        value = omega[np.arange(layers), choice].sum()
        if best is None or value < best:
            best, best_choice = value, choice
    return best, best_choice


def test_ilp_optimum_equals_brute_force_on_small_instances():
    rng = _rng()
    solved = infeasible = 0
    for _ in range(40):
        layers, cands = int(rng.integers(2, 6)), int(rng.integers(2, 4))
        omega = rng.exponential(size=(layers, cands))
        size = rng.integers(1, 50, size=(layers, 1)).astype(float)
        bits = np.sort(rng.choice([2, 3, 4, 8, 16], size=cands, replace=False))
        constraints = [BudgetConstraint("bits", size * bits, float(rng.uniform(0.3, 1.0) * (size * bits.max()).sum()))]
        if rng.random() < 0.5:
            other = rng.uniform(0, 10, size=(layers, cands))
            constraints.append(BudgetConstraint("other", other, float(rng.uniform(0.2, 1.0) * other.max(1).sum())))
        allowed = rng.random((layers, cands)) < 0.8
        allowed[np.arange(layers), rng.integers(0, cands, layers)] = True
        ties = [sorted(rng.choice(layers, int(rng.integers(2, layers + 1)), replace=False).tolist())
                ] if rng.random() < 0.6 else []
        # tie classes, e.g. the candidates' activation widths; None: tied layers take one candidate
        classes = rng.integers(0, 2, cands) if rng.random() < 0.5 else None
        best, _ = _brute_force(omega, constraints, allowed, ties, classes)
        if best is None:
            with pytest.raises(BudgetInfeasibleError):
                solve_assignment(omega, constraints, allowed, ties, tie_classes=classes)
            infeasible += 1
            continue
        result = solve_assignment(omega, constraints, allowed, ties, tie_classes=classes, mip_rel_gap=0.0)
        # proven optimal (gap 0): the two sums of the same float64 terms agree to rounding
        assert result.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        default = solve_assignment(omega, constraints, allowed, ties, tie_classes=classes)
        assert default.objective <= best * (1 + 1e-4) + 1e-12  # HiGHS's default relative gap
        assert allowed[np.arange(layers), result.choice].all()
        tied = np.arange(cands) if classes is None else classes
        assert all(len({tied[result.choice[i]] for i in g}) == 1 for g in ties)
        solved += 1
    assert solved >= 10  # the random limits leave most instances feasible


def test_budgets_never_exceeded_over_random_budgets():
    rng = _rng()
    layers = 60
    numel = rng.integers(1_000, 3_000_000, size=layers).astype(float)
    bits = np.array([3, 4, 8, 16])
    avg_bits = numel[:, None] * bits
    nbytes = numel[:, None] * np.array([0.5 + 1 / 16, 0.5 + 1 / 16, 1.0 + 1 / 512, 2.0])  # int3 = int4 bytes
    bops = numel[:, None] * bits * 16 * rng.integers(1, 9)
    tables = {"avg_bits": avg_bits, "bytes": nbytes, "bops": bops}
    for _ in range(120):
        omega = rng.exponential(size=(layers, 4)) * np.array([8.0, 2.0, 0.1, 0.0])
        chosen = [k for k in tables if rng.random() < 0.6] or ["avg_bits"]
        constraints = []
        for k in chosen:
            low, high = tables[k].min(1).sum(), tables[k].max(1).sum()
            constraints.append(BudgetConstraint(k, tables[k], float(rng.uniform(low, high))))
        try:
            result = solve_assignment(omega, constraints)
        except BudgetInfeasibleError:
            continue
        for con in constraints:
            # LIMIT_RTOL = 1e-12 relative: float rounding of converting units, not a real excess
            assert con.total(result.choice) <= con.limit * (1 + LIMIT_RTOL), (con.name, con.total(result.choice))


def test_infeasible_budget_names_the_smallest_feasible_value():
    rng = _rng()
    numel = rng.integers(100, 10_000, size=7).astype(float)
    total = numel.sum()
    table = numel[:, None] * np.array([3, 4, 8])
    allowed = np.ones((7, 3), dtype=bool)
    allowed[2] = [False, False, True]  # one layer pinned to 8 bits
    smallest = (table[:, 0].sum() - table[2, 0] + table[2, 2]) / total
    con = BudgetConstraint("avg_bits", table, 2.5 * total, 1 / total)
    with pytest.raises(BudgetInfeasibleError, match=r"smallest feasible avg_bits") as info:
        solve_assignment(rng.random((7, 3)), [con], allowed)
    assert info.value.smallest["avg_bits"] == pytest.approx(smallest, rel=1e-12)
    shown = float(str(info.value).rsplit(" ", 1)[-1])  # rounded up to 6 digits: feasible as written
    assert smallest <= shown <= smallest * (1 + 1e-5)
    feasible = BudgetConstraint("avg_bits", table, info.value.smallest["avg_bits"] * total, 1 / total)
    result = solve_assignment(rng.random((7, 3)), [feasible], allowed)
    assert result.choice[2] == 2 and result.totals["avg_bits"] == pytest.approx(smallest, rel=1e-12)


def test_budget_and_recipe_validation():
    with pytest.raises(RecipeError, match="at least one"):
        Budget()
    with pytest.raises(RecipeError, match="avg_bits"):
        Budget(avg_bits=-1)
    with pytest.raises(RecipeError, match="device"):
        Budget(latency_ms=1.0, device="tpu")
    with pytest.raises(RecipeError, match="activation_bits=16"):
        Recipe(weight_bits=4, group_size=128, activation_bits=8, budget=Budget(avg_bits=4))
    with pytest.raises(RecipeError, match="candidates"):
        Recipe(budget=Budget(avg_bits=4), candidates=("w5",))
    with pytest.raises(RecipeError, match="precision_pins only apply"):
        Recipe(precision_pins=(("lm_head", "w8"),))
    recipe = resolve_recipe({"preset": "auto", "budget": {"bytes": 1e6}, "candidates": ["w4", "w8"],
                             "precision_pins": [["lm_head", "float"]]})
    assert recipe.budget == Budget(bytes=1e6) and recipe.candidates == ("w4", "w8")
    assert recipe.precision_pins == (("lm_head", "float"),)
    assert PRESETS["auto"].budget == Budget(avg_bits=4.5) and "budget" in PRESETS["auto"].needs_calibration


def _run_auto(canonical_zoo, recipe, name="llama"):
    gm, example, other = canonical_zoo(name)
    ctx = PassContext(recipe, example, calibration=[example, other], progress=False)
    gm = run_passes(gm, [assign_precision, quantize_weights, lower_to_kernels], ctx)
    return gm, ctx


def _lowered_formats(gm):
    """(layer, grid bits, stored bytes, numel) of every lowered linear, read from the graph."""
    rows = []
    for bits, op in WEIGHT_ONLY_LINEAR_OPS.items():
        for node in call_nodes(gm, op):
            fmt = node.meta[PRECISION_META]
            qw = node.meta[QWEIGHT_META]
            assert qw.bits == bits == fmt.storage_bits
            stored = sum(t.numel() * t.element_size() for t in (qw.qweight, qw.scales, qw.zeros) if t is not None)
            tensors = [getattr(gm, a.target) for a in node.args[1:4] if isinstance(a, torch.fx.Node)]
            assert sum(t.numel() * t.element_size() for t in tensors) == stored  # the graph holds exactly these
            rows.append((fmt.grid_bits, stored, qw.in_features * qw.out_features))
    return rows


def test_auto_respects_avg_bits_and_lowers_to_the_chosen_ops(canonical_zoo):
    recipe = PRESETS["auto"].replace(sensitivity="local", group_size=32, budget=Budget(avg_bits=4.3), clip_ratios=())
    gm, ctx = _run_auto(canonical_zoo, recipe)
    rows = _lowered_formats(gm)
    assert not quantizable_linears(gm)  # every linear was lowered (none kept float)
    numel = sum(r[2] for r in rows)
    average = sum(r[0] * r[2] for r in rows) / numel
    assert average <= 4.3
    assert {r[0] for r in rows} >= {8} and len({r[0] for r in rows}) >= 2  # a mix, not one uniform format
    solution = ctx.analyses["precision"]
    assert solution["assignment"].totals["avg_bits"] == pytest.approx(average, rel=1e-12)
    for row in ctx.layers.values():
        assert set(row["omega"]) == {"w3", "w4", "w8"}
        assert row["omega"]["w3"] >= row["omega"]["w4"] >= row["omega"]["w8"] >= 0
        assert row["format"].startswith(f"int{row['cost']['bits']} ")


def test_bytes_budget_measured_on_the_lowered_graph_with_pins(canonical_zoo):
    gm0, _, _ = canonical_zoo("llama")
    shapes = {layer_name(n): tuple(linear_weight(gm0, n).shape) for n in quantizable_linears(gm0)}
    float_bytes = 4 * shapes["lm_head"][0] * shapes["lm_head"][1]
    limit = 0.22 * sum(n * k * 4 for n, k in shapes.values()) + float_bytes
    recipe = PRESETS["auto"].replace(sensitivity="local", group_size=32, clip_ratios=(), budget=Budget(bytes=limit),
                                     precision_pins=(("lm_head", "float"), ("*.0.self_attn.q_proj", "w3")))
    gm, ctx = _run_auto(canonical_zoo, recipe)
    rows = _lowered_formats(gm)
    kept = [n for n in quantizable_linears(gm)]
    assert [layer_name(n) for n in kept] == ["lm_head"]  # pinned float: still aten.linear
    assert sum(r[1] for r in rows) + float_bytes <= limit
    q_proj = ctx.layers["model.layers.0.self_attn.q_proj"]
    assert q_proj["precision"] == "w3 (pinned)" and q_proj["format"].startswith("int3 g32")


def test_every_layer_pinned_needs_no_sensitivity(canonical_zoo):
    recipe = PRESETS["auto"].replace(sensitivity="local", clip_ratios=(), budget=Budget(avg_bits=8), precision_pins=(("*", "w8"),))
    gm, ctx = _run_auto(canonical_zoo, recipe)
    assert not any(isinstance(k, tuple) and k[0] == "sensitivity" for k in ctx.analyses)
    assert {r[0] for r in _lowered_formats(gm)} == {8} and not quantizable_linears(gm)
    with pytest.raises(BudgetInfeasibleError, match=r"smallest feasible avg_bits 8$"):
        _run_auto(canonical_zoo, recipe.replace(budget=Budget(avg_bits=7.9)))


def test_infeasible_budget_in_the_pass_names_recipe_and_smallest(canonical_zoo):
    recipe = PRESETS["auto"].replace(sensitivity="local", budget=Budget(avg_bits=2.0), clip_ratios=())
    with pytest.raises(BudgetInfeasibleError, match=r"recipe 'auto'.*smallest feasible avg_bits 3$") as info:
        _run_auto(canonical_zoo, recipe)
    assert info.value.smallest["avg_bits"] == pytest.approx(3.0)


def test_quantize_with_auto_preset_on_a_zoo_model():
    from tests.models import zoo

    model, (args, kwargs), (args2, kwargs2) = zoo.build("bert")
    with pytest.raises(CalibrationError, match="budget"):
        qcompile.quantize(model, args, kwargs, recipe="auto")
    qm = qcompile.quantize(model, args, kwargs, recipe={"preset": "auto", "group_size": 32, "hutchinson_samples": 4},
                           calibration=[kwargs, kwargs2], progress=False)
    report = qm.report()
    assert "Ω per candidate" in report.table()
    # the preset's Hessian sensitivity: 4 HVPs, their spread reported per layer and summarized
    assert re.search(r"sensitivity hessian in [\d.]+ s \(4 Hessian-vector products, loss mse; standard error "
                     r"/ \|trace\| median [\d.]+%", report.table())
    assert all(r["hessian_trace"]["std_error"] >= 0 for r in report.layers if "omega" in r)
    layers = [r for r in report.layers if "omega" in r]
    assert layers and all(r["format"].startswith(("int3", "int4", "int8")) for r in layers)
    numel = sum(r["shape"][0] * r["shape"][1] for r in layers)
    assert sum(r["bits"] * r["shape"][0] * r["shape"][1] for r in layers) / numel <= 4.5
    with torch.no_grad():
        ref = model(*args2, **kwargs2).last_hidden_state
        out = qm(*args2, **kwargs2).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.9  # 3-8 bit weights on a random-weight BERT: close, not exact
    assert sum(weight_bytes(qcompile.weight_formats.candidate_formats(("w8",), None, True)[0], *r["shape"], 4)
               for r in layers) > report.quantized_bytes


def test_cli_inspect_prints_the_pareto_frontier(tmp_path, capsys):
    import re

    from qcompile.cli import main
    from qcompile.model_loading import load_model

    loaded = load_model("tests.models.factories:tiny_llama")
    args, kwargs = loaded.example
    calib = tmp_path / "calib.pt"
    torch.save([kwargs if kwargs else tuple(args)] * 2, calib)
    png = tmp_path / "frontier.png"
    assert main(["inspect", "tests.models.factories:tiny_llama", "--recipe", "auto", "--group-size", "32",
                 "--calib", str(calib), "--pareto", "6", "--pareto-png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Ω per candidate (chosen*)" in out and "against average bits per weight" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt", "frontier.png"]  # no temporary left
    chosen = re.search(r"recipe's choice: avg_bits (\S+), Σ Ω (\S+)", out)
    assert float(chosen.group(1)) <= 4.5
    points = re.findall(r"^\s+(\d[\d.]*)\s+(\d[\d.]*)\s+(\S+e[-+]\d+)$", out, re.M)
    assert [float(p[0]) for p in points] == pytest.approx([3.0, 4.0, 5.0, 6.0, 7.0, 8.0])  # int3 .. int8
    used = [float(p[1]) for p in points]
    omega = [float(p[2]) for p in points]
    assert all(u <= v + 1e-9 for u, v in zip(used, [float(p[0]) for p in points]))
    assert all(a >= b for a, b in zip(omega, omega[1:])) and omega[0] > omega[-1] > 0  # more bits, less Ω
    # the recipe's own choice (4.5 bits) lies on the frontier: between the 4- and 5-bit points
    assert omega[1] >= float(chosen.group(2)) >= omega[2]
    with pytest.raises(QcompileError, match="does not exist"):
        from qcompile.pareto import Frontier, plot_frontier

        plot_frontier(Frontier("avg_bits", "hessian", [(3.0, 1.0, 3.0)], (3.0, 1.0)), tmp_path / "no" / "f.png")


def test_activation_formats_chosen_per_layer_with_ties_and_bops_budget(canonical_zoo):
    """Candidates that quantize activations: the ILP picks weight and activation formats per
    layer under a BOPs budget, linears reading one tensor get one activation width, each
    layer is lowered to its format's op, and the lowered graph computes what the fake
    quantized layers compute."""
    from qcompile.cost_model import linear_costs
    from qcompile.graph_utils import ACT_BITS_META, ACTQ_META
    from qcompile.kernels import ACTIVATION_QUANT_LINEAR_OPS, W4_ACT_QUANT_LINEAR_OPS
    from qcompile.quantizers import dequantize_weight
    from qcompile.weight_formats import fake_quantize_activation

    gm, example, other = canonical_zoo("llama")
    costs, sizes = linear_costs(gm, quantizable_linears(gm))
    macs = sum(c.evaluate(c.tokens, sizes) * c.out_features * c.in_features for c in costs)
    # bits_w·bits_a per MAC: w4a4 16, w4a8 32, w8a8 64, w8 128: 28 forces 4- and 8-bit activations
    limit = 28 * macs
    # the pin ties layer 0's k/v projections (same input as q) to 4-bit activations too
    recipe = PRESETS["auto"].replace(group_size=32, clip_ratios=(), budget=Budget(bops=limit), hutchinson_samples=4,
                                     candidates=("w4", "w8", "w4a4", "w4a8", "w8a8"),
                                     precision_pins=(("*.0.self_attn.q_proj", "w4a4"),))
    ctx = PassContext(recipe, example, calibration=[example, other], progress=False)
    gm = run_passes(gm, [assign_precision, quantize_weights], ctx)
    chosen = {layer_name(n): n.meta[PRECISION_META] for n in quantizable_linears(gm)}
    assert len(chosen) == len(costs) and {f.act_bits for f in chosen.values()} >= {4, 8}
    bops = sum(c.evaluate(c.bops(chosen[c.layer]), sizes) for c in costs)
    assert bops <= limit and bops == pytest.approx(ctx.analyses["precision"]["assignment"].totals["bops"], rel=1e-12)
    readers: dict = {}
    for node in quantizable_linears(gm):
        readers.setdefault(node.args[0], []).append(chosen[layer_name(node)].act_bits)
    assert any(len(widths) == 3 for widths in readers.values())  # q/k/v read one normalized tensor
    assert all(len(set(widths)) == 1 for widths in readers.values())  # ... and share its activation width
    assert [chosen[f"model.layers.0.self_attn.{p}_proj"].act_bits for p in "qkv"] == [4, 4, 4]
    assert {chosen[f"model.layers.1.self_attn.{p}_proj"].act_bits for p in "qkv"} == {8}  # not pinned: 8 is better

    class FakeQuantized(torch.fx.Interpreter):  # each linear as x̂ Ŵᵀ + b from its attached weights
        def run_node(self, n):
            if n.op != "call_function" or PRECISION_META not in n.meta:
                return super().run_node(n)
            args, _ = self.fetch_args_kwargs_from_env(n)
            fmt = n.meta[PRECISION_META]
            w_hat = n.meta[ACTQ_META].dequantize() if ACTQ_META in n.meta else dequantize_weight(n.meta[QWEIGHT_META])
            bias = args[2] if len(args) > 2 else None
            return torch.nn.functional.linear(fake_quantize_activation(args[0], fmt), w_hat, bias)

    with torch.no_grad():
        expected = FakeQuantized(gm).run(*other)[0]
    lowered = run_passes(gm, [lower_to_kernels], ctx)
    ops = {ACTIVATION_QUANT_LINEAR_OPS["int8"]: "w8a8", W4_ACT_QUANT_LINEAR_OPS[8]: "w4a8",
           W4_ACT_QUANT_LINEAR_OPS[4]: "w4a4", WEIGHT_ONLY_LINEAR_OPS[4]: "w4", WEIGHT_ONLY_LINEAR_OPS[8]: "w8"}
    for op, fmt in ops.items():
        for node in call_nodes(lowered, op):
            assert node.meta[PRECISION_META].name == fmt
            assert (ACTQ_META in node.meta) == (fmt == "w8a8")
            assert node.meta.get(ACT_BITS_META) == {"w4a8": 8, "w4a4": 4}.get(fmt)
    assert sum(len(call_nodes(lowered, op)) for op in ops) == len(chosen) and not quantizable_linears(lowered)
    with torch.no_grad():
        got = lowered(*other)[0]
    # the kernels dequantize in their epilogues (int dots, float32 scales): float32 rounding, not format error
    assert float((got - expected).norm()) <= 1e-4 * float(expected.norm())


@pytest.mark.parametrize("name", ["w3", "w4", "w8", "w8a8", "w4a8", "w4a4", "float"])
def test_format_linear_computes_the_format(name):
    """The op a measured latency table times is the layer in that format: x̂ Ŵᵀ."""
    from qcompile.latency_table import format_linear
    from qcompile.weight_formats import candidate_formats, fake_quantize, fake_quantize_activation

    gen = torch.Generator().manual_seed(int(_rng().integers(1 << 31)))
    fmt = candidate_formats((name,), 32, False)[0]
    w, x = torch.randn(37, 96, generator=gen), torch.randn(19, 96, generator=gen)
    expected = fake_quantize_activation(x, fmt).double() @ fake_quantize(w, fmt).double().T
    got = format_linear(fmt, w)(x).double()
    # weight-only CPU kernels compute with bf16 activations (2^-9 relative rounding per
    # element); the others in float32 after exact integer dots
    tol = 1e-2 if fmt.act_bits == 16 and not fmt.is_float else 1e-5
    assert float((got - expected).norm()) <= tol * float(expected.norm())


def test_measured_latency_budget(canonical_zoo):
    from qcompile.cost_model import linear_costs
    from qcompile.latency_table import measure_latency_table
    from qcompile.weight_formats import candidate_formats

    gm, example, other = canonical_zoo("llama")
    nodes = quantizable_linears(gm)
    costs, sizes = linear_costs(gm, nodes)
    formats = candidate_formats(("w4", "w8", "w8a8", "float"), 32, False)
    table = measure_latency_table(costs, formats, sizes, repeat=3, progress=False)
    assert table.shape == (len(nodes), 4) and np.isfinite(table).all() and (table > 0).all()
    shapes = [(c.out_features, c.in_features) for c in costs]
    for i, j in itertools.combinations(range(len(costs)), 2):  # one measurement per shape
        assert (table[i] == table[j]).all() == (shapes[i] == shapes[j])
    lo, hi = table.min(1).sum(), table.max(1).sum()
    recipe = PRESETS["auto"].replace(sensitivity="local", group_size=32, clip_ratios=(),
                                     candidates=("w4", "w8", "w8a8", "float"),
                                     budget=Budget(latency_ms=lo + 0.75 * (hi - lo), device="measured"))
    ctx = PassContext(recipe, example, calibration=[example, other], progress=False)
    run_passes(gm, [assign_precision], ctx)
    problem = ctx.analyses["precision"]
    con = problem["constraints"][0]
    assert con.name == "latency_ms" and (con.costs > 0).all()
    choice = problem["assignment"].choice
    assert con.total(choice) <= con.limit and problem["assignment"].totals["latency_ms"] == con.total(choice)
