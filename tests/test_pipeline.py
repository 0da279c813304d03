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

    def spy(before, after, inputs, *, reference=None):
        calls.append((before is None, reference is None))
        return real(before, after, inputs, reference=reference)

    monkeypatch.setattr(pipeline, "check_equivalence", spy)
    identity = GraphPass("identity", lambda gm, ctx: PassResult(gm, False), preserves_function=True)
    bad = GraphPass("scale_weights", _scale_first_weight(1 + 1e-6), preserves_function=True)
    with pytest.raises(VerificationError, match="scale_weights"):
        run_passes(cap.graph_module, [canonicalize, identity, bad], ctx)
    assert calls == [(False, True), (True, False), (True, False)]


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
            q_node = add_constant(gm, q.float(), "q", before=second, exact=q if record else None)
            with gm.graph.inserting_before(second):
                rotated = gm.graph.call_function(torch.ops.aten.matmul.default, (second.args[0], q_node))
            infer_meta(gm, rotated)
            w_node = add_constant(gm, exact_w.float(), "w2", before=second, exact=exact_w + wrong if record else None)
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
