"""``to_onnx`` options and graph shapes beyond the zoo, on small models (fast).

Numerics as in the parity tests: ONNX Runtime CPU with ``EXACT_CONFIG`` against the
float32 reference path, EXACT_RTOL (see ``tests/export/helpers.py``).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.export import (
    format_summary,
    inference_session,
    onnx_feeds,
    summarize_onnx,
    to_onnx,
)
from tests.export import small_models
from tests.export.helpers import EXACT_RTOL, float32_reference, worst_relative_error


def _quantize(factory, recipe="w4a16"):
    model, args = factory()
    return qcompile.quantize(model, args, recipe=recipe, progress=False, verify=False), args


def _assert_exact(qm, result, args):
    outputs = inference_session(result.path).run(None, onnx_feeds(qm, args))
    err, where = worst_relative_error(outputs, float32_reference(qm)(args, {}), result.output_names)
    assert err < EXACT_RTOL, f"{where}: {err:.2e}"
    return outputs


def _attributes(model: onnx.ModelProto, op_type: str) -> list[dict]:
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == op_type]


@pytest.fixture(scope="module")
def mlp_w4():
    return _quantize(small_models.mlp)


def test_default_ort_export_names_and_attributes(tmp_path, mlp_w4):
    qm, args = mlp_w4
    result = to_onnx(qm, tmp_path / "mlp.onnx")
    assert result.flavor == "ort" and result.opset == 21 and result.external_data is None
    assert result.ops["com.microsoft.MatMulNBits"] == 2
    assert result.input_names == ["x"] and result.output_names == ["output"]
    model = onnx.load(str(result.path))
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", 64]
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["batch", 32]
    attrs = _attributes(model, "MatMulNBits")
    # fc1 (K=64 < group 128: one group per row) -> one padded block of 64; fc2 (K=128) -> 128.
    assert sorted((a["K"], a["N"], a["bits"], a["block_size"]) for a in attrs) == [(64, 128, 4, 64), (128, 32, 4, 128)]
    assert all("accuracy_level" not in a for a in attrs)
    assert {p.key: p.value for p in model.metadata_props} == {"qcompile.flavor": "ort", "qcompile.recipe": "w4a16"}
    assert model.producer_name == "qcompile" and model.ir_version == 10
    _assert_exact(qm, result, (torch.randn(7, 64),))


def test_accuracy_level_is_written_and_trades_exactness_for_speed(tmp_path, mlp_w4):
    qm, args = mlp_w4
    result = to_onnx(qm, tmp_path / "acc4.onnx", accuracy_level=4)
    attrs = _attributes(onnx.load(str(result.path)), "MatMulNBits")
    assert [a["accuracy_level"] for a in attrs] == [4, 4]
    x = (torch.randn(9, 64),)
    outputs = inference_session(result.path).run(None, onnx_feeds(qm, x))
    err, _ = worst_relative_error(outputs, float32_reference(qm)(x, {}), result.output_names)
    # int8 activations per block: ~0.5% per matmul, two matmuls.
    assert err < 5e-2


def test_static_shapes(tmp_path, mlp_w4):
    qm, args = mlp_w4
    result = to_onnx(qm, tmp_path / "static.onnx", dynamic=False)
    model = onnx.load(str(result.path))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [4, 64]
    _assert_exact(qm, result, args)


def test_opset_18_for_the_ort_flavor(tmp_path, mlp_w4):
    qm, args = mlp_w4
    result = to_onnx(qm, tmp_path / "op18.onnx", opset=18)
    assert {o.domain or "": o.version for o in onnx.load(str(result.path)).opset_import}[""] == 18
    _assert_exact(qm, result, args)


def test_groups_matmulnbits_cannot_hold_fall_back_to_dequantize_linear(tmp_path):
    qm, args = _quantize(small_models.odd_group_mlp, {"preset": "w4a16", "group_size": 40})
    result = to_onnx(qm, tmp_path / "odd.onnx", flavor="ort")
    assert result.ops.get("com.microsoft.MatMulNBits", 0) == 0
    assert result.ops["DequantizeLinear"] == 2
    assert len(result.notes) == 2 and all("DequantizeLinear + MatMul" in n and "40" in n for n in result.notes)
    _assert_exact(qm, result, args)


def test_external_data_on_request(tmp_path, mlp_w4):
    qm, args = mlp_w4
    result = to_onnx(qm, tmp_path / "ext.onnx", external_data=True)
    assert result.external_data == tmp_path / "ext.onnx.data" and result.external_data.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert summarize_onnx(result.path).external_data
    _assert_exact(qm, result, args)


def test_constant_argument_and_repeated_outputs(tmp_path):
    """Graph preparation is the same for every flavor; one flavor checks it."""
    qm, args = _quantize(small_models.tuple_model, "w8a16")
    result = to_onnx(qm, tmp_path / "tuple.onnx", flavor="qcompile")
    assert result.input_names == ["x"]  # the float argument is fixed at its captured value
    assert result.output_names == ["output_0", "output_1", "output_2"]
    outputs = _assert_exact(qm, result, (torch.randn(2, 3, 64), 3.0))
    np.testing.assert_array_equal(outputs[0], outputs[2])
    model = onnx.load(str(result.path))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input]
    assert dims == [["batch", "x_dim1", 64]]


def test_vector_input(tmp_path):
    """MatMulNBits takes A of rank >= 2: a 1-D input is unsqueezed around it."""
    qm, args = _quantize(small_models.vector_model, "w4a16")
    result = to_onnx(qm, tmp_path / "vec.onnx", flavor="ort")
    assert result.ops["Unsqueeze"] >= 1 and result.ops["com.microsoft.MatMulNBits"] == 2
    assert _assert_exact(qm, result, args)[0].shape == (32,)


def test_qcompile_flavor_carries_function_bodies(tmp_path, mlp_w4):
    qm, args = mlp_w4
    result = to_onnx(qm, tmp_path / "fn.onnx", flavor="qcompile")
    model = onnx.load(str(result.path))
    assert [(f.domain, f.name) for f in model.functions] == [("qcompile", "LinearW4A16")]
    assert {o.domain: o.version for o in model.opset_import}["qcompile"] == 1
    nodes = [n for n in model.graph.node if n.domain == "qcompile"]
    assert len(nodes) == 2 and all(n.attribute[0].name == "group_size" for n in nodes)
    # The op reads qcompile's storage unchanged: packed uint8 [N, K/2], float32 scales and zeros.
    inits = {t.name: t for t in model.graph.initializer}
    qweight = inits[nodes[0].input[1]]
    assert qweight.data_type == onnx.TensorProto.UINT8 and list(qweight.dims) == [128, 32]
    _assert_exact(qm, result, args)


def test_summary_counts_ops_and_bytes(tmp_path, mlp_w4):
    qm, _ = mlp_w4
    result = to_onnx(qm, tmp_path / "qdq.onnx", flavor="qdq")
    summary = summarize_onnx(result.path)
    assert summary.ops_by_domain["ai.onnx"]["DequantizeLinear"] == 2
    assert "com.microsoft" not in summary.ops_by_domain
    # w4a16 is asymmetric: UINT4 weights, 64*128 + 128*32 codes at half a byte each.
    assert summary.bytes_by_dtype["UINT4"] == (4, (64 * 128 + 128 * 32) // 2 + (128 + 32) // 2)
    text = format_summary(summary)
    assert "ai.onnx" in text and "DequantizeLinear" in text and "UINT4" in text and "['batch', 64]" in text
