"""The translations qcompile ships: one entry per op, one translation per flavor."""
from __future__ import annotations

import torch

from qcompile import kernels  # noqa: F401  (registers the qcompile:: ops)

from . import activation_domain, activation_ort, activation_qdq, hadamard, ort_contrib, qcompile_domain, qdq
from . import linear_w4ax
from .registry import TranslationTable

__all__ = ["TRANSLATIONS"]

_ops = torch.ops.qcompile

TRANSLATIONS = TranslationTable()

TRANSLATIONS.add(
    _ops.linear_w8a16.default,
    ort=ort_contrib.weight_only_linear("qcompile::linear_w8a16", 8),
    qdq=qdq.weight_only_linear("qcompile::linear_w8a16", 8),
    qcompile=qcompile_domain.weight_only_linear("qcompile::linear_w8a16", 8, "LinearW8A16"),
)
TRANSLATIONS.add(
    _ops.linear_w4a16.default,
    ort=ort_contrib.weight_only_linear("qcompile::linear_w4a16", 4),
    qdq=qdq.weight_only_linear("qcompile::linear_w4a16", 4),
    qcompile=qcompile_domain.weight_only_linear("qcompile::linear_w4a16", 4, "LinearW4A16"),
)
TRANSLATIONS.add(
    _ops.linear_w8a8.default,
    ort=activation_ort.linear_w8a8,
    qdq=activation_qdq.linear_w8a8,
    qcompile=activation_domain.linear_w8a8,
)
TRANSLATIONS.add(
    _ops.linear_fp8.default,
    ort=activation_ort.linear_fp8,
    qcompile=activation_domain.linear_fp8,
)
TRANSLATIONS.refuse(_ops.linear_fp8.default, "qdq", activation_qdq.FP8_LINEAR_REFUSAL)
TRANSLATIONS.add(
    _ops.quantize_per_token.default,
    ort=activation_ort.quantize_per_token,
    qdq=activation_qdq.quantize_per_token,
    qcompile=activation_domain.quantize_per_token,
)
TRANSLATIONS.add(
    _ops.hadamard.default,
    ort=hadamard.hadamard_standard,
    qdq=hadamard.hadamard_standard,
    qcompile=hadamard.hadamard_domain,
)
TRANSLATIONS.add(
    _ops.linear_w4a8.default,
    ort=linear_w4ax.linear_w4ax_ort(8),
    qdq=linear_w4ax.linear_w4ax_qdq(8),
    qcompile=linear_w4ax.linear_w4ax_domain(8),
)
TRANSLATIONS.add(
    _ops.linear_w4a4.default,
    ort=linear_w4ax.linear_w4ax_ort(4),
    qdq=linear_w4ax.linear_w4ax_qdq(4),
    qcompile=linear_w4ax.linear_w4ax_domain(4),
)
