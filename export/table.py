"""The translations qcompile ships: one entry per op, one translation per flavor."""
from __future__ import annotations

import torch

from qcompile import kernels  # noqa: F401  (registers the qcompile:: ops)

from . import ort_contrib, qcompile_domain, qdq
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
