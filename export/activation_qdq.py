"""The "qdq" flavor of the activation-quantized ops: standard ``QuantizeLinear`` /
``DequantizeLinear`` around ``MatMul``.

* Activations: the per-token scale is computed in the graph (``ReduceMax``/``ReduceMin``,
  ``Div``, the zero guard; see :mod:`qcompile.export.activation_quant`) and fed to a
  blocked ``QuantizeLinear`` (one block of K channels per token: scale ``[..., 1]``,
  ``block_size = K`` on the last axis, ``output_dtype`` INT8; opset 21)
  and the matching ``DequantizeLinear`` (a 1-D activation, one token, as a ``[1, K]`` row:
  ONNX Runtime refuses a blocked scale of one element). A static ``act_scale`` is a per-tensor scale
  (activations first raised to ``-127 * scale``, so that the codes clamp at -127 as the
  torch op's do, not at QuantizeLinear's -128).
* Weights: int8 initializers laid out ``[K, N]`` (what ``MatMul`` reads)
  with one scale per output channel (``DequantizeLinear`` ``axis=1``), as the weight-only
  "qdq" translation lays weights out.
* ``MatMul`` of the dequantized operands in float32, then ``Add`` of the bias.

The codes are bit-identical to the torch op's (``QuantizeLinear`` divides, rounds half to
even and saturates as the torch op does); the product is a float32 GEMM of dequantized
values, not an int32 accumulation, so outputs differ from the torch op by float32
rounding (~1e-7 relative). ONNX Runtime does not turn this form into integer kernels (the
activation scales are dynamic) and dequantizes the weight on every run: measured with
``benchmarks/onnx_w8a8_ops.py`` (M = 4096, 2 threads) it takes 0.8-1.5x the time of a
float32 MatMul, against 0.26-0.37x for the "ort" flavor. The flavor is for consumers
that match Q/DQ patterns, not for speed in ONNX Runtime.
``qcompile::quantize_per_token`` becomes ``QuantizeLinear``
(INT8, or FLOAT8E4M3FN for format "fp8") with the in-graph scale, returning (codes, scales).

``qcompile::linear_fp8`` has no "qdq" translation (:data:`FP8_LINEAR_REFUSAL`, declared in
:mod:`qcompile.export.table`): its standard form, ``QuantizeLinear``/``DequantizeLinear``
to FLOAT8E4M3FN around ``MatMul``, is valid ONNX, but ONNX Runtime's CPU provider fails to
load it at the default optimization level (it runs with ``session.disable_quant_qdq = 1``
or basic optimizations; measured on 1.31.1). The "ort" and "qcompile" flavors export it.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qcompile.errors import ExportError

from .activation_quant import (
    INT8_QMAX,
    Float32Inputs,
    act_qmax,
    finish_epilogue,
    in_input_dtype,
    per_token_scale,
    read_linear_call,
    require_opset,
    smoothed_input,
    static_rank,
    static_scale,
    weight_kn,
)
from .context import ExportContext
from .node_builder import NodeBuilder, ScriptNodes

__all__ = ["QDQ_ACTIVATION_MIN_OPSET", "FP8_LINEAR_REFUSAL", "linear_w8a8", "quantize_per_token"]

# Blocked QuantizeLinear/DequantizeLinear and their output_dtype attribute: opset 21.
QDQ_ACTIVATION_MIN_OPSET = 21

FP8_LINEAR_REFUSAL = (
    "ONNX Runtime's CPU provider cannot run its standard form, DequantizeLinear(FLOAT8E4M3FN) on both "
    "operands of MatMul: at the default optimization level its QDQ fusion turns the pattern into "
    "com.microsoft.MatMulIntegerToFloat, which takes no float8 input, and the session fails to load "
    "(ONNX Runtime 1.31: \"Type 'tensor(float8e4m3fn)' of input parameter ... of operator "
    "(MatMulIntegerToFloat) ... is invalid\")"
)


def _require(ctx: ExportContext, op_name: str) -> None:
    require_opset(ctx, QDQ_ACTIVATION_MIN_OPSET, op_name,
                  "QuantizeLinear/DequantizeLinear with per-token (blocked) activation scales",
                  "export with opset=21 (the default), or flavor 'ort' or 'qcompile', which write the "
                  "activation quantization without blocked scales")


def _per_token_codes(b: NodeBuilder, xs, s, k: int, dtype: int):
    """``QuantizeLinear`` of ``xs [..., K]`` with the per-token scale ``s [..., 1]`` (one block of K).
    ``xs`` must have at least 2 dimensions: ONNX Runtime reads a one-element scale ``[1]`` as
    per-tensor and refuses ``block_size`` (callers give a 1-D input as a ``[1, K]`` row)."""
    return b("QuantizeLinear", xs, s, axis=-1, block_size=k, output_dtype=dtype)


def _per_token_qdq(b: NodeBuilder, xs, s, k: int, dtype: int):
    """The dequantized per-token codes of ``xs`` (at least 2-D, see :func:`_per_token_codes`)."""
    return b("DequantizeLinear", _per_token_codes(b, xs, s, k, dtype), s, axis=-1, block_size=k)


def _linear(ctx: ExportContext, call, xd, wscales, b: NodeBuilder, known: Float32Inputs):
    """``MatMul(xd, DequantizeLinear(W [K, N], wscales, axis=1)) + bias`` in x's dtype."""
    data = ctx.initializer(f"{call.name}.DequantizeLinear.x", weight_kn(call.qweight))
    weight = b("DequantizeLinear", data, wscales, axis=1)
    y = finish_epilogue(b, b("MatMul", xd, weight), None, call.bias, known.bias)
    return in_input_dtype(b, y, call.x, known.x)


