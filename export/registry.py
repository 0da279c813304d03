"""The translation table: for each qcompile op, one ONNX translation per flavor.

A translation is a function ``fn(ctx, *op_args)`` that builds ONNX nodes with onnxscript
for one call of the op (``ctx`` is the :class:`~qcompile.export.context.ExportContext`).
An op that a later issue adds (w8a8, a Hadamard rotation, ...) slots in as one entry::

    TRANSLATIONS.add(torch.ops.qcompile.linear_w8a8.default, ort=..., qcompile=...)

and an op without a translation for the requested flavor is refused before anything is
written, with the flavors that do support it (:meth:`TranslationTable.build`). A flavor
that cannot express an op (or whose output ONNX Runtime cannot run) is declared with
:meth:`TranslationTable.refuse` and its reason, which the refusal then states.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import ExportError

from .context import ExportContext

__all__ = ["FLAVORS", "TranslationTable", "ops_needing_translation", "op_label"]

FLAVORS = ("ort", "qdq", "qcompile")

# Op namespaces that torch.onnx translates itself.
_NATIVE_NAMESPACES = frozenset({"aten", "prims", "onnx", "torchvision"})

Translation = Callable[..., Any]


def op_label(op: torch._ops.OpOverload) -> str:
    """``qcompile::linear_w4a16`` (with ``.overload`` unless it is the default one)."""
    name = op.name()
    return name.removesuffix(".default")


def ops_needing_translation(gm: fx.GraphModule) -> dict[torch._ops.OpOverload, list[str]]:
    """Ops in ``gm`` that torch.onnx does not translate itself -> the nodes calling them."""
    found: dict[torch._ops.OpOverload, list[str]] = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if target.namespace not in _NATIVE_NAMESPACES:
                found.setdefault(target, []).append(node.name)
    return found


class TranslationTable:
    """Op overload -> {flavor: translation}."""

    def __init__(self) -> None:
        self._entries: dict[torch._ops.OpOverload, dict[str, Translation]] = {}
        self._refusals: dict[torch._ops.OpOverload, dict[str, str]] = {}

    def add(self, op: torch._ops.OpOverload, **by_flavor: Translation) -> None:
        """Register ``op``'s translations, one keyword per flavor (``ort=``, ``qdq=``, ``qcompile=``)."""
        if not isinstance(op, torch._ops.OpOverload):
            raise TypeError(f"translations are registered per OpOverload (e.g. op.default), got {op!r}")
        unknown = set(by_flavor) - set(FLAVORS)
        if unknown:
            raise ValueError(f"unknown flavor(s) {sorted(unknown)}; flavors: {', '.join(FLAVORS)}")
        self._entries.setdefault(op, {}).update(by_flavor)
        for flavor in by_flavor:
            self._refusals.get(op, {}).pop(flavor, None)

    def refuse(self, op: torch._ops.OpOverload, flavor: str, reason: str) -> None:
        """Declare that ``flavor`` does not translate ``op``, because ``reason`` (stated in the error)."""
        if not isinstance(op, torch._ops.OpOverload):
            raise TypeError(f"translations are registered per OpOverload (e.g. op.default), got {op!r}")
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; flavors: {', '.join(FLAVORS)}")
        self._entries.get(op, {}).pop(flavor, None)
        self._refusals.setdefault(op, {})[flavor] = reason

    def refusals(self, op: torch._ops.OpOverload) -> dict[str, str]:
        """Flavor -> reason, for the flavors declared unable to translate ``op``."""
        return dict(self._refusals.get(op, {}))

    def flavors_for(self, op: torch._ops.OpOverload) -> tuple[str, ...]:
        """The flavors with a translation of ``op``, in the order of :data:`FLAVORS`."""
        have = self._entries.get(op, {})
        return tuple(f for f in FLAVORS if f in have)

    def ops(self) -> tuple[torch._ops.OpOverload, ...]:
        return tuple(self._entries)

    def copy(self) -> "TranslationTable":
        new = TranslationTable()
        for op, by_flavor in self._entries.items():
            new._entries[op] = dict(by_flavor)
        for op, reasons in self._refusals.items():
            new._refusals[op] = dict(reasons)
        return new

    def build(self, used: Mapping[torch._ops.OpOverload, list[str]], ctx: ExportContext) -> dict[Any, Callable]:
        """The ``custom_translation_table`` for torch.onnx: every op in ``used`` bound to ``ctx``.

        Raises ExportError naming every op that has no translation for ``ctx.flavor``, the
        nodes that call it and the flavors that support it.
        """
        table: dict[Any, Callable] = {}
        problems = []
        for op, nodes in used.items():
            fn = self._entries.get(op, {}).get(ctx.flavor)
            if fn is None:
                problems.append(self._missing(op, nodes, ctx.flavor))
                continue
            table[op] = functools.partial(fn, ctx)
        if problems:
            raise ExportError("\n".join(problems))
        return table

    def _missing(self, op: torch._ops.OpOverload, nodes: Iterable[str], flavor: str) -> str:
        nodes = list(nodes)
        where = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        supported = self.flavors_for(op)
        reason = self._refusals.get(op, {}).get(flavor)
        if reason is not None:
            works = ", ".join(supported) or "none"
            return (f"{op_label(op)} (node {where}) cannot be exported with flavor {flavor!r}: {reason}; "
                    f"flavors that support it: {works}" + (f"; export with flavor={supported[0]!r}" if supported else ""))
        if supported:
            hint = f"flavors that support it: {', '.join(supported)}; export with flavor={supported[0]!r}"
        else:
            translated = ", ".join(sorted(op_label(o) for o in self._entries)) or "none"
            hint = f"flavors that support it: none (qcompile.export translates: {translated})"
        return f"{op_label(op)} (node {where}) has no ONNX translation for flavor {flavor!r}; {hint}"
