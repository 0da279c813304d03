"""ONNX translations of ``qcompile::linear_w4a8`` and ``qcompile::linear_w4a4``
(:mod:`qcompile.kernels.linear_w4ax`): 4-bit group-wise weights, per-token int8 / int4
activations of ``x / smooth`` quantized inside the op, exact integer accumulation per
group, the float32 epilogue ``((Σ_g acc_g * scales_g) * xscale + bias)``.

Every flavor first writes the op's activation quantization with the standard-op pieces of
:mod:`qcompile.export.activation_quant` (``float32(x) / smooth``; ``absmax / qmax`` per
token over the last axis with the zero guard, qmax 127 or 7; ``QuantizeLinear``, which
divides, rounds half to even and saturates like the torch op), so the codes and the
per-token scales are the torch op's bit for bit. The weight is re-laid out at export time
from :class:`qcompile.quantizers.QuantizedWeight`'s 4-bit layout (exact integer moves,
:mod:`qcompile.export.layouts`) and stays 4-bit in the file. Then:

* ``"ort"`` (:func:`linear_w4ax_ort`): the codes, cast to float32 (integers, exact), times
  the weight in ``com.microsoft.MatMulNBits`` (``bits=4``, ``block_size`` from
  :func:`~qcompile.export.layouts.matmulnbits_block_size`: the group size, or blocks
  tiling a per-channel row; ``accuracy_level`` not written, so ONNX Runtime does not
  re-quantize the codes), then ``Mul`` by the per-token scale, ``Add`` of the bias.
  Per-channel weights (one group per row) are written with unit block scales, so the
  kernel sums integers, exact in float32 while ``K * qmax * 15 < 2**24`` (K <= 8806 for
  int8 codes, any K of a real model for int4), and the per-channel scale follows as a
  ``Mul``: the torch op's epilogue in its order, bit-identical. With groups the kernel
  dequantizes ``(code - zero) * scale`` and sums the float32 products: the result is the
  op's up to float32 rounding: ``|onnx - op| <= (K + G + 4) u T + 4 u |y|`` with
  ``T = xscale * Σ_k |a_k| |w_k|``, ``u = 2**-24`` (a float32 dot product of K terms and
  the rounding of each dequantized weight, against the op's G rounded group terms and
  their sums; tested). A group size that no MatMulNBits
  block size represents (40, say) falls back to ``MatMul`` by ``DequantizeLinear`` of the
  weight (noted, as for the weight-only linears).
* ``"qdq"`` (:func:`linear_w4ax_qdq`): standard ONNX only. Blocked ``QuantizeLinear`` /
  ``DequantizeLinear`` of the activation (one block of K per token, the in-graph scale;
  ``output_dtype`` INT8 for w4a8 and INT4 for w4a4, which ONNX Runtime 1.31's CPU provider
  runs), ``DequantizeLinear`` of the weight (UINT4 with zero points, or INT4 when
  symmetric; per-axis or blocked along K: the weight-only "qdq" layout), float32
  ``MatMul``, ``Add`` of the bias. Within float32 rounding of the op as above (plus one
  rounding of ``code * xscale``). ONNX Runtime 1.31 runs this pattern as written (it
  fuses neither the weight's DequantizeLinear + MatMul into MatMulNBits, as it does for
  the weight-only "qdq" form, nor the pair of DequantizeLinears into an integer GEMM:
  checked on its optimized graph, default and EXACT_CONFIG sessions alike), so it
  dequantizes the weight on every run: a form for consumers that match Q/DQ patterns,
  not for speed in ONNX Runtime.
* ``"qcompile"`` (:func:`linear_w4ax_domain`): one ``qcompile.LinearW4A8`` /
  ``qcompile.LinearW4A4`` node ``(X, QWeight, Scales, Zeros, Bias, Smooth) -> Y``,
  attribute ``group_size``, reading qcompile's storage unchanged (QWeight uint8 ``[N,
  ceil(K / 2)]``, Scales and Zeros float32 ``[N, G]``; absent zeros written as 8, absent
  bias as zeros ``[N]``, absent smooth as ones ``[K]``: function bodies cannot branch on
  an omitted input). Its body is the op's exact integer form: uint8 codes + 128 viewed
  ``[G, M, group_size]``, the weight unpacked to ``code - zero`` int8 ``[G, group_size,
  N]``, one batched ``MatMulInteger`` (int32 per group), ``Cast`` and ``Mul`` by the group
  scales, ``ReduceSum`` over the groups (ONNX Runtime adds them from first to last, the
  op's order), ``Mul`` by the per-token scale, ``Add`` of the bias: bit-identical to the
  torch op (tested). ONNX Runtime constant-folds the weight's unpacking when it loads
  the model, so it holds an int8 copy of the weight (K * N bytes) in memory, like the
  op's CPU path.

Speed, measured with ``benchmarks/onnx_w4ax_ops.py`` (ONNX Runtime 1.31.1, CPU provider,
2 intra-op threads, spinning off, EXACT_CONFIG; AMD EPYC with AVX512-VNNI; M = 4096 rows,
float32 activations, bias; other processes used one of the two cores throughout, so
compare within a column), time relative to ONNX Runtime's float32 MatMul + Add::

    K x N                          384x384   1536x384   bit-identical to the op
    "ort" w4a8 g128                  0.78       0.93      20% / 10% of outputs
    "ort" w4a8 per-channel           0.72       0.93      all
    "ort" w4a8 g32                   0.71       0.91      19% / 10%
    "ort" w4a4 g128                  0.81       0.91      21% / 11%
    "ort" w4a8 g128, accuracy 4      0.53       0.56      none (4e-3 relative error)
    "qdq" w4a8 / w4a4 g128        0.84-0.87  1.19         (float32 rounding)
    "qcompile" w4a8 / w4a4 g128   0.66-0.68  0.90-0.91    all

MatMulNBits at accuracy level 0 computes in float32 (it unpacks the weight on the fly),
so the "ort" form saves the weight's bytes (4 bits: an eighth of float32's), not
arithmetic; its largest difference from the op was 7e-7 (K = 384) and 1.1e-6 (K = 1536)
of max|y|. ``to_onnx(accuracy_level=4)`` lets MatMulNBits re-quantize the (integer)
codes to int8 per weight block with its own scales: about 1.7x faster, but 4e-3 from the
op, so not the default. The "qcompile" flavor's exact integer body (MatMulInteger, uint8
x int8, per group) ran as fast as the "ort" form here, at twice its weight memory (int8
after constant folding).

x may be float32, float16 or bfloat16 (quantized in float32 after a ``Cast``; the result
cast back with ``CastLike``), of any rank; bias and smooth of any floating type.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto

from qcompile.kernels.linear_w4ax import W4AX_OP_NAMES

from .activation_qdq import QDQ_ACTIVATION_MIN_OPSET, _per_token_qdq
from .activation_domain import FunctionOp
from .activation_quant import (
    Float32Inputs,
    act_qmax,
    finish_epilogue,
    float32,
    in_input_dtype,
    int8_codes_per_token,
    per_token_scale,
    require_opset,
    smoothed_input,
    static_rank,
    uint8_codes_per_token,
)
from .context import ExportContext
from .layouts import UnsignedGrid, matmulnbits_block_size, stored_zeros, to_matmulnbits
from .node_builder import NodeBuilder, ScriptNodes
from .qcompile_domain import qcompile_opset, register_domain_ops
from .qdq import dequantize_matmul
from .weight_only import WeightOnlyCall, read_call

__all__ = [
    "W4AX_DOMAIN_OPS",
    "exact_in_float32",
    "linear_w4ax_ort",
    "linear_w4ax_qdq",
    "linear_w4ax_domain",
    "unpack_int4_nodes",
]

WEIGHT_BITS = 4
# |code - zero| <= 15 on a 4-bit grid.
_MAX_CENTERED_CODE = 15
# Integers up to 2**24 are exact in float32.
_FLOAT32_EXACT_INTEGERS = 2**24
_DOMAIN_NAMES = {8: "LinearW4A8", 4: "LinearW4A4"}
_QDQ_CODE_TYPES = {8: TensorProto.INT8, 4: TensorProto.INT4}


def exact_in_float32(in_features: int, act_bits: int) -> bool:
    """Whether every partial sum of ``Σ_k a_k (code_k - zero)`` over K input channels is an
    integer that float32 holds exactly (``K * qmax * 15 <= 2**24``)."""
    return in_features * act_qmax(act_bits, "int") * _MAX_CENTERED_CODE <= _FLOAT32_EXACT_INTEGERS


def _read(ctx: ExportContext, act_bits: int, x, qweight, scales, zeros, bias,
          group_size) -> tuple[WeightOnlyCall, UnsignedGrid]:
    """The call's constant weight tensors and its unsigned grid (ExportError for zero points
    that are not integers in 0..15)."""
    call = read_call(ctx, W4AX_OP_NAMES[act_bits], WEIGHT_BITS, x, qweight, scales, zeros, bias, group_size)
    return call, call.grid()


def _matmulnbits(ctx: ExportContext, b: NodeBuilder, call: WeightOnlyCall, grid: UnsignedGrid, a, block_size: int,
                 rank: int | None):
    """``com.microsoft.MatMulNBits(a, grid)`` (a 1-D ``a`` is made ``[1, K]`` and back)."""
    weights = to_matmulnbits(grid, block_size)
    B = ctx.initializer(f"{call.name}.MatMulNBits.B", weights.B)
    scales = ctx.initializer(f"{call.name}.MatMulNBits.scales", weights.scales)
    zero_points = None
    if weights.zero_points is not None:
        zero_points = ctx.initializer(f"{call.name}.MatMulNBits.zero_points", weights.zero_points)
    attributes = {"K": weights.in_features, "N": weights.out_features, "bits": WEIGHT_BITS, "block_size": block_size}
    if ctx.accuracy_level is not None:
        attributes["accuracy_level"] = ctx.accuracy_level
    axis0 = None
    if rank == 1:
        axis0 = b.constant(np.array([0], np.int64))
        a = b("Unsqueeze", a, axis0)
    y = b("MatMulNBits", a, B, scales, zero_points, domain="com.microsoft", **attributes)
    return b("Squeeze", y, axis0) if rank == 1 else y


def linear_w4ax_ort(act_bits: int):
    """The "ort" translation of ``linear_w4a<act_bits>``: codes (float32) ``MatMulNBits``
    the 4-bit weight, times the per-token scale, plus the bias."""
    op_name = W4AX_OP_NAMES[act_bits]

    def translate(ctx: ExportContext, x, qweight, scales, zeros, bias, smooth, group_size):
        call, grid = _read(ctx, act_bits, x, qweight, scales, zeros, bias, group_size)
        b = ScriptNodes(ctx.opset)
        known = Float32Inputs.of(x, bias, smooth)
        xs = smoothed_input(b, x, smooth, known)
        s = per_token_scale(b, xs, act_qmax(act_bits, "int"))
        codes = b("Cast", int8_codes_per_token(b, xs, s), to=TensorProto.FLOAT)
        block_size = matmulnbits_block_size(grid.in_features, grid.group_size)
        if block_size is None:
            ctx.note(
                f"{call.name}: group_size {grid.group_size} is not a multiple of a MatMulNBits block size "
                "(16, 32, 64, 128, 256); exported as DequantizeLinear + MatMul instead"
            )
            acc = dequantize_matmul(ctx, dataclasses.replace(call, x=codes, bias=None), grid)
        elif grid.num_groups == 1 and exact_in_float32(grid.in_features, act_bits):
            # Unit scales: MatMulNBits sums integers (exact); the channel scale follows, as in the op.
            unit = dataclasses.replace(grid, scales=np.ones_like(grid.scales))
            acc = _matmulnbits(ctx, b, call, unit, codes, block_size, static_rank(x))
            acc = b("Mul", acc, ctx.initializer(f"{call.name}.wscales", np.ascontiguousarray(grid.scales[:, 0])))
        else:
            acc = _matmulnbits(ctx, b, call, grid, codes, block_size, static_rank(x))
        y = finish_epilogue(b, b("Mul", acc, s), None, bias, known.bias)
        return in_input_dtype(b, y, x, known.x)

    translate.__name__ = f"{op_name.split('::')[-1]}_ort"
    return translate


def linear_w4ax_qdq(act_bits: int):
    """The "qdq" translation of ``linear_w4a<act_bits>``: Q/DQ of the activation (INT8 or
    INT4 codes), DequantizeLinear of the 4-bit weight, MatMul, plus the bias."""
    op_name = W4AX_OP_NAMES[act_bits]

    def translate(ctx: ExportContext, x, qweight, scales, zeros, bias, smooth, group_size):
        call, grid = _read(ctx, act_bits, x, qweight, scales, zeros, bias, group_size)
        require_opset(ctx, QDQ_ACTIVATION_MIN_OPSET, op_name,
                      "QuantizeLinear/DequantizeLinear with per-token (blocked) activation scales and 4-bit weights",
                      "export with opset=21 (the default), or flavor 'ort' or 'qcompile'")
        b = ScriptNodes(ctx.opset)
        known = Float32Inputs.of(x, bias, smooth)
        xs = smoothed_input(b, x, smooth, known)
        rank1 = static_rank(x) == 1
        if rank1:  # ONNX Runtime reads a one-element scale [1] as per-tensor and refuses block_size
            axis0 = b.constant(np.array([0], np.int64))
            xs = b("Unsqueeze", xs, axis0)
        s = per_token_scale(b, xs, act_qmax(act_bits, "int"))
        xd = _per_token_qdq(b, xs, s, grid.in_features, _QDQ_CODE_TYPES[act_bits])
        y = dequantize_matmul(ctx, dataclasses.replace(call, x=xd, bias=None), grid)
        if rank1:
            y = b("Squeeze", y, axis0)
        return in_input_dtype(b, finish_epilogue(b, y, None, bias, known.bias), x, known.x)

    translate.__name__ = f"{op_name.split('::')[-1]}_qdq"
    return translate


# --------------------------------------------------------------------------- "qcompile" flavor


def unpack_int4_nodes(b: NodeBuilder, packed, n, k):
    """uint8 codes ``[N, K]`` from qcompile's packed 4-bit ``[N, ceil(K / 2)]`` (low nibble
    first); ``n`` and ``k`` are int64 ``[1]`` values."""
    low = b("BitwiseAnd", packed, b.constant(np.array(15, np.uint8)))
    high = b("BitShift", packed, b.constant(np.array(4, np.uint8)), direction="RIGHT")
    last = b.constant(np.array([-1], np.int64))
    pairs = b("Concat", b("Unsqueeze", low, last), b("Unsqueeze", high, last), axis=-1)  # [N, ceil(K/2), 2]
    padded = b("Reshape", pairs, b("Concat", n, last, axis=0))
    zero, one = b.constant(np.array([0], np.int64)), b.constant(np.array([1], np.int64))
    return b("Slice", padded, zero, k, one)


def _w4ax_body(act_bits: int):
    qmax = act_qmax(act_bits, "int")

    def body(b, x, qweight, scales, zeros, bias, smooth):
        none = Float32Inputs()
        xs = smoothed_input(b, x, smooth, none)
        s = per_token_scale(b, xs, qmax)
        codes = uint8_codes_per_token(b, xs, s)  # code + 128, shaped like x
        first, last = b.constant(np.array([0], np.int64)), b.constant(np.array([-1], np.int64))
        group = b("Unsqueeze", b.attribute_constant("group_size"), first)
        groups = b("Shape", scales, start=1, end=2)
        n = b("Shape", qweight, start=0, end=1)
        k = b("Mul", groups, group)
        # Activations [G, M, group_size].
        a = b("Transpose", b("Reshape", codes, b("Concat", last, groups, group, axis=0)), perm=[1, 0, 2])
        # Weight code - zero, int8 [G, group_size, N] (constant-folded by ONNX Runtime).
        wcodes = b("Cast", unpack_int4_nodes(b, qweight, n, k), to=TensorProto.INT32)
        wzeros = b("Unsqueeze", b("Cast", zeros, to=TensorProto.INT32), last)
        centered = b("Sub", b("Reshape", wcodes, b("Concat", n, groups, group, axis=0)), wzeros)
        w = b("Transpose", b("Cast", centered, to=TensorProto.INT8), perm=[1, 2, 0])
        acc = b("MatMulInteger", a, w, b.constant(np.array(128, np.uint8)))  # int32 [G, M, N]
        group_scales = b("Unsqueeze", b("Transpose", float32(b, scales), perm=[1, 0]),
                         b.constant(np.array([1], np.int64)))  # [G, 1, N]
        y = b("ReduceSum", b("Mul", b("Cast", acc, to=TensorProto.FLOAT), group_scales), first, keepdims=0)
        y = b("Mul", y, b("Reshape", s, b.constant(np.array([-1, 1], np.int64))))
        y = finish_epilogue(b, y, None, bias)
        y = b("Reshape", y, b("Concat", b("Shape", x, end=-1), n, axis=0))
        return in_input_dtype(b, y, x)

    return body


def _domain_op(act_bits: int) -> FunctionOp:
    name = _DOMAIN_NAMES[act_bits]
    qmax = int(act_qmax(act_bits, "int"))
    return FunctionOp(
        name,
        f"Y = linear(X / Smooth) with 4-bit group-wise weights ((code - Zeros) * Scales per group of group_size "
        f"input channels) and per-token int{act_bits} activations (absmax / {qmax}, round half to even), exact "
        "integer accumulation per group, Y = (sum over groups of acc * Scales) * xscale + Bias in float32",
        (
            ("X", "T", "activations [..., K]"),
            ("QWeight", "tensor(uint8)", "4-bit weight codes packed two per byte, low nibble first, [N, ceil(K / 2)]"),
            ("Scales", "tensor(float)", "group scales [N, K / group_size]"),
            ("Zeros", "tensor(float)", "integer zero points 0..15 [N, K / group_size] (8 when symmetric)"),
            ("Bias", "B", "bias [N] (zeros when the linear has none)"),
            ("Smooth", "S", "smoothing divisor [K] (ones when the linear has none)"),
        ),
        (("Y", "T", "output [..., N] in X's dtype"),),
        _w4ax_body(act_bits),
        attributes=(("group_size", "input channels per group (K: per-channel)"),),
    )


W4AX_DOMAIN_OPS = {op.name: op for op in (_domain_op(8), _domain_op(4))}
register_domain_ops(*W4AX_DOMAIN_OPS.values())


def linear_w4ax_domain(act_bits: int):
    """The "qcompile" translation of ``linear_w4a<act_bits>``: one ``qcompile.LinearW4A<bits>`` node."""
    op_name = W4AX_OP_NAMES[act_bits]
    domain_op = _DOMAIN_NAMES[act_bits]

    def translate(ctx: ExportContext, x, qweight, scales, zeros, bias, smooth, group_size):
        call, _ = _read(ctx, act_bits, x, qweight, scales, zeros, bias, group_size)
        if zeros is None:
            zeros = ctx.initializer(f"{call.name}.zeros",
                                    stored_zeros(call.qweight, call.scales, None, bits=WEIGHT_BITS).numpy())
        if bias is None:
            bias = ctx.initializer(f"{call.name}.bias", np.zeros(call.out_features, np.float32))
        if smooth is None:
            smooth = ctx.initializer(f"{call.name}.smooth", np.ones(call.in_features, np.float32))
        y = getattr(qcompile_opset(), domain_op)(x, qweight, scales, zeros, bias, smooth, group_size=call.group_size)
        ctx.use_function(domain_op)
        return y

    translate.__name__ = f"{op_name.split('::')[-1]}_qcompile"
    return translate

