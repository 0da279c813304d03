"""Recipes: what to quantize and how, as validated data; named presets are data too."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from .budget import Budget, check_precision_fields
from .errors import RecipeError

__all__ = [
    "Recipe",
    "CLIP_SEARCH",
    "SMOOTH_SEARCH",
    "AWQ_SEARCH",
    "PRESETS",
    "DEFAULT_PRESET",
    "resolve_recipe",
]

_WEIGHT_BITS = (3, 4, 8)
_ACTIVATION_BITS = (16, 8, 4)
_ACTIVATION_FORMATS = ("int", "fp8")
_ACTIVATION_SCALES = ("dynamic", "static")
_SMOOTH = ("off", "alpha", "search")
_SMOOTH_OBJECTIVES = ("group", "stage")
_ROTATE = ("off", "input", "residual")
_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model.

    Attributes:
        name: a label for reports.
        weight_bits: 8, 4 or 3 (INT8 weights; INT4 packed two per byte; a 3-bit grid, codes
            0..7, stored in the same packed 4-bit container, so it runs on the 4-bit kernels
            and exports like INT4 — no smaller, but 3-bit-accurate for comparisons).
        group_size: weights share one scale per ``group_size`` input channels; ``None``
            means one scale per output channel. A layer whose in-features the group size
            does not divide falls back to per-channel, and the report says so.
        symmetric: symmetric (zero point fixed) or asymmetric (per-group zero point) grid.
        activation_bits: 16 — activations stay in 16-bit floating point (the fast CPU
            kernels compute in bfloat16); 8 — activations are quantized per token inside
            each linear: with 8-bit weights (``qcompile::linear_w8a8`` / ``linear_fp8``)
            these must be symmetric per-channel (``group_size=None, symmetric=True``); with
            4-bit (or 3-bit) group-wise weights, ``qcompile::linear_w4a8``; 4 — per-token
            INT4 activations with 4-bit (or 3-bit) weights, ``qcompile::linear_w4a4``.
        activation_format: with 8-bit activations: ``"int"`` (INT8 weights and activations,
            int32 accumulation) or ``"fp8"`` (float8 e4m3 weights and activations).
        activation_scale: with INT8 activations: ``"dynamic"`` (one scale per token,
            computed on the fly) or ``"static"`` (one scale per tensor, from calibration).
        smooth: SmoothQuant/AWQ smoothing of each group of linears that read one activation
            (found from the graph; see ``passes/fold_smoothing.py``): ``"off"``,
            ``"alpha"`` (scale ``max|X|^α / max|W|^(1-α)`` with ``smooth_alpha``) or
            ``"search"`` (per group, the α of ``smooth_alphas`` — or none — with the least
            quantized output error on calibration data). Needs calibration.
        smooth_objective: what ``smooth="search"`` minimizes per group: ``"group"`` — the
            quantized output error of the group's own linears on sampled calibration rows —
            or ``"stage"`` — the error of the outputs of the whole stage holding the group
            (``qcompile.stages``: a transformer layer, so attention, FFN and norms count;
            each token's error relative to its norm), run on the calibration batches with
            the group's weights fake-quantized
            (``qcompile.stage_smoothing``); weight-only recipes without rotations only. A
            group whose linears span two stages, or a graph with no stage cut, keeps
            ``"group"`` (the report row says why).
        smooth_alpha: α for ``smooth="alpha"`` (SmoothQuant's migration strength).
        smooth_alphas: the grid ``smooth="search"`` tries.
        smooth_online: where no op upstream can absorb a group's scale, apply it online
            (an explicit per-channel multiply that the activation-quantizing op absorbs;
            with 16-bit activations it stays a multiply) instead of leaving the group
            unsmoothed.
        rotate: Hadamard rotations (QuaRot-style; ``passes/insert_rotations.py``):
            ``"off"``, or ``"input"`` — every activation that quantized linears read is
            rotated online (``qcompile::hadamard``) and their weights are rotated to match
            (``(X Q)(W Q)ᵀ = X Wᵀ``), which spreads outlier channels before quantization; or
            ``"residual"`` — as QuaRot does for pre-norm decoders: the residual stream is
            carried rotated (embeddings, every linear reading or writing it and the norms'
            weights folded offline, ``passes/rotate_residual.py``), so the linears reading it
            need no online op; the other quantized linears (attention output, MLP down
            projection) get online input rotations as with ``"input"``. Where no stream can
            be rotated (post-norm encoders, LayerNorm models) every linear gets the
            ``"input"`` treatment and the report's notes say why.
        rotation_seed: seed of the rotations' random signs.
        method: weight rounding, ``"rtn"`` (round to nearest) or ``"gptq"`` (GPTQ: columns
            rounded one at a time, each one's error compensated on the columns not yet
            rounded through the inverse Hessian of the layer's calibration inputs,
            ``H = Σ x xᵀ``; see ``qcompile.gptq``). GPTQ needs calibration data. With
            ``clip_ratios`` the group grids are range-searched first (weighted by diag H
            when ``clip_objective="output"``).
        gptq_damp: GPTQ's dampening, added to the Hessian's diagonal as a fraction of its
            mean; raised tenfold (with a warning) while the Cholesky factorization fails.
        gptq_act_order: GPTQ rounds columns in order of decreasing ``H_ii`` (activation
            order) instead of column order.
        gptq_static_groups: with activation order and groups: ``True`` — every group's grid
            is fixed from the weight before rounding and columns are visited in global
            activation order; ``False`` — groups are visited in order of decreasing
            ``Σ H_ii``, the columns of a group together (by ``H_ii``), and each group's grid
            is chosen from the compensated weights when reached. Without activation order
            grids are always chosen as reached (standard GPTQ).
        gptq_block_size: columns per lazy batch update (speed only; results agree to
            rounding error).
        sequential: calibrate stage by stage (``qcompile.stages``: the graph cut into its
            layers at single-tensor cut points): each stage's statistics/Hessians come from
            the outputs of the *already quantized* earlier stages, so later layers are
            rounded against what they will really see (as GPTQ's reference code does).
            Weight-only recipes only. Streaming quantization (``qcompile.streaming``) is
            always sequential; with ``sequential=True`` the in-memory path gives the same
            weights.
        clip_ratios: weight range search: per group, shrink the grid's range by each ratio
            and keep the one with the least squared rounding error (still round-to-nearest;
            ``()`` = plain min/max). The w4a16 preset searches ``CLIP_SEARCH``.
        clip_objective: what the range search minimizes: ``"output"`` — the weight error
            weighted per input channel by E[x²] over the calibration inputs (an estimate of
            the output error; plain weight error when no calibration is given) —,
            ``"hessian"`` — the group's exact output error on the calibration inputs,
            ``Δ H_g Δᵀ`` with H_g the group's block of ``Σ x xᵀ`` (AWQ's ``auto_clip``
            objective; needs calibration) — or ``"weight"`` — the plain squared weight error.
        keep_float: glob patterns of layer names (the weight's source name without
            ``.weight``, e.g. ``"lm_head"`` or ``"*.attention.*"``) left in floating point.
        min_in_features: linears with fewer input features stay in floating point.
        budget: a :class:`qcompile.Budget` (or a dict of its fields): each linear's format
            is then chosen per layer among ``candidates`` by an integer linear program
            (``passes/assign_precision.py``) minimizing the summed sensitivity under the
            budget; ``weight_bits`` is then only the default of layers the choice skips.
            Needs calibration data and ``activation_bits=16`` (activation formats are
            chosen per layer through the candidates).
        candidates: the formats a budget chooses from: ``"w3"`` / ``"w4"`` (3- / 4-bit grids
            with ``group_size`` and ``symmetric``, in the 4-bit container), ``"w8"`` (int8
            per-channel symmetric), ``"float"`` (kept in floating point) — these keep 16-bit
            activations — and ``"w8a8"``, ``"w4a8"``, ``"w4a4"`` (the same weights with the
            input quantized per token to INT8 / INT4). Linears reading one activation get the
            same activation width.
        sensitivity: how Ω is measured (``qcompile.sensitivity``): ``"hessian"`` (default;
            HAWQ: Hutchinson trace of the loss Hessian · ‖ΔW‖² / n), ``"local"`` (layer
            output error ``tr(ΔW H_x ΔWᵀ)``: cheaper, no backward pass, but blind to how
            much the rest of the network amplifies a layer's error) or ``"e2e"`` (measured
            loss increase, one layer at a time).
        sensitivity_loss: the loss of ``"hessian"`` / ``"e2e"``: ``"auto"``, ``"lm"``, ``"kl"``
            or ``"mse"`` (see ``qcompile.hessian_trace``).
        hutchinson_samples: Hessian-vector products of the ``"hessian"`` estimate.
        precision_pins: ``((layer glob, format), ...)``: layers whose format the budget does
            not choose (they still count in its totals).
    """

    name: str = "custom"
    weight_bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    activation_bits: int = 16
    activation_format: str = "int"
    activation_scale: str = "dynamic"
    smooth: str = "off"
    smooth_alpha: float = 0.5
    smooth_objective: str = "group"
    smooth_alphas: tuple[float, ...] = ()
    smooth_online: bool = True
    rotate: str = "off"
    rotation_seed: int = 0
    method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_static_groups: bool = True
    gptq_block_size: int = 128
    sequential: bool = False
    clip_ratios: tuple[float, ...] = ()
    clip_objective: str = "output"
    keep_float: tuple[str, ...] = ()
    min_in_features: int = 1
    budget: Budget | None = None
    candidates: tuple[str, ...] = ("w3", "w4", "w8")
    sensitivity: str = "hessian"
    sensitivity_loss: str = "auto"
    hutchinson_samples: int = 16
    precision_pins: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.weight_bits not in _WEIGHT_BITS:
            raise RecipeError(f"weight_bits must be one of {_WEIGHT_BITS}, got {self.weight_bits!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2
        ):
            raise RecipeError(f"group_size must be an integer >= 2 or None (per-channel), got {self.group_size!r}")
        if self.group_size is not None and self.weight_bits in (3, 4) and self.group_size % 2:
            raise RecipeError(
                f"{self.weight_bits}-bit groups (packed two per byte) must hold an even number of channels, "
                f"got group_size={self.group_size}"
            )
        self._check_activations()
        self._check_smoothing()
        self._check_rotation()
        self._check_method()
        check_precision_fields(self)
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"symmetric must be True or False, got {self.symmetric!r}")
        if isinstance(self.clip_ratios, (str, bytes)) or not all(
            isinstance(r, (int, float)) and 0.0 < r <= 1.0 for r in self.clip_ratios
        ):
            raise RecipeError(f"clip_ratios must be numbers in (0, 1], got {self.clip_ratios!r}")
        object.__setattr__(self, "clip_ratios", tuple(float(r) for r in self.clip_ratios))
        if self.clip_objective not in ("output", "hessian", "weight"):
            raise RecipeError(f'clip_objective must be "output", "hessian" or "weight", got {self.clip_objective!r}')
        if isinstance(self.keep_float, str) or not all(isinstance(p, str) for p in self.keep_float):
            raise RecipeError(f"keep_float must be a tuple of glob patterns, got {self.keep_float!r}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if not isinstance(self.min_in_features, int) or self.min_in_features < 1:
            raise RecipeError(f"min_in_features must be a positive integer, got {self.min_in_features!r}")

    def _check_activations(self) -> None:
        if self.activation_bits not in _ACTIVATION_BITS:
            raise RecipeError(f"activation_bits must be one of {_ACTIVATION_BITS}, got {self.activation_bits!r}")
        if self.activation_format not in _ACTIVATION_FORMATS:
            raise RecipeError(f"activation_format must be one of {_ACTIVATION_FORMATS}, got {self.activation_format!r}")
        if self.activation_scale not in _ACTIVATION_SCALES:
            raise RecipeError(f"activation_scale must be one of {_ACTIVATION_SCALES}, got {self.activation_scale!r}")
        if self.activation_bits == 16:
            if self.activation_format != "int" or self.activation_scale != "dynamic":
                raise RecipeError(
                    "activation_format and activation_scale apply to quantized activations; "
                    "this recipe has activation_bits=16 (set activation_bits=8 to quantize activations)"
                )
            return
        if self.weight_bits in (3, 4):
            # qcompile::linear_w4a8 / linear_w4a4: 4-bit (or 3-bit) group-wise weights,
            # dynamic per-token integer activations
            if self.activation_format != "int" or self.activation_scale != "dynamic":
                raise RecipeError(
                    f"{self.weight_bits}-bit weights with {self.activation_bits}-bit activations need dynamic per-token "
                    f'integer activations (activation_format="int", activation_scale="dynamic"); got '
                    f"{self.activation_format!r} / {self.activation_scale!r}"
                )
            return
        if self.activation_bits == 4:
            raise RecipeError(f"4-bit activations need 4-bit (or 3-bit) weights, got weight_bits={self.weight_bits}")
        if self.group_size is not None or not self.symmetric:
            raise RecipeError(
                "8-bit activations with 8-bit weights need symmetric per-channel weights (group_size=None, "
                f"symmetric=True); got group_size={self.group_size}, symmetric={self.symmetric}"
            )
        if self.activation_format == "fp8" and self.activation_scale != "dynamic":
            raise RecipeError('fp8 activations are scaled per token: activation_scale must be "dynamic"')
        if self.activation_format == "fp8" and self.clip_ratios:
            raise RecipeError("clip_ratios (range search) applies to integer weights, not fp8")

    def _check_method(self) -> None:
        if not isinstance(self.sequential, bool):
            raise RecipeError(f"sequential must be True or False, got {self.sequential!r}")
        if self.sequential and self.activation_bits != 16:
            raise RecipeError("sequential calibration feeds each stage the previous stages' quantized outputs with "
                              f"float activations: it needs a weight-only recipe, got activation_bits={self.activation_bits}")
        if self.method not in _METHODS:
            raise RecipeError(f"method must be one of {_METHODS}, got {self.method!r}")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) or not (
            0.0 < self.gptq_damp <= 1.0
        ):
            raise RecipeError(f"gptq_damp must be a number in (0, 1] (a fraction of mean diag H), got {self.gptq_damp!r}")
        object.__setattr__(self, "gptq_damp", float(self.gptq_damp))
        if not isinstance(self.gptq_act_order, bool):
            raise RecipeError(f"gptq_act_order must be True or False, got {self.gptq_act_order!r}")
        if not isinstance(self.gptq_static_groups, bool):
            raise RecipeError(f"gptq_static_groups must be True or False, got {self.gptq_static_groups!r}")
        if isinstance(self.gptq_block_size, bool) or not isinstance(self.gptq_block_size, int) or self.gptq_block_size < 1:
            raise RecipeError(f"gptq_block_size must be a positive integer, got {self.gptq_block_size!r}")
        if self.method == "gptq" and self.activation_bits == 8 and self.activation_format == "fp8":
            raise RecipeError('method="gptq" rounds integer weights; fp8 weights are cast, not rounded: use method="rtn"')

    def _check_rotation(self) -> None:
        if self.rotate not in _ROTATE:
            raise RecipeError(f"rotate must be one of {_ROTATE}, got {self.rotate!r}")
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int) or self.rotation_seed < 0:
            raise RecipeError(f"rotation_seed must be a non-negative integer, got {self.rotation_seed!r}")

    def _check_smoothing(self) -> None:
        if self.smooth not in _SMOOTH:
            raise RecipeError(f"smooth must be one of {_SMOOTH}, got {self.smooth!r}")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) or not (
            0.0 <= self.smooth_alpha <= 1.0
        ):
            raise RecipeError(f"smooth_alpha must be a number in [0, 1], got {self.smooth_alpha!r}")
        object.__setattr__(self, "smooth_alpha", float(self.smooth_alpha))
        alphas = self.smooth_alphas or (SMOOTH_SEARCH if self.smooth == "search" else ())
        if isinstance(alphas, (str, bytes)) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in alphas
        ):
            raise RecipeError(f"smooth_alphas must be numbers in [0, 1], got {self.smooth_alphas!r}")
        object.__setattr__(self, "smooth_alphas", tuple(float(a) for a in alphas))
        if not isinstance(self.smooth_online, bool):
            raise RecipeError(f"smooth_online must be True or False, got {self.smooth_online!r}")
        if self.smooth_objective not in _SMOOTH_OBJECTIVES:
            raise RecipeError(f"smooth_objective must be one of {_SMOOTH_OBJECTIVES}, got {self.smooth_objective!r}")
        if self.smooth_objective == "stage":
            if self.smooth != "search":
                raise RecipeError(f'smooth_objective="stage" scores the candidates of smooth="search", got smooth={self.smooth!r}')
            if self.activation_bits != 16:
                raise RecipeError('smooth_objective="stage" fake-quantizes weights only: it needs activation_bits=16, '
                                  f"got {self.activation_bits}")
            if self.rotate != "off":
                raise RecipeError(f'smooth_objective="stage" does not model rotations: it needs rotate="off", got {self.rotate!r}')

    @property
    def needs_calibration(self) -> str:
        """Why this recipe needs calibration data ('' if it does not)."""
        reasons = []
        if self.smooth != "off":
            reasons.append(f'smooth="{self.smooth}" computes scales from activation statistics')
        if self.activation_bits == 8 and self.activation_scale == "static":
            reasons.append("static activation scales come from calibration")
        if self.method == "gptq":
            reasons.append('method="gptq" needs the Hessian (Σ x xᵀ) of every linear\'s inputs')
        if self.clip_ratios and self.clip_objective == "hessian":
            reasons.append('clip_objective="hessian" weighs the range search by Σ x xᵀ of each linear\'s inputs')
        if self.budget is not None:
            reasons.append("a budget's per-layer precision choice measures each layer's sensitivity on calibration data")
        return "; ".join(reasons)

    def float_reason(self, layer: str, in_features: int) -> str:
        """Why a linear stays in floating point under this recipe ('' if it is quantized)."""
        if self.keeps_float(layer):
            return "kept float by recipe.keep_float"
        if in_features < self.min_in_features:
            return f"in_features < {self.min_in_features}"
        return ""

    def keeps_float(self, layer: str) -> bool:
        return any(fnmatch.fnmatchcase(layer, pattern) for pattern in self.keep_float)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @property
    def weight_storage_bits(self) -> int:
        """Bits of the weight container: 3-bit grids are stored as 4-bit codes."""
        return 4 if self.weight_bits == 3 else self.weight_bits

    @property
    def weight_format(self) -> str:
        if self.budget is not None:
            from .weight_formats import CANDIDATE_NAMES  # noqa: PLC0415  (weight_formats imports numerics only)

            acts = "a16" if all(CANDIDATE_NAMES[c][1] == 16 for c in self.candidates) else "mixed activations"
            return f"mixed weights {acts} (" + ", ".join(f"{k} {v:g}" for k, v in self.budget.limits().items()) + ")"
        if self.activation_bits == 8 and self.activation_format == "fp8":
            return "fp8"
        return f"w{self.weight_bits}a{self.activation_bits}"


