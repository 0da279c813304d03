"""Per-layer sensitivity to each candidate format: Ω_l(c), read-only.

For every linear ``l`` and candidate format ``c`` (see :mod:`qcompile.weight_formats`),
``Ω_l(c)`` estimates how much quantizing that one layer to ``c`` hurts; a float
candidate has ``Ω = 0``. ``ΔW = Q_c(W) − W`` is the RTN rounding error (with the recipe's
range search when given, as ``passes/quantize_weights.py`` rounds). A candidate that also
quantizes the layer's input per token (``w8a8``, ``w4a8``, ``w4a4``) adds the activation
part of the layer's output error, ``E_act = (tr(Ŵ H_δ Ŵᵀ) + 2 Σ (ΔWᵀŴ) ⊙ C) / tokens``
(:mod:`qcompile.activation_error`: exact on the calibration inputs, ``δ`` the input's
quantization error). Three methods:

* ``"local"`` — layer-local output error on the calibration inputs,
  ``Ω = tr(ΔW H_x ΔWᵀ) / tokens`` with ``H_x = Σ x xᵀ`` (``qcompile.calibration``,
  ``qcompile.gptq.proxy_loss``): the mean squared error the layer adds to its own output per
  token; plus ``E_act``, so that Ω is the layer's whole output error per token. Cheap: one
  forward pass per batch, no backward.
* ``"hessian"`` — HAWQ: ``Ω = tr(∇²_W L) / n_l · ‖ΔW‖²`` with the trace estimated by
  Hutchinson's method (:mod:`qcompile.hessian_trace`; loss: next-token cross-entropy for a
  language model, else KL to the float outputs). The table keeps every layer's trace and
  its standard error. The activation part is ``γ_l · E_act`` with the layer's output
  curvature ``γ_l = tr(∇²_W L) / (N_l · tr(A_l))``, ``A_l = E[x xᵀ]``: under the Kronecker
  factorization ``∇²_W L ≈ A ⊗ G`` (K-FAC) with ``G`` the Hessian with respect to the
  layer's output, ``tr(∇²_W L) = tr(A) tr(G)``, and an output error ``e`` costs
  ``eᵀ G e ≈ tr(G)/N · ‖e‖²`` — the same scale on which HAWQ's weight term is
  ``tr(G)/N · tr(ΔW A ΔWᵀ)`` for isotropic ``A``.
* ``"e2e"`` — measured: the model is run with only layer ``l`` quantized to ``c`` (its
  weight rounded and, for a candidate that quantizes activations, its input too) and
  ``Ω`` is the increase of the same loss over the float model's (KL / MSE distortion of the
  first output, or the cross-entropy increase for an LM), on up to ``e2e_batches``
  calibration batches. This sees what the layer's error does downstream (the inter-layer
  information a layer-local or block-diagonal measure misses), at one forward pass per layer,
  candidate and batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.func import functional_call
from tqdm.auto import tqdm

from .activation_error import activation_output_error, collect_activation_error
from .calibration import collect_linear_stats
from .gptq import proxy_loss
from .graph_utils import layer_name, linear_weight
from .hessian_trace import TraceEstimate, first_float_output, label_input, loss_value, detect_loss, hutchinson_traces
from .weight_formats import WeightFormat, fake_quantize, fake_quantize_activation

__all__ = ["SENSITIVITY_METHODS", "SensitivityTable", "layer_sensitivity"]

SENSITIVITY_METHODS = ("local", "hessian", "e2e")


@dataclass
class SensitivityTable:
    """``omega[l, c]``: sensitivity of layer ``layers[l]`` to format ``candidates[c]``.

    Attributes:
        layers: layer names, graph order.
        candidates: the formats (columns).
        omega: float64 ``[L, C]``, non-negative; 0 for float.
        method: ``"local"``, ``"hessian"`` or ``"e2e"``.
        shapes: ``(out_features, in_features)`` per layer.
        float_bits: bits per weight of each layer's float weight.
        traces: for ``"hessian"``: the Hutchinson estimate (traces and standard errors).
        seconds: wall time of the analysis.
    """

    layers: list[str]
    candidates: list[WeightFormat]
    omega: np.ndarray
    method: str
    shapes: list[tuple[int, int]]
    float_bits: list[int]
    traces: TraceEstimate | None = None
    seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)

    def value(self, layer: str, candidate: str) -> float:
        return float(self.omega[self.layers.index(layer), [c.name for c in self.candidates].index(candidate)])


def _rounding_errors(weights: dict[str, torch.Tensor], candidates: list[WeightFormat], clip_ratios, importance,
                     progress: bool) -> dict[str, list[torch.Tensor | None]]:
    """``Q_c(W) − W`` (float64) per layer and candidate (None for float)."""
    out = {}
    for name, w in tqdm(weights.items(), desc="rounding candidates", unit="layer", disable=not progress, leave=False):
        deltas = []
        for fmt in candidates:
            if fmt.is_float:
                deltas.append(None)
                continue
            imp = importance.get(name) if importance else None
            q = fake_quantize(w, fmt, clip_ratios=clip_ratios, importance=imp)
            deltas.append(q.double() - w.detach().double())
        out[name] = deltas
    return out


def layer_sensitivity(
    gm: fx.GraphModule,
    batches: list[list[Any]],
    nodes: list[fx.Node],
    candidates: list[WeightFormat],
    *,
    method: str = "local",
    clip_ratios: tuple[float, ...] | None = None,
    samples: int = 16,
    loss: str = "auto",
    seed: int = 0,
    e2e_batches: int = 4,
    clip_weighted: bool = True,
    progress: bool = True,
) -> SensitivityTable:
    """Ω of every linear in ``nodes`` for every candidate (see the module docstring).

    ``clip_ratios`` / ``clip_weighted``: the range search of the rounding, its error weighted
    by the calibration inputs' E[x²] per channel when ``clip_weighted`` (as
    ``clip_objective="output"`` does in ``passes/quantize_weights.py``).
    """
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"method must be one of {SENSITIVITY_METHODS}, got {method!r}")
    if not batches:
        raise ValueError("sensitivity analysis needs calibration batches")
    start = time.perf_counter()
    names = [layer_name(n) for n in nodes]
    weights = {layer_name(n): linear_weight(gm, n) for n in nodes}
    shapes = [tuple(weights[name].shape) for name in names]
    float_bits = [weights[name].element_size() * 8 for name in names]
    omega = np.zeros((len(names), len(candidates)))
    traces = None
    need_stats = method == "local" or bool(clip_ratios and clip_weighted)
    stats = collect_linear_stats(gm, batches, hessian=method == "local", progress=progress).layers if need_stats else {}
    importance = {name: stats[name].mean_square for name in names} if clip_ratios and clip_weighted else None
    deltas = _rounding_errors(weights, candidates, clip_ratios, importance, progress)
    quantizes_acts = any(f.quantizes_activations and not f.is_float for f in candidates)
    act_stats = (collect_activation_error(gm, batches, nodes, candidates, progress=progress)
                 if quantizes_acts and method != "e2e" else {})

    def act_error(name: str, j: int) -> float:
        fmt = candidates[j]
        if not fmt.quantizes_activations or fmt.is_float:
            return 0.0
        return activation_output_error(act_stats[name], weights[name], deltas[name][j], fmt.act_bits)

    if method == "local":
        for i, name in enumerate(names):
            tokens = max(stats[name].tokens, 1)
            for j, delta in enumerate(deltas[name]):
                if delta is not None:
                    weight_part = proxy_loss(weights[name], weights[name].double() + delta, stats[name].hessian)
                    omega[i, j] = max(weight_part / tokens + act_error(name, j), 0.0)
    elif method == "hessian":
        traces = hutchinson_traces(gm, batches, nodes, samples=samples, loss=loss, seed=seed, progress=progress)
        for i, name in enumerate(names):
            # a negative trace estimate (noise, or a non-convex LM loss) ranks the layer as insensitive
            trace = max(traces.traces[name], 0.0)
            per_weight = trace / weights[name].numel()
            gain = 0.0
            if act_stats and act_stats[name].input_energy > 0:
                mean_energy = act_stats[name].input_energy / max(act_stats[name].tokens, 1)
                gain = trace / (shapes[i][0] * mean_energy)
            for j, delta in enumerate(deltas[name]):
                if delta is not None:
                    omega[i, j] = max(per_weight * float(delta.pow(2).sum()) + gain * act_error(name, j), 0.0)
    else:
        omega = _end_to_end(gm, batches[:e2e_batches], nodes, names, deltas, candidates, loss, progress)
    return SensitivityTable(names, list(candidates), omega, method, shapes, float_bits, traces,
                            time.perf_counter() - start)


class _QuantizedLayerInterpreter(fx.Interpreter):
    """Runs ``gm`` with one linear's weight replaced and, optionally, its input quantized."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, fmt: WeightFormat):
        super().__init__(gm)
        self.node, self.weight, self.fmt = node, weight, fmt
        self.weight_target = node.args[1].target

    def fetch_attr(self, target: str):
        return self.weight if target == self.weight_target else super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        if n is not self.node or not self.fmt.quantizes_activations:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        x_hat = fake_quantize_activation(x, self.fmt).to(x.dtype)
        return n.target(x_hat, *args[1:], **kwargs)


