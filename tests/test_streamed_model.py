"""Loading streamed output (qcompile.load_streamed) and ``qcompile quantize HF_DIR --stream
--export onnx``: the loaded model computes what the in-memory sequential quantized model
computes, bit for bit; its ONNX file runs in ONNX Runtime; incomplete or corrupt output is
refused naming the file."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil

import pytest
import torch
import transformers

import qcompile
from qcompile import streamed_model
from qcompile.checkpoint import placeholder_model, write_synthetic_checkpoint
from qcompile.cli import EXIT_USER_ERROR, _stream_inputs, main
from qcompile.errors import ModelLoadError
from qcompile.export import inference_session, onnx_feeds
from qcompile.recipe import resolve_recipe
from qcompile.testing import count_ops
from tests.export.helpers import BF16_RTOL, EXACT_RTOL, float32_reference, quantized_outputs, worst_relative_error

VOCAB = 301
RECIPE_ARGS = ["--recipe", "w4a16-gptq", "--group-size", "32"]


def _config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    write_synthetic_checkpoint(_config(), root / "llama", shard_bytes=60_000, seed=5)
    gen = torch.Generator().manual_seed(2)
    torch.save([{"input_ids": torch.randint(0, VOCAB, (2, 13), generator=gen)} for _ in range(3)],
               root / "calib.pt")
    return root


def _single_thread(fn):
    """Run ``fn()`` with one torch thread: float32 matmuls (the stage outputs the next stage
    calibrates on) may round differently with another thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def streamed(checkpoint):
    """``qcompile quantize llama --stream --export onnx`` (one process) and its output folder;
    made by a run whose export fails (nothing published) and the run that resumes it."""
    out = checkpoint / "q"
    argv = ["quantize", str(checkpoint / "llama"), "--stream", *RECIPE_ARGS, "--calib", str(checkpoint / "calib.pt"),
            "--out", str(out), "--export", "onnx"]

    def cannot_load(work, progress=False):
        raise ModelLoadError(f"simulated failure loading {work}")

    original = streamed_model.load_streamed
    streamed_model.load_streamed = cannot_load  # what the CLI's export step calls first
    try:
        assert _single_thread(lambda: main(argv)) == EXIT_USER_ERROR
    finally:
        streamed_model.load_streamed = original
    partial = checkpoint / "q.partial"
    assert not out.exists(), "a failed export must not leave the output folder"
    assert json.loads((partial / "manifest.json").read_text())["complete"] and not (partial / "model.onnx").exists()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _single_thread(lambda: main(argv)) == 0  # resumes: every stage done, exports, publishes
    assert "3 stages (3 resumed)" in printed.getvalue() and "model.onnx (flavor ort, opset 21)" in printed.getvalue()
    assert not partial.exists()
    return out


@pytest.fixture(scope="module")
def loaded(streamed):
    return qcompile.load_streamed(streamed)


def _fresh_input(seed=11):
    """Another batch size and sequence length than the example (2 x 16) and calibration (2 x 13)."""
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (3, 7), generator=gen)}


def test_loaded_equals_in_memory_sequential(checkpoint, streamed, loaded, capsys):
    # the in-memory path on the model transformers loads, with the CLI's example and calibration
    ns = argparse.Namespace(model=str(checkpoint / "llama"), calib=str(checkpoint / "calib.pt"))
    recipe = resolve_recipe("w4a16-gptq").replace(group_size=32, sequential=True)
    example, calibration = _stream_inputs(ns, recipe)
    model = transformers.AutoModel.from_pretrained(str(checkpoint / "llama")).eval()
    reference = _single_thread(lambda: qcompile.quantize(model, (), example, recipe=recipe, calibration=calibration,
                                                         verify=False, progress=False))
    capsys.readouterr()

    ops = count_ops(loaded.graph_module)
    assert ops == count_ops(reference.graph_module)
    assert ops["qcompile.linear_w4a16"] == 14 and "aten.linear" not in ops
    # the same ops on the same constants: bitwise equal outputs (hidden states and KV cache)
    x = _fresh_input()
    got, expected = quantized_outputs(loaded, (), x), quantized_outputs(reference, (), x)
    assert len(got) == len(expected) == 5 and got[0].shape == (3, 7, 64)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"output {i} differs by {(a - b).abs().max():.3e}"
    assert torch.equal(loaded(**x).last_hidden_state, got[0])  # the model's own call and output structure
    # and the quantization did something: the float model differs. int4 g32 weights move these
    # hidden states (max |h| ~3.6) by up to ~0.43 (measured); 1e-4 is far below that and far
    # above float32 rounding, so only a loader that returned the float weights would pass it.
    with torch.no_grad():
        assert not torch.allclose(model(**x).last_hidden_state, got[0], atol=1e-4)

    report, ref_report = loaded.report(), reference.report()
    assert [r["layer"] for r in report.layers] == [r["layer"] for r in ref_report.layers]
    for mine, theirs in zip(report.layers, ref_report.layers):
        assert (mine["format"], mine["bytes"], mine["op"]) == (theirs["format"], theirs["bytes"], theirs["op"])
        assert mine["op"] == "qcompile.linear_w4a16"
    assert report.recipe == recipe
    assert "int4 g32" in str(report)


