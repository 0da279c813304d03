"""ONNX OpSchemas of the ONNX Runtime contrib ops qcompile emits.

onnxscript builds a node only for an op whose schema the ``onnx`` package knows, and the
``onnx`` package does not ship ONNX Runtime's ``com.microsoft`` ops; registering the
schema (``onnx.defs.register_schema``) also lets ``onnx.checker`` validate the nodes.
The schemas copy ONNX Runtime's own (1.31: ``onnxruntime.capi.onnxruntime_pybind11_state
.get_all_operator_schema()``), restricted to what qcompile writes.
"""
from __future__ import annotations

import threading

import onnx
import onnxscript
from onnx.defs import OpSchema

__all__ = ["MICROSOFT_DOMAIN", "ensure_contrib_schemas", "microsoft_opset"]

MICROSOFT_DOMAIN = "com.microsoft"
_LOCK = threading.Lock()


def _matmulnbits_schema() -> OpSchema:
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    ints = OpSchema.AttrType.INT
    return OpSchema(
        "MatMulNBits",
        MICROSOFT_DOMAIN,
        1,
        "Y = A @ dequantize(B)^T with B quantized block-wise along K to `bits` bits: "
        "w = (q - zero_point) * scale per block of `block_size` input channels.",
        inputs=[
            param("A", "T1", "the input [..., K]", param_option=single),
            param("B", "T2", "packed weights [N, k_blocks, block_size * bits / 8]", param_option=single),
            param("scales", "T1", "per-block scales [N, k_blocks] (or flattened)", param_option=single),
            param("zero_points", "T3", "per-block zero points, packed like B", param_option=optional),
            param("g_idx", "T4", "deprecated", param_option=optional),
            param("bias", "T1", "bias [N]", param_option=optional),
        ],
        outputs=[param("Y", "T1", "the output [..., N]", param_option=single)],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and scales"),
            ("T2", ["tensor(uint8)"], "packed weights"),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "zero points"),
            ("T4", ["tensor(int32)"], "group index"),
        ],
        attributes=[
            attr("K", ints, "input features", required=True),
            attr("N", ints, "output features", required=True),
            attr("bits", ints, "weight bits (2, 4 or 8)", required=False),
            attr("block_size", ints, "block size along K: a power of two >= 16", required=True),
            attr("accuracy_level", ints, "minimum accuracy of A: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8",
                 required=False),
            attr("weight_prepacked", ints, "B is prepacked in an EP-specific layout", required=False),
        ],
    )


_SCHEMAS = (_matmulnbits_schema,)


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
