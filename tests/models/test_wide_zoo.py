"""The wider zoo (``zoo.EXTENDED``) itself: every entry runs at both shapes with the inputs its
processor gives, its linears have in_features a multiple of 32, and a regression case found
while building it. The quantize / torch.compile / ONNX tests of these architectures are in
test_zoo_decoders.py, test_zoo_encoders.py and test_zoo_multimodal.py."""
from __future__ import annotations

import pytest
import torch
import transformers

import qcompile
from qcompile.errors import InputMismatchError
from tests.models import zoo

# What each kind's processor returns (the keyword arguments every entry of that kind gets).
_INPUT_NAMES = {
    "decoder": {"input_ids", "attention_mask"},
    "ssm": {"input_ids", "attention_mask"},
    "encoder": {"input_ids", "attention_mask"},  # + token_type_ids for BERT-style tokenizers
    "encoder-decoder": {"input_ids", "attention_mask", "decoder_input_ids"},  # Whisper: input_features
    "vision": {"pixel_values"},
    "multimodal": {"input_ids", "attention_mask", "pixel_values"},
    "audio": {"input_values"},  # + attention_mask where the feature extractor gives one
}


@pytest.mark.parametrize("name", list(zoo.EXTENDED))
def test_extended_entry_runs_at_both_shapes(name):
    entry = zoo.EXTENDED[name]
    model = entry.build()
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    batches = []
    for make in (entry.inputs, entry.other_inputs):
        args, kwargs = make()
        assert args == ()
        expected = _INPUT_NAMES[entry.kind]
        if name == "whisper":
            expected = {"input_features", "decoder_input_ids"}
        assert expected <= set(kwargs) <= expected | {"token_type_ids", "attention_mask"}, sorted(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            assert (mask[-1] == 0).any() and (mask[0] == 1).all()  # the last row is padded, the first not
        with torch.no_grad():
            out = model(**kwargs)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out.to_tuple()) if isinstance(t, torch.Tensor)]
        assert leaves and all(torch.isfinite(t).all() for t in leaves if t.is_floating_point())
        batches.append(next(iter(kwargs.values())).shape[0])
        if entry.returns_cache:
            assert isinstance(out.past_key_values, transformers.Cache)
    assert batches == [zoo.SHAPE_A[0], zoo.SHAPE_B[0]]
    for layer, k in zoo.linear_in_features(model).items():
        assert k % 32 == 0 or entry.odd_sizes, f"{name}.{layer}: in_features {k} not a multiple of 32"


def test_zoo_is_wide():
    assert len(zoo.ALL_ARCHITECTURES) >= 30
    assert set(zoo.ARCHITECTURES).isdisjoint(zoo.EXTENDED)
    assert {e.kind for e in zoo.ALL_ARCHITECTURES.values()} == set(zoo.KINDS)


# Regression: Mamba2 captured at 16 tokens with chunk_size 8 takes the no-padding branch, which
# torch.export guards as (8 - seq % 8) % 8 <= 0; qcompile must refuse 11 tokens with
# InputMismatchError instead of running the graph into a reshape error inside it.
def test_mamba2_whole_chunks_specialization_is_reported():
    # One layer (the capture of the chunked scan costs ~20 s per layer on 2 cores).
    config = zoo._mamba2(chunk_size=8)
    config.num_hidden_layers = 1
    model = zoo._build_from(transformers.Mamba2ForCausalLM, config, 0)
    entry = zoo.EXTENDED["mamba2"]
    qm = qcompile.quantize(model, *entry.inputs(0), recipe="w8a16", progress=False)
    args, kwargs = entry.other_inputs(1)  # 11 tokens: not a whole number of chunks
    with pytest.raises(InputMismatchError):
        qm(*args, **kwargs)
