"""ONNX Runtime runs every exported zoo architecture like ``qcompile.quantize`` does.

Each case exports a quantized zoo model (captured at batch 2 x 16 tokens) and runs the
ONNX file in ONNX Runtime's CPU provider at batch 3 x 11 tokens (ViT: batch 3), so the
dynamic axes are exercised. Session: ``qcompile.export.EXACT_CONFIG``
(``session.qdq_matmulnbits_accuracy_level = "0"``: ONNX Runtime may not quantize
activations when it fuses DequantizeLinear + MatMul), default optimization level; the
"ort" exports carry no ``accuracy_level`` attribute (0: activations unquantized).

Checked against (tolerances and their reasons in ``tests/export/helpers.py``):
* the float32 reference path of the qcompile ops — EXACT_RTOL (1e-5);
* ``qm(...)`` itself, whose CPU fast paths compute in bfloat16 — BF16_RTOL (2e-2).

Coverage: every architecture for (w4a16, "ort"); one architecture for each other
(preset, flavor) pair, chosen so that odd sizes are covered (llama's K=192 and opt's
K=200 fall back to per-channel 4-bit groups: per-axis UINT4 in "qdq"). Layouts of every
kind (odd block counts, padded blocks, replicated scales) are tested exhaustively and
cheaply in ``test_layouts.py``.
Structure: the graph has one target op per quantized linear, and no float copy of a
quantized weight.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from qcompile.export import EXACT_CONFIG, inference_session, onnx_feeds
from qcompile.kernels import WEIGHT_ONLY_LINEAR_OPS
from tests.export.helpers import (
    BF16_RTOL,
    EXACT_RTOL,
    float32_reference,
    quantized_outputs,
    worst_relative_error,
)
from tests.models import zoo

ALL_ARCHITECTURES = list(zoo.ARCHITECTURES)
# One architecture per other (preset, flavor) pair (each export costs seconds): w4a16 on
# models already quantized above, w8a16 on the two fastest.
OTHER_CASES = [
    ("bert", "w8a16", "ort"),
    ("vit", "w8a16", "qdq"),
    ("bert", "w8a16", "qcompile"),
    ("llama", "w4a16", "qdq"),
    ("opt", "w4a16", "qcompile"),
]

_QUANTIZED_DTYPES = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
_FLOAT_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _quantized_linears(qm) -> list[tuple[int, int, int]]:
    """(bits, N, K) of every weight-only linear in the quantized graph."""
    gm = qm.graph_module
    bits_of = {op: bits for bits, op in WEIGHT_ONLY_LINEAR_OPS.items()}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in bits_of:
            scales = node.args[2].meta["val"]
            out.append((bits_of[node.target], int(scales.shape[0]), int(scales.shape[1]) * int(node.args[5])))
    return out


def _float_constant_shapes(qm) -> Counter:
    """Shapes of the 2-D floating-point constants the quantized torch graph still reads."""
    gm = qm.graph_module
    shapes = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            t = getattr(gm, node.target)
            if t.is_floating_point() and t.dim() == 2:
                shapes[tuple(t.shape)] += 1
    return shapes


def assert_structure(qm, result, flavor: str) -> None:
    model = onnx.load(str(result.path))
    linears = _quantized_linears(qm)
    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    n_linears = len(linears)
    assert n_linears > 0
    assert result.notes == [], result.notes  # no layer of the zoo needs the DequantizeLinear fallback
    if flavor == "ort":
        assert ops[("com.microsoft", "MatMulNBits")] == n_linears
        assert ops[("ai.onnx", "DequantizeLinear")] == 0
    elif flavor == "qdq":
        assert ops[("ai.onnx", "DequantizeLinear")] == n_linears
        assert {d for d, _ in ops} == {"ai.onnx"}
    else:
        domain_ops = sum(n for (d, _), n in ops.items() if d == "qcompile")
        assert domain_ops == n_linears
        assert {f"{f.domain}.{f.name}" for f in model.functions} == {
            f"qcompile.{op}" for (d, op) in ops if d == "qcompile"
        }
        assert ops[("com.microsoft", "MatMulNBits")] == 0
    # Integer weights are there, and no float copy of a quantized weight is left: every
    # 2-D float initializer shaped like a quantized weight ([N, K] or [K, N]) corresponds to
    # a float constant the torch graph itself still reads (a tied embedding, say).
    inits = list(model.graph.initializer)
    assert sum(1 for t in inits if t.data_type in _QUANTIZED_DTYPES and len(t.dims) >= 2) >= n_linears
    float_shapes = Counter(tuple(t.dims) for t in inits if t.data_type in _FLOAT_DTYPES and len(t.dims) == 2)
    torch_float = _float_constant_shapes(qm)
    for _, n, k in set(linears):
        in_onnx = float_shapes[(n, k)] + (float_shapes[(k, n)] if n != k else 0)
        in_torch = torch_float[(n, k)] + (torch_float[(k, n)] if n != k else 0)
        assert in_onnx <= in_torch, f"a float weight of shape [{n}, {k}] was left for a quantized linear"


def check_parity(exported_zoo, arch: str, preset: str, flavor: str) -> None:
    qm, result = exported_zoo(arch, preset, flavor)
    entry = zoo.ARCHITECTURES[arch]
    args, kwargs = entry.other_inputs(1)
    session = inference_session(result.path)
    # Dynamic axes: named, and another batch (and sequence length) than the export example.
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert all(shape[0] == "batch" for shape in shapes.values()), shapes
    if "input_ids" in shapes:
        assert shapes["input_ids"] == ["batch", "sequence"]
    outputs = session.run(None, onnx_feeds(qm, args, kwargs))
    mask = kwargs.get("attention_mask")
    err, where = worst_relative_error(outputs, float32_reference(qm)(args, kwargs), result.output_names, mask)
    assert err < EXACT_RTOL, f"{arch} {preset} {flavor}: {where} differs from the float32 reference by {err:.2e}"
    err, where = worst_relative_error(outputs, quantized_outputs(qm, args, kwargs), result.output_names, mask)
    assert err < BF16_RTOL, f"{arch} {preset} {flavor}: {where} differs from qm(...) by {err:.2e}"
    assert_structure(qm, result, flavor)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_ort_flavor_w4a16_matches_quantized_model(exported_zoo, arch):
    check_parity(exported_zoo, arch, "w4a16", "ort")


@pytest.mark.parametrize("arch,preset,flavor", OTHER_CASES)
def test_other_flavors_and_presets_match_quantized_model(exported_zoo, arch, preset, flavor):
    check_parity(exported_zoo, arch, preset, flavor)


def test_every_preset_and_flavor_is_covered():
    cases = {(p, f) for _, p, f in OTHER_CASES} | {("w4a16", "ort")}
    assert cases == {(p, f) for p in ("w8a16", "w4a16") for f in ("ort", "qdq", "qcompile")}


def test_batch_one_and_short_sequence(exported_zoo):
    """Size-oblivious export: batch 1 and 5 tokens run too (no 0/1 specialization)."""
    qm, result = exported_zoo("bert", "w4a16", "ort")
    _, kwargs = zoo.ARCHITECTURES["bert"].other_inputs(1)
    kwargs = {k: v[:1, :5].contiguous() for k, v in kwargs.items()}
    outputs = inference_session(result.path).run(None, onnx_feeds(qm, (), kwargs))
    err, where = worst_relative_error(outputs, float32_reference(qm)((), kwargs), result.output_names)
    assert outputs[0].shape == (1, 5, 128)
    assert err < EXACT_RTOL, f"{where}: {err:.2e}"


def test_parity_session_config_is_the_exact_one():
    """The parity tests' numerics depend on this setting; keep it visible."""
    assert dict(EXACT_CONFIG) == {"session.qdq_matmulnbits_accuracy_level": "0"}


def _cuda_provider() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    return session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("arch,preset,flavor", [("llama", "w4a16", "ort"), ("bert", "w8a16", "ort"),
                                                ("llama", "w4a16", "qdq"), ("bert", "w8a16", "qcompile")])
def test_cuda_provider_matches_quantized_model(exported_zoo, arch, preset, flavor):
    """With a working CUDAExecutionProvider (onnxruntime-gpu and a GPU), the same files run
    there. Tolerance 1e-2: the CUDA kernels may compute float32 matmuls in TF32 (10-bit
    mantissa, ~5e-4 per product sum)."""
    if not _cuda_provider():
        pytest.skip("onnxruntime has no working CUDAExecutionProvider here")
    qm, result = exported_zoo(arch, preset, flavor)
    args, kwargs = zoo.ARCHITECTURES[arch].other_inputs(1)
    session = inference_session(result.path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    outputs = session.run(None, onnx_feeds(qm, args, kwargs))
    err, where = worst_relative_error(outputs, float32_reference(qm)(args, kwargs), result.output_names,
                                      kwargs.get("attention_mask"))
    assert np.isfinite(err) and err < 1e-2, f"{where}: {err:.2e}"
