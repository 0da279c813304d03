"""``qcompile.export.softmax_nan_guard``: the attention Softmax's NaN guard is dropped only
where it cannot change a finite result.

* A hand-written copy of torch.onnx's boolean-mask attention (``Where(mask, 0, finfo.min)``
  added to the scores, ``Softmax``, ``Where(IsNaN(p), 0, p)``, ``MatMul`` by V): with the
  guard dropped ONNX Runtime's output is bit-identical to the guarded graph's on fresh
  finite inputs, including a batch element whose keys are all masked (exact equality:
  the remaining nodes are the same nodes on the same values).
* A ``-inf`` mask keeps the guard (a fully masked row would be NaN without it), and so does
  a Softmax whose input is not a finitely masked ``Add``.
* ``to_onnx`` of a module calling ``F.scaled_dot_product_attention`` with a boolean mask:
  no ``IsNaN`` left, and ONNX Runtime matches the float32 module within 1e-5 of max|y|
  (float32 summation order of ONNX Runtime's MatMul/Softmax against torch's kernels).
"""
from __future__ import annotations

import secrets

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.export import inference_session, onnx_feeds, to_onnx
from qcompile.export.softmax_nan_guard import drop_softmax_nan_guards

B, H, S, D = 3, 2, 7, 5
# ONNX Runtime's float32 MatMul / Softmax against torch's: the same math summed in another
# order, ~1e-7 of max|y| measured; 1e-5 of max|y| still fails on a wrong mask or a dropped scale
FLOAT_RTOL = 1e-5


@pytest.fixture(scope="module")
def seed() -> int:
    return secrets.randbits(31)


def _attention(mask_value: float, *, masked_add: bool = True) -> onnx.ModelProto:
    """torch.onnx's boolean-mask attention, guard included (``mask_value`` for masked keys)."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kT"], ["scores"]),
        helper.make_node("Where", ["mask", "zero", "masked"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"] if masked_add else ["scores", "zero"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "p"], ["guarded"]),
        helper.make_node("MatMul", ["guarded", "v"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(mask_value, np.float32), "masked")]
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, [B, H, S, D]) for n in ("q", "k", "v")]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, 1, S]))
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", f, [B, H, S, D])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _without_guards(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    model = ir.from_proto(proto)
    dropped = drop_softmax_nan_guards(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return ir.to_proto(model), dropped


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    mask = rng.random((B, 1, 1, S)) < 0.6
    mask[0] = False  # every key of batch element 0 masked
    mask[1, ..., 0] = True
    feeds = {n: (rng.standard_normal((B, H, S, D)) * 3).astype(np.float32) for n in ("q", "k", "v")}
    return {**feeds, "mask": mask}


def test_finite_mask_guard_dropped_bit_identical(seed):
    guarded = _attention(float(np.finfo(np.float32).min))
    dropped_model, dropped = _without_guards(guarded)
    assert dropped == 1
    ops = [n.op_type for n in dropped_model.graph.node]
    assert "IsNaN" not in ops and ops.count("Where") == 1, ops  # the mask's Where stays
    onnx.checker.check_model(dropped_model, full_check=True)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        feeds = _feeds(rng)
        expected, got = _run(guarded, feeds), _run(dropped_model, feeds)
        assert np.isfinite(expected).all()
        np.testing.assert_array_equal(got, expected, err_msg=f"seed {seed}")


@pytest.mark.parametrize("mask_value, masked_add", [(-np.inf, True), (float(np.finfo(np.float32).min), False)])
def test_guard_kept_where_it_can_fire(mask_value, masked_add):
    proto, dropped = _without_guards(_attention(mask_value, masked_add=masked_add))
    assert dropped == 0
    assert [n.op_type for n in proto.graph.node].count("IsNaN") == 1


def test_guard_with_minus_inf_mask_does_fire(seed):
    """Why a -inf mask must keep its guard: the fully masked batch element is 0, not NaN."""
    feeds = _feeds(np.random.default_rng(seed))
    y = _run(_attention(-np.inf), feeds)
    assert np.isfinite(y).all() and (y[0] == 0).all()


class MaskedAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return y.transpose(1, 2).reshape(b, s, d)


def test_to_onnx_drops_the_attention_guard(tmp_path, seed):
    torch.manual_seed(seed)
    module = MaskedAttention(12, 3).eval()
    x, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    qm = qcompile.quantize(module, (x, mask), recipe="w8a16", progress=False, verify=False)
    result = to_onnx(qm, tmp_path / "attention.onnx", flavor="ort")
    assert "IsNaN" not in result.ops and "Softmax" in result.ops, result.ops
    session = inference_session(result.path)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 12, generator=gen)
    mask = torch.rand(3, 9, generator=gen) < 0.7
    mask[:, 0] = True
    (got,) = session.run(None, onnx_feeds(qm, (x, mask)))
    with torch.no_grad():
        expected = qm(x, mask).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=FLOAT_RTOL * np.abs(expected).max(),
                               err_msg=f"seed {seed}")
