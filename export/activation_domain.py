"""The "qcompile" flavor of the activation-quantized ops: ``qcompile``-domain ops with
ONNX function bodies made of standard ops (stock ONNX Runtime runs them by inlining).

Each op takes qcompile's own storage unchanged (a runtime with a fused kernel can match
the node and use the tensors as they are) and mirrors the torch op's schema. ONNX function
bodies cannot branch on an omitted input, so every input is always given: an absent
``smooth`` is written as ones ``[K]`` and an absent ``bias`` as zeros ``[N]`` (float32;
``x / 1`` and ``y + 0`` change nothing), as the weight-only ops write default zero points.

``qcompile.LinearW8A8(X, QWeight, WScales, Bias, Smooth) -> Y``
    ``linear_w8a8`` with dynamic per-token int8 activations. QWeight int8 ``[N, K]``,
    WScales float32 ``[N]``, Bias ``[N]``, Smooth ``[K]``; Y in X's dtype.
``qcompile.LinearW8A8Static(X, QWeight, WScales, Bias, Smooth, ActScale) -> Y``
    the same with the calibrated per-tensor scale ActScale (float32, ``[]`` or ``[1]``).
``qcompile.LinearFP8(X, QWeight, WScales, Bias, Smooth) -> Y``
    ``linear_fp8``: QWeight FLOAT8E4M3FN ``[N, K]``; per-token e4m3fn activations.
``qcompile.QuantizePerToken(X, Smooth) -> (Codes, Scales)``, attribute ``bits`` (8 or 4)
    ``quantize_per_token(x, smooth, bits, "int")``: Codes int8 ``[..., K]``, Scales
    float32 ``[..., 1]``.
``qcompile.QuantizePerTokenFP8(X, Smooth) -> (Codes, Scales)``
    ``quantize_per_token(x, smooth, 8, "fp8")``: Codes FLOAT8E4M3FN.

The bodies are the sequences of :mod:`qcompile.export.activation_quant` with the standard
``MatMulInteger`` (uint8 codes + 128 times the transposed int8 weight, int32) and the
float32 epilogue: bit-identical to the torch op for the int8 linear; the fp8 linear's
float32 MatMul differs from torch's by float32 rounding only. ONNX Runtime folds the
weight's ``Transpose`` (and, for fp8, its dequantization to float32) when it loads the
model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from onnx.defs import OpSchema

from qcompile.errors import ExportError

from .activation_quant import (
    FP8_MIN_OPSET,
    FP8_QMAX,
    Float32Inputs,
    linear_fp8_nodes,
    linear_w8a8_nodes,
    quantize_per_token_nodes,
    read_linear_call,
    require_opset,
)
from .context import ExportContext
from .contrib_schemas import op_schema
from .node_builder import FunctionNodes
from .qcompile_domain import QCOMPILE_DOMAIN, QCOMPILE_DOMAIN_VERSION, qcompile_opset, register_domain_ops

__all__ = ["ACTIVATION_DOMAIN_OPS", "linear_w8a8", "linear_fp8", "quantize_per_token"]

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_SMOOTH_OR_BIAS = [*_FLOATS, "tensor(double)"]


@dataclass(frozen=True)
class FunctionOp:
    """A qcompile-domain op: formal inputs/outputs with their types, and a body builder
    ``body(b: FunctionNodes, *input names) -> output value(s)``."""

    name: str
    doc: str
    inputs: tuple[tuple[str, str, str], ...]  # (name, type or type variable, description)
    outputs: tuple[tuple[str, str, str], ...]
    body: Callable[..., object]
    attributes: tuple[tuple[str, str], ...] = ()  # (name, description), INT, required
    types: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("T", tuple(_FLOATS)), ("B", tuple(_SMOOTH_OR_BIAS)), ("S", tuple(_SMOOTH_OR_BIAS)))

    def schema(self) -> OpSchema:
        used = {t for _, t, _ in (*self.inputs, *self.outputs)}
        return op_schema(
            self.name,
            QCOMPILE_DOMAIN,
            QCOMPILE_DOMAIN_VERSION,
            f"qcompile.{self.name}: {self.doc} (see qcompile.export.activation_domain)",
            inputs=self.inputs,
            outputs=self.outputs,
            type_constraints=[(v, allowed, v) for v, allowed in self.types if v in used],
            attributes=self.attributes,
        )

    def function(self, opset: int) -> onnx.FunctionProto:
        b = FunctionNodes()
        results = self.body(b, *(n for n, _, _ in self.inputs))
        results = results if isinstance(results, tuple) else (results,)
        for value, (name, _, _) in zip(results, self.outputs):
            b.rename_output(value, name)
        return helper.make_function(
            QCOMPILE_DOMAIN,
            self.name,
            inputs=[n for n, _, _ in self.inputs],
            outputs=[n for n, _, _ in self.outputs],
            nodes=b.nodes,
            opset_imports=[helper.make_opsetid("", opset)],
            attributes=[n for n, _ in self.attributes],
            doc_string=f"qcompile.{self.name}: {self.doc}",
        )


_NONE_FLOAT32 = Float32Inputs()


def _transposed(b: FunctionNodes, qweight: str) -> str:
    return b("Transpose", qweight, perm=[1, 0])


def _w8a8_body(b, x, qweight, wscales, bias, smooth, act_scale=None):
    return linear_w8a8_nodes(b, x, _transposed(b, qweight), wscales, bias, smooth, act_scale, contrib=False,
                             known=_NONE_FLOAT32)


def _fp8_body(b, x, qweight, wscales, bias, smooth):
    return linear_fp8_nodes(b, x, _transposed(b, qweight), wscales, bias, smooth, known=_NONE_FLOAT32)


def _quantize_int_body(b, x, smooth):
    # qmax = 2 ** (bits - 1) - 1 from the attribute (127 or 7; exact in float32).
    bits = b("Cast", b.attribute_constant("bits"), to=onnx.TensorProto.FLOAT)
    one = b.constant(np.array(1.0, np.float32))
    qmax = b("Sub", b("Pow", b.constant(np.array(2.0, np.float32)), b("Sub", bits, one)), one)
    return quantize_per_token_nodes(b, x, smooth, qmax, "int", known=_NONE_FLOAT32)


def _quantize_fp8_body(b, x, smooth):
    return quantize_per_token_nodes(b, x, smooth, FP8_QMAX, "fp8", known=_NONE_FLOAT32)


_X = ("X", "T", "activations [..., K]")
_LINEAR_INPUTS = (
    _X,
    ("QWeight", "tensor(int8)", "int8 weight codes [N, K] in [-127, 127]"),
    ("WScales", "tensor(float)", "per-output-channel weight scales [N]"),
    ("Bias", "B", "bias [N] (zeros when the linear has none)"),
    ("Smooth", "S", "smoothing divisor [K] (ones when the linear has none)"),
)
_Y = (("Y", "T", "output [..., N] in X's dtype"),)
_CODES_SCALES = ("Scales", "tensor(float)", "per-token scales [..., 1]")
_SMOOTH = ("Smooth", "S", "smoothing divisor [K] (ones when none)")

ACTIVATION_DOMAIN_OPS = {
    op.name: op
    for op in (
        FunctionOp("LinearW8A8", "Y = linear(X / Smooth) with per-token int8 activations (absmax / 127, "
                   "round half to even), int32 accumulation, Y = acc * xscale * WScales + Bias in float32",
                   _LINEAR_INPUTS, _Y, _w8a8_body),
        FunctionOp("LinearW8A8Static", "LinearW8A8 with the static per-tensor activation scale ActScale "
                   "(codes clamped to [-127, 127])",
                   (*_LINEAR_INPUTS, ("ActScale", "tensor(float)", "calibrated activation scale, [] or [1]")),
                   _Y, _w8a8_body),
        FunctionOp("LinearFP8", "Y = linear(X / Smooth) with per-token e4m3fn activations (absmax / 448) and "
                   "e4m3fn weights, dequantized and multiplied in float32",
                   (_X, ("QWeight", "tensor(float8e4m3fn)", "e4m3fn weight codes [N, K]"), *_LINEAR_INPUTS[2:]),
                   _Y, _fp8_body),
        FunctionOp("QuantizePerToken", "per-token symmetric integer codes of X / Smooth: scale = absmax / "
                   "(2 ** (bits - 1) - 1), codes = clamp(round(x / scale)) as int8",
                   (_X, _SMOOTH), (("Codes", "tensor(int8)", "codes [..., K]"), _CODES_SCALES),
                   _quantize_int_body, attributes=(("bits", "8 or 4"),)),
        FunctionOp("QuantizePerTokenFP8", "per-token e4m3fn codes of X / Smooth: scale = absmax / 448",
                   (_X, _SMOOTH), (("Codes", "tensor(float8e4m3fn)", "codes [..., K]"), _CODES_SCALES),
                   _quantize_fp8_body),
    )
}
register_domain_ops(*ACTIVATION_DOMAIN_OPS.values())

_FP8_WORKS = "export with opset >= 19 (the default is 21)"


def _ones(ctx: ExportContext, name: str, n: int):
    return ctx.initializer(name, np.ones(n, np.float32))


def _zeros(ctx: ExportContext, name: str, n: int):
    return ctx.initializer(name, np.zeros(n, np.float32))


def _call(ctx: ExportContext, name: str, *inputs, **attributes):
    result = getattr(qcompile_opset(), name)(*inputs, **attributes)
    ctx.use_function(name)
    return result


def linear_w8a8(ctx: ExportContext, x, qweight, wscales, bias, smooth, act_scale):
    """``qcompile::linear_w8a8`` -> one ``qcompile.LinearW8A8`` (or ``LinearW8A8Static``) node."""
    call = read_linear_call(ctx, "qcompile::linear_w8a8", x, qweight, wscales, bias, smooth, act_scale)
    bias = _zeros(ctx, f"{call.name}.bias", call.out_features) if bias is None else bias
    smooth = _ones(ctx, f"{call.name}.smooth", call.in_features) if smooth is None else smooth
    if act_scale is None:
        return _call(ctx, "LinearW8A8", x, qweight, wscales, bias, smooth)
    return _call(ctx, "LinearW8A8Static", x, qweight, wscales, bias, smooth, act_scale)


def linear_fp8(ctx: ExportContext, x, qweight, wscales, bias, smooth):
    """``qcompile::linear_fp8`` -> one ``qcompile.LinearFP8`` node."""
    call = read_linear_call(ctx, "qcompile::linear_fp8", x, qweight, wscales, bias, smooth)
    require_opset(ctx, FP8_MIN_OPSET, call.op_name, "FLOAT8E4M3FN tensors", _FP8_WORKS)
    bias = _zeros(ctx, f"{call.name}.bias", call.out_features) if bias is None else bias
    smooth = _ones(ctx, f"{call.name}.smooth", call.in_features) if smooth is None else smooth
    return _call(ctx, "LinearFP8", x, qweight, wscales, bias, smooth)


def quantize_per_token(ctx: ExportContext, x, smooth, bits, format):
    """``qcompile::quantize_per_token`` -> ``qcompile.QuantizePerToken`` / ``QuantizePerTokenFP8``."""
    op_name = "qcompile::quantize_per_token"
    if smooth is None:
        k = x.shape[-1] if getattr(x, "shape", None) is not None else None
        if not isinstance(k, int):
            raise ExportError(f"{op_name}: flavor 'qcompile' writes an explicit Smooth of ones [K] and needs a "
                              f"static last dimension K, got shape {getattr(x, 'shape', None)}")
        smooth = _ones(ctx, "quantize_per_token.smooth", k)
    if format == "fp8":
        require_opset(ctx, FP8_MIN_OPSET, op_name, "FLOAT8E4M3FN tensors", _FP8_WORKS)
        return _call(ctx, "QuantizePerTokenFP8", x, smooth)
    return _call(ctx, "QuantizePerToken", x, smooth, bits=int(bits))
