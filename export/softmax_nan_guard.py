"""Drop the NaN guard after a boolean-masked attention's Softmax where it cannot change a finite result.

torch.onnx (onnxscript's torchlib) writes ``scaled_dot_product_attention`` with a boolean
mask as::

    bias = Where(mask, 0, m)                      # m = finfo(dtype).min: a finite number
    p = Softmax(MatMul(q * sqrt(s), kT * sqrt(s)) + bias)
    p = Where(IsNaN(p), 0, p)                     # the guard

With a finite ``m``, a row whose keys are all masked still has finite scores, so Softmax
gives finite weights; ``p`` holds a NaN only where the scores hold a NaN or an infinity
(non-finite q or k, or an overflow), and there the guard writes zeros (torch itself
returns NaN). For every input whose attention scores are finite the guard returns ``p``
unchanged, bit for bit, yet ONNX Runtime spends two passes over ``[batch, heads, seq,
seq]`` on it (``IsNaN``, ``Where``): 8-11% of the whole run of MiniLM at batch 32 x 128
(``benchmarks/onnx_op_profile.py``; BENCHMARKS.md).

:func:`drop_softmax_nan_guards` removes the guard only where the pattern is exactly that
one: ``Where(IsNaN(p), 0, p)`` with ``p = Softmax(Add(x, Where(c, a, b)))`` (either order of
the ``Add``) and ``a``, ``b`` constants whose values are all finite. A mask of ``-inf``
(a fully masked row would give NaN, which the guard turns into zeros), any other producer
of the Softmax input, or a guard output that is a graph output keeps the guard.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["drop_softmax_nan_guards"]


def _op(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The node producing ``value`` when it is a default-domain ``op_type``, else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _constant(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _finite_mask_bias(value: ir.Value) -> bool:
    """Whether ``value`` is ``Where(c, a, b)`` with constant, all-finite ``a`` and ``b``."""
    where = _op(value, "Where")
    if where is None or len(where.inputs) != 3:
        return False
    branches = [_constant(v) for v in where.inputs[1:]]
    return all(b is not None and np.issubdtype(b.dtype, np.floating) and np.isfinite(b).all() for b in branches)


def _guarded_softmax(node: ir.Node) -> ir.Value | None:
    """``p`` when ``node`` is the guard ``Where(IsNaN(p), 0, p)`` of a finitely masked Softmax."""
    if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
        return None
    condition, zero, p = node.inputs
    isnan = _op(condition, "IsNaN")
    if isnan is None or isnan.inputs[0] is not p:
        return None
    zero_value = _constant(zero)
    if zero_value is None or zero_value.size != 1 or zero_value.reshape(()) != 0:
        return None
    softmax = _op(p, "Softmax")
    add = _op(softmax.inputs[0], "Add") if softmax is not None else None
    if add is None or not any(_finite_mask_bias(v) for v in add.inputs):
        return None
    if node.outputs[0].is_graph_output():
        return None
    return p


def drop_softmax_nan_guards(model: ir.Model) -> int:
    """Remove every guard of the module docstring's pattern from the main graph; returns how many.

    The ``IsNaN`` / ``Where`` nodes are left unused (a dead-node pass removes them)."""
    dropped = 0
    for node in list(model.graph):
        p = _guarded_softmax(node)
        if p is None:
            continue
        node.outputs[0].replace_all_uses_with(p)
        dropped += 1
    return dropped
