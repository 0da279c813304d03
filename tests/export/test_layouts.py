"""Weight layouts of the emitted ONNX ops, checked in ONNX Runtime one op at a time.

Each case quantizes a random weight with qcompile's own quantizer, re-lays it out with
``qcompile.export.layouts`` and runs a one-op ONNX graph (MatMulNBits, DequantizeLinear +
MatMul, or the qcompile-domain function) in ONNX Runtime's CPU provider against
``x @ dequantize(weight)^T`` computed in float64. Tolerance 1e-5 relative: the weights are
reproduced exactly (only integers move), and float32 accumulation over K <= 1024 products
stays below ~1e-6.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qcompile.export.layouts import (
    matmulnbits_block_size,
    to_dequantize_linear,
    to_matmulnbits,
    unsigned_grid,
)
from qcompile.export.qcompile_domain import DOMAIN_OPS, QCOMPILE_DOMAIN
from qcompile.export.runtime import inference_session
from qcompile.quantizers import dequantize_weight, quantize_weight_rtn

RTOL = 1e-5
M = 5


def _quantized(bits: int, n: int, k: int, group_size: int | None, symmetric: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    return quantize_weight_rtn(w, bits, group_size, symmetric)


def _run(tmp_path, nodes, initializers, k: int, n: int, x: np.ndarray, *, functions=(), opsets=()) -> np.ndarray:
    graph = helper.make_graph(
        nodes, "layout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), *opsets], functions=list(functions), ir_version=10
    )
    onnx.checker.check_model(model)
    path = tmp_path / "layout.onnx"
    onnx.save(model, str(path))
    return inference_session(path).run(None, {"x": x})[0]


def _expected(qw, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ dequantize_weight(qw, torch.float64).numpy().T


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    import onnx_ir as ir

    return ir.serde.serialize_tensor(ir.Tensor(np.ascontiguousarray(array), name=name))


def _assert_close(y: np.ndarray, expected: np.ndarray) -> None:
    err = np.abs(y - expected).max() / np.abs(expected).max()
    assert err < RTOL, f"relative error {err:.2e}"


# (bits, N, K, group_size or None = per-channel, symmetric, expected MatMulNBits block size)
MATMULNBITS_CASES = [
    (4, 40, 96, 32, False, 32),     # 3 blocks: odd count, zero points padded to 2 per byte
    (4, 40, 96, 32, True, 32),      # symmetric: no zero points input (default 8)
    (4, 24, 96, 48, False, 16),     # groups of 48 as 3 blocks of 16 (scales repeated)
    (4, 24, 1024, 512, False, 256),  # groups of 512 as 2 blocks of 256
    (4, 24, 200, None, False, 256),  # per-channel, one block padded from 200 to 256
    (4, 24, 600, None, False, 128),  # per-channel over 256: tiles of 128, the last padded
    (4, 16, 64, None, True, 64),
    (8, 40, 100, None, True, 128),  # 8-bit symmetric per-channel: no zero points (default 128)
    (8, 40, 384, None, False, 128),
    (8, 24, 128, 64, False, 64),
]


@pytest.mark.parametrize("bits,n,k,group_size,symmetric,block", MATMULNBITS_CASES)
def test_matmulnbits_layout(tmp_path, bits, n, k, group_size, symmetric, block):
    qw = _quantized(bits, n, k, group_size, symmetric)
    grid = unsigned_grid(qw.qweight, qw.scales, qw.zeros, bits=bits, group_size=qw.group_size)
    assert matmulnbits_block_size(k, qw.group_size) == block
    w = to_matmulnbits(grid, block)
    k_blocks = -(-k // block)
    assert w.B.shape == (n, k_blocks, block * bits // 8) and w.B.dtype == np.uint8
    assert w.scales.shape == (n, k_blocks)
    assert (w.zero_points is None) == symmetric
    inits = [_tensor("B", w.B), _tensor("scales", w.scales)]
    inputs = ["x", "B", "scales"]
    if w.zero_points is not None:
        assert w.zero_points.shape == (n, k_blocks if bits == 8 else -(-k_blocks // 2))
        inits.append(_tensor("zp", w.zero_points))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    x = np.random.default_rng(1).standard_normal((M, k)).astype(np.float32)
    y = _run(tmp_path, [node], inits, k, n, x, opsets=[helper.make_opsetid("com.microsoft", 1)])
    _assert_close(y, _expected(qw, x))


def test_groups_no_block_size_divides_have_no_matmulnbits_layout():
    assert matmulnbits_block_size(80, 40) is None
    assert matmulnbits_block_size(400, 200) is None
    assert matmulnbits_block_size(200, 200) == 256  # one group per row always fits


# (bits, N, K, group_size, symmetric, ONNX dtype of the weight, axis)
DEQUANTIZE_CASES = [
    (8, 40, 96, None, True, TensorProto.INT8, 1),
    (8, 40, 96, None, False, TensorProto.INT8, 1),
    (8, 24, 128, 32, True, TensorProto.INT8, 0),
    (4, 40, 96, 32, True, TensorProto.INT4, 0),
    (4, 40, 96, 32, False, TensorProto.UINT4, 0),
    (4, 24, 200, None, False, TensorProto.UINT4, 1),
    (4, 24, 192, None, True, TensorProto.INT4, 1),
]


@pytest.mark.parametrize("bits,n,k,group_size,symmetric,dtype,axis", DEQUANTIZE_CASES)
def test_dequantize_linear_layout(tmp_path, bits, n, k, group_size, symmetric, dtype, axis):
    qw = _quantized(bits, n, k, group_size, symmetric)
    grid = unsigned_grid(qw.qweight, qw.scales, qw.zeros, bits=bits, group_size=qw.group_size)
    dq = to_dequantize_linear(grid)
    assert dq.data.shape == (k, n) and dq.axis == axis
    assert (dq.zero_point is None) == symmetric
    inits = [_tensor("w_q", dq.data), _tensor("w_scale", dq.scale)]
    inputs = ["w_q", "w_scale"]
    if dq.zero_point is not None:
        inits.append(_tensor("w_zp", dq.zero_point))
        inputs.append("w_zp")
    assert inits[0].data_type == dtype
    attrs = {"axis": dq.axis} | ({"block_size": dq.block_size} if dq.block_size else {})
    nodes = [helper.make_node("DequantizeLinear", inputs, ["w"], **attrs), helper.make_node("MatMul", ["x", "w"], ["y"])]
    x = np.random.default_rng(2).standard_normal((M, k)).astype(np.float32)
    _assert_close(_run(tmp_path, nodes, inits, k, n, x), _expected(qw, x))


@pytest.mark.parametrize("bits,k,group_size,symmetric", [(4, 101, None, False), (4, 96, 32, True), (8, 96, 32, False),
                                                         (8, 64, None, True)])
def test_qcompile_domain_function_bodies(tmp_path, bits, k, group_size, symmetric):
    """The function bodies read qcompile's storage as it is (odd K: a padding nibble per row)."""
    n = 24
    qw = _quantized(bits, n, k, group_size, symmetric)
    name = "LinearW8A16" if bits == 8 else "LinearW4A16"
    zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, 0.0 if bits == 8 else 8.0)
    inits = [_tensor("q", qw.qweight.numpy()), _tensor("s", qw.scales.numpy()), _tensor("z", zeros.numpy())]
    node = helper.make_node(name, ["x", "q", "s", "z"], ["y"], domain=QCOMPILE_DOMAIN, group_size=qw.group_size)
    x = np.random.default_rng(3).standard_normal((M, k)).astype(np.float32)
    y = _run(tmp_path, [node], inits, k, n, x, functions=[DOMAIN_OPS[name].function(21)],
             opsets=[helper.make_opsetid(QCOMPILE_DOMAIN, 1)])
    _assert_close(y, _expected(qw, x))


def test_int4_values_are_packed_low_nibble_first():
    """ONNX INT4/UINT4 tensors pack element 2j in the low nibble — as qcompile does."""
    codes = np.array([[1, 2, 3, 4]], dtype=ml_dtypes.uint4)
    assert _tensor("t", codes).raw_data == bytes([0x21, 0x43])


def test_zero_points_must_be_integers():
    qw = _quantized(4, 8, 64, 32, False)
    with pytest.raises(ValueError, match="integers"):
        unsigned_grid(qw.qweight, qw.scales, qw.zeros + 0.5, bits=4, group_size=32)
