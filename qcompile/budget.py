"""``qcompile.Budget``: the limits a per-layer precision choice must meet, validated data.

A recipe with ``budget=Budget(...)`` has ``passes/assign_precision.py`` choose each linear's
format (weights, and activations where a candidate quantizes them) among ``recipe.candidates`` (an integer linear program minimizing the summed
sensitivity) so that every limit given holds. The totals cover every quantizable linear,
including those pinned by ``keep_float``, ``min_in_features`` or ``precision_pins``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import RecipeError

__all__ = ["Budget", "SENSITIVITIES", "check_precision_fields"]

SENSITIVITIES = ("local", "hessian", "e2e")
_LOSSES = ("auto", "lm", "kl", "mse")


def _positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RecipeError(f"Budget.{name} must be a positive number or None, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """Limits on the quantizable linears; give at least one.

    Attributes:
        avg_bits: mean nominal bits per weight (a 3-bit grid counts 3 although it is stored
            in the 4-bit container; a layer kept float counts its dtype's width), weighted by
            parameter count.
        bytes: total stored weight bytes (codes, scales and zero points; float weights at
            their dtype's size).
        bops: total bit operations ``Σ M·N·K·bits_w·bits_a`` at the sizes below (``bits_a``
            16 for weight-only formats, 8 / 4 for candidates that quantize activations).
        latency_ms: total latency of the linears at the sizes below: a roofline on
            ``device`` (``qcompile.cost_model``), or measured on this machine.
        device: the device profile of ``latency_ms`` (``"cpu"`` or ``"h100"``), or
            ``"measured"``: each linear's op timed in each candidate format here
            (``qcompile.latency_table``).
        batch, seq: the sizes BOPs and latency are evaluated at; None: the example inputs'.
    """

    avg_bits: float | None = None
    bytes: float | None = None
    bops: float | None = None
    latency_ms: float | None = None
    device: str = "cpu"
    batch: int | None = None
    seq: int | None = None

    def __post_init__(self) -> None:
        from .cost_model import DEVICE_PROFILES

        for name in ("avg_bits", "bytes", "bops", "latency_ms"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        if all(getattr(self, n) is None for n in ("avg_bits", "bytes", "bops", "latency_ms")):
            raise RecipeError("a Budget needs at least one of avg_bits, bytes, bops, latency_ms")
        if self.device not in (*DEVICE_PROFILES, "measured"):
            raise RecipeError(f"Budget.device must be one of {sorted(DEVICE_PROFILES) + ['measured']}, "
                              f"got {self.device!r}")
        for name in ("batch", "seq"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RecipeError(f"Budget.{name} must be a positive integer or None, got {value!r}")

    def limits(self) -> dict[str, float]:
        """The limits given: name -> value."""
        return {n: getattr(self, n) for n in ("avg_bits", "bytes", "bops", "latency_ms") if getattr(self, n) is not None}


def check_precision_fields(recipe: Any) -> None:
    """Validate (and normalize) a Recipe's precision-choice fields in place."""
    from .weight_formats import CANDIDATE_NAMES

    budget = recipe.budget
    if isinstance(budget, dict):
        budget = Budget(**budget)
        object.__setattr__(recipe, "budget", budget)
    if budget is not None and not isinstance(budget, Budget):
        raise RecipeError(f"budget must be a qcompile.Budget, a dict of its fields or None, got {type(budget).__name__}")
    candidates = recipe.candidates
    if isinstance(candidates, (str, bytes)) or not candidates or any(c not in CANDIDATE_NAMES for c in candidates):
        raise RecipeError(f"candidates must be a non-empty tuple of {sorted(CANDIDATE_NAMES)}, got {candidates!r}")
    object.__setattr__(recipe, "candidates", tuple(dict.fromkeys(candidates)))
    pins = recipe.precision_pins
    if isinstance(pins, dict):
        pins = tuple(pins.items())
    pins = tuple(tuple(p) for p in pins)
    for pin in pins:
        if len(pin) != 2 or not isinstance(pin[0], str) or pin[1] not in CANDIDATE_NAMES:
            raise RecipeError(f"precision_pins entries are (layer glob, format in {sorted(CANDIDATE_NAMES)}), got {pin!r}")
    object.__setattr__(recipe, "precision_pins", pins)
    if recipe.sensitivity not in SENSITIVITIES:
        raise RecipeError(f"sensitivity must be one of {SENSITIVITIES}, got {recipe.sensitivity!r}")
    if recipe.sensitivity_loss not in _LOSSES:
        raise RecipeError(f"sensitivity_loss must be one of {_LOSSES}, got {recipe.sensitivity_loss!r}")
    samples = recipe.hutchinson_samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise RecipeError(f"hutchinson_samples must be an integer >= 2, got {samples!r}")
    if budget is None:
        if pins:
            raise RecipeError("precision_pins only apply with a budget (the per-layer precision choice)")
        return
    if recipe.activation_bits != 16:
        raise RecipeError(
            "a budget chooses each layer's activation format among its candidates (e.g. 'w8a8', 'w4a8'): "
            f"it needs activation_bits=16, got {recipe.activation_bits}")
    if any(CANDIDATE_NAMES[c][0] in (3, 4) for c in recipe.candidates) and recipe.group_size is not None \
            and recipe.group_size % 2:
        raise RecipeError(f"3/4-bit candidates need an even group_size, got {recipe.group_size}")
