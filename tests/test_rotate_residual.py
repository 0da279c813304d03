"""rotate_residual: the residual stream carried rotated, folded offline (QuaRot's residual rotation).

On the zoo's pre-norm decoders (RMSNorm ones, and LayerNorm ones once their stream is
centered and the LayerNorms become RMS norms) the stream is found from the graph and rotated
with no online op on it; the pass manager's float64 check must hold; only the linears that
do not read the stream (attention output and MLP down projections) keep online rotations,
placed by ``insert_rotations``. Post-norm BERT and ViT (convolution patch embedding) are
rejected with the reason in the report's notes and fall back to online input rotations for
every linear.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile.capture import capture
from qcompile.graph_utils import RESIDUAL_META, get_constant, quantizable_linears
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.insert_rotations import HADAMARD_OP, insert_rotations
from qcompile.passes.rotate_residual import rotate_residual
from qcompile.pipeline import PassContext, run_passes
from qcompile.recipe import Recipe
from qcompile.residual_stream import find_residual_streams
from tests.models import zoo

aten = torch.ops.aten
RESIDUAL = Recipe(name="residual-only", rotate="residual")
RMS_DECODERS = ("gemma", "llama", "mistral", "phi3", "qwen2", "qwen3")
LAYERNORM_DECODERS = ("gpt2", "gpt_neox", "opt")
NOT_ROTATABLE = ("bert", "vit")
ZOO_LAYERS = 2  # every zoo entry is built with num_hidden_layers=2

# float32 forward of the rotated graph against the original: rotated weights rounded to
# float32 (relative 6e-8 each) over a few layers of random-weight models
FLOAT32_RTOL = 2e-4


def _max_rel(a, b):
    leaves_a = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    leaves_b = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max(((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item() for x, y in zip(leaves_a, leaves_b))


def _norm_weight_muls(gm, width):
    """Multiplies of a stream-width tensor by a constant per-channel vector (a norm weight)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == aten.mul.Tensor:
            for a in n.args[:2]:
                c = get_constant(gm, a)
                if c is not None and c.dim() == 1 and c.shape[0] == width:
                    out.append(n)
    return out


@pytest.mark.parametrize("name", RMS_DECODERS + LAYERNORM_DECODERS)
def test_residual_rotation_preserves_function_and_leaves_no_online_op_on_the_stream(canonical_zoo, name):
    gm, example, other = canonical_zoo(name)
    with torch.no_grad():
        expected = gm(*other)
    (stream,) = find_residual_streams(gm).streams
    width = stream.width
    layers = ZOO_LAYERS
    # every layer writes twice (attention output, MLP down); norms before attention, MLP and head
    assert len(stream.embeddings) == (2 if name in ("gpt2", "opt") else 1)  # + learned positions
    assert len(stream.writers) == 2 * layers
    assert len(stream.layer_norms) == (2 * layers + 1 if name in LAYERNORM_DECODERS else 0)
    assert all(r.scale is not None for r in stream.readers)
    readers = {r.linear.name for r in stream.readers}
    tables = {n.name: get_constant(gm, n.args[0]).clone() for n in stream.embeddings}
    ctx = PassContext(RESIDUAL, example, calibration=[other], progress=False)
    out = run_passes(gm, [rotate_residual, insert_rotations], ctx)
    assert [p.verified for p in ctx.pass_log] == ["structure+float64"] * 2
    assert all(p.modified for p in ctx.pass_log)
    # the norms' per-channel weights are folded away, no LayerNorm is left; tables are rotated
    assert not _norm_weight_muls(out, width)
    assert not [n for n in out.graph.nodes if n.target == aten.layer_norm.default]
    for node in out.graph.nodes:
        if node.name in tables:
            table = tables[node.name]
            if name in LAYERNORM_DECODERS:  # centered first
                table = table - table.mean(-1, keepdim=True)
            rotated_table = get_constant(out, node.args[0])
            # rotated: entries move by about their own size (randn tables, |entry| ~ 1), far
            # beyond 1e-3; an unrotated (or only re-rounded) table stays within float32 rounding
            assert not torch.allclose(rotated_table, table, atol=1e-3)
            # a rotation is orthogonal: every row keeps its norm (float32 rounding of the product)
            assert torch.allclose(rotated_table.norm(dim=1), table.norm(dim=1), rtol=1e-4)
    linears = quantizable_linears(out)
    online = [n for n in out.graph.nodes if n.op == "call_function" and n.target == HADAMARD_OP]
    for n in linears:
        if n.name in readers:
            assert RESIDUAL_META in n.meta and n.args[0].target != HADAMARD_OP
        else:  # attention output / MLP down projection: an online rotation of its own input
            assert n.args[0].target == HADAMARD_OP
    assert len(online) == 2 * layers and all(
        all(u.target == aten.linear.default and RESIDUAL_META not in u.meta for u in rot.users) for rot in online
    )
    rows = {r["layer"]: r for r in ctx.layers.values()}
    assert sum("rotation_out" in r for r in rows.values()) == 2 * layers
    assert sum(r.get("rotation", "").startswith("reads the rotated residual stream") for r in rows.values()) \
        == len(readers)
    assert any("rotated the residual stream" in note for note in ctx.notes)
    with torch.no_grad():
        got = out(*other)
    assert _max_rel(expected, got) < FLOAT32_RTOL


