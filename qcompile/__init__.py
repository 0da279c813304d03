"""qcompile — a graph-level quantization compiler for PyTorch.

    qm = qcompile.quantize(model, args, kwargs=None, recipe="w4a16", calibration=batches)
    qm(*args, **kwargs); print(qm.report()); qm.graph_module
    torch.compile(model, backend="qcompile", options={"recipe": "w4a16"})
    qm = qcompile.load_streamed(out)   # the output of qcompile.streaming.quantize_checkpoint
"""
from __future__ import annotations

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
    VerificationError,
)
from .recipe import PRESETS, Recipe, resolve_recipe
from .streamed_model import load_streamed

__version__ = "0.1.0"

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
    "VerificationError",
    "load_streamed",
    "quantize",
    "resolve_recipe",
    "testing",
]
