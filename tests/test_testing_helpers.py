"""qcompile.testing: the helpers users call in their own graph tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.testing import assert_close_to_float, assert_op_counts, count_ops, relative_error


@pytest.fixture(scope="module")
def quantized():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    x = torch.randn(5, 64)
    return model, qcompile.quantize(model, (x,), recipe="w4a16", progress=False)


def test_count_ops_and_assert_op_counts(quantized):
    _, qm = quantized
    ops = count_ops(qm)
    assert ops == count_ops(qm.graph_module)
    assert ops["qcompile.linear_w4a16"] == 2 and ops["aten.gelu"] == 1 and "aten.linear" not in ops
    assert_op_counts(qm, {"qcompile.linear_w4a16": 2, "aten.linear": 0})
    with pytest.raises(AssertionError, match="expected 3, found 2"):
        assert_op_counts(qm, {"qcompile.linear_w4a16": 3})
    with pytest.raises(TypeError):
        count_ops(object())


def test_relative_error_and_assert_close(quantized):
    model, qm = quantized
    x = torch.randn(7, 64)
    ref = model(x).detach()
    assert relative_error(ref, ref.clone()) == 0.0
    noisy = ref * (1 + 1e-3)
    # the product is rounded to float32 (~6e-8 per element), which moves a 1e-3 difference
    # by up to ~1e-4 of itself
    assert relative_error(ref, noisy) == pytest.approx(1e-3, rel=1e-3)
    err = assert_close_to_float(model, qm, x, rtol=0.3)
    assert 0 < err < 0.3
    with pytest.raises(AssertionError, match="allowed"):
        assert_close_to_float(model, qm, x, rtol=1e-9)
    with pytest.raises(AssertionError, match="shapes"):
        relative_error(ref, ref[:3])
