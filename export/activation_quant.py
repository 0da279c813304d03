"""Pieces every flavor's translation of an activation-quantized op shares.

The ops (``qcompile::linear_w8a8``, ``qcompile::linear_fp8``, ``qcompile::quantize_per_token``;
numerics in :mod:`qcompile.act_quant`) quantize their activation inside the op, so every
flavor writes the quantization itself with standard ONNX ops, reproducing the torch op's
float32 operations in the same order (the same IEEE operations give the same bits):

* ``xs = float32(x) / smooth`` (``Div`` by the constant ``smooth [K]``, when given);
* per-token scale ``s = max(ReduceMax(xs), -ReduceMin(xs)) / qmax`` over the last axis
  (keepdims: ``[..., 1]``), a scale below the smallest normal float32 replaced by 1.0
  (``Less`` + ``Where``); a static ``act_scale`` gets the same guard, as a scalar;
* int8 codes ``clamp(round(xs / s), -127, 127)``: ``QuantizeLinear`` (true division,
  round half to even, saturation) per row (per-axis on the ``[M, K]`` view, opset 13) into
  uint8 with zero point 128, i.e. ``code + 128``, the operand ONNX Runtime's integer GEMM
  is fast with (int8 x int8 runs 6-9x slower on its CPU kernel: see
  ``benchmarks/onnx_w8a8_ops.py``). A per-token scale never saturates (``|xs / s| <=
  127`` up to rounding); a static one can, and the torch op clamps to -127 where
  QuantizeLinear would give -128, so static activations are first raised to ``-127 * s``
  (``Max``), which gives exactly the clamped codes (``(-127 * s) / s`` rounds to -127);
* fp8 codes ``clamp(xs / s, -448, 448)`` cast to ``FLOAT8E4M3FN`` (``Clip`` + ``Cast``,
  round to nearest even; opset 19);
* the int8 epilogue ``float32(acc) * s * wscales + bias`` in that order, then the cast
  to x's dtype.

The translations read ``qweight`` and ``wscales`` as constants (weights are re-laid out at
export time); ``bias``, ``smooth`` and ``act_scale`` may be any values. The sequences are
written once against :class:`~qcompile.export.node_builder.NodeBuilder`, so the "ort" and
"qdq" translations and the "qcompile" function bodies use the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from onnx import TensorProto

from qcompile.errors import ExportError

from .context import ExportContext
from .node_builder import NodeBuilder

__all__ = [
    "INT8_QMAX",
    "FP8_QMAX",
    "FP8_MIN_OPSET",
    "ActQuantLinearCall",
    "read_linear_call",
    "require_opset",
    "weight_kn",
    "float32",
    "smoothed",
    "per_token_scale",
    "static_scale",
    "uint8_codes_per_token",
    "uint8_codes_static",
    "int8_codes_per_token",
    "fp8_codes",
    "fp8_dequantize",
    "fp8_weight",
    "integer_product_scaled",
    "finish_epilogue",
    "in_input_dtype",
    "is_float32",
    "Float32Inputs",
    "act_qmax",
    "smoothed_input",
    "linear_w8a8_nodes",
    "linear_fp8_nodes",
    "quantize_per_token_nodes",
]

INT8_QMAX = 127.0
FP8_QMAX = 448.0
# FLOAT8E4M3FN tensors in Cast, QuantizeLinear and DequantizeLinear: opset 19.
FP8_MIN_OPSET = 19
_MIN_SCALE = float(np.finfo(np.float32).tiny)


@dataclass
class ActQuantLinearCall:
    """One call of ``linear_w8a8`` / ``linear_fp8``, as a translation sees it."""

    op_name: str
    x: Any  # ONNX value
    bias: Any  # ONNX value or None
    smooth: Any  # ONNX value or None
    act_scale: Any  # ONNX value or None (dynamic per-token)
    qweight: torch.Tensor  # int8 or float8_e4m3fn [N, K]
    wscales: torch.Tensor  # float32 [N]
    name: str  # base name for derived initializers (the weight's source name)

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])


def read_linear_call(ctx: ExportContext, op_name: str, x, qweight, wscales, bias, smooth,
                     act_scale=None) -> ActQuantLinearCall:
    """Resolve the constant inputs (``qweight``, ``wscales``) of one activation-quantized linear."""
    q = ctx.constant(qweight, "qweight", op_name)
    s = ctx.constant(wscales, "wscales", op_name)
    name = ctx.source_name(qweight)
    if q.dim() != 2 or tuple(s.shape) != (q.shape[0],):
        raise ExportError(f"{op_name} ({name}): qweight must be [N, K] and wscales [N], got "
                          f"{tuple(q.shape)} and {tuple(s.shape)}")
    return ActQuantLinearCall(op_name, x, bias, smooth, act_scale, q, s, name)


def require_opset(ctx: ExportContext, needed: int, op_name: str, what: str, works: str) -> None:
    """ExportError unless the export's opset is at least ``needed`` (``works``: what to do instead)."""
    if ctx.opset < needed:
        raise ExportError(
            f"{op_name}: flavor {ctx.flavor!r} writes {what}, which needs opset >= {needed}, but the export "
            f"uses opset {ctx.opset}; {works}"
        )


