"""The "qcompile" flavor: ops in the ``qcompile`` ONNX domain that carry function bodies.

Each qcompile op becomes one node of the ``qcompile`` domain (version 1) whose inputs are
qcompile's own storage, unchanged, so a runtime with a fused kernel can match the node and
use the tensors as they are; the model's ``functions`` list holds an ONNX function body
for every such op, so stock ONNX Runtime runs the model by inlining it.

Ops (the bias of a linear stays a standard ``Add`` after the node):

``qcompile.LinearW8A16(X, QWeight, Scales, Zeros) -> Y``, attribute ``group_size``
    QWeight int8 ``[N, K]``; Scales, Zeros float32 ``[N, K / group_size]``.
``qcompile.LinearW4A16(X, QWeight, Scales, Zeros) -> Y``, attribute ``group_size``
    QWeight uint8 ``[N, ceil(K / 2)]``, two 4-bit codes per byte, low nibble first.

Both compute ``Y = X @ ((code - Zeros) * Scales)^T`` per group of ``group_size`` input
channels in float32 and return X's dtype — the pure-torch reference of the qcompile op.
Zeros are always given (qcompile's default zero point, 0 for 8-bit and 8 for 4-bit, is
written out when the weight has none): ONNX function bodies cannot branch on an omitted
input. ONNX Runtime constant-folds the inlined dequantization when it loads the model, so
it keeps a float32 copy of each weight in memory and runs at float32 speed.

The activation-quantized ops (``LinearW8A8``, ``LinearW8A8Static``, ``LinearFP8``,
``QuantizePerToken``, ``QuantizePerTokenFP8``) live in
:mod:`qcompile.export.activation_domain`, which adds them to :data:`DOMAIN_OPS` with
:func:`register_domain_ops`. Every entry of :data:`DOMAIN_OPS` has a ``name``, a
``schema()`` and a ``function(opset)``.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx import AttributeProto, TensorProto, helper
from onnx.defs import OpSchema

from .context import ExportContext
from .contrib_schemas import op_schema
from .layouts import stored_zeros
from .weight_only import add_bias, read_call

__all__ = [
    "QCOMPILE_DOMAIN",
    "QCOMPILE_DOMAIN_VERSION",
    "DOMAIN_OPS",
    "register_domain_ops",
    "qcompile_opset",
    "weight_only_linear",
    "add_functions",
]

QCOMPILE_DOMAIN = "qcompile"
QCOMPILE_DOMAIN_VERSION = 1
_LOCK = threading.Lock()


def _constant_ints(output: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value_ints=values)


def _unpack_int8() -> tuple[list[onnx.NodeProto], str]:
    """int8 [N, K] codes are used as they are."""
    return [], "QWeight"


def _unpack_int4() -> tuple[list[onnx.NodeProto], str]:
    """Nodes turning the packed uint8 [N, ceil(K/2)] into codes [N, K] (K = G * group_size)."""
    nodes = [
        helper.make_node("Constant", [], ["mask"], value=helper.make_tensor("mask", TensorProto.UINT8, [], [15])),
        helper.make_node("Constant", [], ["four"], value=helper.make_tensor("four", TensorProto.UINT8, [], [4])),
        helper.make_node("BitwiseAnd", ["QWeight", "mask"], ["low"]),
        helper.make_node("BitShift", ["QWeight", "four"], ["high"], direction="RIGHT"),
        helper.make_node("Unsqueeze", ["low", "last_axis"], ["low_1"]),
        helper.make_node("Unsqueeze", ["high", "last_axis"], ["high_1"]),
        helper.make_node("Concat", ["low_1", "high_1"], ["pairs"], axis=-1),
        helper.make_node("Concat", ["n", "last_axis"], ["n_minus_1"], axis=0),
        helper.make_node("Reshape", ["pairs", "n_minus_1"], ["padded_codes"]),
        _constant_ints("start", [0]),
        _constant_ints("axis_1", [1]),
        helper.make_node("Slice", ["padded_codes", "start", "k", "axis_1"], ["codes"]),
    ]
    return nodes, "codes"


def _linear_function(name: str, unpack) -> onnx.FunctionProto:
    group_size = AttributeProto(name="value_int", ref_attr_name="group_size", type=AttributeProto.INT)
    const_group = helper.make_node("Constant", [], ["group_size_scalar"])
    const_group.attribute.append(group_size)
    head = [
        const_group,
        _constant_ints("last_axis", [-1]),
        _constant_ints("first_axis", [0]),
        helper.make_node("Unsqueeze", ["group_size_scalar", "first_axis"], ["g_size"]),
        helper.make_node("Shape", ["QWeight"], ["n"], start=0, end=1),
        helper.make_node("Shape", ["Scales"], ["groups"], start=1, end=2),
        helper.make_node("Mul", ["groups", "g_size"], ["k"]),
    ]
    unpack_nodes, codes = unpack()
    tail = [
        helper.make_node("Cast", [codes], ["codes_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["n", "groups", "g_size"], ["grouped_shape"], axis=0),
        helper.make_node("Reshape", ["codes_f", "grouped_shape"], ["grouped"]),
        helper.make_node("Cast", ["Zeros"], ["zeros_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["Scales"], ["scales_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["zeros_f", "last_axis"], ["zeros_3d"]),
        helper.make_node("Unsqueeze", ["scales_f", "last_axis"], ["scales_3d"]),
        helper.make_node("Sub", ["grouped", "zeros_3d"], ["centered"]),
        helper.make_node("Mul", ["centered", "scales_3d"], ["w_grouped"]),
        helper.make_node("Concat", ["n", "k"], ["w_shape"], axis=0),
        helper.make_node("Reshape", ["w_grouped", "w_shape"], ["w"]),
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        helper.make_node("Cast", ["X"], ["x_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x_f", "w_t"], ["y_f"]),
        helper.make_node("CastLike", ["y_f", "X"], ["Y"]),
    ]
    return helper.make_function(
        QCOMPILE_DOMAIN,
        name,
        inputs=["X", "QWeight", "Scales", "Zeros"],
        outputs=["Y"],
        nodes=head + unpack_nodes + tail,
        opset_imports=[],  # filled in by add_functions with the model's opset
        attributes=["group_size"],
        doc_string=f"qcompile.{name}: Y = X @ ((code - Zeros) * Scales)^T per group of group_size input channels, "
        "computed in float32, returned in X's dtype.",
    )


@dataclass(frozen=True)
class DomainOp:
    """One op of the qcompile ONNX domain: its schema (for onnxscript and onnx.checker)
    and its function body."""

    name: str
    weight_type: str
    body: Callable[[str], onnx.FunctionProto]

    def schema(self) -> OpSchema:
        return op_schema(
            self.name,
            QCOMPILE_DOMAIN,
            QCOMPILE_DOMAIN_VERSION,
            f"qcompile.{self.name} (see qcompile.export.qcompile_domain)",
            inputs=[
                ("X", "T", "activations [..., K]"),
                ("QWeight", "Q", "quantized weight in qcompile's storage"),
                ("Scales", "tensor(float)", "scales [N, K / group_size]"),
                ("Zeros", "tensor(float)", "zero points [N, K / group_size]"),
            ],
            outputs=[("Y", "T", "output [..., N]")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                ("Q", [self.weight_type], "quantized weight"),
            ],
            attributes=[("group_size", "input channels per group")],
        )

    def function(self, opset: int) -> onnx.FunctionProto:
        proto = self.body(self.name)
        proto.opset_import.extend([helper.make_opsetid("", opset)])
        return proto


DOMAIN_OPS = {
    "LinearW8A16": DomainOp("LinearW8A16", "tensor(int8)", lambda name: _linear_function(name, _unpack_int8)),
    "LinearW4A16": DomainOp("LinearW4A16", "tensor(uint8)", lambda name: _linear_function(name, _unpack_int4)),
}


def register_domain_ops(*ops) -> None:
    """Add ops (each with ``name``, ``schema()`` and ``function(opset)``) to :data:`DOMAIN_OPS`."""
    with _LOCK:
        for op in ops:
            known = DOMAIN_OPS.get(op.name)
            if known is not None and known is not op:
                raise ValueError(f"qcompile domain op {op.name!r} is already registered")
            DOMAIN_OPS[op.name] = op


def qcompile_opset():
    """The ``qcompile`` opset for onnxscript (the schemas of :data:`DOMAIN_OPS` registered first)."""
    import onnxscript

    with _LOCK:
        for op in DOMAIN_OPS.values():
            if not onnx.defs.has(op.name, QCOMPILE_DOMAIN):
                onnx.defs.register_schema(op.schema())
    return onnxscript.values.Opset(QCOMPILE_DOMAIN, QCOMPILE_DOMAIN_VERSION)


def weight_only_linear(op_name: str, bits: int, domain_op: str):
    """The qcompile-domain translation of a weight-only linear: one ``qcompile.<domain_op>`` node."""

    def translate(ctx: ExportContext, x, qweight, scales, zeros, bias, group_size):
        call = read_call(ctx, op_name, bits, x, qweight, scales, zeros, bias, group_size)
        if zeros is None:
            zeros = ctx.initializer(
                f"{call.name}.zeros", stored_zeros(call.qweight, call.scales, None, bits=bits).numpy()
            )
        node = getattr(qcompile_opset(), domain_op)
        y = node(x, qweight, scales, zeros, group_size=call.group_size)
        ctx.use_function(domain_op)
        return add_bias(ctx, y, x, bias)

    translate.__name__ = f"{op_name.split('::')[-1]}_qcompile"
    return translate


def add_functions(model: ir.Model, names: list[str], opset: int) -> None:
    """Put the function bodies of the qcompile-domain ops ``names`` into ``model``."""
    for name in names:
        function = ir.serde.deserialize_function(DOMAIN_OPS[name].function(opset))
        model.functions[function.identifier()] = function
    if names:
        model.opset_imports[QCOMPILE_DOMAIN] = QCOMPILE_DOMAIN_VERSION
