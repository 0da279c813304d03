"""``qcompile.export.to_onnx``: a quantized model as an ONNX file that stock ONNX Runtime runs."""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxscript.optimizer
import torch

from qcompile.errors import ExportError

from .context import ExportContext
from .exportable import export_program, exportable_graph, graph_constants
from .naming import rename_axes
from .ort_contrib import ACCURACY_LEVELS
from .qcompile_domain import add_functions
from .registry import FLAVORS, TranslationTable, ops_needing_translation
from .softmax_nan_guard import drop_softmax_nan_guards
from .table import TRANSLATIONS
from .writer import check_destination, save_model

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "OnnxExport", "W8A8_ACTIVATIONS", "to_onnx"]

# Opset 21: DequantizeLinear with INT4/UINT4 and blocked scales (the "qdq" flavor; also the
# fallback of "ort"). ONNX Runtime runs opset 21 from 1.20 on.
DEFAULT_OPSET = 21
# The function bodies of the "qcompile" flavor use BitwiseAnd (opset 18); torch.onnx
# translates ATen ops from opset 18 on.
MIN_OPSET = 18
# ONNX IR version written: 10 (ONNX 1.16) is what ONNX Runtime 1.20 and later load; newer
# onnx packages default to a version older runtimes refuse.
IR_VERSION = 10


@dataclass
class OnnxExport:
    """What :func:`to_onnx` wrote."""

    path: Path
    flavor: str
    opset: int
    external_data: Path | None
    ops: dict[str, int]  # "domain.OpType" (default domain: "OpType") -> count
    initializer_bytes: int
    input_names: list[str]
    output_names: list[str]
    notes: list[str] = field(default_factory=list)


W8A8_ACTIVATIONS = ("per-token", "per-tensor")


def _validate(flavor: str, opset: int, accuracy_level: int | None, external_data: bool | None,
              w8a8_activations: str = "per-token") -> None:
    if flavor not in FLAVORS:
        raise ExportError(f"unknown ONNX flavor {flavor!r}; flavors: {', '.join(FLAVORS)}")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy_level must be None or one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    if accuracy_level is not None and flavor != "ort":
        raise ExportError(f"accuracy_level is an attribute of MatMulNBits, which only the 'ort' flavor writes "
                          f"(flavor={flavor!r})")
    if w8a8_activations not in W8A8_ACTIVATIONS:
        raise ExportError(f"w8a8_activations must be one of {W8A8_ACTIVATIONS}, got {w8a8_activations!r}")
    if w8a8_activations != "per-token" and flavor != "ort":
        raise ExportError(f"w8a8_activations={w8a8_activations!r} writes ONNX Runtime's DynamicQuantizeLinear + "
                          f"com.microsoft.MatMulIntegerToFloat, which only the 'ort' flavor writes (flavor={flavor!r})")
    if external_data not in (None, True, False):
        raise ExportError(f"external_data must be None, True or False, got {external_data!r}")


def _export_error(exc: BaseException) -> BaseException | None:
    """The ExportError a translation raised inside torch.onnx (torch wraps it), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ExportError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _torch_onnx_export(ep, table, graph, opset: int) -> ir.Model:
    # torch.onnx logs a warning per torchvision op it cannot register when torchvision is
    # absent, and warns about things it handles itself; neither concerns the user here.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                custom_translation_table=table,
                input_names=graph.input_names,
                output_names=graph.output_names,
                opset_version=opset,
                optimize=False,
                verbose=False,
            )
    except Exception as exc:  # re-raised: ours as it is, torch's with its first line
        ours = _export_error(exc)
        if ours is not None:  # raised by a translation; torch's wrappers add nothing to it
            raise ours.with_traceback(ours.__traceback__) from ours.__cause__
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {reason}") from exc
    finally:
        logger.setLevel(level)
    return program.model


# Element types of quantized weights: a node reading a 2-D constant of one of these is never
# constant-folded (folding DequantizeLinear or Cast of a small quantized weight would store a
# float copy of it in the file; large ones are already above onnxscript's folding size limit).
_QUANTIZED_DTYPES = frozenset({
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
    ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ,
})


def _keeps_quantized_weights(node: ir.Node) -> bool | None:
    """onnxscript's ``should_fold``: False for a node that reads a quantized 2-D constant, else its default."""
    for value in node.inputs:
        tensor = None if value is None else value.const_value
        if tensor is not None and tensor.dtype in _QUANTIZED_DTYPES and len(tensor.shape) >= 2:
            return False
    return None


