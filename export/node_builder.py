"""One way to write ONNX nodes for two destinations: a translation and a function body.

The activation-quantized ops are written as the same standard-op sequences in every
flavor: inside a ``torch.onnx`` translation (nodes built by onnxscript while the exporter
traces) and inside the ONNX function bodies of the ``qcompile`` domain (``NodeProto``s).
The sequences are written once, against :class:`NodeBuilder`, and run with either

* :class:`ScriptNodes` — onnxscript opsets (the translation context); values are
  onnxscript/onnx_ir values, ``None`` for an omitted optional input;
* :class:`FunctionNodes` — collects ``onnx.NodeProto``s for ``onnx.helper.make_function``;
  values are names, ``None`` becomes the empty name.

``b("Div", x, y)`` builds one node and returns its output (a tuple for ``outputs > 1``);
``b.constant(array)`` a ``Constant`` node holding ``array`` (its dtype is the tensor's).
"""
from __future__ import annotations

import itertools
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
from onnx import helper

from .contrib_schemas import MICROSOFT_DOMAIN, microsoft_opset

__all__ = ["NodeBuilder", "ScriptNodes", "FunctionNodes"]


class NodeBuilder(Protocol):
    def __call__(self, op_type: str, *inputs: Any, domain: str = "", outputs: int = 1, **attributes: Any) -> Any: ...

    def constant(self, array: np.ndarray) -> Any: ...


class ScriptNodes:
    """Nodes built with onnxscript, in a torch.onnx translation function."""

    def __init__(self, opset: int):
        self._opsets = {"": onnxscript.values.Opset("", opset)}

    def _opset(self, domain: str):
        if domain not in self._opsets:
            if domain != MICROSOFT_DOMAIN:
                raise ValueError(f"no opset for domain {domain!r}")
            self._opsets[domain] = microsoft_opset()
        return self._opsets[domain]

    def __call__(self, op_type: str, *inputs: Any, domain: str = "", outputs: int = 1, **attributes: Any) -> Any:
        # onnxscript takes the number of outputs from the op's schema.
        result = getattr(self._opset(domain), op_type)(*inputs, **attributes)
        if outputs != 1 and (not isinstance(result, tuple) or len(result) != outputs):
            raise ValueError(f"{op_type} returned {result!r}, expected {outputs} outputs")
        return result

    def constant(self, array: np.ndarray) -> Any:
        return self("Constant", value=ir.tensor(np.array(array, order="C")))


class FunctionNodes:
    """Nodes collected as ``onnx.NodeProto`` for an ONNX function body (names are values)."""

    def __init__(self, prefix: str = "t"):
        self.nodes: list[onnx.NodeProto] = []
        self._counter = itertools.count()
        self._prefix = prefix

    def _name(self, op_type: str) -> str:
        return f"{self._prefix}{next(self._counter)}_{op_type}"

    def __call__(self, op_type: str, *inputs: Any, domain: str = "", outputs: int = 1, **attributes: Any) -> Any:
        names = [self._name(op_type) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, ["" if i is None else i for i in inputs], names, domain=domain or None,
                             **attributes)
        )
        return names[0] if outputs == 1 else tuple(names)

    def constant(self, array: np.ndarray) -> str:
        tensor = ir.serde.serialize_tensor(ir.tensor(np.array(array, order="C")))
        return self("Constant", value=tensor)

    def attribute_constant(self, attribute: str, kind: str = "value_int") -> str:
        """A ``Constant`` whose value is the function's attribute ``attribute`` (``@attribute``)."""
        attribute_type = {"value_int": onnx.AttributeProto.INT, "value_float": onnx.AttributeProto.FLOAT}[kind]
        name = self._name("Constant")
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(onnx.AttributeProto(name=kind, ref_attr_name=attribute, type=attribute_type))
        self.nodes.append(node)
        return name

    def rename_output(self, value: str, name: str) -> None:
        """Make the node that produced ``value`` write ``name`` instead (a function's formal output)."""
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == value:
                    node.output[i] = name
            for i, inp in enumerate(node.input):
                if inp == value:
                    node.input[i] = name
