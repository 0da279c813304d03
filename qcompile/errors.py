"""Exceptions a user can act on.

Every error qcompile raises on purpose derives from :class:`QcompileError`, names what
went wrong (the node, the op, the layer, the input) and, where there is one, says what to
do instead. Errors from torch are chained (``raise ... from exc``), never swallowed.
"""
from __future__ import annotations

__all__ = [
    "QcompileError",
    "CaptureError",
    "RecipeError",
    "CalibrationError",
    "InputMismatchError",
    "VerificationError",
    "OutputExistsError",
    "ModelLoadError",
    "ExportError",
    "ReplayError",
]


class QcompileError(Exception):
    """Base class of all qcompile errors."""


class CaptureError(QcompileError):
    """The model could not be captured as a graph (torch.export failed)."""


class RecipeError(QcompileError, ValueError):
    """A recipe is unknown or malformed."""


class CalibrationError(QcompileError, ValueError):
    """Calibration data does not match the model's inputs, or holds NaN/Inf."""


class InputMismatchError(QcompileError, TypeError):
    """A quantized model was called with inputs whose structure differs from the captured ones."""


class VerificationError(QcompileError):
    """A pass broke the graph, its metadata, or (for function-preserving passes) its function."""


class OutputExistsError(QcompileError, FileExistsError):
    """An output folder already exists and would be overwritten."""


class ModelLoadError(QcompileError):
    """A model named on the command line cannot be loaded."""


class ExportError(QcompileError):
    """A quantized model cannot be written to the requested format (an op without a
    translation for the chosen flavor, a path in a missing folder, a model too large for
    the requested storage)."""


class ReplayError(QcompileError):
    """A graph of a model (e.g. the decode step of generation) does not match the choices
    recorded while quantizing the model's first graph: another weight, another linear."""
