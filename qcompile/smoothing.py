"""Smoothing scales (SmoothQuant / AWQ): pure numerics, no graphs.

A smoothing group is an activation ``X [tokens, K]`` and the weights ``W_i [N_i, K]``
that read it. With a positive per-channel scale ``s [K]``, ``X W_iᵀ = (X / s) (W_i s)ᵀ``:
outliers of X move into the weight columns, where per-channel/group quantization
absorbs them better. SmoothQuant's scale is

    s_j = max|X_j|^α / max_i max|W_i[:, j]|^(1-α)

and AWQ searches the exponent on calibration data. Two guards keep this finite: a
channel whose activation or weight maximum is zero or not finite gets s_j = 1, and the
scales are clamped to ``[2**-MAX_EXPONENT, 2**MAX_EXPONENT]``.

Every scale is rounded to a power of two (to the nearest in log2). Multiplying or
dividing by a power of two is exact in binary floating point (away from overflow and
subnormals), so folding the scales into the graph leaves the model's function unchanged
to the last bit, and the pass manager's float64 equivalence check proves it. The
rounding moves each scale by at most a factor √2, which changes nothing measurable in
how well the result quantizes (SmoothQuant's α itself is a coarse knob).

:func:`search_scales` is the AWQ-style search: for each α of a grid (and "no
smoothing"), quantize the scaled weights (and activations, for W8A8) with the recipe's
quantizers and measure the group's relative output error on calibration samples; keep
the α with the least error. Its candidates come from :func:`candidate_scales` and the
winner from :func:`best_candidate`, which ``qcompile.stage_smoothing`` shares to score the
same candidates on a whole stage's outputs instead.

:func:`awq_scales` is AWQ's own scale for weight-only quantization (AutoAWQ's
``duo_scaling``): ``s_j = mean|X_j|^α / mean|Ŵ_j|^(1-α)`` normalized by
``sqrt(max(s) min(s))``, with mean statistics instead of maxima (Ŵ: each weight divided
by its quantization group's abs-max, averaged over the rows of every consumer). These
scales are *not* rounded to powers of two: with 4-bit weights the rounding (a factor up
to √2 per channel) costs more than the search gains (MiniLM, int4 g128: 0.9641 mean cosine
with power-of-two scales against 0.9689 exact, same search). Folding them is exact only
in float64, so the pass records each new constant's float64 value for the pass
manager's check (``graph_utils.EXACT_META``); the float32 model moves by float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "MAX_EXPONENT",
    "smoothing_scales",
    "awq_scales",
    "weight_group_absmean",
    "weight_column_absmax",
    "group_output_error",
    "ScaleSearch",
    "candidate_scales",
    "best_candidate",
    "search_scales",
]

# Scales stay within 2**±20: a larger ratio between channels means a degenerate
# statistic (a channel that is ~0 in calibration), not an outlier worth migrating.
MAX_EXPONENT = 20

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # tensor -> its dequantized quantization


def weight_column_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max_i max_n |W_i[n, j]|`` over a group's weights, float32 ``[K]``."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def _log2_ratio(act_stat: torch.Tensor, weight_stat: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``log2(act^α / weight^(1-α))`` in float64 ``[K]`` and the mask of usable channels
    (both statistics finite and positive; the others read as 1 on both sides)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha!r}")
    a = act_stat.detach().double()
    w = weight_stat.detach().double()
    if a.shape != w.shape or a.dim() != 1:
        raise ValueError(f"activation and weight statistics must both be [K], got {tuple(a.shape)} and {tuple(w.shape)}")
    ok = torch.isfinite(a) & torch.isfinite(w) & (a > 0) & (w > 0)
    log2 = alpha * torch.log2(torch.where(ok, a, 1.0)) - (1.0 - alpha) * torch.log2(torch.where(ok, w, 1.0))
    return log2, ok


def smoothing_scales(act_stat: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Power-of-two scales ``act_stat^α / weight_absmax^(1-α)``, float32 ``[K]``.

    ``act_stat`` is the activation's per-channel statistic (SmoothQuant: abs-max over
    calibration tokens). Degenerate channels (zero or non-finite statistic) get 1.
    """
    log2, ok = _log2_ratio(act_stat, weight_absmax, alpha)
    exponent = torch.round(log2).clamp(-MAX_EXPONENT, MAX_EXPONENT)
    return torch.where(ok, torch.exp2(exponent), 1.0).float()


