"""The pass manager: verification after every pass, timings, dumps."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qcompile.capture import capture
from qcompile.errors import VerificationError
from qcompile.graph_utils import get_constant, quantizable_linears
from qcompile.passes.canonicalize import canonicalize
from qcompile.pipeline import GraphPass, PassContext, PassResult, run_passes
from qcompile.recipe import PRESETS
from qcompile.verify import EQUIVALENCE_RTOL, run_float64, to_float64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _setup():
    model = Block().eval()
    x = torch.randn(4, 16)
    cap = capture(model, (x,))
    return model, cap, PassContext(PRESETS["w8a16"], cap.flatten_inputs((x,), {}))


def _scale_first_weight(factor):
    def run(gm, ctx):
        weight = get_constant(gm, quantizable_linears(gm)[0].args[1])
        weight.mul_(factor)
        return PassResult(gm, True)

    return run


def test_function_preserving_pass_that_changes_the_function_is_caught_and_named():
    _, cap, ctx = _setup()
    bad = GraphPass("scale_weights", _scale_first_weight(1 + 1e-6), preserves_function=True)
    with pytest.raises(VerificationError, match="scale_weights") as info:
        run_passes(cap.graph_module, [bad], ctx)
    assert "float64" in str(info.value)


def test_second_function_preserving_pass_is_checked_against_reused_outputs(monkeypatch):
    """After a verified pass, the next one is compared with the float64 outputs the first
    check computed (the graph is not run again), and a wrong change is still caught."""
    import qcompile.pipeline as pipeline

    _, cap, ctx = _setup()
    calls = []
    real = pipeline.check_equivalence

    references = []
    real_run = pipeline.float64_run

    def spy(before, after, inputs, *, reference=None, **kwargs):
        calls.append((before is None, reference is None))
        return real(before, after, inputs, reference=reference, **kwargs)

    def run_spy(gm, inputs, record=()):
        references.append(gm)
        return real_run(gm, inputs, record)

    monkeypatch.setattr(pipeline, "check_equivalence", spy)
    monkeypatch.setattr(pipeline, "float64_run", run_spy)
    identity = GraphPass("identity", lambda gm, ctx: PassResult(gm, False), preserves_function=True)
    bad = GraphPass("scale_weights", _scale_first_weight(1 + 1e-6), preserves_function=True)
    with pytest.raises(VerificationError, match="scale_weights"):
        run_passes(cap.graph_module, [canonicalize, identity, bad], ctx)
    # the graph is run in float64 once before the first pass (no copy of it is kept), then
    # each check compares with the runs the previous check made
    assert len(references) == 1
    assert calls == [(True, False), (True, False), (True, False)]


def test_a_calibration_batch_equal_to_the_example_is_checked_once():
    _, cap, ctx = _setup()
    other = [torch.randn(4, 16)]
    ctx.calibration = [[ctx.example_inputs[0].clone()], other]
    assert [len(s) for s in ctx.check_inputs()] == [1, 1]
    assert ctx.check_inputs()[1] is other


def test_rounded_constant_is_checked_at_its_recorded_float64_value():
    """A rotation ``x W2ᵀ = (x Q)(W2 Q)ᵀ`` with Q and W2 Q computed in float64 and stored in
    float32 is exact only at the recorded float64 values: with them the check holds; without
    them the float32 rounding (~1e-8) fails the 1e-9 check; a recorded value that is not what
    was stored fails too."""
    from qcompile.graph_utils import EXACT_META, add_constant, infer_meta

    def rotate(record, wrong=0.0):
        def run(gm, ctx):
            _, second = quantizable_linears(gm)
            q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
            exact_w = get_constant(gm, second.args[1]).double() @ q
            q_node = add_constant(gm, q.float(), "q", before=second, exact=(lambda: q) if record else None)
            with gm.graph.inserting_before(second):
                rotated = gm.graph.call_function(torch.ops.aten.matmul.default, (second.args[0], q_node))
            infer_meta(gm, rotated)
            w_node = add_constant(gm, exact_w.float(), "w2", before=second,
                                  exact=(lambda: exact_w + wrong) if record else None)
            second.args = (rotated, w_node, *second.args[2:])
            return PassResult(gm, True)
        return GraphPass("rotate", run, preserves_function=True)

    _, cap, ctx = _setup()
    run_passes(cap.graph_module, [rotate(record=True)], ctx)
    assert ctx.pass_log[0].verified == "structure+float64"
    assert all(EXACT_META not in n.meta for n in cap.graph_module.graph.nodes)  # dropped once checked
    _, cap, ctx = _setup()
    with pytest.raises(VerificationError, match="float64"):
        run_passes(cap.graph_module, [rotate(record=False)], ctx)
    _, cap, ctx = _setup()
    with pytest.raises(VerificationError, match="recorded float64 value"):
        run_passes(cap.graph_module, [rotate(record=True, wrong=1e-3)], ctx)


def test_same_change_is_allowed_when_the_pass_does_not_claim_to_preserve_function():
    _, cap, ctx = _setup()
    ok = GraphPass("scale_weights", _scale_first_weight(2.0), preserves_function=False)
    run_passes(cap.graph_module, [ok], ctx)
    assert ctx.pass_log[0].verified == "structure"


def test_broken_graph_and_missing_metadata_are_caught():
    _, cap, ctx = _setup()

    def drop_meta(gm, ctx):
        node = quantizable_linears(gm)[0]
        del node.meta["val"]
        return PassResult(gm, True)

    with pytest.raises(VerificationError, match="drop_meta.*no shape/dtype metadata"):
        run_passes(cap.graph_module, [GraphPass("drop_meta", drop_meta, False)], ctx)

    _, cap, ctx = _setup()

    def dangling(gm, ctx):
        node = quantizable_linears(gm)[0]
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            gm.graph.call_function(torch.ops.aten.relu.default, (node,))  # uses a node defined later
        return PassResult(gm, True)

    with pytest.raises(VerificationError, match="dangling.*lint"):
        run_passes(cap.graph_module, [GraphPass("dangling", dangling, False)], ctx)


def test_pass_log_and_dump_dir(tmp_path):
    _, cap, ctx = _setup()
    ctx.dump_dir = tmp_path / "dump"
    run_passes(cap.graph_module, [canonicalize], ctx)
    record = ctx.pass_log[0]
    assert record.name == "canonicalize" and record.seconds >= 0 and record.nodes_after == record.nodes_before
    assert record.modified is False  # already canonical: nn.Linear is captured as aten.linear
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["00_captured.txt", "01_canonicalize.txt"]
    assert "aten.linear" in (tmp_path / "dump" / "01_canonicalize.txt").read_text()


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    _, cap, ctx = _setup()
    monkeypatch.setenv("QCOMPILE_DUMP_DIR", str(tmp_path / "env"))
    run_passes(cap.graph_module, [canonicalize], ctx)
    assert (tmp_path / "env" / "01_canonicalize.txt").exists()


def test_float64_copy_computes_in_float64_and_matches_model():
    model, cap, _ = _setup()
    x = torch.randn(5, 16, dtype=torch.float64)
    gm64 = to_float64(cap.graph_module)
    assert all(b.dtype == torch.float64 for b in gm64.buffers())
    (out,) = run_float64(cap.graph_module, [x])
    ref = Block().double()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, ref(x), rtol=EQUIVALENCE_RTOL, atol=0)
    assert out.dtype == torch.float64


def _llama(layers: int):
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 101, (2, 7))
    cap = capture(model, (), {"input_ids": ids, "use_cache": False})
    return cap, PassContext(PRESETS["w8a16"], cap.flatten_inputs((), {"input_ids": ids, "use_cache": False}))


@pytest.mark.parametrize("layer", [1, 3])
def test_a_broken_rewrite_in_one_layer_names_the_pass_and_the_stage(layer):
    """A 'function-preserving' pass that changes one weight of one decoder layer by 1e-6 is
    caught, and the message names the pass and the stage (the layer) where the outputs part."""
    cap, ctx = _llama(layers=4)
    target = f"model.layers.{layer}.mlp.down_proj"
    block = f"model.layers.{layer}.* (7 linears)"

    def nudge(gm, ctx):
        node = next(n for n in quantizable_linears(gm) if n.args[1].meta.get("qcompile.source") == f"{target}.weight")
        get_constant(gm, node.args[1]).mul_(1 + 1e-6)
        return PassResult(gm, True)

    with pytest.raises(VerificationError) as info:
        run_passes(cap.graph_module, [canonicalize, GraphPass("nudge", nudge, preserves_function=True)], ctx)
    message = str(info.value)
    assert "pass 'nudge' failed verification" in message
    # stage 0 is the embedding with layer 0; the 4 layers are 4 stages, the head joins the last
    assert f"in stage {layer} of 4" in message and block in message, message


def test_a_pass_that_rotates_between_stages_is_not_located():
    cap, ctx = _llama(layers=2)

    def nudge(gm, ctx):
        get_constant(gm, quantizable_linears(gm)[0].args[1]).mul_(1 + 1e-6)
        return PassResult(gm, True)

    rotating = GraphPass("rotating", nudge, preserves_function=True, keeps_stage_values=False)
    with pytest.raises(VerificationError, match="pass 'rotating'.*no stage is named"):
        run_passes(cap.graph_module, [rotating], ctx)


def test_the_check_holds_no_copy_of_the_weights():
    """The float64 check promotes one constant at a time: on a model of 8 MiB-float64 weights
    (32 MiB float32 in all) its resident peak grows by far less than the model (the old
    check held a copy and two float64 versions: 5x the model). The bound leaves room for one
    promoted weight, the activations and the allocator's slack."""
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).eval()
    x = torch.randn(3, 1024)
    cap = capture(model, (x,))
    ctx = PassContext(PRESETS["w8a16"], cap.flatten_inputs((x,), {}))
    run_passes(cap.graph_module, [canonicalize], ctx)
    record = ctx.pass_log[0]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if record.verify_peak_bytes is None:
        pytest.skip("no /proc: resident memory is not measured here")
    from qcompile.resident import resident_bytes

    assert record.verified == "structure+float64"
    assert record.verify_peak_bytes - resident_bytes() < 0.6 * model_bytes, (record, model_bytes)


def test_the_report_gives_each_check_its_time_and_peak_memory():
    import re

    import qcompile

    model = Block().eval()
    qm = qcompile.quantize(model, (torch.randn(4, 16),), recipe="w8a16", progress=False)
    records = {p.name: p for p in qm.report().passes}
    assert records["canonicalize"].verified == "structure+float64" and records["canonicalize"].verify_seconds > 0
    assert records["quantize_weights"].verified == "structure"
    line = next(ln for ln in qm.report().table().splitlines() if ln.startswith("passes: "))
    assert re.search(r"canonicalize \d+ ms \(\d+->\d+ ops, verified structure\+float64, check \d+ ms"
                     r"(, peak [\d.]+ [KMG]?i?B resident)?\)", line), line
    unverified = qcompile.quantize(model, (torch.randn(4, 16),), recipe="w8a16", progress=False, verify=False)
    assert all(p.verified == "none" and p.verify_peak_bytes is None for p in unverified.report().passes)
    assert "check" not in next(ln for ln in unverified.report().table().splitlines() if ln.startswith("passes: "))
