"""Running an exported model in ONNX Runtime with stated numerics.

ONNX Runtime fuses ``DequantizeLinear`` + ``MatMul`` into MatMulNBits at its default
optimization level and then, by default, quantizes the activations to int8 inside it
(session config ``session.qdq_matmulnbits_accuracy_level``, default "4"): about 0.6%
relative error per matmul. :data:`EXACT_CONFIG` sets it to "0", which keeps activations
unquantized; parity tests use it. MatMulNBits nodes that qcompile writes ("ort" flavor)
carry their own ``accuracy_level`` attribute instead (see ``to_onnx``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .exportable import input_names

__all__ = ["EXACT_CONFIG", "session_options", "inference_session", "onnx_feeds"]

EXACT_CONFIG: Mapping[str, str] = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session_options(*, threads: int | None = None, exact: bool = True, config: Mapping[str, str] | None = None):
    """``onnxruntime.SessionOptions``: ``threads`` intra-op threads, :data:`EXACT_CONFIG` when ``exact``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    entries = dict(EXACT_CONFIG) if exact else {}
    entries.update(config or {})
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return options


def inference_session(
    path: str | os.PathLike,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    exact: bool = True,
    config: Mapping[str, str] | None = None,
):
    """An ``onnxruntime.InferenceSession`` on ``path`` (see :func:`session_options`)."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), session_options(threads=threads, exact=exact, config=config), providers=list(providers)
    )


def onnx_feeds(qm: Any, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The ONNX Runtime inputs (name -> array) for calling the exported ``qm`` as ``qm(*args, **kwargs)``."""
    flat = qm.captured.flatten_inputs(tuple(args), dict(kwargs or {}))
    tensors = [
        value
        for value, const in zip(flat, qm.captured.constant_inputs)
        if const is None and isinstance(value, torch.Tensor)
    ]
    names = input_names(qm)
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}
