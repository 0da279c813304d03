"""ONNX Runtime forms of ``qcompile::linear_w8a8`` (per-token int8 activations) on CPU.

    .venv/bin/python benchmarks/onnx_w8a8_ops.py [--threads 2] [--rows 4096] [--repeat 21]

One linear with bias (no smoothing, dynamic per-token activations) at MiniLM's shapes
(K x N = 384 x 384, 384 x 1536, 1536 x 384) and M rows, float32 activations. Candidates,
each a one-linear ONNX model run by ONNX Runtime's CPU provider (``intra_op_num_threads``
= threads, ``inter_op_num_threads`` = 1, spinning off so that idle ORT threads do not
steal the cores from the candidates timed after them; default optimization level):

* ``fp32 MatMul`` — the float linear (``MatMul`` + ``Add``; ORT makes it a Gemm);
* ``(a) DynamicQuantizeLinear + MatMulInteger`` — ONNX's own dynamic quantization:
  per-tensor asymmetric uint8 activations (not the torch op's numerics);
* ``(b) DynamicQuantizeMatMul`` — ``com.microsoft.DynamicQuantizeMatMul``, the same
  per-tensor asymmetric numerics in one kernel;
* ``(c) MatMulIntegerToFloat, b_scale = wscales`` — per-token symmetric codes (uint8 + 128)
  and ``com.microsoft.MatMulIntegerToFloat`` applying both scales (wscales first);
* ``(c') MatMulIntegerToFloat, a_scale = row scale`` — the same with the row scale in
  ``a_scale``, ``b_scale = 1`` and ``Mul`` by wscales after: the torch op's order;
* ``(d) MatMulInteger + Cast + Mul + Mul`` — standard ops only, uint8 codes + 128;
* ``(d, int8 codes)`` — the same with int8 activation codes (zero point 0);
* ``shipped ort / qdq / qcompile`` — ``qcompile.export.to_onnx`` of a module calling the op,
  in each flavor (the "ort" flavor should time like (c'), "qcompile" like (d));
* ``shipped ort, w8a8_activations=per-tensor`` — ``to_onnx(..., w8a8_activations="per-tensor")``:
  ``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat`` with wscales and bias inside, which
  ONNX Runtime fuses into (b) (so it should time like (b), with (b)'s numerics);
* ``torch op`` — ``torch.ops.qcompile.linear_w8a8`` itself (``torch._int_mm``), with
  ``torch.set_num_threads(threads)``.

The per-token quantization of (c), (c'), (d) is the exact standard-op sequence of
``qcompile.export.activation_quant`` (row absmax by ReduceMax/ReduceMin, QuantizeLinear
per row). Columns: median ms over interleaved rounds, the ratio to ``fp32 MatMul`` of the
same run, and the numerics against the torch op on the timed input: the fraction of
outputs that are bit-identical and the max error relative to max|output|.
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
from qcompile.act_quant import quantize_weight_per_channel_int8
from qcompile.export import to_onnx
from qcompile.export.activation_quant import (
    INT8_QMAX,
    Float32Inputs,
    linear_w8a8_nodes,
    per_token_scale,
    uint8_codes_per_token,
)
from qcompile.export.node_builder import FunctionNodes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import QuietWaiter, emit, header, quietest_timings, run_cases  # noqa: E402

SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (K, N)
F32 = Float32Inputs(x=True, bias=True)


def _quantized_rows(b: FunctionNodes, x: str):
    s = per_token_scale(b, x, INT8_QMAX)
    return s, uint8_codes_per_token(b, x, s)


def _fp32(b):
    return b("Add", b("MatMul", "x", "wf"), "bias")


def _dql(b):
    codes, s, zp = b("DynamicQuantizeLinear", "x", outputs=3)
    acc = b("MatMulInteger", codes, "w", zp)
    return b("Add", b("Mul", b("Mul", b("Cast", acc, to=TensorProto.FLOAT), s), "ws"), "bias")


def _dqmm(b):
    return b("DynamicQuantizeMatMul", "x", "w", "ws", None, "bias", domain="com.microsoft")


def _mitof_wscales(b):
    s, codes = _quantized_rows(b, "x")
    zp = b.constant(np.array(128, np.uint8))
    y = b("MatMulIntegerToFloat", codes, "w", s, "ws", zp, domain="com.microsoft")
    return b("Add", y, "bias")


def _mitof_exact(b):
    return linear_w8a8_nodes(b, "x", "w", "ws", "bias", None, None, contrib=True, known=F32)


def _matmulinteger(b):
    return linear_w8a8_nodes(b, "x", "w", "ws", "bias", None, None, contrib=False, known=F32)


def _matmulinteger_int8(b):
    s = per_token_scale(b, "x", INT8_QMAX)
    lo, hi = b.constant(np.array(-INT8_QMAX, np.float32)), b.constant(np.array(INT8_QMAX, np.float32))
    codes = b("Cast", b("Clip", b("Round", b("Div", "x", s)), lo, hi), to=TensorProto.INT8)
    acc = b("MatMulInteger", codes, "w")
    return b("Add", b("Mul", b("Mul", b("Cast", acc, to=TensorProto.FLOAT), s), "ws"), "bias")


CANDIDATES = {
    "(a) DynamicQuantizeLinear + MatMulInteger": _dql,
    "(b) DynamicQuantizeMatMul": _dqmm,
    "(c) MatMulIntegerToFloat, b_scale = wscales": _mitof_wscales,
    "(c') MatMulIntegerToFloat, a_scale = row scale": _mitof_exact,
    "(d) MatMulInteger + Cast + Mul + Mul": _matmulinteger,
    "(d, int8 codes) MatMulInteger s8 x s8": _matmulinteger_int8,
}


def candidate_model(build, k: int, n: int, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    b = FunctionNodes()
    y = build(b)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    used = {i for node in b.nodes for i in node.input}
    inits = [numpy_helper.from_array(a, name) for name, a in weights.items() if name in used]
    graph = helper.make_graph(b.nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    onnx.checker.check_model(model)
    return model


class OneLinear(torch.nn.Module):
    def __init__(self, q: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("ws", ws)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qcompile.linear_w8a8(x, self.q, self.ws, self.bias, None, None)


def session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def bench_shape(k: int, n: int, rows: int, threads: int, repeat: int, folder: Path, waiter: QuietWaiter):
    gen = torch.Generator().manual_seed(k * 10007 + n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    q, ws = quantize_weight_per_channel_int8(w)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    weights = {
        "w": np.ascontiguousarray(q.numpy().T), "ws": ws.numpy(), "bias": bias.numpy(),
        "wf": np.ascontiguousarray((q.float() * ws[:, None]).numpy().T),
    }
    sessions = {"fp32 MatMul": session(candidate_model(_fp32, k, n, weights), threads)}
    for name, build in CANDIDATES.items():
        sessions[name] = session(candidate_model(build, k, n, weights), threads)
    module = OneLinear(q, ws, bias)
    qm = qcompile.quantize(module, (torch.randn(8, k),), recipe="w8a16", progress=False, verify=False)
    for flavor in ("ort", "qdq", "qcompile"):
        result = to_onnx(qm, folder / f"w8a8_{k}x{n}_{flavor}.onnx", flavor=flavor)
        sessions[f"shipped {flavor}"] = session(result.path, threads)
    result = to_onnx(qm, folder / f"w8a8_{k}x{n}_ort_per_tensor.onnx", flavor="ort", w8a8_activations="per-tensor")
    sessions["shipped ort, w8a8_activations=per-tensor"] = session(result.path, threads)
    feeds = {"x": x.numpy()}
    calls = {name: (lambda s=s: s.run(None, feeds)[0]) for name, s in sessions.items()}
    calls["torch op"] = lambda: module(x).numpy()
    reference = module(x).numpy()
    # re-time what other processes disturbed; keep the quietest run
    timings, report, _ = quietest_timings(calls, waiter, first_warmup=3, repeat=repeat)
    base = timings["fp32 MatMul"].median_s
    rows_out = []
    for name, fn in calls.items():
        out = fn()
        diff = np.abs(out.astype(np.float64) - reference)
        rows_out.append([
            f"{k}x{n}", name, f"{timings[name].median_ms:.2f}", f"{timings[name].median_s / base:.2f}",
            f"{float(np.mean(out == reference)):.3f}", f"{diff.max() / np.abs(reference).max():.1e}",
        ])
    return rows_out, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096, help="M, the number of token rows (default 4096)")
    parser.add_argument("--repeat", type=int, default=21, help="timed rounds (default 21)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emit(header("ONNX Runtime forms of linear_w8a8 (per-token int8 activations)", args.threads))
    emit(f"- onnxruntime {ort.__version__}, onnx {onnx.__version__}; ORT sessions: intra_op_num_threads="
         f"{args.threads}, inter_op_num_threads=1, session.intra_op.allow_spinning=0, CPUExecutionProvider")
    emit(f"- M = {args.rows} rows, float32 activations, bias, no smoothing; {args.repeat} interleaved rounds "
         "after 3 warm-up calls")
    emit("")

    def bench(case, folder, waiter):
        return bench_shape(*case, args.rows, args.threads, args.repeat, folder, waiter)

    run_cases(SHAPES, bench, label="w8a8 ops", name=lambda case: f"{case[0]}x{case[1]}",
              prefix="onnx_w8a8_ops_",
              head=["K x N", "candidate", "ms (median)", "x fp32 MatMul time", "bit-identical to torch op",
                    "max rel. error vs torch op"], align="llrrrr")


if __name__ == "__main__":
    main()
