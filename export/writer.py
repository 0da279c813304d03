"""Writing an ONNX model atomically, checked, with external data when it must.

:func:`save_model` writes into a private temporary folder inside the target folder, runs
``onnx.checker.check_model`` on the written file (by path, which also works for models
with external data over 2 GB), and only then moves the result into place (the external
data file first, the model file last, each with an atomic rename). On any failure the
temporary folder is removed and nothing is left behind.

ONNX files are protocol buffers, limited to 2 GB. Weights go to an external data file
``<name>.data`` next to the model when ``external_data=True``, or, with the default
``external_data=None``, when the model's tensors would not fit; ``external_data=False``
on a model that does not fit is an error.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from qcompile.errors import ExportError

__all__ = ["PROTOBUF_LIMIT", "check_destination", "model_nbytes", "needs_external_data", "save_model"]

# The protobuf limit on one serialized message (onnx.checker.MAXIMUM_PROTOBUF, 2 GiB).
PROTOBUF_LIMIT = getattr(onnx.checker, "MAXIMUM_PROTOBUF", 2**31)
# Room left for the graph structure, names and attributes besides the tensors.
_HEADROOM = 64 * 2**20


def check_destination(path: str | os.PathLike) -> Path:
    """The output path as a Path; ExportError if its folder is missing or it is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write the ONNX model to {path}: it is a folder; give a file path such as {path / 'model.onnx'}")
    if not path.parent.is_dir():
        raise ExportError(
            f"cannot write the ONNX model to {path}: the folder {path.parent} does not exist; create it first"
        )
    return path


def _tensor_nbytes(tensor: ir.TensorProtocol) -> int:
    nbytes = getattr(tensor, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    return len(tensor.tobytes())


def model_nbytes(model: ir.Model) -> int:
    """Bytes of tensor data the model holds (initializers and constant attributes)."""
    total = sum(_tensor_nbytes(v.const_value) for v in model.graph.initializers.values() if v.const_value is not None)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.TENSOR:
                total += _tensor_nbytes(attr.value)
    return total


def needs_external_data(model: ir.Model, external_data: bool | None) -> bool:
    """Whether to write the tensors to an external file (ExportError for ``False`` on a too-large model)."""
    nbytes = model_nbytes(model)
    too_large = nbytes > PROTOBUF_LIMIT - _HEADROOM
    if external_data is None:
        return too_large
    if not external_data and too_large:
        raise ExportError(
            f"the model holds {nbytes / 2**30:.2f} GiB of tensors, more than fits in one ONNX file "
            f"(protobuf's 2 GiB limit); export with external_data=True (or leave it unset) to write the "
            "weights to a separate .data file"
        )
    return bool(external_data)


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> tuple[Path, Path | None]:
    """Write ``model`` to ``path`` atomically and checked; return (model path, data path or None)."""
    path = check_destination(path)
    external = needs_external_data(model, external_data)
    data_name = f"{path.name}.data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    moved_data: Path | None = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp_model = tmp / path.name
        if external:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            ir.save(model, tmp_model)
        try:
            onnx.checker.check_model(str(tmp_model))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported model fails onnx.checker, so {path} was not written: {exc}") from exc
        tmp_model.chmod(0o666 & ~umask)
        if external:
            (tmp / data_name).chmod(0o666 & ~umask)
            moved_data = path.parent / data_name
            os.replace(tmp / data_name, moved_data)
        os.replace(tmp_model, path)
    except BaseException:
        if moved_data is not None and moved_data.exists():
            moved_data.unlink()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, moved_data
