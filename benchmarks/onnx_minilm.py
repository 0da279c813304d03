"""ONNX Runtime latency and embedding fidelity of the exported all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/onnx_minilm.py [--presets w4a16,w8a16,w8a8] [--quick]
                                               [--threads 2] [--repeat 7] [--out DIR]

Candidates, all run by ONNX Runtime's CPU provider (``intra_op_num_threads`` = threads,
``inter_op_num_threads`` = 1, default graph optimization level):

* ORT fp32 — ``torch.onnx.export(model, dynamo=True)`` of the float model;
* ORT ``quantize_dynamic`` INT8 — ``onnxruntime.quantization.quantize_dynamic`` on that file
  (defaults: QInt8 weights, per-tensor, dynamic uint8 activations);
* ORT MatMulNBits 4-bit — ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``
  on that file (defaults: block 128, asymmetric), with accuracy_level unset and 4;
* qcompile w4a16 / w8a16 (``qcompile.quantize`` with 64 calibration texts, then
  ``qcompile.export.to_onnx``) in each flavor: "ort" (MatMulNBits, accuracy_level unset and
  4), "qdq" (DequantizeLinear + MatMul; ORT fuses it into MatMulNBits: timed with ORT's
  default session config, which quantizes activations to int8 inside, and with
  ``session.qdq_matmulnbits_accuracy_level = 0``, which does not) and "qcompile"
  (qcompile-domain functions, inlined by ORT);
* qcompile w8a8 (INT8 per-channel weights, dynamic per-token INT8 activations, smoothing
  searched per group on the same calibration texts) in each flavor: "ort" (per-row
  ``QuantizeLinear`` + ``com.microsoft.MatMulIntegerToFloat``: the torch op's numerics), "ort"
  with ``to_onnx(..., w8a8_activations="per-tensor")`` (``DynamicQuantizeLinear``: ONNX
  Runtime's per-tensor asymmetric uint8 activations, scales and bias inside
  ``MatMulIntegerToFloat``: faster, not the torch op's numerics), "qdq" (per-token
  ``QuantizeLinear`` / ``DequantizeLinear`` + per-channel int8 ``DequantizeLinear`` + float
  ``MatMul``; ORT 1.31 fuses none of it, with either session config, so one row) and
  "qcompile".

Latency: one batch of 32 held-out texts padded/truncated to exactly 128 tokens; the median
of interleaved runs (A, B, C, A, B, C, ...), and every ratio (against ORT fp32 and against
ORT ``quantize_dynamic``) between medians of the same run.
Fidelity: 256 held-out standard-library docstrings (``calibration_and_heldout(64, 256)``,
never used for calibration), mean-pooled normalized embeddings, cosine against the float
PyTorch model (mean and min over texts).

``--quick`` (a smoke test, not for the tables): 16 calibration and 64 held-out texts, the
passes' float64 verification off, 3 timed rounds after 1 warm-up call, no wait for a quiet
machine, no ORT MatMulNBits rows, and only the w8a8 rows unless ``--presets`` says otherwise.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import qcompile
from qcompile.data import batches, calibration_and_heldout, embed_texts, embedding_cosine, load_minilm
from qcompile.export import to_onnx
from qcompile.export.runtime import EXACT_CONFIG
from qcompile.timing import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_cpu import CpuShare, QuietWaiter, emit, header, markdown_table  # noqa: E402

BATCH, SEQ = 32, 128
OUTPUTS = ["last_hidden_state", "pooler_output"]
N_CALIB, N_EVAL = 64, 256
QUICK_N_CALIB, QUICK_N_EVAL = 16, 64
FP32, DYNAMIC = "ORT fp32", "ORT quantize_dynamic INT8"
PRESETS = ("w4a16", "w8a16", "w8a8")
# preset -> the (flavor, accuracy_level, w8a8_activations) exports timed; accuracy_level is
# MatMulNBits' (the w8a8 "ort" flavor has no MatMulNBits); w8a8_activations "per-tensor" is
# to_onnx's faster, numerically different option for the w8a8 "ort" flavor.
EXPORTS = {
    "w4a16": (("ort", None, None), ("ort", 4, None), ("qdq", None, None), ("qcompile", None, None)),
    "w8a16": (("ort", None, None), ("ort", 4, None), ("qdq", None, None), ("qcompile", None, None)),
    "w8a8": (("ort", None, None), ("ort", None, "per-tensor"), ("qdq", None, None), ("qcompile", None, None)),
}
ORT_HOW = {"w4a16": "MatMulNBits", "w8a16": "MatMulNBits", "w8a8": "per-row QuantizeLinear + MatMulIntegerToFloat"}
PER_TENSOR_HOW = "DynamicQuantizeLinear + MatMulIntegerToFloat (per-tensor uint8 acts)"
QDQ_HOW = {"w4a16": "DQ+MatMul", "w8a16": "DQ+MatMul", "w8a8": "per-token Q/DQ + int8 DQ + float MatMul"}


def export_fp32(model, example: dict[str, torch.Tensor], path: Path) -> None:
    dims = {name: {0: "batch", 1: "sequence"} for name in example}
    torch.onnx.export(model, (), str(path), kwargs=example, dynamo=True, dynamic_shapes=dims,
                      input_names=list(example), output_names=OUTPUTS, opset_version=21, verbose=False)


def ort_quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def ort_matmulnbits(src: Path, dst: Path, accuracy_level: int | None) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=128, is_symmetric=False,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def session(path: Path, threads: int, config: dict[str, str] | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModel:
    """Calls an ONNX session like the Hugging Face model (``model(**enc).last_hidden_state``)."""

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess
        self.inputs = [i.name for i in sess.get_inputs()]
        self.output = next(o.name for o in sess.get_outputs() if o.name == "last_hidden_state")

    def feeds(self, enc: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {name: enc[name].numpy() for name in self.inputs}

    def __call__(self, **enc):
        (hidden,) = self.sess.run([self.output], self.feeds(enc))
        return torch.from_numpy(hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=None, metavar="P,P,...",
                        help=f"qcompile presets to export (default: {','.join(PRESETS)}; with --quick: w8a8)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: fewer texts and rounds, no quiet wait, no ORT MatMulNBits rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    parser.add_argument("--out", default=None, help="keep the ONNX files in this folder (default: a temp folder)")
    args = parser.parse_args()
    chosen = args.presets or ("w8a8" if args.quick else ",".join(PRESETS))
    presets = [p.strip() for p in chosen.split(",") if p.strip()]
    unknown = [p for p in presets if p not in EXPORTS]
    if unknown:
        parser.error(f"unknown --presets {', '.join(unknown)}; known: {', '.join(EXPORTS)}")
    repeat = args.repeat or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    n_calib, n_eval = (QUICK_N_CALIB, QUICK_N_EVAL) if args.quick else (N_CALIB, N_EVAL)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    emit(header("ONNX Runtime: exported all-MiniLM-L6-v2" + (" (--quick: smoke test)" if args.quick else ""),
                args.threads))
    emit(f"- onnxruntime {ort.__version__}, onnx {onnx.__version__}; ORT sessions: intra_op_num_threads="
         f"{args.threads}, inter_op_num_threads=1, CPUExecutionProvider")
    model, tokenizer = load_minilm()
    calib, heldout = calibration_and_heldout(n_calib, n_eval)
    calibration = list(batches(calib, tokenizer, 8))
    example = calibration[0]
    timing_batch = tokenizer(heldout[:BATCH], padding="max_length", truncation=True, max_length=SEQ,
                             return_tensors="pt")
    timing_batch = {k: v for k, v in timing_batch.items() if isinstance(v, torch.Tensor)}
    reference = embed_texts(model, tokenizer, heldout)

    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="onnx_minilm_"))
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, dict[str, str] | None, str]] = {}
    build_s: dict[str, float] = {}

    t0 = time.perf_counter()
    fp32 = folder / "fp32.onnx"
    export_fp32(model, example, fp32)
    build_s["fp32"] = time.perf_counter() - t0
    files[FP32] = (fp32, None, "torch.onnx.export (dynamo)")
    t0 = time.perf_counter()
    ort_quantize_dynamic(fp32, folder / "ort_dynamic_int8.onnx")
    files[DYNAMIC] = (folder / "ort_dynamic_int8.onnx", None, "QInt8 weights, dynamic uint8 acts")
    if not args.quick:
        for level in (None, 4):
            tag = "unset" if level is None else str(level)
            path = folder / f"ort_matmulnbits4_acc{tag}.onnx"
            ort_matmulnbits(fp32, path, level)
            files[f"ORT MatMulNBits 4-bit, accuracy_level {tag}"] = (path, None, "ORT quantizer: block 128, asym")
    build_s["ORT quantizers"] = time.perf_counter() - t0

    for preset in presets:
        t0 = time.perf_counter()
        qm = qcompile.quantize(model, (), example, recipe=preset, calibration=calibration, progress=False,
                               verify=not args.quick)
        build_s[f"qcompile.quantize {preset}"] = time.perf_counter() - t0
        for flavor, level, activations in EXPORTS[preset]:
            tag = (f"{preset}_{flavor}" + ("" if level is None else f"_acc{level}")
                   + ("" if activations is None else f"_{activations}"))
            t0 = time.perf_counter()
            options = {} if activations is None else {"w8a8_activations": activations}
            result = to_onnx(qm, folder / f"qcompile_{tag}.onnx", flavor=flavor, accuracy_level=level, **options)
            build_s[f"to_onnx {tag}"] = time.perf_counter() - t0
            if activations is not None:
                files[f"qcompile {preset} ort, w8a8_activations={activations}"] = (result.path, None, PER_TENSOR_HOW)
            elif flavor == "ort" and preset == "w8a8":
                files[f"qcompile {preset} ort"] = (result.path, None, ORT_HOW[preset])
            elif flavor == "ort":
                files[f"qcompile {preset} ort, accuracy_level {'unset' if level is None else level}"] = (
                    result.path, None, ORT_HOW[preset])
            elif flavor == "qdq" and preset == "w8a8":
                # ORT fuses nothing here (it dequantizes the weights on every run): the
                # qdq_matmulnbits setting leaves the optimized graph unchanged, one row.
                files[f"qcompile {preset} qdq, ORT default session"] = (result.path, None, QDQ_HOW[preset])
            elif flavor == "qdq":
                files[f"qcompile {preset} qdq, ORT default session"] = (
                    result.path, None, f"{QDQ_HOW[preset]}, fused with int8 activations")
                files[f"qcompile {preset} qdq, qdq_matmulnbits_accuracy_level 0"] = (
                    result.path, dict(EXACT_CONFIG), f"{QDQ_HOW[preset]}, fused, exact")
            else:
                files[f"qcompile {preset} qcompile"] = (result.path, None, "qcompile-domain functions")

    sessions = {name: OrtModel(session(path, args.threads, config)) for name, (path, config, _) in files.items()}

    # Fidelity first (it also warms every session up).
    cosines = {}
    for name, runner in sessions.items():
        cos = embedding_cosine(reference, embed_texts(runner, tokenizer, heldout))
        cosines[name] = (float(cos.mean()), float(cos.min()))

    waiter = QuietWaiter(budget_s=0 if args.quick else 60)
    waiter.wait()
    share = CpuShare()
    calls = {name: (lambda r=runner: r(**timing_batch)) for name, runner in sessions.items()}
    timings = time_interleaved(calls, warmup=warmup, repeat=repeat)
    base, dynamic = timings[FP32].median_s, timings[DYNAMIC].median_s

    rows = []
    for name, (path, _, how) in files.items():
        t = timings[name]
        size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
        mean, low = cosines[name]
        rows.append([name, how, f"{t.median_ms:.1f}", f"{t.median_s / base:.2f}", f"{t.median_s / dynamic:.2f}",
                     f"{mean:.4f}", f"{low:.4f}", f"{size / 2**20:.1f}"])
    emit("")
    emit(f"Batch {BATCH} x {SEQ} tokens; cosine over {len(heldout)} held-out texts against the float PyTorch "
         f"model ({len(calib)} calibration texts); {repeat} interleaved rounds after {warmup} warm-up call(s).")
    emit("")
    emit(markdown_table(["candidate", "what", "ms (median)", "x ORT fp32 time", "x ORT quantize_dynamic time",
                         "cosine mean", "cosine min", "file MB"], rows, align="llrrrrrr"))
    emit("")
    emit(f"- {share.report()}; waited {waiter.waited:.0f} s for a quiet machine before timing")
    emit("- build times: " + ", ".join(f"{k} {v:.1f} s" for k, v in build_s.items()))
    emit(f"- files in {folder}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
