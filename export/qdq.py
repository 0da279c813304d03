"""The "qdq" flavor: standard ONNX only.

A weight-only linear becomes ``DequantizeLinear`` on the constant weight, stored ``[K, N]``
(per-axis INT8/INT4/UINT4 for one group per row, blocked along K with ``block_size`` for
groups: opset 21), then ``MatMul`` and, when there is a bias, ``Add``. Consumers such as
TensorRT match this pattern; ONNX Runtime fuses it into MatMulNBits at its default
optimization level and then computes with int8 activations unless the session config
``session.qdq_matmulnbits_accuracy_level`` is "0"-"3" (see :mod:`qcompile.export.runtime`).
"""
from __future__ import annotations

from qcompile.errors import ExportError

from .context import ExportContext
from .layouts import UnsignedGrid, to_dequantize_linear
from .weight_only import WeightOnlyCall, add_bias, in_activation_dtype, read_call

__all__ = ["QDQ_MIN_OPSET", "dequantize_matmul", "weight_only_linear"]

# DequantizeLinear with INT4/UINT4 or block_size is opset 21; per-axis INT8 is opset 13.
QDQ_MIN_OPSET = 21
_PER_AXIS_INT8_MIN_OPSET = 13


def dequantize_matmul(ctx: ExportContext, call: WeightOnlyCall, grid: UnsignedGrid):
    """``MatMul(x, DequantizeLinear(W))`` (+ bias) for ``grid``; returns the output value."""
    dq = to_dequantize_linear(grid)
    needed = _PER_AXIS_INT8_MIN_OPSET if grid.bits == 8 and dq.block_size is None else QDQ_MIN_OPSET
    if ctx.opset < needed:
        raise ExportError(
            f"{call.op_name} ({call.name}): DequantizeLinear with {grid.bits}-bit "
            f"{'blocked' if dq.block_size else 'per-channel'} weights needs opset >= {needed}, "
            f"but the export uses opset {ctx.opset}"
        )
    op = ctx.op
    data = ctx.initializer(f"{call.name}.DequantizeLinear.x", dq.data)
    scale = ctx.initializer(f"{call.name}.DequantizeLinear.scale", in_activation_dtype(dq.scale, call.x))
    zero_point = None
    if dq.zero_point is not None:
        zero_point = ctx.initializer(f"{call.name}.DequantizeLinear.zero_point", dq.zero_point)
    attributes = {"axis": dq.axis}
    if dq.block_size is not None:
        attributes["block_size"] = dq.block_size
    weight = op.DequantizeLinear(data, scale, zero_point, **attributes)
    return add_bias(ctx, op.MatMul(call.x, weight), call.x, call.bias)


def weight_only_linear(op_name: str, bits: int):
    """The qdq translation of a weight-only linear with ``bits``-bit weights."""

    def translate(ctx: ExportContext, x, qweight, scales, zeros, bias, group_size):
        call = read_call(ctx, op_name, bits, x, qweight, scales, zeros, bias, group_size)
        return dequantize_matmul(ctx, call, call.grid())

    translate.__name__ = f"{op_name.split('::')[-1]}_qdq"
    return translate