def static_rank(x) -> int | None:
    """The rank of an exported value when the graph knows it (None otherwise)."""
    shape = getattr(x, "shape", None)
    return len(shape) if shape is not None else None


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def weight_kn(qweight: torch.Tensor) -> np.ndarray:
    """qcompile's ``[N, K]`` int8 / e4m3fn weight as the ``[K, N]`` array MatMul reads (exact)."""
    return np.ascontiguousarray(_numpy(qweight).T)


# --------------------------------------------------------------------------- graph pieces


def float32(b: NodeBuilder, x, known_float32: bool = False):
    """``x`` as float32 (no node when it already is)."""
    return x if known_float32 else b("Cast", x, to=TensorProto.FLOAT)


def smoothed(b: NodeBuilder, xf, smooth, smooth_float32: bool = False):
    """``xf / smooth`` (smooth cast to float32, as the torch op does), or ``xf``."""
    if smooth is None:
        return xf
    return b("Div", xf, float32(b, smooth, smooth_float32))


def _guard(b: NodeBuilder, s):
    """Scales below the smallest normal float32 (zero rows) become 1.0."""
    tiny = b.constant(np.array(_MIN_SCALE, np.float32))
    one = b.constant(np.array(1.0, np.float32))
    return b("Where", b("Less", s, tiny), one, s)


def per_token_scale(b: NodeBuilder, xs, qmax):
    """``absmax(xs) / qmax`` per row over the last axis, ``[..., 1]``, guarded (``qmax`` a
    Python number or a float32 scalar value)."""
    axes = b.constant(np.array([-1], np.int64))
    hi = b("ReduceMax", xs, axes, keepdims=1)
    lo = b("ReduceMin", xs, axes, keepdims=1)
    absmax = b("Max", hi, b("Neg", lo))
    if isinstance(qmax, (int, float)):
        qmax = b.constant(np.array(qmax, np.float32))
    return _guard(b, b("Div", absmax, qmax))


def static_scale(b: NodeBuilder, act_scale, act_scale_float32: bool = False):
    """The calibrated per-tensor scale (``[]`` or ``[1]``) as a guarded float32 scalar."""
    scalar = b("Reshape", float32(b, act_scale, act_scale_float32), b.constant(np.zeros((0,), np.int64)))
    return _guard(b, scalar)


def _per_row_quantize(b: NodeBuilder, xs, s, zero_point: np.ndarray):
    """``QuantizeLinear`` of each row of ``xs [..., K]`` with its scale ``s [..., 1]`` (per-axis
    on the ``[M, K]`` view, zero point ``zero_point`` for every row); codes shaped like xs."""
    rows = b("Concat", b.constant(np.array([-1], np.int64)), b("Shape", xs, start=-1), axis=0)
    x2 = b("Reshape", xs, rows)
    s1 = b("Reshape", s, b.constant(np.array([-1], np.int64)))
    zp = b("Expand", b.constant(zero_point), b("Shape", s1))
    codes = b("QuantizeLinear", x2, s1, zp, axis=0)
    return b("Reshape", codes, b("Shape", xs))


def uint8_codes_per_token(b: NodeBuilder, xs, s):
    """Per-token int8 codes plus 128, as uint8 (exact: see the module docstring)."""
    return _per_row_quantize(b, xs, s, np.array(128, np.uint8))


def int8_codes_per_token(b: NodeBuilder, xs, s):
    """Per-token integer codes as int8 (4-bit codes too: ``|xs / s| <= 7`` never saturates)."""
    return _per_row_quantize(b, xs, s, np.array(0, np.int8))


def uint8_codes_static(b: NodeBuilder, xs, s):
    """Codes ``clamp(round(xs / s), -127, 127) + 128`` for a scalar ``s`` (uint8)."""
    floor = b("Mul", s, b.constant(np.array(-INT8_QMAX, np.float32)))
    return b("QuantizeLinear", b("Max", xs, floor), s, b.constant(np.array(128, np.uint8)))


def fp8_codes(b: NodeBuilder, xs, s):
    """e4m3fn codes ``clamp(xs / s, -448, 448)`` (Cast rounds to nearest even)."""
    lo = b.constant(np.array(-FP8_QMAX, np.float32))
    hi = b.constant(np.array(FP8_QMAX, np.float32))
    return b("Cast", b("Clip", b("Div", xs, s), lo, hi), to=TensorProto.FLOAT8E4M3FN)


def fp8_dequantize(b: NodeBuilder, codes, s):
    """``float32(codes) * s`` (the torch op's ``dequantize_activation``)."""
    return b("Mul", b("Cast", codes, to=TensorProto.FLOAT), s)


