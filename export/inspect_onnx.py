"""What an ONNX file holds: ops by domain and tensor bytes by dtype (``qcompile inspect model.onnx``).

Reads the graph only (``load_external_data=False``), so it is quick on large models; the
bytes of external tensors come from their ``length`` entries.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

__all__ = ["OnnxSummary", "summarize_onnx", "format_summary"]

_SUBBYTE = {onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5}
for _name in ("FLOAT4E2M1",):
    if hasattr(onnx.TensorProto, _name):
        _SUBBYTE[getattr(onnx.TensorProto, _name)] = 0.5


@dataclass
class OnnxSummary:
    path: Path
    ir_version: int
    opsets: dict[str, int]
    producer: str
    metadata: dict[str, str]
    inputs: list[tuple[str, str, list]]  # (name, dtype, shape)
    outputs: list[tuple[str, str, list]]
    ops_by_domain: dict[str, Counter] = field(default_factory=dict)
    functions: list[str] = field(default_factory=list)
    bytes_by_dtype: dict[str, tuple[int, int]] = field(default_factory=dict)  # dtype -> (tensors, bytes)
    external_data: bool = False


def _dtype_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        if "length" in entries:
            return int(entries["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    numel = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type in _SUBBYTE:
        return -(-numel // 2)
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return numel * itemsize


def _value_info(value: onnx.ValueInfoProto) -> tuple[str, str, list]:
    t = value.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in t.shape.dim]
    return value.name, _dtype_name(t.elem_type), dims


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def summarize_onnx(path: str | os.PathLike) -> OnnxSummary:
    """Read ``path`` (graph only) and count its ops and tensor bytes."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    summary = OnnxSummary(
        path=path,
        ir_version=model.ir_version,
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        producer=model.producer_name,
        metadata={p.key: p.value for p in model.metadata_props},
        inputs=[_value_info(v) for v in model.graph.input],
        outputs=[_value_info(v) for v in model.graph.output],
        functions=[f"{f.domain}.{f.name}" for f in model.functions],
    )
    by_dtype: dict[str, list[int]] = {}
    for graph in _graphs(model.graph):
        for node in graph.node:
            summary.ops_by_domain.setdefault(node.domain or "ai.onnx", Counter())[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    entry = by_dtype.setdefault(_dtype_name(attr.t.data_type), [0, 0])
                    entry[0] += 1
                    entry[1] += _tensor_bytes(attr.t)
        for tensor in graph.initializer:
            entry = by_dtype.setdefault(_dtype_name(tensor.data_type), [0, 0])
            entry[0] += 1
            entry[1] += _tensor_bytes(tensor)
            summary.external_data |= tensor.data_location == onnx.TensorProto.EXTERNAL
    summary.bytes_by_dtype = {k: (v[0], v[1]) for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1][1])}
    return summary


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def format_summary(summary: OnnxSummary) -> str:
    """A readable report of :func:`summarize_onnx`."""
    lines = [f"{summary.path}  (IR {summary.ir_version}, producer {summary.producer or '?'}, opsets "
             + ", ".join(f"{d} {v}" for d, v in sorted(summary.opsets.items())) + ")"]
    for key, value in sorted(summary.metadata.items()):
        lines.append(f"  {key}: {value}")
    lines.append("inputs:")
    lines += [f"  {name:<32} {dtype:<8} {shape}" for name, dtype, shape in summary.inputs]
    lines.append("outputs:")
    lines += [f"  {name:<32} {dtype:<8} {shape}" for name, dtype, shape in summary.outputs]
    lines.append("ops by domain:")
    for domain in sorted(summary.ops_by_domain):
        counts = summary.ops_by_domain[domain]
        lines.append(f"  {domain} ({sum(counts.values())} nodes)")
        lines += [f"    {op:<30} {n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if summary.functions:
        lines.append("functions: " + ", ".join(summary.functions))
    total = sum(b for _, b in summary.bytes_by_dtype.values())
    where = " (external data)" if summary.external_data else ""
    lines.append(f"tensor bytes by dtype{where}: {_human(total)} in all")
    for dtype, (count, nbytes) in summary.bytes_by_dtype.items():
        share = 100.0 * nbytes / total if total else 0.0
        lines.append(f"  {dtype:<10} {count:>5} tensors {_human(nbytes):>10}  {share:5.1f}%")
    return "\n".join(lines)
