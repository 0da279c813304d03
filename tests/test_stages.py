"""Stage cutting (qcompile.stages): real Hugging Face graphs split into their layers, from
the graph alone, and the stages run in sequence compute exactly what the graph computes."""
from __future__ import annotations

import re

import pytest
import torch

from qcompile.capture import capture
from qcompile.graph_utils import layer_name
from qcompile.stages import articulation_cut_points, cut_points, find_stages, side_values, stage_module


def _layer_index(name: str) -> str:
    match = re.search(r"layers?\.(\d+)\.", name)
    return match.group(1) if match else "head"


def _run_stages(gm, stages, flat):
    """Run the stages one after another; return {node: value} of every graph output value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, flat))
    outputs = {}
    for stage in stages:
        module, _ = stage_module(gm, stage, with_graph_outputs=True)
        values = module(*[env[n] for n in stage.inputs])
        env.update(zip(stage.outputs + stage.graph_outputs, values))
        outputs.update(zip(stage.graph_outputs, values[len(stage.outputs):]))
    return outputs


@pytest.mark.parametrize("arch, n_stages", [("llama", 3), ("bert", 3)])
def test_transformer_splits_into_layers(canonical_zoo, arch, n_stages):
    gm, example, other = canonical_zoo(arch)
    stages = find_stages(gm)
    assert len(stages) == n_stages  # 2 layers + the head (lm_head / pooler)
    seen = []
    for stage in stages:
        layers = {_layer_index(layer_name(n)) for n in stage.linears}
        assert len(layers) == 1, f"stage {stage.index} mixes layers {layers}"
        seen += sorted(layers)
    assert seen == ["0", "1", "head"]
    # every stage after the first reads exactly one main tensor; the rest are side values
    side = side_values(gm)
    for stage in stages[1:]:
        assert len(stage.main_inputs) == 1
        assert all(n in side for n in stage.side_inputs)
    # the second layer reads side values (mask; rotary cos/sin for llama) that no matrix feeds
    assert stages[1].side_inputs, "the layer's mask/positions must be carried, not block the cut"
    if arch == "llama":
        assert sum(isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].dim() >= 3 for n in stages[1].side_inputs) >= 3

    # running the stages in sequence gives the graph's outputs exactly (same ops, same order)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    with torch.no_grad():
        for flat in (example, other):  # two shapes: the stages stay dynamic
            expected = dict(zip(output_node.args[0], gm(*flat)))
            got = _run_stages(gm, stages, flat)
            assert set(got) == {n for n in expected if n.op == "call_function"}
            for node, value in got.items():
                assert torch.equal(value, expected[node]), node.name


def test_cut_points_are_articulation_points(canonical_zoo):
    gm, _, _ = canonical_zoo("llama")
    side = side_values(gm)
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function")]
    articulation = articulation_cut_points(gm, side)
    cuts = cut_points(gm, side)
    assert cuts
    for i in cuts:
        live = [n for n in nodes[: i + 1] if n not in side
                and any(u in nodes and nodes.index(u) > i for u in n.users)]
        assert len(live) == 1
        if all(a in side or a.op == "get_attr" for a in live[0].all_input_nodes):
            continue  # the first main value (the embedding) starts the main dataflow: no articulation
        assert live[0] in articulation, f"{live[0].name} is live alone after {nodes[i].name} but no articulation point"


class _SkipModel(torch.nn.Module):
    """lin0, then a skip connection around lin1 -> lin2: only one cut point (after lin0)."""

    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(40, 24)
        self.lin1 = torch.nn.Linear(24, 56)
        self.lin2 = torch.nn.Linear(56, 24)

    def forward(self, x):
        a = torch.relu(self.lin0(x))
        return self.lin2(torch.relu(self.lin1(a))) + a


def test_skip_connection_blocks_a_cut():
    torch.manual_seed(0)
    cap = capture(_SkipModel().eval(), (torch.randn(3, 5, 40),))
    gm = cap.graph_module
    stages = find_stages(gm, group=False)
    assert [[layer_name(n) for n in s.linears] for s in stages] == [["lin0"], ["lin1", "lin2"]]
    assert [n.name for n in stages[1].inputs] == [stages[0].outputs[0].name]
    x = torch.randn(2, 7, 40)
    out = _run_stages(gm, stages, [x])
    (value,) = out.values()
    assert torch.equal(value, gm(x)[0])


def test_sequential_recipe_calibrates_on_quantized_earlier_stages():
    """recipe.sequential: lin1/lin2 (stage 1) are rounded against the inputs that the
    *quantized* lin0 makes — the same weights as the all-at-once path gives on a graph whose
    lin0 weight was replaced by its dequantized value beforehand."""
    import copy

    from qcompile.graph_utils import QWEIGHT_META, linear_weight, quantizable_linears
    from qcompile.passes.quantize_weights import quantize_weights
    from qcompile.pipeline import PassContext, run_passes
    from qcompile.quantizers import dequantize_weight
    from qcompile.recipe import resolve_recipe

    torch.manual_seed(1)
    batches = [[torch.randn(2, 3 + i, 40)] for i in range(3)]
    gm = capture(_SkipModel().eval(), (batches[0][0],)).graph_module
    recipe = resolve_recipe({"preset": "w4a16-gptq", "group_size": 8, "clip_ratios": ()})

    def run(graph, sequential):
        ctx = PassContext(recipe.replace(sequential=sequential), batches[0], calibration=batches, verify=False,
                          progress=False)
        out = run_passes(graph, [quantize_weights], ctx)
        return {layer_name(n): n.meta[QWEIGHT_META] for n in quantizable_linears(out)}

    sequential = run(copy.deepcopy(gm), True)
    reference_graph = copy.deepcopy(gm)
    lin0 = quantizable_linears(reference_graph)[0]
    setattr(reference_graph, lin0.args[1].target, dequantize_weight(sequential["lin0"], linear_weight(gm, lin0).dtype))
    reference = run(reference_graph, False)
    plain = run(copy.deepcopy(gm), False)
    assert torch.equal(sequential["lin0"].qweight, plain["lin0"].qweight)  # stage 0: same inputs either way
    for name in ("lin1", "lin2"):
        assert torch.equal(sequential[name].qweight, reference[name].qweight), name
        assert torch.equal(sequential[name].scales, reference[name].scales), name
    assert any(not torch.equal(sequential[n].qweight, plain[n].qweight) for n in ("lin1", "lin2"))


def test_sequential_recipe_validation():
    from qcompile.errors import RecipeError
    from qcompile.recipe import resolve_recipe

    with pytest.raises(RecipeError, match="weight-only recipe, got activation_bits=8"):
        resolve_recipe({"preset": "w4a8", "sequential": True})
    with pytest.raises(RecipeError, match="sequential must be True or False"):
        resolve_recipe({"preset": "w4a16-gptq", "sequential": "yes"})
    assert resolve_recipe({"preset": "w4a16-gptq", "sequential": True}).sequential is True