def fp8_weight(b: NodeBuilder, w_kn, wscales):
    """``float32(w [K, N]) * wscales [N]``: the dequantized weight MatMul reads."""
    return b("Mul", b("Cast", w_kn, to=TensorProto.FLOAT), wscales)


def integer_product_scaled(b: NodeBuilder, codes_u8, w_kn, s, *, contrib: bool):
    """``float32(acc) * s`` with ``acc = (codes_u8 - 128) @ w_kn`` accumulated in int32.

    ``contrib``: ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat`` with ``a_scale = s``
    and ``b_scale = 1``. Its CPU kernel converts the int32 sum to float32 times 1.0 inside
    the GEMM and then multiplies each row by a per-row ``a_scale`` (or, for a scalar one,
    the GEMM multiplies by ``s * 1``): the same product as the standard form. (The bias is
    not given to it: with a per-row ``a_scale`` its CPU kernel scales the bias too.)
    Otherwise standard ``MatMulInteger`` + ``Cast`` + ``Mul``.
    """
    zero_point = b.constant(np.array(128, np.uint8))
    if contrib:
        one = b.constant(np.array(1.0, np.float32))
        return b("MatMulIntegerToFloat", codes_u8, w_kn, s, one, zero_point, domain="com.microsoft")
    acc = b("MatMulInteger", codes_u8, w_kn, zero_point)
    return b("Mul", b("Cast", acc, to=TensorProto.FLOAT), s)


def finish_epilogue(b: NodeBuilder, y, wscales, bias, bias_float32: bool = False):
    """``y * wscales + bias`` in float32 (wscales omitted when None: already applied)."""
    if wscales is not None:
        y = b("Mul", y, wscales)
    if bias is not None:
        y = b("Add", y, float32(b, bias, bias_float32))
    return y


def in_input_dtype(b: NodeBuilder, y, x, x_float32: bool = False):
    """The float32 result in x's dtype (no node when x is float32)."""
    return y if x_float32 else b("CastLike", y, x)


def is_float32(value: Any) -> bool:
    """Whether an ONNX value of a translation is known to be float32."""
    return getattr(value, "dtype", None) == ir.DataType.FLOAT


# --------------------------------------------------------------------------- whole ops


@dataclass(frozen=True)
class Float32Inputs:
    """Which inputs are known to be float32 (no Cast needed); a function body knows none."""

    x: bool = False
    bias: bool = False
    smooth: bool = False
    act_scale: bool = False

    @classmethod
    def of(cls, x=None, bias=None, smooth=None, act_scale=None) -> "Float32Inputs":
        return cls(is_float32(x), is_float32(bias), is_float32(smooth), is_float32(act_scale))


def smoothed_input(b: NodeBuilder, x, smooth, known: Float32Inputs):
    """``float32(x) / smooth``."""
    return smoothed(b, float32(b, x, known.x), smooth, known.smooth)


def linear_w8a8_nodes(b: NodeBuilder, x, w_kn, wscales, bias, smooth, act_scale, *, contrib: bool,
                      known: Float32Inputs):
    """The whole ``linear_w8a8`` (int8 codes + 128 as uint8, int32 accumulation, epilogue)."""
    xs = smoothed_input(b, x, smooth, known)
    if act_scale is None:
        s = per_token_scale(b, xs, INT8_QMAX)
        codes = uint8_codes_per_token(b, xs, s)
    else:
        s = static_scale(b, act_scale, known.act_scale)
        codes = uint8_codes_static(b, xs, s)
    y = integer_product_scaled(b, codes, w_kn, s, contrib=contrib)
    return in_input_dtype(b, finish_epilogue(b, y, wscales, bias, known.bias), x, known.x)


def linear_fp8_nodes(b: NodeBuilder, x, w_kn, wscales, bias, smooth, *, known: Float32Inputs):
    """The whole ``linear_fp8``: per-token e4m3fn codes, dequantized, float32 MatMul."""
    xs = smoothed_input(b, x, smooth, known)
    s = per_token_scale(b, xs, FP8_QMAX)
    xd = fp8_dequantize(b, fp8_codes(b, xs, s), s)
    y = b("MatMul", xd, fp8_weight(b, w_kn, wscales))
    return in_input_dtype(b, finish_epilogue(b, y, None, bias, known.bias), x, known.x)


def act_qmax(bits: int, format: str) -> float:
    """127 (int8), 7 (int4) or 448 (fp8)."""
    return FP8_QMAX if format == "fp8" else float(2 ** (bits - 1) - 1)


def quantize_per_token_nodes(b: NodeBuilder, x, smooth, qmax, format: str, *, known: Float32Inputs):
    """``(codes, scales [..., 1])`` of ``quantize_per_token``; ``qmax`` a float or a value."""
    xs = smoothed_input(b, x, smooth, known)
    s = per_token_scale(b, xs, qmax)
    codes = fp8_codes(b, xs, s) if format == "fp8" else int8_codes_per_token(b, xs, s)
    return codes, s
