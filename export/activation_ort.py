"""The "ort" flavor of the activation-quantized ops: ONNX Runtime's integer GEMM, exact.

``qcompile::linear_w8a8`` becomes the per-token (or static) quantization written with
standard ops (:mod:`qcompile.export.activation_quant`: ``ReduceMax``/``ReduceMin`` for the
row absmax, ``QuantizeLinear`` per row into uint8 with zero point 128), then
``com.microsoft.MatMulIntegerToFloat(codes, W [K, N] int8, a_scale = s, b_scale = 1,
a_zero_point = 128)``, which accumulates in int32 and returns ``float32(acc) * s``, then
``Mul`` by ``wscales`` and ``Add`` of the bias. Every step is the torch op's float32
operation in the torch op's order, so the output is bit-identical to
``torch.ops.qcompile.linear_w8a8`` (checked by ``tests/export/test_activation_quant_export.py``).

Why this form: measured with ``.venv/bin/python benchmarks/onnx_w8a8_ops.py`` (ONNX Runtime
1.31.1, CPU provider, 2 intra-op threads, spinning off; AMD EPYC with AVX512-VNNI, 2 cores;
M = 4096 rows, float32 activations, bias, no smoothing; median ms of 21 interleaved
rounds; "exact" = fraction of outputs bit-identical to ``torch.ops.qcompile.linear_w8a8``)::

    K x N                                     384x384  384x1536  1536x384   exact   max rel. err
    fp32 MatMul (float weight)                  13.09     30.72     33.26   0       6e-3
    (a) DynamicQuantizeLinear + MatMulInteger    2.92     11.51     10.70   0       1e-2
    (b) com.microsoft.DynamicQuantizeMatMul      2.21      7.22      9.64   0       1e-2
    (c) MatMulIntegerToFloat, b_scale=wscales    3.04     10.34     11.68   0.78    1.4e-7
    (c') this form (a_scale = row scale)         3.26     11.53     11.83   1       0
    (d) MatMulInteger + Cast + Mul + Mul         3.51     13.02     11.78   1       0
    (d) with int8 (not uint8 + 128) codes       23.89     83.06    101.21   1       0
    exported "ort" flavor (to_onnx)              3.39     11.52     11.73   1       0
    torch op (torch._int_mm, 2 threads)          5.49      9.17     16.09   1       0

(a) and (b) are ONNX Runtime's dynamic quantization: per-tensor asymmetric uint8
activations, not the torch op's per-token symmetric int8, hence 1% relative error against
it. (b) is the fastest (1.2-1.6x faster than this form here; 1.1-1.2x in a second, more
contended run) but changes the numerics, so it is not the default. (c) takes per-token
codes but multiplies ``acc * wscales`` first and by the row scale after, ~1 ulp from the
torch op's ``acc * s * wscales`` on 22% of the outputs. This form, (c'), keeps (d)'s
exactness (standard ``MatMulInteger`` + float32 epilogue, which the "qcompile" flavor's
function body uses) at about (c)'s speed: 0.26-0.37x the time of ONNX Runtime's fp32
MatMul. int8 activation codes make ONNX Runtime's CPU GEMM 6-9x slower than uint8 codes
with zero point 128, hence the zero point.

``qcompile::linear_fp8``: ONNX Runtime has no fp8 GEMM on CPU, so this flavor writes the
standard form the "qcompile" function body uses: e4m3fn codes by ``Clip`` + ``Cast``
(opset 19), dequantized with ``Mul``, a float32 ``MatMul`` against ``Cast(W) * wscales``.

``qcompile::quantize_per_token``: the standard-op quantization, returning (codes, scales).
"""
from __future__ import annotations

from .activation_quant import (
    FP8_MIN_OPSET,
    Float32Inputs,
    act_qmax,
    linear_fp8_nodes,
    linear_w8a8_nodes,
    quantize_per_token_nodes,
    read_linear_call,
    require_opset,
    weight_kn,
)
from .context import ExportContext
from .node_builder import ScriptNodes

__all__ = ["linear_w8a8", "linear_fp8", "quantize_per_token"]

_FP8_WORKS = "export with opset >= 19 (the default is 21)"


def linear_w8a8(ctx: ExportContext, x, qweight, wscales, bias, smooth, act_scale):
    """``qcompile::linear_w8a8`` -> quantization + ``com.microsoft.MatMulIntegerToFloat`` + epilogue."""
    call = read_linear_call(ctx, "qcompile::linear_w8a8", x, qweight, wscales, bias, smooth, act_scale)
    w_kn = ctx.initializer(f"{call.name}.MatMulIntegerToFloat.B", weight_kn(call.qweight))
    return linear_w8a8_nodes(ScriptNodes(ctx.opset), x, w_kn, wscales, bias, smooth, act_scale, contrib=True,
                             known=Float32Inputs.of(x, bias, smooth, act_scale))


def linear_fp8(ctx: ExportContext, x, qweight, wscales, bias, smooth):
    """``qcompile::linear_fp8`` -> e4m3fn codes (Cast), dequantized, float32 MatMul."""
    call = read_linear_call(ctx, "qcompile::linear_fp8", x, qweight, wscales, bias, smooth)
    require_opset(ctx, FP8_MIN_OPSET, call.op_name, "FLOAT8E4M3FN tensors", _FP8_WORKS)
    w_kn = ctx.initializer(f"{call.name}.fp8_weight", weight_kn(call.qweight))
    return linear_fp8_nodes(ScriptNodes(ctx.opset), x, w_kn, wscales, bias, smooth,
                            known=Float32Inputs.of(x, bias, smooth))


def quantize_per_token(ctx: ExportContext, x, smooth, bits, format):
    """``qcompile::quantize_per_token`` -> (codes, scales) with standard ops."""
    if format == "fp8":
        require_opset(ctx, FP8_MIN_OPSET, "qcompile::quantize_per_token", "FLOAT8E4M3FN tensors", _FP8_WORKS)
    return quantize_per_token_nodes(ScriptNodes(ctx.opset), x, smooth, act_qmax(int(bits), format), format,
                                    known=Float32Inputs.of(x, None, smooth))
