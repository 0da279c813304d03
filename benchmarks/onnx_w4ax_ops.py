"""ONNX Runtime forms of ``qcompile::linear_w4a8`` / ``linear_w4a4`` (4-bit group-wise
weights, per-token int8 / int4 activations) on CPU, as ``qcompile.export.to_onnx`` writes
them, against ONNX Runtime's float32 MatMul.

    .venv/bin/python benchmarks/onnx_w4ax_ops.py [--threads 2] [--rows 4096] [--repeat 21]

One linear with bias (no smoothing) at K x N = 384 x 384 and 1536 x 384, M rows, float32
activations, random weights quantized asymmetrically (RTN) per group. Candidates, each run
by ONNX Runtime's CPU provider (``intra_op_num_threads`` = threads,
``inter_op_num_threads`` = 1, spinning off, default optimization level, EXACT_CONFIG):

* ``fp32 MatMul`` — the float linear (``MatMul`` + ``Add``) on the dequantized weight;
* ``<op> <layout> <flavor>`` — ``to_onnx`` of a module calling the op, for the w4a8/w4a4
  presets' layout (g128), per-channel and g32 weights;
* ``... ort, accuracy_level=4`` — the "ort" flavor with ``to_onnx(accuracy_level=4)``:
  MatMulNBits re-quantizes the (integer) codes to int8 per block (not the op's numerics);
* ``torch op`` — the op itself (CPU path, ``torch._int_mm`` per group) with
  ``torch.set_num_threads(threads)``.

Columns: median ms over interleaved rounds, the ratio to ``fp32 MatMul`` of the same run,
the fraction of outputs bit-identical to the torch op and the max error relative to
max|output|.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.export import EXACT_CONFIG, to_onnx
from qcompile.kernels import W4_ACT_QUANT_LINEAR_OPS
from qcompile.quantizers import dequantize_weight, quantize_weight_rtn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import QuietWaiter, emit, header, quietest_timings, run_cases  # noqa: E402

SHAPES = [(384, 384), (1536, 384)]  # (K, N)
# (label, activation bits, group size (None: per-channel), flavor, accuracy_level)
CANDIDATES = [
    ("w4a8 g128 ort", 8, 128, "ort", None),
    ("w4a8 g128 ort, accuracy_level=4", 8, 128, "ort", 4),
    ("w4a8 g128 qdq", 8, 128, "qdq", None),
    ("w4a8 g128 qcompile", 8, 128, "qcompile", None),
    ("w4a8 per-channel ort", 8, None, "ort", None),
    ("w4a8 g32 ort", 8, 32, "ort", None),
    ("w4a4 g128 ort", 4, 128, "ort", None),
    ("w4a4 g128 qdq", 4, 128, "qdq", None),
    ("w4a4 g128 qcompile", 4, 128, "qcompile", None),
]


class OneLinear(torch.nn.Module):
    def __init__(self, bits: int, qw, bias: torch.Tensor):
        super().__init__()
        self.op = W4_ACT_QUANT_LINEAR_OPS[bits]
        self.group_size = qw.group_size
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.qweight, self.scales, self.zeros, self.bias, None, self.group_size)


def session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in EXACT_CONFIG.items():
        options.add_session_config_entry(key, value)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def fp32_model(w: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    n, k = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"),
                               numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def bench_shape(k: int, n: int, rows: int, threads: int, repeat: int, folder: Path, waiter: QuietWaiter):
    gen = torch.Generator().manual_seed(k * 10007 + n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    layouts = {g: quantize_weight_rtn(w, 4, g, symmetric=False) for g in (128, None, 32)}
    sessions = {"fp32 MatMul": session(fp32_model(dequantize_weight(layouts[128]).numpy(), bias.numpy()), threads)}
    modules = {}
    for label, bits, group, flavor, level in CANDIDATES:
        key = (bits, group)
        if key not in modules:
            module = OneLinear(bits, layouts[group], bias)
            modules[key] = module, qcompile.quantize(module, (torch.randn(8, k),), recipe="w8a16", progress=False,
                                                     verify=False)
        module, qm = modules[key]
        name = label.replace(" ", "_").replace(",", "").replace("=", "")
        result = to_onnx(qm, folder / f"{k}x{n}_{name}.onnx", flavor=flavor, accuracy_level=level)
        sessions[label] = session(result.path, threads)
    feeds = {"x": x.numpy()}
    calls = {name: (lambda s=s: s.run(None, feeds)[0]) for name, s in sessions.items()}
    calls["torch op w4a8 g128"] = lambda: modules[8, 128][0](x).numpy()
    calls["torch op w4a4 g128"] = lambda: modules[4, 128][0](x).numpy()
    # re-time what other processes disturbed; keep the quietest run
    timings, report, _ = quietest_timings(calls, waiter, first_warmup=3, repeat=repeat)
    base = timings["fp32 MatMul"].median_s
    labels = {label: (bits, group) for label, bits, group, _, _ in CANDIDATES}
    labels.update({"torch op w4a8 g128": (8, 128), "torch op w4a4 g128": (4, 128)})
    table = []
    for name, fn in calls.items():
        out = fn()
        bits, group = labels.get(name, (8, 128))
        reference = modules[bits, group][0](x).numpy()
        diff = np.abs(out.astype(np.float64) - reference)
        exact = "" if name == "fp32 MatMul" else f"{float(np.mean(out == reference)):.3f}"
        table.append([f"{k}x{n}", name, f"{timings[name].median_ms:.2f}", f"{timings[name].median_s / base:.2f}",
                      exact, f"{diff.max() / np.abs(reference).max():.1e}"])
    return table, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096, help="M, the number of token rows (default 4096)")
    parser.add_argument("--repeat", type=int, default=21, help="timed rounds (default 21)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emit(header("ONNX Runtime forms of linear_w4a8 / linear_w4a4", args.threads))
    emit(f"- onnxruntime {ort.__version__}, onnx {onnx.__version__}; ORT sessions: intra_op_num_threads="
         f"{args.threads}, inter_op_num_threads=1, session.intra_op.allow_spinning=0, CPUExecutionProvider, "
         "EXACT_CONFIG")
    emit(f"- M = {args.rows} rows, float32 activations, bias, no smoothing, asymmetric RTN weights; "
         f"{args.repeat} interleaved rounds after 3 warm-up calls")
    emit("")

    def bench(case, folder, waiter):
        return bench_shape(*case, args.rows, args.threads, args.repeat, folder, waiter)

    run_cases(SHAPES, bench, label="w4ax ops", name=lambda case: f"{case[0]}x{case[1]}",
              prefix="onnx_w4ax_ops_",
              head=["K x N", "candidate", "ms (median)", "x fp32 MatMul time", "bit-identical to torch op",
                    "max rel. error vs torch op"], align="llrrrr")


if __name__ == "__main__":
    main()
