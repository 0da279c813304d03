"""The "ort" flavor: ONNX Runtime contrib ops.

A weight-only linear (4-bit or 8-bit) becomes ``com.microsoft.MatMulNBits`` (``bits`` 4
or 8, ``block_size`` from :func:`~qcompile.export.layouts.matmulnbits_block_size`, packed
weights, per-block scales, packed zero points when they differ from ``2 ** (bits - 1)``),
then ``Add`` for the bias (the form ONNX Runtime's own quantizer writes).

Groups that no supported block size represents (a group of 40 input channels, say) fall
back to the standard ``DequantizeLinear`` + ``MatMul`` of the "qdq" flavor; the export
notes each such layer.

``accuracy_level``: by default the attribute is not written (0, "unset"): ONNX Runtime then
computes with the activations as they are (float32 on CPU), which is what "a16" promises
and matches ``qcompile.quantize``'s output to float32 rounding. ``accuracy_level=4`` lets
the CPU kernel quantize the activations to int8 per block: faster (measured on ORT 1.31,
2 threads: about 1.4x at M=4096, K=384, N=1536 for 4-bit, 2x for 8-bit, and far more for
8-bit at small M, where the exact 8-bit kernel is slow) at about 0.6% relative error per
matmul. Levels 1-3 compute like 0 on x86 CPUs.
"""
from __future__ import annotations

from .context import ExportContext
from .contrib_schemas import microsoft_opset
from .layouts import matmulnbits_block_size, to_matmulnbits
from .qdq import dequantize_matmul
from .weight_only import add_bias, in_activation_dtype, read_call

__all__ = ["ACCURACY_LEVELS", "weight_only_linear"]

ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def weight_only_linear(op_name: str, bits: int):
    """The ort translation of a weight-only linear with ``bits``-bit weights."""

    def translate(ctx: ExportContext, x, qweight, scales, zeros, bias, group_size):
        call = read_call(ctx, op_name, bits, x, qweight, scales, zeros, bias, group_size)
        grid = call.grid()
        block_size = matmulnbits_block_size(grid.in_features, grid.group_size)
        if block_size is None:
            ctx.note(
                f"{call.name}: group_size {grid.group_size} is not a multiple of a MatMulNBits block size "
                "(16, 32, 64, 128, 256); exported as DequantizeLinear + MatMul instead"
            )
            return dequantize_matmul(ctx, call, grid)
        weights = to_matmulnbits(grid, block_size)
        B = ctx.initializer(f"{call.name}.MatMulNBits.B", weights.B)
        block_scales = ctx.initializer(f"{call.name}.MatMulNBits.scales", in_activation_dtype(weights.scales, x))
        zero_points = None
        if weights.zero_points is not None:
            zero_points = ctx.initializer(f"{call.name}.MatMulNBits.zero_points", weights.zero_points)
        attributes = {"K": weights.in_features, "N": weights.out_features, "bits": bits, "block_size": block_size}
        if ctx.accuracy_level is not None:
            attributes["accuracy_level"] = ctx.accuracy_level
        msft = microsoft_opset()
        op = ctx.op
        rank = len(x.shape) if getattr(x, "shape", None) is not None else None
        a = op.Unsqueeze(x, op.Constant(value_ints=[0])) if rank == 1 else x
        y = msft.MatMulNBits(a, B, block_scales, zero_points, **attributes)
        if rank == 1:
            y = op.Squeeze(y, op.Constant(value_ints=[0]))
        return add_bias(ctx, y, x, bias)

    translate.__name__ = f"{op_name.split('::')[-1]}_ort"
    return translate