# Range ratios searched by the 4-bit presets: 1.0 down to 0.62 in steps of 0.02.
CLIP_SEARCH = tuple(round(1.0 - 0.02 * i, 2) for i in range(20))
# Smoothing exponents smooth="search" tries by default (plus no smoothing): 0 to 1 by 0.1.
SMOOTH_SEARCH = tuple(round(0.1 * i, 1) for i in range(11))
# AWQ's grid (llm-awq auto_scale, n_grid=20): 0 to 0.95 by 0.05.
AWQ_SEARCH = tuple(round(0.05 * i, 2) for i in range(20))

PRESETS: dict[str, Recipe] = {
    "w8a16": Recipe(name="w8a16", weight_bits=8, group_size=None, symmetric=True),
    "w4a16": Recipe(name="w4a16", weight_bits=4, group_size=128, symmetric=False, clip_ratios=CLIP_SEARCH),
    # GPTQ, activation order, grids range-searched (weighted by diag H) before rounding
    "w4a16-gptq": Recipe(name="w4a16-gptq", weight_bits=4, group_size=128, symmetric=False, clip_ratios=CLIP_SEARCH,
                         method="gptq"),
    # AWQ: per group the scale mean|x|^a / mean|w|^(1-a) (a on AWQ's grid, or none) with the
    # least quantized error of its stage's (transformer layer's) outputs (online where no
    # producer absorbs it: a multiply per group), then each weight group's range by its
    # exact output error (H blocks). On
    # MiniLM see BENCHMARKS.md (w4a16-awq against w4a16).
    "w4a16-awq": Recipe(name="w4a16-awq", weight_bits=4, group_size=128, symmetric=False, clip_ratios=CLIP_SEARCH,
                        clip_objective="hessian", smooth="search", smooth_alphas=AWQ_SEARCH, smooth_objective="stage"),
    # per group, the smoothing exponent (or none) with the least quantized output error, then
    # GPTQ (act-order) for the int8 weights: on MiniLM 0.99927 mean cosine (0.99922 for a bf16
    # copy of the model), against 0.99902 with round-to-nearest weights; SmoothQuant's fixed
    # alpha = 0.5 gives 0.99885 (RTN weights: 0.99864) (BENCHMARKS.md)
    "w8a8": Recipe(name="w8a8", weight_bits=8, activation_bits=8, smooth="search", method="gptq"),
    # one scale per tensor cannot cover MiniLM's outlier tokens without smoothing chosen for
    # it: 0.9973 with the search against 0.918 with alpha = 0.5
    "w8a8-static": Recipe(name="w8a8-static", weight_bits=8, activation_bits=8, activation_scale="static",
                          smooth="search"),
    "fp8": Recipe(name="fp8", weight_bits=8, activation_bits=8, activation_format="fp8", smooth="search"),
    # QuaRot-style: the residual stream rotated offline where the graph has one (pre-norm
    # RMSNorm decoders), online Hadamard rotations of the other quantized linears' inputs,
    # GPTQ int4 g128 weights, per-token int8 / int4 activations. On the tiny Llama the
    # residual rotation beats rotating every input online (w4a4 perplexity 1.0167x vs
    # 1.0168x, w4a8 1.00095x vs 1.00119x) with half the online rotations.
    "w4a8": Recipe(name="w4a8", weight_bits=4, group_size=128, symmetric=False, clip_ratios=CLIP_SEARCH,
                   method="gptq", activation_bits=8, rotate="residual"),
    "w4a4": Recipe(name="w4a4", weight_bits=4, group_size=128, symmetric=False, clip_ratios=CLIP_SEARCH,
                   method="gptq", activation_bits=4, rotate="residual"),
    # per-layer int3 / int4 g128 / int8 weights chosen by the precision ILP at 4.5 bits per
    # weight on average, from each layer's HAWQ sensitivity (Hutchinson trace of the loss
    # Hessian): on MiniLM 0.978 embedding cosine against 0.963 for uniform int4 and 0.952
    # with the layer-local output error
    "auto": Recipe(name="auto", weight_bits=4, group_size=128, symmetric=False, clip_ratios=CLIP_SEARCH,
                   budget=Budget(avg_bits=4.5), candidates=("w3", "w4", "w8")),
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
        for key in ("keep_float", "clip_ratios", "smooth_alphas", "candidates", "precision_pins"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        return base.replace(**fields)
    raise RecipeError(f"a recipe is a preset name, a qcompile.Recipe or a dict, got {type(recipe).__name__}")
