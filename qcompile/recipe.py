"""Recipes: what to quantize and how, as validated data; named presets are data too."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .errors import RecipeError

_WEIGHT_BITS = (4, 8)
_METHODS = ("rtn",)


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model.

    Attributes:
        name: a label for reports.
        weight_bits: 8 or 4 (INT8 weights, or INT4 packed two per byte).
        group_size: weights share one scale per ``group_size`` input channels; ``None``
            means one scale per output channel. A layer whose in-features the group size
            does not divide falls back to per-channel, and the report says so.
        symmetric: symmetric (zero point fixed) or asymmetric (per-group zero point) grid.
        activation_bits: 16 — activations stay in 16-bit floating point (the fast CPU
            kernels compute in bfloat16).
        method: weight rounding, ``"rtn"`` (round to nearest).
        clip_ratios: weight range search: per group, shrink the grid's range by each ratio
            and keep the one with the least squared rounding error (still round-to-nearest;
            ``()`` = plain min/max). The w4a16 preset searches ``CLIP_SEARCH``.
        keep_float: glob patterns of layer names (the weight's source name without
            ``.weight``, e.g. ``"lm_head"`` or ``"*.attention.*"``) left in floating point.
        min_in_features: linears with fewer input features stay in floating point.
    """

    name: str = "custom"
    weight_bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    activation_bits: int = 16
    method: str = "rtn"
    clip_ratios: tuple[float, ...] = ()
    keep_float: tuple[str, ...] = ()
    min_in_features: int = 1

    def __post_init__(self) -> None:
        if self.weight_bits not in _WEIGHT_BITS:
            raise RecipeError(f"weight_bits must be one of {_WEIGHT_BITS}, got {self.weight_bits!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2
        ):
            raise RecipeError(f"group_size must be an integer >= 2 or None (per-channel), got {self.group_size!r}")
        if self.group_size is not None and self.weight_bits == 4 and self.group_size % 2:
            raise RecipeError(f"4-bit groups must hold an even number of channels, got group_size={self.group_size}")
        if self.activation_bits != 16:
            raise RecipeError(
                f"activation_bits={self.activation_bits!r}: this recipe family keeps activations in 16-bit; "
                "set activation_bits=16"
            )
        if self.method not in _METHODS:
            raise RecipeError(f"method must be one of {_METHODS}, got {self.method!r}")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"symmetric must be True or False, got {self.symmetric!r}")
        if isinstance(self.clip_ratios, (str, bytes)) or not all(
            isinstance(r, (int, float)) and 0.0 < r <= 1.0 for r in self.clip_ratios
        ):
            raise RecipeError(f"clip_ratios must be numbers in (0, 1], got {self.clip_ratios!r}")
        object.__setattr__(self, "clip_ratios", tuple(float(r) for r in self.clip_ratios))
        if isinstance(self.keep_float, str) or not all(isinstance(p, str) for p in self.keep_float):
            raise RecipeError(f"keep_float must be a tuple of glob patterns, got {self.keep_float!r}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if not isinstance(self.min_in_features, int) or self.min_in_features < 1:
            raise RecipeError(f"min_in_features must be a positive integer, got {self.min_in_features!r}")

    def keeps_float(self, layer: str) -> bool:
        return any(fnmatch.fnmatchcase(layer, pattern) for pattern in self.keep_float)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @property
    def weight_format(self) -> str:
        return f"w{self.weight_bits}a{self.activation_bits}"


# Range ratios searched by the 4-bit presets: 1.0 down to 0.62 in steps of 0.02.
CLIP_SEARCH = tuple(round(1.0 - 0.02 * i, 2) for i in range(20))

PRESETS: dict[str, Recipe] = {
    "w8a16": Recipe(name="w8a16", weight_bits=8, group_size=None, symmetric=True),
    "w4a16": Recipe(name="w4a16", weight_bits=4, group_size=128, symmetric=False, clip_ratios=CLIP_SEARCH),
}

DEFAULT_PRESET = "w8a16"


def resolve_recipe(recipe: "str | Recipe | dict[str, Any] | None") -> Recipe:
    """A Recipe from a preset name, a Recipe, or a dict of fields (optionally with ``preset``)."""
    if recipe is None:
        return PRESETS[DEFAULT_PRESET]
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise RecipeError(f"unknown recipe {recipe!r}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[recipe]
    if isinstance(recipe, dict):
        fields = dict(recipe)
        base = resolve_recipe(fields.pop("preset", None)) if "preset" in fields else Recipe()
        for key in ("keep_float", "clip_ratios"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        return base.replace(**fields)
    raise RecipeError(f"a recipe is a preset name, a qcompile.Recipe or a dict, got {type(recipe).__name__}")
