"""Streaming quantization of a checkpoint folder (qcompile.streaming): the same weights as
the in-memory sequential path, lazy shards with clear errors, and resumable output."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers

from qcompile.capture import capture
from qcompile.checkpoint import LazyCheckpoint, write_synthetic_checkpoint
from qcompile.errors import ModelLoadError, OutputExistsError
from qcompile.graph_utils import QWEIGHT_META, layer_name, quantizable_linears
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.quantize_weights import quantize_weights
from qcompile.pipeline import PassContext, run_passes
from qcompile.recipe import resolve_recipe
from qcompile.streaming import quantize_checkpoint, read_stage

# GPTQ int4 g32 with activation order; no range search (speed only: it is the same code either way)
RECIPE = {"preset": "w4a16-gptq", "group_size": 32, "clip_ratios": ()}
VOCAB = 301


def _config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=64)


def _calibration(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 13), generator=gen)} for _ in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck") / "llama"
    write_synthetic_checkpoint(_config(), folder, shard_bytes=60_000, seed=3)
    return folder


def _stage_files(out):
    return sorted(out.glob("stage-*.safetensors"))


@pytest.fixture(scope="module")
def in_memory(checkpoint):
    """``{sequential: {layer: QuantizedWeight}}`` of the in-memory path (the quantize_weights
    pass on the model loaded by transformers), with sequential=True and False."""
    model = transformers.AutoModel.from_pretrained(str(checkpoint)).eval()
    cal = _calibration()
    cap = capture(model, (), cal[0])
    batches = [cap.flatten_inputs((), b) for b in cal]
    out = {}
    for sequential in (True, False):
        recipe = resolve_recipe(RECIPE).replace(sequential=sequential)
        ctx = PassContext(recipe, batches[0], calibration=batches, verify=False, progress=False)
        gm = run_passes(copy.deepcopy(cap.graph_module), [canonicalize, quantize_weights], ctx)
        out[sequential] = {layer_name(n): n.meta[QWEIGHT_META] for n in quantizable_linears(gm)}
    return out


def _assert_same_weights(out, reference):
    got = {}
    for f in _stage_files(out):
        got.update(read_stage(f)[0])
    assert len(got) == len(reference) == 14
    for name, qw in reference.items():
        mine = got[name + ".weight"]
        assert torch.equal(mine.qweight, qw.qweight), name
        assert torch.equal(mine.scales, qw.scales), name
        assert torch.equal(mine.zeros, qw.zeros), name


def test_streaming_equals_in_memory_sequential(checkpoint, in_memory, tmp_path):
    out = tmp_path / "q"
    result = quantize_checkpoint(checkpoint, out, recipe=RECIPE, calibration=_calibration(), progress=False)
    # the embedding lookup is a stage of its own (never held with a layer's weights), then the 2 layers
    assert result.stages == 3 and result.resumed == 0
    assert (out / "manifest.json").is_file() and not out.with_name("q.partial").exists()
    assert json.loads((out / "manifest.json").read_text())["done"] == [0, 1, 2]
    first = read_stage(_stage_files(out)[0])
    assert first[0] == {} and set(first[1]) == {"embed_tokens.weight"}, "stage 0 is the embedding table alone"
    _assert_same_weights(out, in_memory[True])
    floats = {}
    for f in _stage_files(out):
        qweights, constants, rows = read_stage(f)
        floats.update(constants)
        assert {r["layer"] for r in rows} == {k[: -len(".weight")] for k in qweights}
    # float constants (norms, embedding) are the checkpoint's, bit for bit
    ck = LazyCheckpoint(checkpoint)
    for key, value in floats.items():
        assert torch.equal(value, ck.read(["model." + key])["model." + key]), key
    assert "embed_tokens.weight" in floats and "norm.weight" in floats

    # sequential vs all-at-once: layer 0 sees the same inputs (equal weights); layer 1 is
    # calibrated on layer 0's quantized outputs, so its rounding differs
    memory, parallel = in_memory[True], in_memory[False]
    assert torch.equal(parallel["layers.0.self_attn.q_proj"].qweight, memory["layers.0.self_attn.q_proj"].qweight)
    assert not torch.equal(parallel["layers.1.mlp.down_proj"].qweight, memory["layers.1.mlp.down_proj"].qweight)


def test_interrupted_run_resumes(checkpoint, in_memory, tmp_path):
    out = tmp_path / "q"

    def stop_after_first(index, _seconds):
        if index == 0:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(checkpoint, out, recipe=RECIPE, calibration=_calibration(), progress=False,
                            on_stage_done=stop_after_first)
    partial = tmp_path / "q.partial"
    assert not out.exists(), "an interrupted run must not present a result as complete"
    assert json.loads((partial / "manifest.json").read_text())["done"] == [0]
    assert [f.name for f in _stage_files(partial)] == ["stage-00000.safetensors"]

    with pytest.raises(OutputExistsError, match="different recipe"):  # resuming needs the same arguments
        quantize_checkpoint(checkpoint, out, recipe={**RECIPE, "group_size": 16}, calibration=_calibration(),
                            progress=False)
    result = quantize_checkpoint(checkpoint, out, recipe=RECIPE, calibration=_calibration(), progress=False)
    assert result.resumed == 1 and set(result.stage_seconds) == {0, 1, 2}
    assert not partial.exists()
    # the resumed run's weights are the uninterrupted ones (= the in-memory sequential path's)
    _assert_same_weights(out, in_memory[True])


def test_missing_or_corrupt_shard_names_the_file(checkpoint, tmp_path):
    shards = sorted(checkpoint.glob("model-*.safetensors"))
    assert len(shards) >= 3

    missing = tmp_path / "missing"
    shutil.copytree(checkpoint, missing)
    (missing / shards[1].name).unlink()
    with pytest.raises(ModelLoadError, match=f"{shards[1].name} is missing"):
        LazyCheckpoint(missing)

    garbage = tmp_path / "garbage"
    shutil.copytree(checkpoint, garbage)
    data = bytearray((garbage / shards[0].name).read_bytes())
    data[8:40] = b"#" * 32  # the JSON header is no longer JSON
    (garbage / shards[0].name).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=f"{shards[0].name} is corrupt"):
        LazyCheckpoint(garbage)

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    path = truncated / shards[2].name
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=shards[2].name):
        LazyCheckpoint(truncated)
