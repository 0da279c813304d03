"""ONNX OpSchemas of the ONNX Runtime contrib ops qcompile emits.

onnxscript builds a node only for an op whose schema the ``onnx`` package knows, and the
``onnx`` package does not ship ONNX Runtime's ``com.microsoft`` ops; registering the
schema (``onnx.defs.register_schema``) also lets ``onnx.checker`` validate the nodes.
The schemas copy ONNX Runtime's own (1.31: ``onnxruntime.capi.onnxruntime_pybind11_state
.get_all_operator_schema()``), restricted to what qcompile writes. :func:`op_schema` builds
an ``OpSchema`` from plain tuples; the ``qcompile`` domain's schemas use it too.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import onnx
import onnxscript
from onnx.defs import OpSchema

__all__ = ["MICROSOFT_DOMAIN", "ensure_contrib_schemas", "microsoft_opset", "op_schema", "OPTIONAL"]

MICROSOFT_DOMAIN = "com.microsoft"
_LOCK = threading.Lock()
SINGLE = OpSchema.FormalParameterOption.Single
OPTIONAL = OpSchema.FormalParameterOption.Optional


def op_schema(
    name: str,
    domain: str,
    version: int,
    doc: str,
    *,
    inputs: Sequence[tuple],
    outputs: Sequence[tuple],
    type_constraints: Sequence[tuple[str, Sequence[str], str]],
    attributes: Sequence[tuple] = (),
) -> OpSchema:
    """An ``OpSchema`` from plain tuples.

    ``inputs`` / ``outputs``: ``(name, type or type variable, description)``, with a fourth
    item ``OPTIONAL`` for an optional input (single otherwise); ``type_constraints``:
    ``(type variable, allowed types, description)``; ``attributes``: INT attributes,
    ``(name, description)`` (required) or ``(name, description, required)``.
    """
    def param(name, type_str, description, option=SINGLE):
        return OpSchema.FormalParameter(name, type_str, description, param_option=option)

    def attribute(name, description, required=True):
        return OpSchema.Attribute(name, OpSchema.AttrType.INT, description, required=required)

    return OpSchema(
        name,
        domain,
        version,
        doc,
        inputs=[param(*p) for p in inputs],
        outputs=[param(*p) for p in outputs],
        type_constraints=[(v, list(allowed), d) for v, allowed, d in type_constraints],
        attributes=[attribute(*a) for a in attributes],
    )


def _matmulnbits_schema() -> OpSchema:
    return op_schema(
        "MatMulNBits",
        MICROSOFT_DOMAIN,
        1,
        "Y = A @ dequantize(B)^T with B quantized block-wise along K to `bits` bits: "
        "w = (q - zero_point) * scale per block of `block_size` input channels.",
        inputs=[
            ("A", "T1", "the input [..., K]"),
            ("B", "T2", "packed weights [N, k_blocks, block_size * bits / 8]"),
            ("scales", "T1", "per-block scales [N, k_blocks] (or flattened)"),
            ("zero_points", "T3", "per-block zero points, packed like B", OPTIONAL),
            ("g_idx", "T4", "deprecated", OPTIONAL),
            ("bias", "T1", "bias [N]", OPTIONAL),
        ],
        outputs=[("Y", "T1", "the output [..., N]")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and scales"),
            ("T2", ["tensor(uint8)"], "packed weights"),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "zero points"),
            ("T4", ["tensor(int32)"], "group index"),
        ],
        attributes=[
            ("K", "input features"),
            ("N", "output features"),
            ("bits", "weight bits (2, 4 or 8)", False),
            ("block_size", "block size along K: a power of two >= 16"),
            ("accuracy_level", "minimum accuracy of A: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8", False),
            ("weight_prepacked", "B is prepacked in an EP-specific layout", False),
        ],
    )


def _matmulintegertofloat_schema() -> OpSchema:
    return op_schema(
        "MatMulIntegerToFloat",
        MICROSOFT_DOMAIN,
        1,
        "Y = ((A - a_zero_point) @ (B - b_zero_point)) * a_scale * b_scale + bias, the integer product "
        "accumulated in int32.",
        inputs=[
            ("A", "T1", "the quantized input [..., K]"),
            ("B", "T2", "the quantized weight [K, N]"),
            ("a_scale", "T3", "scale of A: a scalar (or, in ONNX Runtime's CPU kernel, one per row)"),
            ("b_scale", "T3", "scale of B: a scalar or one per column [N]"),
            ("a_zero_point", "T1", "zero point of A (scalar)", OPTIONAL),
            ("b_zero_point", "T2", "zero point of B (scalar or [N])", OPTIONAL),
            ("bias", "T3", "bias [N]", OPTIONAL),
        ],
        outputs=[("Y", "T3", "the output [..., N]")],
        type_constraints=[
            ("T1", ["tensor(int8)", "tensor(uint8)"], "quantized input"),
            ("T2", ["tensor(int8)", "tensor(uint8)"], "quantized weight"),
            ("T3", ["tensor(float)", "tensor(float16)"], "scales, bias and output"),
        ],
    )


_SCHEMAS = (_matmulnbits_schema, _matmulintegertofloat_schema)


def ensure_contrib_schemas() -> None:
    """Register the contrib schemas with ``onnx`` once (a no-op when they are known)."""
    with _LOCK:
        for make in _SCHEMAS:
            schema = make()
            if not onnx.defs.has(schema.name, schema.domain):
                onnx.defs.register_schema(schema)


def microsoft_opset() -> onnxscript.values.Opset:
    """The ``com.microsoft`` opset for onnxscript (schemas registered first)."""
    ensure_contrib_schemas()
    return onnxscript.values.Opset(MICROSOFT_DOMAIN, 1)
