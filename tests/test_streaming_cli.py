"""``qcompile quantize HF_DIR --max-memory SIZE``: streams stage by stage when the weights
exceed the budget, with per-stage progress, and writes the streaming output folder."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers

from qcompile.checkpoint import checkpoint_bytes, write_synthetic_checkpoint
from qcompile.cli import _should_stream, main, parse_size


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("512mib") == 512 * 2**20
    assert parse_size("100") == 100
    for bad in ("2 parsecs", "GB", "-1GB", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
            parse_size(bad)


def test_quantize_streams_when_weights_exceed_budget(tmp_path, capsys):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=211, max_position_embeddings=64)
    ck = tmp_path / "ck"
    size = write_synthetic_checkpoint(config, ck, shard_bytes=80_000)
    gen = torch.Generator().manual_seed(0)
    torch.save([{"input_ids": torch.randint(0, 211, (2, 9), generator=gen)} for _ in range(2)], tmp_path / "calib.pt")

    def ns(max_memory, stream=False):
        return argparse.Namespace(model=str(ck), max_memory=max_memory, stream=stream)

    assert size == checkpoint_bytes(ck)
    assert _should_stream(ns(2 * size - 1)) and not _should_stream(ns(2 * size)) and not _should_stream(ns(None))
    assert _should_stream(ns(None, stream=True))

    out = tmp_path / "q"
    base = ["quantize", str(ck), "--recipe", "w4a16-gptq", "--group-size", "32", "--calib", str(tmp_path / "calib.pt"),
            "--max-memory", f"{size // 1000}KB"]
    assert main(base + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "stage by stage" in captured.out and "3 stages (0 resumed)" in captured.out
    assert "peak resident memory" in captured.out
    assert "stages: 100%" in captured.err and "peak_rss=" in captured.err  # the per-stage progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["done"] == [0, 1, 2] and manifest["recipe"]["sequential"]
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 14 and all(r["format"].startswith("int4 g32") for r in report["layers"])
