"""qcompile's kernels, registered as torch.library custom ops in the ``qcompile`` namespace.

Importing this package registers every op. Each op has a pure-torch reference, a CPU fast
path where torch has one, and a fake implementation for torch.export / torch.compile;
the Triton implementations are added by the kernels issue.

Weight-only linears (``Tensor x, Tensor qweight, Tensor scales, Tensor? zeros,
Tensor? bias, int group_size -> Tensor``, weights in the layout of
:class:`qcompile.quantizers.QuantizedWeight`):

* ``torch.ops.qcompile.linear_w8a16`` — int8 weights;
* ``torch.ops.qcompile.linear_w4a16`` — 4-bit weights packed two per byte.
"""
from __future__ import annotations

import torch

# Not re-exported here: the CustomOpDef objects ``linear_w8a16`` / ``linear_w4a16``, whose
# names would shadow their modules; call them as torch.ops.qcompile.<name> or import them
# from their modules.
from qcompile.kernels.linear_w4a16 import linear_w4a16_reference
from qcompile.kernels.linear_w8a16 import linear_w8a16_reference

__all__ = [
    "linear_w8a16_reference",
    "linear_w4a16_reference",
    "WEIGHT_ONLY_LINEAR_OPS",
    "WEIGHT_ONLY_LINEAR_REFERENCES",
]

# Weight bits -> the op overload a lowering pass inserts into a graph.
WEIGHT_ONLY_LINEAR_OPS = {
    8: torch.ops.qcompile.linear_w8a16.default,
    4: torch.ops.qcompile.linear_w4a16.default,
}

# Weight bits -> the pure-torch reference with the op's signature.
WEIGHT_ONLY_LINEAR_REFERENCES = {
    8: linear_w8a16_reference,
    4: linear_w4a16_reference,
}