@pytest.mark.parametrize("name", NOT_ROTATABLE)
def test_models_without_a_rotatable_stream_fall_back_to_online_input_rotations_and_say_why(canonical_zoo, name):
    gm, example, other = canonical_zoo(name)
    linears = quantizable_linears(gm)
    ctx = PassContext(RESIDUAL, example, calibration=[other], progress=False)
    out = run_passes(gm, [rotate_residual, insert_rotations], ctx)
    assert [p.modified for p in ctx.pass_log] == [False, True]
    assert [p.verified for p in ctx.pass_log] == ["structure+float64"] * 2
    (note,) = ctx.notes
    why = {"bert": "the output of layer_norm (layer_norm.default) reaches add",  # post-norm
           "vit": "transpose (transpose.int) produces it"}[name]  # the conv patch embedding's
    assert "no residual stream rotated" in note and why in note
    assert all(n.args[0].target == HADAMARD_OP for n in quantizable_linears(out))
    assert len(quantizable_linears(out)) == len(linears)


class _PreNorm(nn.Module):
    """A hand-written pre-norm decoder: RMS norms with weights, biased writers, a constant
    shift added to the stream, and an LM head tied to the embedding."""

    def __init__(self, vocab=37, d=24, hidden=40, layers=2, return_hidden=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.shift = nn.Parameter(torch.randn(d))
        self.norms = nn.ParameterList([nn.Parameter(1 + 0.3 * torch.randn(d)) for _ in range(2 * layers + 1)])
        self.ups = nn.ModuleList([nn.Linear(d, hidden) for _ in range(layers)])
        self.downs = nn.ModuleList([nn.Linear(hidden, d) for _ in range(layers)])
        self.mixes = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)])
        self.return_hidden = return_hidden

    @staticmethod
    def _rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    def forward(self, ids):
        h = self.emb(ids) + self.shift
        for i, (mix, up, down) in enumerate(zip(self.mixes, self.ups, self.downs)):
            h = h + mix(self._rms(h, self.norms[2 * i]))
            h = h + down(torch.relu(up(self._rms(h, self.norms[2 * i + 1]))))
        logits = nn.functional.linear(self._rms(h, self.norms[-1]), self.emb.weight)
        return (logits, h) if self.return_hidden else logits


def _canonical(model, ids):
    cap = capture(model, (ids,))
    example = cap.flatten_inputs((ids,), {})
    gm = run_passes(cap.graph_module, [canonicalize], PassContext(Recipe(), example, progress=False))
    return gm, example


