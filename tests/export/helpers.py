"""What the export tests share: a float32 reference of a quantized model, and output
comparison restricted to the positions a model defines.

Tolerances (used by the tests, stated once here):

* :data:`EXACT_RTOL` — ONNX Runtime (CPU, ``EXACT_CONFIG``: activations never quantized)
  against the float32 reference path of the qcompile ops. Both use the same dequantized
  float32 weights (the export only re-lays integers out); what differs is the order in
  which float32 products are summed, ~1e-7 relative per matmul. Measured here: at most
  6e-7 over all zoo architectures, presets and flavors; 1e-5 leaves room for other CPUs.
* :data:`BF16_RTOL` — ONNX Runtime against ``qm(...)`` itself. On CPU, qcompile's fast
  paths round the activations (and scales) to bfloat16, 8 significant bits, ~4e-3 per
  rounding, compounded over the two layers of these random-weight models. Measured here:
  at most 7e-3 over all zoo architectures and both presets; 2e-2 leaves room.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from qcompile.kernels import WEIGHT_ONLY_LINEAR_OPS, WEIGHT_ONLY_LINEAR_REFERENCES

EXACT_RTOL = 1e-5
BF16_RTOL = 2e-2


def float32_reference(qm: Any):
    """``fn(args, kwargs) -> flat outputs`` of ``qm`` with every weight-only op replaced by its
    pure-torch float32 reference (no bfloat16 fast path)."""
    gm = qm.graph_module
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    references = {op: WEIGHT_ONLY_LINEAR_REFERENCES[bits] for bits, op in WEIGHT_ONLY_LINEAR_OPS.items()}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in references:
            node.target = references[node.target]
    reference = fx.GraphModule(gm, graph)

    def run(args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
        with torch.no_grad():
            return list(reference(*qm.captured.flatten_inputs(tuple(args), dict(kwargs))))

    return run


def quantized_outputs(qm: Any, args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
    """What ``qm(*args, **kwargs)`` computes, flat, in the order of the ONNX outputs.

    ``qm(...)`` is ``unflatten(qm.graph_module(*flat inputs))``; the flat values are taken
    before unflattening because re-flattening a returned cache object drops the sizes it
    holds as plain ints (a sliding-window cache's length), which the graph does return.
    """
    with torch.no_grad():
        return list(qm.graph_module(*qm.captured.flatten_inputs(tuple(args), dict(kwargs))))


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def defined_positions(name: str, shape: tuple[int, ...], attention_mask: np.ndarray | None) -> np.ndarray | None:
    """Where an output is defined, as a mask broadcastable to ``shape`` (None: everywhere).

    Positions whose attention_mask is 0 are padding: their query row attends to nothing,
    and torch's SDPA and its ONNX translation fill such rows differently (independently of
    quantization), so outputs there are unspecified; so are KV-cache entries computed from
    them in later layers. A sliding-window cache (Mistral) keeps the last L positions.
    """
    if attention_mask is None or len(shape) < 2:
        return None
    batch, seq = attention_mask.shape
    if shape[0] != batch:
        return None
    for axis in range(1, len(shape)):
        if shape[axis] == seq:
            view = [1] * len(shape)
            view[0], view[axis] = batch, seq
            return attention_mask.reshape(view).astype(bool)
    if name.endswith((".keys", ".values")) and len(shape) == 4 and shape[2] < seq:
        view = [batch, 1, shape[2], 1]
        return attention_mask[:, seq - shape[2]:].reshape(view).astype(bool)
    return None


def worst_relative_error(
    got: Sequence[Any], expected: Sequence[Any], names: Sequence[str], attention_mask: Any = None
) -> tuple[float, str]:
    """max over outputs of max|got - expected| / max|expected| at defined positions; and which output.

    Integer outputs (cache lengths) must be equal.
    """
    assert len(got) == len(expected) == len(names), (len(got), len(expected), len(names))
    mask = None if attention_mask is None else _as_array(attention_mask)
    worst, where = 0.0, ""
    for name, g, e in zip(names, got, expected):
        g, e = _as_array(g), _as_array(e)
        assert g.shape == e.shape, f"{name}: shape {g.shape} != {e.shape}"
        if e.dtype.kind != "f":
            assert np.array_equal(g, e), f"{name}: {g} != {e}"
            continue
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        scale = np.abs(e.astype(np.float64))
        defined = defined_positions(name, e.shape, mask)
        if defined is not None:
            diff = np.where(defined, diff, 0.0)
            scale = np.where(defined, scale, 0.0)
        err = float(diff.max() / max(scale.max(), 1e-30)) if diff.size else 0.0
        if err > worst:
            worst, where = err, name
    return worst, where
