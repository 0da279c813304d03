"""Where ONNX Runtime spends its time: kernel time per op type of ONNX files, same inputs.

    .venv/bin/python benchmarks/onnx_minilm.py --presets w8a8 --out DIR
    .venv/bin/python benchmarks/onnx_op_profile.py DIR/ort_dynamic_int8.onnx DIR/qcompile_w8a8_ort.onnx \\
        [--runs 4] [--threads 2] [--batch 32] [--seq 128]

Each file runs in its own ONNX Runtime CPU session (``intra_op_num_threads`` = threads,
``inter_op_num_threads`` = 1, default optimization level, ``enable_profiling``) on the same
random token batch (ids drawn from a fixed seed, attention mask all ones, token types
zero; every int64 input of the file is fed by its name): one warm-up run, then ``--runs``
profiled runs. The table sums the profiler's ``*_kernel_time`` events per op type of the
graph ONNX Runtime actually ran (after its fusions) and divides by the runs: ms per run.
``model_run`` is the whole ``run`` call. The op counts of each optimized graph (written
with ``optimized_model_filepath``) follow the table, so the fusions ORT applied can be
read off (e.g. ``DynamicQuantizeMatMul`` for ``DynamicQuantizeLinear`` +
``MatMulIntegerToFloat``). Figures are as noisy as the machine: the CPU share of other
processes is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import CpuShare, emit, header, markdown_table  # noqa: E402

SEED = 0
ID_RANGE = (1000, 20000)  # ordinary vocabulary ids of MiniLM's tokenizer


def feeds_for(session: ort.InferenceSession, batch: int, seq: int) -> dict[str, np.ndarray]:
    """The token batch, by input name (ValueError for an input this script cannot feed)."""
    rng = np.random.default_rng(SEED)
    feeds = {}
    for value in session.get_inputs():
        if value.type != "tensor(int64)":
            raise ValueError(f"input {value.name!r} is {value.type}; this script feeds int64 token inputs only")
        if "mask" in value.name:
            feeds[value.name] = np.ones((batch, seq), np.int64)
        elif "type" in value.name:
            feeds[value.name] = np.zeros((batch, seq), np.int64)
        else:
            feeds[value.name] = rng.integers(*ID_RANGE, (batch, seq)).astype(np.int64)
    return feeds


def profile(path: Path, folder: Path, runs: int, threads: int, batch: int, seq: int):
    """(ms per run by op type, nodes by op type, model_run ms per run, optimized-graph op counts)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.stem)
    optimized = folder / f"{path.stem}.optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = feeds_for(session, batch, seq)
    for _ in range(runs + 1):
        session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    model_runs = [e for e in events if e.get("name") == "model_run"]
    if len(model_runs) != runs + 1:
        raise RuntimeError(f"{path.name}: the profile holds {len(model_runs)} model runs, expected {runs + 1}")
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"]
    time_us, nodes = Counter(), Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm_end:
            time_us[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    per_run = {op: us / runs / 1e3 for op, us in time_us.items()}
    model_ms = sum(r["dur"] for r in model_runs[1:]) / runs / 1e3
    graph = onnx.load(str(optimized), load_external_data=False).graph
    ops = Counter((n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in graph.node)
    return per_run, {op: n // runs for op, n in nodes.items()}, model_ms, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="ONNX files taking int64 token inputs")
    parser.add_argument("--runs", type=int, default=4, help="profiled runs after one warm-up (default 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    emit(header("ONNX Runtime kernel time per op type", args.threads))
    emit(f"- onnxruntime {ort.__version__}; batch {args.batch} x {args.seq} random token ids (seed {SEED}); "
         f"{args.runs} profiled runs after 1 warm-up; ms per run")
    folder = Path(tempfile.mkdtemp(prefix="onnx_op_profile_"))
    share = CpuShare()
    results = {path.name: profile(path, folder, args.runs, args.threads, args.batch, args.seq) for path in args.files}
    names = list(results)
    ops = sorted({op for per_run, *_ in results.values() for op in per_run},
                 key=lambda op: -max(r[0].get(op, 0.0) for r in results.values()))
    rows = [[op] + [f"{results[n][0][op]:.1f} ({results[n][1][op]})" if op in results[n][0] else "-" for n in names]
            for op in ops]
    rows.append(["sum of kernels"] + [f"{sum(results[n][0].values()):.1f}" for n in names])
    rows.append(["model_run"] + [f"{results[n][2]:.1f}" for n in names])
    emit("")
    emit(markdown_table(["op type: ms per run (nodes)"] + names, rows))
    emit("")
    for name in names:
        emit(f"- {name}, optimized graph: " + ", ".join(f"{op} {n}" for op, n in results[name][3].most_common()))
    emit(f"- {share.report()}; profiles and optimized graphs in {folder}")


if __name__ == "__main__":
    main()