def test_hand_written_decoder_rotates_constants_biases_and_tied_head_exactly():
    torch.manual_seed(2)
    model = _PreNorm().eval()
    ids = torch.randint(0, 37, (3, 9))
    gm, example = _canonical(model, ids)
    (stream,) = find_residual_streams(gm).streams
    assert len(stream.constants) == 1 and len(stream.writers) == 4 and len(stream.readers) == 5
    ctx = PassContext(RESIDUAL, example, progress=False)
    out = run_passes(gm, [rotate_residual], ctx)
    assert ctx.pass_log[0].verified == "structure+float64"
    # the tied table now exists twice: rotated rows for the lookup, W diag(g) Q for the head
    (embedding,) = [n for n in out.graph.nodes if n.target == aten.embedding.default]
    linears = quantizable_linears(out)
    head = linears[-1]
    assert len(linears) == 7 and head.args[1] is not embedding.args[0] and not _norm_weight_muls(out, 24)
    assert get_constant(out, head.args[1]).shape == get_constant(out, embedding.args[0]).shape == (37, 24)
    # float64 end to end against the model itself (the float64 check ran on the graph's
    # float32-rounded constants; here the model is rebuilt in float64)
    fresh = torch.randint(0, 37, (2, 13))
    with torch.no_grad():
        expected = model.double()(fresh)
        (got,) = out(fresh)
    # float32 storage of the rotated constants: relative error a few float32 ulps per layer
    assert (got.double() - expected).abs().max() / expected.abs().max() < 1e-5


def test_stream_that_is_a_graph_output_is_not_rotated():
    torch.manual_seed(3)
    model = _PreNorm(return_hidden=True).eval()
    gm, example = _canonical(model, torch.randint(0, 37, (2, 5)))
    search = find_residual_streams(gm)
    assert not search.streams
    assert "graph output" in search.rejected[0]


def test_w4a4_with_residual_rotation_lowers_and_beats_no_rotation():
    """End to end on the zoo Llama with an outlier channel in its residual stream (as trained
    LLMs have): the stream's readers take rotated inputs with no online op, and 4-bit
    activations lose far less than without any rotation."""
    model, (args, kwargs), (args2, kwargs2) = zoo.build("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 40.0
    calibration = [kwargs2]
    with torch.no_grad():
        reference = model(*args, **kwargs).logits
    errors = {}
    for rotate in ("off", "residual"):
        # RTN weights (GPTQ is tested elsewhere; here only the rotation differs)
        recipe = qcompile.PRESETS["w4a4"].replace(rotate=rotate, group_size=32, method="rtn", clip_ratios=())
        # the float64 checks of these passes are the tests above; here only the numerics
        qm = qcompile.quantize(model, args, kwargs, recipe=recipe, calibration=calibration, progress=False,
                               verify=False)
        with torch.no_grad():
            got = qm(*args, **kwargs).logits
        errors[rotate] = float((got - reference).norm() / reference.norm())
        ops = [n for n in qm.graph_module.graph.nodes if n.op == "call_function"]
        hadamards = [n for n in ops if n.target == torch.ops.qcompile.hadamard.default]
        assert len(hadamards) == (4 if rotate == "residual" else 0)  # o_proj and down_proj of 2 layers
    assert errors["residual"] < 0.7 * errors["off"], errors


def test_report_says_which_linears_got_which_rotation():
    torch.manual_seed(4)
    model = _PreNorm().eval()
    ids = torch.randint(0, 37, (2, 6))
    recipe = Recipe(name="w8a8-res", weight_bits=8, activation_bits=8, rotate="residual")
    qm = qcompile.quantize(model, (ids,), recipe=recipe, progress=False)
    report = qm.report()
    cells = {r["layer"]: report_cell for r, report_cell in zip(report.layers, _rotation_cells(report))}
    assert cells["ups.0"] == "residual stream"  # reads the stream: rotated offline, no online op
    assert cells["mixes.1"] == "residual stream, writes residual stream"  # reads and writes it
    assert cells["downs.0"] == "online input, writes residual stream"
    assert any("rotated the residual stream" in note for note in report.notes)
    table = report.table()
    assert "rotation" in table.splitlines()[1] and "note: rotate_residual: rotated the residual stream" in table
    with torch.no_grad():
        ref = model(ids)
    # int8 per-channel weights and int8 per-token activations through 7 random linears
    assert (qm(ids) - ref).norm() / ref.norm() < 3e-2


def _rotation_cells(report):
    from qcompile.report import _rotation_cell

    return [_rotation_cell(r) for r in report.layers]
