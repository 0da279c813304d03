"""qcompile's kernels, registered as torch.library custom ops in the ``qcompile`` namespace.

Importing this package registers every op. Each op has a pure-torch reference, a CPU fast
path where torch has one, and a fake implementation for torch.export / torch.compile;
the Triton implementations are added by the kernels issue.

Weight-only linears (``Tensor x, Tensor qweight, Tensor scales, Tensor? zeros,
Tensor? bias, int group_size -> Tensor``, weights in the layout of
:class:`qcompile.quantizers.QuantizedWeight`):

* ``torch.ops.qcompile.linear_w8a16`` — int8 weights;
* ``torch.ops.qcompile.linear_w4a16`` — 4-bit weights packed two per byte.

Activation quantization (weights quantized symmetrically per output channel, scales
float32 ``[N]``; see :mod:`qcompile.act_quant`):

* ``torch.ops.qcompile.quantize_per_token(x, smooth, bits, format) -> (codes, scales)`` —
  dynamic per-token int8 / int4 / fp8 e4m3fn codes of ``x / smooth``;
* ``torch.ops.qcompile.linear_w8a8(x, qweight, wscales, bias, smooth, act_scale)`` — int8
  weights, int8 activations (per token, or static per tensor with ``act_scale``), int32
  accumulation;
* ``torch.ops.qcompile.linear_fp8(x, qweight, wscales, bias, smooth)`` — e4m3fn weights and
  per-token e4m3fn activations.

4-bit weights with integer activations (``Tensor x, Tensor qweight, Tensor scales,
Tensor? zeros, Tensor? bias, Tensor? smooth, int group_size -> Tensor``, weights in the
4-bit layout of :class:`qcompile.quantizers.QuantizedWeight`; see
:mod:`qcompile.kernels.linear_w4ax`):

* ``torch.ops.qcompile.linear_w4a8`` — per-token int8 activations of ``x / smooth``,
  exact int32 accumulation per weight group, float32 epilogue;
* ``torch.ops.qcompile.linear_w4a4`` — the same with per-token int4 activations.

Rotations (see :mod:`qcompile.hadamard` for the matrices and plans):

* ``torch.ops.qcompile.hadamard(x, small, signs, block) -> Tensor`` — ``(x * signs) @ Q``
  along the last dim, Q block-diagonal with blocks ``H_small (x) H_{2**k} / sqrt(block)``
  (fast Walsh-Hadamard transform); :func:`qcompile.kernels.hadamard.apply_hadamard_op`
  calls it with a :class:`qcompile.hadamard.RotationPlan`.
"""
from __future__ import annotations

import torch

# Not re-exported here: the CustomOpDef objects ``linear_w8a16`` / ``linear_w4a16`` /
# ``linear_w8a8`` / ``quantize_per_token`` / ``hadamard`` (and ``linear_fp8``,
# ``linear_w4a8``, ``linear_w4a4``), whose names would shadow
# their modules; call them as torch.ops.qcompile.<name> or import them
# from their modules.
from qcompile.kernels.hadamard import apply_hadamard_op, hadamard_reference
from qcompile.kernels.linear_w4a16 import linear_w4a16_reference
from qcompile.kernels.linear_w4ax import linear_w4a4_reference, linear_w4a8_reference
from qcompile.kernels.linear_w8a8 import linear_fp8_reference, linear_w8a8_reference
from qcompile.kernels.linear_w8a16 import linear_w8a16_reference
from qcompile.kernels.quantize_per_token import quantize_per_token_reference
from qcompile.kernels import _triton_common  # noqa: F401,E402  registers the Triton CUDA kernels if triton is installed

__all__ = [
    "linear_w8a16_reference",
    "linear_w4a16_reference",
    "WEIGHT_ONLY_LINEAR_OPS",
    "WEIGHT_ONLY_LINEAR_REFERENCES",
    "linear_w8a8_reference",
    "linear_fp8_reference",
    "quantize_per_token_reference",
    "ACTIVATION_QUANT_LINEAR_OPS",
    "ACTIVATION_QUANT_LINEAR_REFERENCES",
    "W4_ACT_QUANT_LINEAR_OPS",
    "W4_ACT_QUANT_LINEAR_REFERENCES",
    "linear_w4a8_reference",
    "linear_w4a4_reference",
    "hadamard_reference",
    "apply_hadamard_op",
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

# Activation format -> the op overload a lowering pass inserts for a W8A8 / FP8 linear.
ACTIVATION_QUANT_LINEAR_OPS = {
    "int8": torch.ops.qcompile.linear_w8a8.default,
    "fp8": torch.ops.qcompile.linear_fp8.default,
}

# Activation format -> the pure-torch reference with the op's signature.
ACTIVATION_QUANT_LINEAR_REFERENCES = {
    "int8": linear_w8a8_reference,
    "fp8": linear_fp8_reference,
}

# Activation bits -> the op overload a lowering pass inserts for a 4-bit-weight linear with
# per-token integer activations (W4A8 / W4A4).
W4_ACT_QUANT_LINEAR_OPS = {
    8: torch.ops.qcompile.linear_w4a8.default,
    4: torch.ops.qcompile.linear_w4a4.default,
}

# Activation bits -> the pure-torch reference with the op's signature.
W4_ACT_QUANT_LINEAR_REFERENCES = {
    8: linear_w4a8_reference,
    4: linear_w4a4_reference,
}