def test_cli_stream_export_onnx_runs_in_onnx_runtime(streamed, loaded, capsys):
    assert sorted(p.name for p in streamed.iterdir()) == [
        "config.json", "example.safetensors", "manifest.json", "model.onnx", "report.json", "report.txt",
        "stage-00000.safetensors", "stage-00001.safetensors", "stage-00002.safetensors"]
    assert not streamed.with_name("q.partial").exists()
    x = _fresh_input(seed=12)
    session = inference_session(streamed / "model.onnx")  # exact: activations never quantized by ORT
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, onnx_feeds(loaded, (), x))
    # tolerances of tests/export/helpers.py: EXACT_RTOL against the float32 reference of the
    # qcompile ops (same dequantized weights, float32 summation order differs); BF16_RTOL
    # against qm(...), whose CPU fast path rounds activations to bfloat16
    err, where = worst_relative_error(got, float32_reference(loaded)((), x), names)
    assert err < EXACT_RTOL, f"{where}: {err:.2e}"
    err, where = worst_relative_error(got, quantized_outputs(loaded, (), x), names)
    assert err < BF16_RTOL, f"{where}: {err:.2e}"
    assert main(["inspect", str(streamed / "model.onnx")]) == 0
    assert "MatMulNBits" in capsys.readouterr().out


def test_incomplete_or_corrupt_output_is_refused(streamed, tmp_path):
    def copy(name):
        folder = tmp_path / name
        shutil.copytree(streamed, folder)
        return folder

    with pytest.raises(ModelLoadError, match="has no manifest.json"):
        qcompile.load_streamed(tmp_path)
    shutil.copytree(streamed, tmp_path / "interrupted.partial")
    with pytest.raises(ModelLoadError, match=r"interrupted does not exist, only .*interrupted.partial: .*not finish"):
        qcompile.load_streamed(tmp_path / "interrupted")
    unfinished = copy("unfinished")
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "complete": False, "done": [0]}))
    with pytest.raises(ModelLoadError, match=r"manifest.json is not marked complete.*1 of 3 stages done"):
        qcompile.load_streamed(unfinished)

    missing = copy("missing")
    (missing / "stage-00001.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"stage file .*missing/stage-00001.safetensors is missing"):
        qcompile.load_streamed(missing)

    truncated = copy("truncated")
    data = (truncated / "stage-00002.safetensors").read_bytes()
    (truncated / "stage-00002.safetensors").write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match=r"stage file .*truncated/stage-00002.safetensors is corrupt"):
        qcompile.load_streamed(truncated)

    garbage = copy("garbage")
    data = bytearray((garbage / "stage-00000.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # the JSON header is no longer JSON
    (garbage / "stage-00000.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"stage file .*garbage/stage-00000.safetensors is corrupt"):
        qcompile.load_streamed(garbage)


def test_world_size_without_streaming_or_torchrun_is_refused(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["quantize", "tests.export.small_models:mlp", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and "WORLD_SIZE=2" in err and "only streaming quantization" in err
    # WORLD_SIZE set by hand, without the rest of what torchrun sets
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    rc = main(["quantize", str(checkpoint / "llama"), "--stream", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and "torch.distributed cannot start" in err and "torchrun --nproc-per-node" in err
    assert not (tmp_path / "out").exists()


def test_example_without_recorded_order_follows_the_signature(streamed, tmp_path):
    """Output written before example.safetensors recorded its inputs' order (safetensors lists
    keys sorted): keyword inputs are taken in the order of the model's forward signature."""
    from safetensors.torch import save_file

    ids = torch.randint(0, VOCAB, (2, 5))
    save_file({"[1]['input_ids']": ids, "[1]['attention_mask']": torch.ones(2, 5, dtype=torch.long)},
              str(tmp_path / "example.safetensors"))
    args, kwargs = streamed_model._example(tmp_path, placeholder_model(streamed))
    assert args == () and list(kwargs) == ["input_ids", "attention_mask"] and torch.equal(kwargs["input_ids"], ids)
    save_file({"[1]['input_ids']['nested']": ids}, str(tmp_path / "example.safetensors"))
    with pytest.raises(ModelLoadError, match="not a top-level positional or keyword argument"):
        streamed_model._example(tmp_path, placeholder_model(streamed))