def linear_w8a8(ctx: ExportContext, x, qweight, wscales, bias, smooth, act_scale):
    """``qcompile::linear_w8a8`` -> Q/DQ of the activation, DQ of the int8 weight, MatMul."""
    call = read_linear_call(ctx, "qcompile::linear_w8a8", x, qweight, wscales, bias, smooth, act_scale)
    _require(ctx, call.op_name)
    b = ScriptNodes(ctx.opset)
    known = Float32Inputs.of(x, bias, smooth, act_scale)
    xs = smoothed_input(b, x, smooth, known)
    if act_scale is None:
        one_token = static_rank(x) == 1  # quantized as a [1, K] row (see _per_token_codes)
        row = b.constant(np.array([0], np.int64))
        rows = b("Unsqueeze", xs, row) if one_token else xs
        xd = _per_token_qdq(b, rows, per_token_scale(b, rows, INT8_QMAX), call.in_features, TensorProto.INT8)
        y = _linear(ctx, call, xd, wscales, b, known)
        # squeezed after the MatMul: a Squeeze between DequantizeLinear and MatMul lets ONNX
        # Runtime's QDQ fusion replace the product with its own integer kernel (4e-3 off)
        return b("Squeeze", y, row) if one_token else y
    else:
        s = static_scale(b, act_scale, known.act_scale)
        zero = b.constant(np.array(0, np.int8))
        floor = b("Mul", s, b.constant(np.array(-INT8_QMAX, np.float32)))
        codes = b("QuantizeLinear", b("Max", xs, floor), s, zero)
        xd = b("DequantizeLinear", codes, s, zero)
    return _linear(ctx, call, xd, wscales, b, known)


def quantize_per_token(ctx: ExportContext, x, smooth, bits, format):
    """``qcompile::quantize_per_token`` -> (QuantizeLinear codes, in-graph scales)."""
    _require(ctx, "qcompile::quantize_per_token")
    k = x.shape[-1] if getattr(x, "shape", None) is not None else None
    if not isinstance(k, int):
        raise ExportError(f"qcompile::quantize_per_token: flavor 'qdq' needs a static last dimension K "
                          f"(the block size of QuantizeLinear), got shape {getattr(x, 'shape', None)}")
    b = ScriptNodes(ctx.opset)
    known = Float32Inputs.of(x, None, smooth)
    xs = smoothed_input(b, x, smooth, known)
    dtype = TensorProto.FLOAT8E4M3FN if format == "fp8" else TensorProto.INT8
    if static_rank(x) == 1:  # one token: quantized as a [1, K] row (see _per_token_codes)
        row = b.constant(np.array([0], np.int64))
        rows = b("Unsqueeze", xs, row)
        s = per_token_scale(b, rows, act_qmax(int(bits), format))
        return b("Squeeze", _per_token_codes(b, rows, s, k, dtype), row), b("Squeeze", s, row)
    s = per_token_scale(b, xs, act_qmax(int(bits), format))
    return _per_token_codes(b, xs, s, k, dtype), s
