"""``torchrun --nproc-per-node 2 -m qcompile.cli quantize HF_DIR --stream``: the CLI starts the
process group itself (gloo), shares the calibration batches across the 2 processes, rank 0
prints and writes; the output equals a 1-process run's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from qcompile.checkpoint import write_synthetic_checkpoint
from qcompile.cli import main
from qcompile.streaming import read_stage

VOCAB = 257


def test_torchrun_two_processes_equal_one(tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    ck = tmp_path / "llama"
    write_synthetic_checkpoint(config, ck, shard_bytes=70_000, seed=8)
    gen = torch.Generator().manual_seed(3)
    # 3 batches: rank 0 calibrates on 2, rank 1 on 1; the weights equal one process's only if
    # the statistics were reduced across both
    torch.save([{"input_ids": torch.randint(0, VOCAB, (2, 11), generator=gen)} for _ in range(3)], tmp_path / "c.pt")
    args = ["quantize", str(ck), "--stream", "--recipe", "w4a16-gptq", "--group-size", "32", "--calib",
            str(tmp_path / "c.pt")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per process, as the 1-process run below
    launched = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qcompile.cli",
         *args, "--out", str(tmp_path / "two")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the 1-process run, meanwhile (a float32 matmul may round differently with other thread counts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = launched.communicate(timeout=300)
    assert launched.returncode == 0, stderr[-3000:]

    # only rank 0 prints (the summary, the progress bar) and writes
    assert stdout.count("streaming ") == 1 and "calibrating across 2 processes" in stdout
    assert stdout.count("3 stages (0 resumed)") == 1
    assert stderr.count("| 0/3 [00:00<?, ?stage/s]") == 1, stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    assert manifests[1]["complete"] and manifests[1]["done"] == [0, 1, 2]
    assert manifests[0]["calibration_sha256"] == manifests[1]["calibration_sha256"]  # all batches, on both

    files = sorted(one.glob("stage-*.safetensors"))
    assert len(files) == 3
    quantized = 0
    for path in files:
        (q1, f1, rows1), (q2, f2, rows2) = read_stage(path), read_stage(two / path.name)
        assert q1.keys() == q2.keys() and f1.keys() == f2.keys()
        for name in q1:
            # bitwise, as tests/test_distributed_calibration.py: abs-max and token counts
            # reduce exactly, and GPTQ's decisions do not move under the ~1e-16 relative change
            # of the Hessians (float64 sums added in another order)
            for part in ("qweight", "scales", "zeros"):
                assert torch.equal(getattr(q1[name], part), getattr(q2[name], part)), (path.name, name, part)
            quantized += 1
        for name in f1:
            assert torch.equal(f1[name], f2[name]), (path.name, name)
        assert [(r["layer"], r["format"], r["bytes"]) for r in rows1] == \
            [(r["layer"], r["format"], r["bytes"]) for r in rows2]
    assert quantized == 14