def _end_to_end(gm, batches, nodes, names, deltas, candidates, loss, progress) -> np.ndarray:
    """Loss increase with one layer at a time quantized, per candidate."""
    kind = detect_loss(gm, batches[0]) if loss == "auto" else loss
    with torch.no_grad():
        references = [first_float_output(gm(*flat)).detach() for flat in batches]
        labels = [flat[label_input(list(flat), ref)] if kind == "lm" else None for flat, ref in zip(batches, references)]
        base = [float(loss_value(kind, ref, ref, lab)) for ref, lab in zip(references, labels)]
    omega = np.zeros((len(names), len(candidates)))
    work = [(i, j) for i, name in enumerate(names) for j in range(len(candidates)) if deltas[name][j] is not None]
    with torch.no_grad():
        for i, j in tqdm(work, desc="end-to-end sensitivity", unit="run", disable=not progress, leave=False):
            node, name = nodes[i], names[i]
            w = linear_weight(gm, node)
            quantized = (w.double() + deltas[name][j]).to(w.dtype)
            total = 0.0
            for flat, ref, lab, b in zip(batches, references, labels, base):
                if candidates[j].quantizes_activations:
                    raw = _QuantizedLayerInterpreter(gm, node, quantized, candidates[j]).run(*flat)
                else:
                    raw = functional_call(gm, {node.args[1].target: quantized}, tuple(flat))
                out = first_float_output(raw)
                total += float(loss_value(kind, out, ref, lab)) - (b if kind == "lm" else 0.0)
            omega[i, j] = max(total / len(batches), 0.0)
    return omega