def weight_group_absmean(weights: Sequence[torch.Tensor], group_size: Optional[int]) -> torch.Tensor:
    """AWQ's weight statistic, float32 ``[K]``: ``|W|`` divided by its quantization group's
    abs-max (per row and group of ``group_size`` input channels; None: per row), averaged
    over all rows of all the group's weights. A group of zeros counts as 0."""
    parts = []
    for w in weights:
        wf = w.detach().float().abs()
        n, k = wf.shape
        g = k if group_size is None else group_size
        if k % g:
            raise ValueError(f"group size {g} does not divide the weight's {k} input channels")
        grouped = wf.reshape(n, k // g, g)
        peak = grouped.amax(dim=-1, keepdim=True)
        parts.append(torch.where(peak > 0, grouped / torch.where(peak > 0, peak, 1.0), 0.0).reshape(n, k))
    return torch.cat(parts).mean(dim=0)


def awq_scales(act_absmean: torch.Tensor, weight_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ scales ``act^α / weight^(1-α)`` normalized by ``sqrt(max · min)``, float64 ``[K]``.

    Computed in float64 and not rounded. A channel with a zero or non-finite statistic
    gets the scale 1 before normalization (then the normalization's factor like the
    others); the ratio of largest to smallest scale is capped at ``2**(2·MAX_EXPONENT)``
    (scales within ``2**±MAX_EXPONENT`` after normalization).
    """
    log2, ok = _log2_ratio(act_absmean, weight_absmean, alpha)
    log2 = torch.where(ok, log2, 0.0)
    log2 = log2 - 0.5 * (log2.max() + log2.min())  # s / sqrt(max(s) min(s))
    return torch.exp2(log2.clamp(-MAX_EXPONENT, MAX_EXPONENT))


def group_output_error(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scale: Optional[torch.Tensor],
    quantize_weight: Quantizer,
    quantize_activation: Optional[Quantizer] = None,
    exact_outputs: Optional[Sequence[torch.Tensor]] = None,
    rotation: Optional[Quantizer] = None,
) -> float:
    """Relative output error ``‖Q(X/s) Q(W s)ᵀ − X Wᵀ‖ / ‖X Wᵀ‖`` summed over the group.

    ``x`` is ``[tokens, K]`` calibration samples; ``scale`` None means no smoothing;
    ``exact_outputs`` optionally the precomputed ``X W_iᵀ``; ``rotation`` an orthogonal
    ``t -> t Q`` applied to both smoothed operands before they are quantized (the rotation a
    recipe inserts after smoothing: ``Q(X/s Q) Q(W s Q)ᵀ``). Computed in float32 (the
    errors compared are 1e-3 and up; float32's 1e-7 does not change which α wins).
    """
    rotate = rotation if rotation is not None else (lambda t: t)
    xf = x.detach().float()
    scale = None if scale is None else scale.float()
    xs = rotate(xf if scale is None else xf / scale)
    xq = quantize_activation(xs) if quantize_activation is not None else xs
    err = ref = 0.0
    for i, w in enumerate(weights):
        wf = w.detach().float()
        ws = rotate(wf if scale is None else wf * scale)
        exact = exact_outputs[i] if exact_outputs is not None else xf @ wf.T
        got = xq @ quantize_weight(ws).T
        err += float((got - exact).double().pow(2).sum())
        ref += float(exact.double().pow(2).sum())
    return (err / ref) ** 0.5 if ref > 0 else 0.0


@dataclass
class ScaleSearch:
    """The outcome of :func:`search_scales`: the chosen α (None: no smoothing), its scales,
    and the error of every candidate (key None = no smoothing)."""

    alpha: Optional[float]
    scale: Optional[torch.Tensor]
    errors: dict[Optional[float], float]


def candidate_scales(
    weights: Sequence[torch.Tensor],
    act_stat: torch.Tensor,
    alphas: Sequence[float],
    *,
    weight_stat: Optional[torch.Tensor] = None,
    scale_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = smoothing_scales,
) -> dict[Optional[float], Optional[torch.Tensor]]:
    """The candidates of a search: ``{None: None}`` (no smoothing), then for every α
    ``scale_fn(act_stat, weight_stat, α)`` (``weight_stat`` defaults to the weights' column
    abs-max). The candidates do not depend on how they are scored."""
    w_stat = weight_column_absmax(weights) if weight_stat is None else weight_stat
    scales: dict[Optional[float], Optional[torch.Tensor]] = {None: None}
    for alpha in alphas:
        scales[alpha] = scale_fn(act_stat, w_stat, alpha)
    return scales


def best_candidate(errors: dict[Optional[float], float]) -> Optional[float]:
    """The α with the least error; a tie goes to no smoothing (None), then to the first α."""
    return min(errors, key=lambda a: (errors[a], a is not None))


def search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    act_stat: torch.Tensor,
    alphas: Sequence[float],
    quantize_weight: Quantizer,
    quantize_activation: Optional[Quantizer] = None,
    rotation: Optional[Quantizer] = None,
    *,
    weight_stat: Optional[torch.Tensor] = None,
    scale_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = smoothing_scales,
) -> ScaleSearch:
    """Grid search over α (plus no smoothing) for the least group output error (with the
    rotation that follows smoothing, if any: see :func:`group_output_error`).

    The candidates are ``scale_fn(act_stat, weight_stat, α)``: by default SmoothQuant's
    power-of-two :func:`smoothing_scales` with the weights' column abs-max; AWQ passes
    :func:`awq_scales` with the activations' mean |x| and :func:`weight_group_absmean`.
    """
    scales = candidate_scales(weights, act_stat, alphas, weight_stat=weight_stat, scale_fn=scale_fn)
    xf = x.detach().float()
    exact = [xf @ w.detach().float().T for w in weights]
    errors = {
        alpha: group_output_error(x, weights, s, quantize_weight, quantize_activation, exact, rotation)
        for alpha, s in scales.items()
    }
    best = best_candidate(errors)
    return ScaleSearch(best, scales[best], errors)
