"""ONNX Runtime forms of ``qcompile::hadamard`` (a block Hadamard rotation) on CPU.

    .venv/bin/python benchmarks/onnx_hadamard.py [--threads 2] [--rows 4096] [--repeat 11] [--dims 384 1536 4096]

One rotation ``(x * signs) @ Q`` of ``x [rows, n]`` (float32, random +-1 signs) with the
rotation plan of n (``qcompile.hadamard.rotation_plan``: 384 = H_12 (x) H_32,
1536 = H_12 (x) H_128, 4096 = H_4096). Candidates, each an ONNX model run by ONNX
Runtime's CPU provider (``intra_op_num_threads`` = threads, ``inter_op_num_threads`` = 1,
spinning off, default optimization level):

* ``dense n x n MatMul`` — Q (signs folded in) as one ``[n, n]`` initializer;
* ``R x L, broadcast`` — the form of ``qcompile.export.hadamard`` for every power-of-two
  split ``R`` of the Sylvester part (``L = block / R``): ``Mul`` by the signs, ``Reshape``
  to ``[-1, L, R]``, ``MatMul`` by ``H_R / sqrt(block)``, ``MatMul`` of the 2-D
  ``M_L^T = (H_small (x) H_{P/R})^T`` by the 3-D activations (numpy broadcasting),
  ``Reshape`` back;
* ``R x L, transposes`` — the same with the left product as ``Transpose`` + ``MatMul`` by
  ``M_L`` + ``Transpose``;
* ``shipped ort / qdq / qcompile`` — ``qcompile.export.to_onnx`` of a module calling the op,
  in each flavor (R = min(P, 64));
* ``torch op`` — ``torch.ops.qcompile.hadamard`` itself (its CPU path), with
  ``torch.set_num_threads(threads)``.

Columns: median ms over interleaved rounds, the ratio to the dense MatMul of the same run,
and the max error against the torch op relative to max|output|.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.export import to_onnx
from qcompile.export.hadamard import RIGHT_FACTOR
from qcompile.hadamard import apply_hadamard, hadamard_matrix, random_signs, rotation_plan
from qcompile.kernels.hadamard import hadamard_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import QuietWaiter, emit, header, quietest_timings, run_cases  # noqa: E402

DIMS = (384, 1536, 4096)
MAX_LEFT = 512  # splits with a larger left factor are not timed (slow, and their [L, L] grows)


def _model(nodes, inits: dict[str, np.ndarray], n: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hadamard", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def dense_model(n: int, signs: np.ndarray) -> onnx.ModelProto:
    q = apply_hadamard(torch.diag(torch.from_numpy(signs).double()), rotation_plan(n)).numpy()
    return _model([helper.make_node("MatMul", ["x", "Q"], ["y"])], {"Q": q.astype(np.float32)}, n)


def split_model(n: int, signs: np.ndarray, right: int, transposes: bool) -> onnx.ModelProto:
    plan = rotation_plan(n)
    left = plan.block // right
    h_right = (hadamard_matrix(right, torch.float64).numpy() / math.sqrt(plan.block)).astype(np.float32)
    small = np.ones((1, 1)) if plan.small is None else plan.small.double().numpy()
    m_left = np.kron(small, hadamard_matrix(plan.power // right, torch.float64).numpy()).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "signs"], ["xs"]),
        helper.make_node("Reshape", ["xs", "view"], ["x3"]),
        helper.make_node("MatMul", ["x3", "h_right"], ["y3"]),
    ]
    inits = {"signs": signs, "view": np.array([-1, left, right], np.int64), "h_right": h_right,
             "shape": np.array([-1, n], np.int64)}
    if transposes:
        nodes += [helper.make_node("Transpose", ["y3"], ["t"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["t", "m_left"], ["tz"]),
                  helper.make_node("Transpose", ["tz"], ["z3"], perm=[0, 2, 1])]
        inits["m_left"] = m_left
    else:
        nodes.append(helper.make_node("MatMul", ["m_left_t", "y3"], ["z3"]))
        inits["m_left_t"] = np.ascontiguousarray(m_left.T)
    nodes.append(helper.make_node("Reshape", ["z3", "shape"], ["y"]))
    return _model(nodes, inits, n)


class OneRotation(torch.nn.Module):
    def __init__(self, n: int, signs: torch.Tensor):
        super().__init__()
        small, self.block = hadamard_args(rotation_plan(n))
        self.register_buffer("small", small)
        self.register_buffer("signs", signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qcompile.hadamard(x, self.small, self.signs, self.block)


def session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def bench_dim(n: int, rows: int, threads: int, repeat: int, folder: Path, waiter: QuietWaiter):
    plan = rotation_plan(n)
    signs_t = random_signs(n, n, torch.float32)
    signs = signs_t.numpy()
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    sessions = {"dense n x n MatMul": session(dense_model(n, signs), threads)}
    right = plan.power
    while right >= 2:
        if plan.block // right <= MAX_LEFT:
            for transposes in (False, True):
                name = f"R x L = {right} x {plan.block // right}, {'transposes' if transposes else 'broadcast'}"
                if plan.block // right == 1:
                    name = f"R = {right}, one MatMul"
                    if transposes:
                        continue
                sessions[name] = session(split_model(n, signs, right, transposes), threads)
        right //= 2
    module = OneRotation(n, signs_t)
    qm = qcompile.quantize(module, (torch.randn(8, n),), recipe="w8a16", progress=False, verify=False)
    for flavor in ("ort", "qdq", "qcompile"):
        result = to_onnx(qm, folder / f"hadamard_{n}_{flavor}.onnx", flavor=flavor)
        sessions[f"shipped {flavor} (R = {min(plan.power, RIGHT_FACTOR)})"] = session(result.path, threads)
    feeds = {"x": x.numpy()}
    calls = {name: (lambda s=s: s.run(None, feeds)[0]) for name, s in sessions.items()}
    calls["torch op"] = lambda: module(x).numpy()
    reference = module(x).numpy().astype(np.float64)
    # re-time what other processes disturbed; keep the quietest run
    timings, report, _ = quietest_timings(calls, waiter, first_warmup=2, repeat=repeat)
    base = timings["dense n x n MatMul"].median_s
    table = []
    for name, fn in calls.items():
        err = np.abs(fn().astype(np.float64) - reference).max() / np.abs(reference).max()
        table.append([f"{n} ({plan.description.split(' = ')[-1]})", name, f"{timings[name].median_ms:.2f}",
                      f"{timings[name].median_s / base:.3f}", f"{err:.1e}"])
    return table, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096, help="rows of x (default 4096)")
    parser.add_argument("--repeat", type=int, default=11, help="timed rounds (default 11)")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="rotated dimensions n")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)
    emit(header("ONNX Runtime forms of qcompile::hadamard", args.threads))
    emit(f"- onnxruntime {ort.__version__}, onnx {onnx.__version__}; ORT sessions: intra_op_num_threads="
         f"{args.threads}, inter_op_num_threads=1, session.intra_op.allow_spinning=0, CPUExecutionProvider")
    emit(f"- {args.rows} rows, float32, random +-1 signs; {args.repeat} interleaved rounds after 2 warm-up calls")
    emit("")

    def bench(n, folder, waiter):
        return bench_dim(n, args.rows, args.threads, args.repeat, folder, waiter)

    run_cases(args.dims, bench, label="hadamard", name=str, prefix="onnx_hadamard_",
              head=["n", "candidate", "ms (median)", "x dense MatMul time", "max rel. error vs torch op"],
              align="llrrr")


if __name__ == "__main__":
    main()
