"""Capture: one canonical ATen graph with frozen weights, dynamic shapes, pytree outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qcompile.capture import capture, register_output_types
from qcompile.errors import CaptureError, InputMismatchError
from qcompile.testing import count_ops, relative_error
from tests.models.zoo import ARCHITECTURES


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 16)
        self.norm = nn.LayerNorm(16)
        self.register_buffer("offset", torch.randn(16))

    def forward(self, x, scale=2.0, extra=None):
        h = self.norm(self.proj(x) + self.offset) * scale
        return {"h": h, "pair": (h.sum(-1), x.mean())}


def test_weights_are_constants_and_every_node_has_metadata():
    model = TwoHeads().eval()
    cap = capture(model, (torch.randn(3, 5, 24),), {"scale": 2.0})
    gm = cap.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # user inputs only: x and the (specialized) float scale; no parameters
    assert [n.name for n in placeholders] == ["x", "scale"]
    sources = {n.meta["qcompile.source"] for n in gm.graph.nodes if n.op == "get_attr"}
    assert sources == {"proj.weight", "proj.bias", "norm.weight", "norm.bias", "offset"}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "call_function"):
            assert "val" in node.meta, node.name
    assert cap.constant_inputs == [None, 2.0]


def test_output_structure_and_other_shapes_are_exact():
    model = TwoHeads().eval()
    cap = capture(model, (torch.randn(3, 5, 24),), {"scale": 2.0})
    for shape in [(1, 1, 24), (2, 9, 24), (7, 3, 24)]:  # batch 1 and seq 1 included
        x = torch.randn(shape)
        out = cap.unflatten_outputs(cap.graph_module(*cap.flatten_inputs((x,), {"scale": 2.0})))
        ref = model(x, scale=2.0)
        assert set(out) == {"h", "pair"} and isinstance(out["pair"], tuple)
        torch.testing.assert_close(out["h"], ref["h"], rtol=0, atol=0)
        torch.testing.assert_close(out["pair"][0], ref["pair"][0], rtol=0, atol=0)


def test_specialized_non_tensor_input_is_checked():
    model = TwoHeads().eval()
    cap = capture(model, (torch.randn(3, 5, 24),), {"scale": 2.0})
    with pytest.raises(InputMismatchError, match="scale"):
        cap.flatten_inputs((torch.randn(3, 5, 24),), {"scale": 3.0})
    with pytest.raises(InputMismatchError, match="structure"):
        cap.flatten_inputs((torch.randn(3, 5, 24),), {})
    with pytest.raises(InputMismatchError, match="dimensions"):
        cap.flatten_inputs((torch.randn(5, 24),), {"scale": 2.0})


def test_state_objects_in_outputs_are_registered_generically():
    class State:  # a plain class that is not a pytree, like a KV cache
        def __init__(self, k, v):
            self.keys, self.values, self.length, self.name = k, v, k.shape[1], "s"

    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Linear(8, 8)

        def forward(self, x):
            return self.k(x), State(self.k(x) * 2, x + 1)

    model = WithState().eval()
    x = torch.randn(2, 4, 8)
    assert register_output_types(model(x)) == [State]
    cap = capture(model, (x,))
    x2 = torch.randn(3, 6, 8)
    out, state = cap.unflatten_outputs(cap.graph_module(*cap.flatten_inputs((x2,), {})))
    ref_out, ref_state = model(x2)
    assert isinstance(state, State) and state.name == "s"
    torch.testing.assert_close(state.keys, ref_state.keys)
    torch.testing.assert_close(out, ref_out)


def test_uncapturable_model_names_reason_and_torch_compile():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[: int(x.sum().item() > 0) + 1]

    with pytest.raises(CaptureError, match="torch.compile"):
        capture(DataDependent(), (torch.randn(4, 3),))


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral", "bert", "vit"])
def test_hf_models_capture_as_called_with_dynamic_shapes(name):
    entry = ARCHITECTURES[name]
    model = entry.build(0)
    args, kwargs = entry.inputs(0)
    cap = capture(model, args, kwargs)
    args2, kwargs2 = entry.other_inputs(1)
    with torch.no_grad():
        ref = model(*args2, **kwargs2)
        out = cap.unflatten_outputs(cap.graph_module(*cap.flatten_inputs(args2, kwargs2)))
    assert type(out) is type(ref)
    # same ops on the same inputs in float32; kernels may block differently per shape
    assert relative_error(ref, out) < 1e-5
    if entry.returns_cache:
        assert type(out.past_key_values) is type(ref.past_key_values)
        assert out.past_key_values.get_seq_length() == ref.past_key_values.get_seq_length()
    assert not any(n.op == "placeholder" and n.meta.get("qcompile.source") for n in cap.graph_module.graph.nodes)
    assert count_ops(cap.graph_module).get("aten.linear", 0) + count_ops(cap.graph_module).get("aten.addmm", 0) > 0


class _PadsToChunks(nn.Module):
    """Pads the sequence to whole chunks when it is not one already (as Mamba2 does): an
    example of whole chunks traces the branch without padding, valid only for such lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[1]
        pad = (8 - seq % 8) % 8
        if pad > 0:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        y = self.proj(x).reshape(x.shape[0], -1, 8, 32).sum(2)
        return y


def test_export_guards_are_checked_with_a_clear_error():
    model = _PadsToChunks().eval()
    cap = capture(model, (torch.randn(2, 16, 32),))
    gm = cap.graph_module
    x = torch.randn(3, 24, 32)  # whole chunks: the traced branch holds
    assert relative_error(model(x), gm(*cap.flatten_inputs((x,), {}))) < 1e-6
    with pytest.raises(InputMismatchError, match=r"\(3, 11, 32\)\) break a condition torch.export found"):
        cap.flatten_inputs((torch.randn(3, 11, 32),), {})


class _TiedHead(nn.Module):
    """An LM head sharing the embedding's tensor (``tie_word_embeddings``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 64)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 96, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(ids))))


@pytest.mark.parametrize("recipe", ["w8a16", "w4a8"])
def test_tied_weight_is_named_after_the_module_that_calls_it(recipe):
    """torch.export keeps one name per tensor (the embedding's, first in the model); the report
    names the linear after its module, also once rotations have replaced the weight (w4a8)."""
    import qcompile

    model = _TiedHead().eval()
    ids = torch.randint(0, 96, (2, 7))
    qm = qcompile.quantize(model, (ids,), recipe=recipe, calibration=[(ids,)], progress=False)
    assert sorted(r["layer"] for r in qm.report().layers) == ["head", "mix"]
