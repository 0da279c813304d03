"""The "ort" flavor of the activation-quantized ops: ONNX Runtime's integer GEMM, exact by default.

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

In the whole exported MiniLM (batch 32 x 128, 2 threads; kernel time per op type from ONNX
Runtime's profiler, ``benchmarks/onnx_op_profile.py`` on the files of ``benchmarks/onnx_minilm.py
--presets w8a8 --out DIR``, on a machine where other processes used 1.3 of the 2 cores) this
form took 1.13-1.16x the time of ONNX Runtime's ``quantize_dynamic`` file (1.02x once the
exporter dropped the attention's NaN guard, which that file keeps). The integer GEMMs
cost the same in both (ours 539 ms per run in 37 ``MatMulIntegerToFloat``, theirs 547 ms in
19 ``DynamicQuantizeMatMul`` + 18 ``MatMulIntegerToFloat``, their activation quantization
included); the difference is what the exact per-token numerics add around them: the row
absmax (``ReduceMax`` + ``ReduceMin``, 34 ms) and the per-row ``QuantizeLinear`` (37 ms)
against 4 ms of ``DynamicQuantizeLinear``, the ``wscales`` ``Mul`` (48 ms), the Q/K/V bias
``Add`` (51 against 30 ms of ``Add``), and about 250 small ops on ``[M, 1]`` (scale ``Div``,
``Less``, ``Where``, reshapes). MLAS's integer GEMM applies a per-column scale and a bias in
its output pass but not a per-row scale, and ``acc * s * wscales`` in the torch op's order
needs the two products apart, so these passes cannot be fused away without changing the
numerics; a ``ReduceMax`` of ``Abs`` instead of ``ReduceMax`` / ``ReduceMin``, a separate
``Mul`` for the row scale, or both scales inside ``MatMulIntegerToFloat`` (a ``[1, 1, N]``
``b_scale``, which its CPU kernel applies after the row scale) measured no faster within the
noise of that machine (one-off measurements of one linear at M = 4096).

``to_onnx(..., w8a8_activations="per-tensor")`` (:func:`linear_w8a8_per_tensor_nodes`) is
the documented way out: ONNX Runtime's own dynamic quantization (``DynamicQuantizeLinear``,
one asymmetric uint8 scale and zero point per tensor) of ``x / smooth``, with ``wscales``
as ``b_scale`` and the bias inside ``MatMulIntegerToFloat``; ONNX Runtime fuses it into
``DynamicQuantizeMatMul`` where the input is not shared, exactly as in the
``quantize_dynamic`` file, so its linears cost what that file's do (1.00x of its time in
``benchmarks/onnx_minilm.py``; 0.93x once the exporter dropped the attention's NaN guard,
:mod:`qcompile.export.softmax_nan_guard`, which that file keeps), with per-channel weights and
the smoothing the recipe chose: embedding cosine 0.9960 against ``quantize_dynamic``'s 0.9549
and the exact form's 0.9990.
Static (calibrated ``act_scale``) linears keep the exact form under either setting.

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
    float32,
    in_input_dtype,
    linear_fp8_nodes,
    linear_w8a8_nodes,
    quantize_per_token_nodes,
    read_linear_call,
    require_opset,
    smoothed_input,
    weight_kn,
)
from .context import ExportContext
from .node_builder import NodeBuilder, ScriptNodes

__all__ = ["PER_TENSOR_NOTE", "linear_w8a8", "linear_w8a8_per_tensor_nodes", "linear_fp8", "quantize_per_token"]

_FP8_WORKS = "export with opset >= 19 (the default is 21)"
PER_TENSOR_NOTE = (
    "w8a8_activations='per-tensor': the dynamic linear_w8a8 layers quantize their input per tensor "
    "(ONNX Runtime's DynamicQuantizeLinear), not per token as the torch op does; outputs differ from qcompile's"
)


def linear_w8a8(ctx: ExportContext, x, qweight, wscales, bias, smooth, act_scale):
    """``qcompile::linear_w8a8`` -> quantization + ``com.microsoft.MatMulIntegerToFloat`` + epilogue
    (``to_onnx(w8a8_activations="per-tensor")``: :func:`linear_w8a8_per_tensor_nodes`)."""
    call = read_linear_call(ctx, "qcompile::linear_w8a8", x, qweight, wscales, bias, smooth, act_scale)
    w_kn = ctx.initializer(f"{call.name}.MatMulIntegerToFloat.B", weight_kn(call.qweight))
    known = Float32Inputs.of(x, bias, smooth, act_scale)
    if ctx.w8a8_activations == "per-tensor" and act_scale is None:
        ctx.note(PER_TENSOR_NOTE)
        return linear_w8a8_per_tensor_nodes(ScriptNodes(ctx.opset), x, w_kn, wscales, bias, smooth, known=known)
    return linear_w8a8_nodes(ScriptNodes(ctx.opset), x, w_kn, wscales, bias, smooth, act_scale, contrib=True,
                             known=known)


def linear_w8a8_per_tensor_nodes(b: NodeBuilder, x, w_kn, wscales, bias, smooth, *, known: Float32Inputs):
    """ONNX Runtime's dynamic quantization of ``float32(x) / smooth`` (``DynamicQuantizeLinear``:
    one asymmetric uint8 scale ``a`` and zero point ``z`` for the whole tensor), then
    ``MatMulIntegerToFloat(codes, W [K, N] int8, a, wscales [N], z, -, bias)``: ``acc *
    (a * wscales) + bias``, all inside the GEMM. Not the torch op's numerics (see the
    module docstring)."""
    xs = smoothed_input(b, x, smooth, known)
    codes, scale, zero_point = b("DynamicQuantizeLinear", xs, outputs=3)
    bias32 = None if bias is None else float32(b, bias, known.bias)
    y = b("MatMulIntegerToFloat", codes, w_kn, scale, wscales, zero_point, None, bias32, domain="com.microsoft")
    return in_input_dtype(b, y, x, known.x)


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
