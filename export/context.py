"""What a translation function sees of one export: the options, the model's constant
tensors, and a way to add new initializers and notes.

Translation functions run while ``torch.onnx.export`` builds the ONNX graph, before the
exporter attaches the values of initializers; :class:`ExportContext` gives them the torch
tensors behind their constant inputs (looked up by the ONNX value name, which is the
ExportedProgram placeholder name at that point), so a translation can re-lay a weight out
for its target operator. The new tensors it creates become initializers once the graph is
built (:meth:`ExportContext.add_initializers_to`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxscript
import torch

from qcompile.errors import ExportError

__all__ = ["ExportContext", "ConstantTensor"]


@dataclass(frozen=True)
class ConstantTensor:
    """A constant input of the exported graph: its source name and its value."""

    source: str
    tensor: torch.Tensor


@dataclass
class ExportContext:
    """Options and state of one ``to_onnx`` call, shared by all translation functions.

    flavor: "ort", "qdq" or "qcompile". opset: the default-domain opset of the model.
    accuracy_level: the ``accuracy_level`` attribute written on MatMulNBits (None: not
    written, ORT's default 0). w8a8_activations: how the "ort" flavor quantizes the input of
    a dynamic ``linear_w8a8`` ("per-token", the op's own numerics, or "per-tensor": ONNX
    Runtime's dynamic per-tensor uint8; see :mod:`qcompile.export.activation_ort`).
    constants: ONNX value name -> :class:`ConstantTensor`.
    notes: what the export chose that a user should know (a fallback, say).
    functions: the qcompile-domain ops the graph calls (their bodies go into the model).
    """

    flavor: str
    opset: int
    accuracy_level: int | None = None
    w8a8_activations: str = "per-token"
    constants: dict[str, ConstantTensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    _initializers: dict[str, ir.Value] = field(default_factory=dict)

    @property
    def op(self) -> onnxscript.values.Opset:
        """The default ONNX domain at the model's opset, for building nodes."""
        return onnxscript.values.Opset("", self.opset)

    def constant(self, value: Any, role: str, op_name: str) -> torch.Tensor:
        """The tensor behind a constant input ``value`` of ``op_name``; ExportError if it is not one."""
        name = getattr(value, "name", None)
        found = self.constants.get(name) if name is not None else None
        if found is None:
            raise ExportError(
                f"{op_name}: its {role} input ({name or value!r}) is not a constant of the model; "
                "the ONNX translation re-lays weights out at export time and needs them as constants"
            )
        return found.tensor

    def source_name(self, value: Any) -> str:
        """A readable base name for tensors derived from a constant input (its source name)."""
        name = getattr(value, "name", None) or "tensor"
        found = self.constants.get(name)
        return found.source if found is not None else name

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding ``array`` (a unique name derived from ``name``)."""
        base = re.sub(r"[^0-9A-Za-z_.:/-]", "_", name)
        unique, i = base, 1
        while unique in self._initializers or unique in self.constants:
            unique, i = f"{base}_{i}", i + 1
        tensor = ir.Tensor(np.ascontiguousarray(array), name=unique)
        value = ir.Value(name=unique, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self._initializers[unique] = value
        return value

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def use_function(self, name: str) -> None:
        """Record that the graph calls the qcompile-domain function ``name``."""
        if name not in self.functions:
            self.functions.append(name)

    def add_initializers_to(self, graph: ir.Graph) -> None:
        """Register the new initializers that the built graph uses."""
        for value in self._initializers.values():
            if value.uses():
                graph.register_initializer(value)
