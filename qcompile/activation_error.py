"""Second-moment statistics of each linear's activation quantization error, read-only.

A linear computing with its input quantized per token (``x̂ = x + δ``, dynamic, symmetric,
as the ``linear_w8a8`` / ``linear_w4a8`` / ``linear_w4a4`` kernels do) and its weight
rounded (``Ŵ = W + ΔW``) makes the output error ``x̂ Ŵᵀ − x Wᵀ = x ΔWᵀ + δ Ŵᵀ``, whose
energy summed over the calibration tokens is

    Σ_t ‖x_t ΔWᵀ + δ_t Ŵᵀ‖² = tr(ΔW H_x ΔWᵀ) + tr(Ŵ H_δ Ŵᵀ) + 2 Σ_ij (ΔWᵀ Ŵ)_ij C_ij

with ``H_x = Σ x xᵀ``, ``H_δ = Σ δ δᵀ`` and ``C = Σ x δᵀ``. :func:`collect_activation_error`
gathers ``H_δ`` and ``C`` (float64 ``[K, K]``) per linear and activation width in one pass
over the calibration batches (and ``Σ ‖x‖²``, the trace of ``H_x``), so that the
activation part of every candidate's error follows without running the model again
(:func:`activation_output_error`). Exact: no independence between ``δ`` and ``x`` assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .calibration import LinearInputInterpreter
from .graph_utils import layer_name
from .weight_formats import WeightFormat, fake_quantize_activation

__all__ = ["ActivationErrorStats", "collect_activation_error", "activation_output_error"]


@dataclass
class ActivationErrorStats:
    """One linear's statistics: ``tokens``, ``input_energy = Σ ‖x‖²`` and, per activation
    width, ``H_δ = Σ δ δᵀ`` (``delta_second``) and ``C = Σ x δᵀ`` (``cross``), float64."""

    tokens: int = 0
    input_energy: float = 0.0
    delta_second: dict[int, torch.Tensor] = field(default_factory=dict)
    cross: dict[int, torch.Tensor] = field(default_factory=dict)

    def update(self, x: torch.Tensor, formats: dict[int, WeightFormat]) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        x64 = x2.double()
        self.tokens += x2.shape[0]
        self.input_energy += float(x64.pow(2).sum())
        for bits, fmt in formats.items():
            delta = fake_quantize_activation(x2, fmt).double() - x64
            h, c = delta.T @ delta, x64.T @ delta
            if bits in self.delta_second:
                self.delta_second[bits] += h
                self.cross[bits] += c
            else:
                self.delta_second[bits], self.cross[bits] = h, c


def collect_activation_error(
    gm: fx.GraphModule, batches: list[list[Any]], nodes: list[fx.Node], formats: list[WeightFormat], *,
    progress: bool = True,
) -> dict[str, ActivationErrorStats]:
    """:class:`ActivationErrorStats` of every linear in ``nodes`` (by layer name) for the
    activation widths of ``formats`` that quantize activations."""
    widths = {f.act_bits: f for f in formats if f.quantizes_activations and not f.is_float}
    stats = {layer_name(n): ActivationErrorStats() for n in nodes}
    names = {n: layer_name(n) for n in nodes}

    def hook(node: fx.Node, x: torch.Tensor, _out: torch.Tensor) -> None:
        stats[names[node]].update(x, widths)

    interp = LinearInputInterpreter(gm, set(nodes), hook)
    with torch.no_grad():
        for flat in tqdm(batches, desc="activation error statistics", unit="batch", disable=not progress,
                         leave=False):
            interp.run(*flat)
    return stats


def activation_output_error(stats: ActivationErrorStats, weight: torch.Tensor, delta: torch.Tensor | None,
                            act_bits: int) -> float:
    """The activation part of the output error energy per token of a linear with weight
    ``weight``, rounding error ``delta`` (``Ŵ = W + delta``; None: unrounded) and inputs
    quantized to ``act_bits``: ``(tr(Ŵ H_δ Ŵᵀ) + 2 Σ (ΔWᵀ Ŵ) ⊙ C) / tokens`` (see the
    module docstring; add ``tr(ΔW H_x ΔWᵀ) / tokens`` for the whole error)."""
    w_hat = weight.detach().double() + (delta if delta is not None else 0.0)
    energy = float(((w_hat.T @ w_hat) * stats.delta_second[act_bits]).sum())
    if delta is not None:
        energy += 2.0 * float(((delta.T @ w_hat) * stats.cross[act_bits]).sum())
    return energy / max(stats.tokens, 1)