def _optimize(model: ir.Model) -> None:
    """Constant folding, the attention Softmax's NaN guards where they cannot fire
    (:mod:`qcompile.export.softmax_nan_guard`), and dead-code removal, keeping functions (the
    qcompile domain) as calls."""
    # onnx_ir logs a warning for each constant that is also a graph output (a KV cache's
    # fixed window size, say) when deduplicating initializers: expected here, not news.
    logger = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize_ir(model, inline=False, should_fold=_keeps_quantized_weights)
    finally:
        logger.setLevel(level)
    drop_softmax_nan_guards(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.RemoveUnusedFunctionsPass()(model)
    ir.passes.common.RemoveUnusedOpsetsPass()(model)


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts = Counter(
        f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return dict(sorted(counts.items()))


def to_onnx(
    qm: Any,
    path: str | os.PathLike,
    *,
    flavor: str = "ort",
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    accuracy_level: int | None = None,
    w8a8_activations: str = "per-token",
    translations: TranslationTable | None = None,
) -> OnnxExport:
    """Write a quantized model as an ONNX file that stock ONNX Runtime runs.

    Args:
        qm: a :class:`qcompile.QuantizedModel` (``qcompile.quantize(...)``).
        path: the ``.onnx`` file to write; its folder must exist. Written atomically and
            checked with ``onnx.checker``; nothing is left behind on failure.
        flavor: how qcompile's ops are written:
            ``"ort"`` — ONNX Runtime contrib ops (``com.microsoft.MatMulNBits`` for 4- and
            8-bit weight-only linears, ``com.microsoft.MatMulIntegerToFloat`` for W8A8);
            ``"qdq"`` — standard ONNX only (``QuantizeLinear`` / ``DequantizeLinear`` +
            ``MatMul``, opset 21; FP8 linears are refused);
            ``"qcompile"`` — ``qcompile``-domain ops with ONNX function bodies.
        dynamic: keep the captured graph's symbolic dimensions dynamic (inputs named after
            the model's arguments, axes ``batch``, ``sequence``, ...); False fixes every
            size to the captured example's.
        opset: default-domain opset (>= 18; the "qdq" flavor and 4-bit fallbacks need 21,
            FP8 ops need 19).
        external_data: None writes weights to ``<path>.data`` only when the model would
            exceed protobuf's 2 GB limit; True always; False never (error if too large).
        accuracy_level: "ort" flavor only, MatMulNBits' ``accuracy_level`` attribute. None
            (default) omits it: ONNX Runtime computes with unquantized activations, as
            "a16" promises. 4 lets the CPU kernel quantize activations to int8 (faster,
            ~0.6% relative error per matmul). See :mod:`qcompile.export.ort_contrib`.
        w8a8_activations: "ort" flavor only, how a dynamic ``qcompile::linear_w8a8`` quantizes
            its input. ``"per-token"`` (default): the op's own numerics (symmetric int8, one
            scale per token), bit-identical to the torch op. ``"per-tensor"``: ONNX Runtime's
            dynamic quantization (``DynamicQuantizeLinear``: one asymmetric uint8 scale and
            zero point for the whole activation) with the per-channel scales and the bias
            applied inside ``com.microsoft.MatMulIntegerToFloat``; ONNX Runtime then runs
            the linear as fast as ``quantize_dynamic``'s, but the output is NOT the torch
            op's (coarser activation grid). Static (calibrated ``act_scale``) linears keep
            their exact form either way. See :mod:`qcompile.export.activation_ort`.
        translations: the translation table (default: qcompile's own; for tests and extensions).

    Returns an :class:`OnnxExport` with the op counts and notes (e.g. layers that fell back
    from MatMulNBits to DequantizeLinear + MatMul).
    """
    _validate(flavor, opset, accuracy_level, external_data, w8a8_activations)
    if not hasattr(qm, "graph_module") or not hasattr(qm, "captured"):
        raise ExportError(f"to_onnx expects a qcompile.QuantizedModel (from qcompile.quantize), got {type(qm).__name__}")
    path = check_destination(path)
    table_source = TRANSLATIONS if translations is None else translations
    ctx = ExportContext(flavor=flavor, opset=opset, accuracy_level=accuracy_level,
                        w8a8_activations=w8a8_activations)
    table = table_source.build(ops_needing_translation(qm.graph_module), ctx)

    graph = exportable_graph(qm, dynamic=dynamic)
    ep = export_program(graph)
    ctx.constants = graph_constants(ep)
    model = _torch_onnx_export(ep, table, graph, opset)
    ctx.add_initializers_to(model.graph)
    add_functions(model, ctx.functions, opset)
    _optimize(model)
    rename_axes(model, graph.axis_names)
    model.ir_version = min(model.ir_version, IR_VERSION)
    model.producer_name = "qcompile"
    model.metadata_props["qcompile.flavor"] = flavor
    report = getattr(qm, "report", None)
    recipe = getattr(report(), "recipe", None) if callable(report) else None
    if recipe is not None:
        model.metadata_props["qcompile.recipe"] = str(getattr(recipe, "name", recipe))

    ops = _op_counts(model)
    nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    written, data = save_model(model, path, external_data=external_data)
    return OnnxExport(
        path=written,
        flavor=flavor,
        opset=opset,
        external_data=data,
        ops=ops,
        initializer_bytes=nbytes,
        input_names=list(graph.input_names),
        output_names=list(graph.output_names),
        notes=list(ctx.notes),
    )
