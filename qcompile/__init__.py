"""qcompile — a graph-level quantization compiler for PyTorch.

    qm = qcompile.quantize(model, args, kwargs=None, recipe="w4a16", calibration=batches)
    qm(*args, **kwargs); print(qm.report()); qm.graph_module
    torch.compile(model, backend="qcompile", options={"recipe": "w4a16"})
    qm = qcompile.load_streamed(out)   # the output of qcompile.streaming.quantize_checkpoint
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from . import kernels  # noqa: F401  (registers the qcompile:: ops)
from . import testing
from .api import QuantizedModel, quantize
from .budget import Budget
from .precision_ilp import BudgetInfeasibleError
from .errors import (
    CalibrationError,
    CaptureError,
    InputMismatchError,
    OutputExistsError,
    QcompileError,
    RecipeError,
    ReplayError,
    VerificationError,
)
from .recipe import PRESETS, Recipe, resolve_recipe
from .streamed_model import load_streamed

__version__ = "0.1.0"


def __getattr__(name: str):
    """Submodules on first use (``qcompile.export.to_onnx``, ``qcompile.lm_eval``, ...), so that
    ``import qcompile`` alone gives access to all of them without importing onnx, onnxscript
    or transformers up front."""
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    submodules = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return sorted(set(globals()) | submodules | {"export", "kernels", "passes"})

__all__ = [
    "PRESETS",
    "Budget",
    "BudgetInfeasibleError",
    "CalibrationError",
    "CaptureError",
    "InputMismatchError",
    "OutputExistsError",
    "QcompileError",
    "QuantizedModel",
    "Recipe",
    "RecipeError",
    "ReplayError",
    "VerificationError",
    "load_streamed",
    "quantize",
    "resolve_recipe",
    "testing",
]
