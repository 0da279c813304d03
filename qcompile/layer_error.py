"""Per-layer output error of quantized linears, measured on real inputs.

For every linear carrying quantized weights, the relative error ``‖x̂ Ŵᵀ − x Wᵀ‖ / ‖x Wᵀ‖``
of its output on the inputs it sees when the float graph runs (the example inputs and
calibration batches): ``Ŵ`` the dequantized weight, ``x̂`` the input as the op's
activation quantization sees it (``x`` itself for weight-only formats). Read-only.

Each dequantized weight exists only while its linear runs (made again for every batch):
holding all of them would be a float32 copy of the model's linears.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .calibration import LinearInputInterpreter
from .graph_utils import ACTQ_META, QWEIGHT_META, layer_name, linear_weight
from .quantizers import dequantize_weight

__all__ = ["layer_output_errors"]


def layer_output_errors(gm: fx.GraphModule, batches: list[list[Any]]) -> dict[str, float]:
    nodes = [n for n in gm.graph.nodes
             if (QWEIGHT_META in n.meta or ACTQ_META in n.meta) and linear_weight(gm, n) is not None]
    err_sq = {n: 0.0 for n in nodes}
    ref_sq = {n: 0.0 for n in nodes}

    def hook(node: fx.Node, x: torch.Tensor, out: torch.Tensor) -> None:
        w = linear_weight(gm, node)
        xf = x.float()
        ref = torch.nn.functional.linear(xf, w.float())
        if ACTQ_META in node.meta:
            act = node.meta[ACTQ_META]
            delta = torch.nn.functional.linear(act.fake_quantize_input(xf), act.dequantize()) - ref
        else:
            delta = torch.nn.functional.linear(xf, dequantize_weight(node.meta[QWEIGHT_META]) - w.float())
        err_sq[node] += float(delta.double().pow(2).sum())
        ref_sq[node] += float(ref.double().pow(2).sum())

    interp = LinearInputInterpreter(gm, set(nodes), hook)
    with torch.no_grad():
        for flat in batches:
            interp.run(*flat)
    return {layer_name(n): (err_sq[n] / ref_sq[n]) ** 0.5 if ref_sq[n] > 0 else 0.0 for n in nodes}
