"""ONNX export of quantized models: ``qcompile.export.to_onnx(qm, "model.onnx", flavor=...)``.

Flavors (how each qcompile op is written):

* ``"ort"`` — ONNX Runtime contrib ops: weight-only linears become
  ``com.microsoft.MatMulNBits`` (4- and 8-bit); W8A8 linears quantize their activations
  per token with standard ops and multiply with ``com.microsoft.MatMulIntegerToFloat``
  (bit-identical to the torch op; ``w8a8_activations="per-tensor"`` writes ONNX Runtime's
  faster, per-tensor dynamic quantization instead); FP8 linears use standard ops (no fp8
  GEMM on CPU);
* ``"qdq"`` — standard ONNX only: ``DequantizeLinear`` (opset 21, blocked INT4/UINT4,
  per-channel INT8) + ``MatMul``; W8A8 activations through ``QuantizeLinear`` /
  ``DequantizeLinear`` with in-graph per-token scales (FP8 linears are refused: ONNX
  Runtime's CPU provider cannot load their Q/DQ form);
* ``"qcompile"`` — ``qcompile``-domain ops carrying ONNX function bodies, which stock
  ONNX Runtime runs by inlining.

Modules: ``api`` (to_onnx), ``registry``/``table`` (the op -> flavor -> translation
table), ``ort_contrib`` / ``qdq`` / ``qcompile_domain`` (the weight-only translations),
``activation_quant`` (the activation quantization every flavor writes) with
``activation_ort`` / ``activation_qdq`` / ``activation_domain`` (the activation-quantized
translations), ``node_builder`` (one way to write nodes for translations and function
bodies), ``layouts`` (exact weight re-layouts), ``exportable`` (the graph torch.onnx
takes), ``softmax_nan_guard`` (drops the attention Softmax's NaN guard where it cannot
fire), ``naming``, ``writer`` (atomic, checked writes), ``runtime`` (ONNX Runtime
sessions with stated numerics), ``inspect_onnx`` (what a file holds).
"""
from __future__ import annotations

from qcompile.errors import ExportError

from .api import DEFAULT_OPSET, OnnxExport, to_onnx
from .inspect_onnx import OnnxSummary, format_summary, summarize_onnx
from .registry import FLAVORS, TranslationTable
from .runtime import EXACT_CONFIG, inference_session, onnx_feeds, session_options
from .table import TRANSLATIONS

__all__ = [
    "DEFAULT_OPSET",
    "EXACT_CONFIG",
    "ExportError",
    "FLAVORS",
    "OnnxExport",
    "OnnxSummary",
    "TRANSLATIONS",
    "TranslationTable",
    "format_summary",
    "inference_session",
    "onnx_feeds",
    "session_options",
    "summarize_onnx",
    "to_onnx",
]
