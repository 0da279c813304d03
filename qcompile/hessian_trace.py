"""Hutchinson estimates of the loss Hessian's trace with respect to each linear's weight.

HAWQ (Dong et al.) ranks layers by the trace of the Hessian of the loss with respect to
their weights. Here the loss is computed by the canonical graph itself, with the weights
made inputs (``torch.func.functional_call`` over the graph's constants), and the trace is
estimated by Hutchinson's method: for Rademacher vectors ``v`` (entries ±1),
``E[vᵀ H v] = tr(H)``. One Hessian-vector product (``torch.func``: the vector-Jacobian
product of the gradient) over *all* weights at once gives, for every layer ``l``, the sample
``v_lᵀ (H v)_l``: its cross terms ``v_lᵀ H_lm v_m`` (m ≠ l) have mean zero because the
blocks' signs are independent, so each sample is an unbiased estimate of every block's
trace ``tr(H_l)``. Samples cycle through the calibration batches, so the estimate averages
over data too; its standard error is ``std / sqrt(samples)`` (variance ∝ 1 / samples).

The loss (``loss=``):

* ``"lm"`` — next-token cross-entropy of the graph's first output (logits ``[..., T, V]``)
  against the integer input of shape ``[..., T]`` (the token ids), shifted by one: used
  when the labels follow from the inputs (a causal LM). Padding is not masked.
* ``"kl"`` — ``KL(p_float ‖ p)`` of the softmax over the last dimension of the first
  output against the float model's: zero with zero gradient at the float weights, so its
  Hessian there is the Gauss-Newton (Fisher) matrix.
* ``"mse"`` — the mean squared difference of the first output from the float model's
  (also Gauss-Newton at the float point); suited to embedding outputs.
* ``"auto"`` — when the first output is computed by a linear (a head): ``"lm"`` when it
  looks like logits over an integer input, else ``"kl"``; otherwise (hidden states,
  embeddings) ``"mse"`` (:func:`detect_loss`).

The CPU flash-attention kernel has no double backward, so in the copy of the graph that is
differentiated ``aten.scaled_dot_product_attention`` runs the math implementation (output
laid out like the flash kernel's, which the graph's later views assume).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.func import functional_call, grad, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .graph_utils import layer_name

__all__ = ["TraceEstimate", "LossHessian", "hutchinson_traces", "detect_loss", "first_float_output", "label_input", "loss_value", "LOSSES"]

LOSSES = ("auto", "lm", "kl", "mse")


@dataclass(frozen=True)
class TraceEstimate:
    """Per-layer Hutchinson estimates of ``tr(∂²L / ∂W_l²)``.

    Attributes:
        traces: layer name -> the mean of the samples.
        std_errors: layer name -> standard error of that mean (``std / sqrt(samples)``).
        samples: Hessian-vector products taken.
        loss: the loss used (``"lm"``, ``"kl"`` or ``"mse"``).
        seconds: wall time.
    """

    traces: dict[str, float]
    std_errors: dict[str, float]
    samples: int
    loss: str
    seconds: float


def _sdpa_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """``scaled_dot_product_attention`` by the math backend (twice differentiable), with the
    output strides of the CPU flash kernel (``[B, H, S, D]`` stored as ``[B, S, H, D]``)."""
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _differentiable_copy(gm: fx.GraphModule) -> fx.GraphModule:
    twin = copy.deepcopy(gm)
    for node in twin.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.scaled_dot_product_attention.default:
            node.target = _sdpa_math
    twin.recompile()
    return twin


def first_float_output(outputs: Any) -> torch.Tensor:
    flat = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
    for out in flat:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out
    raise ValueError("the graph returns no floating-point tensor to take a loss of")


def label_input(flat_inputs: list[Any], logits: torch.Tensor) -> int | None:
    """Index of the integer input of shape ``logits.shape[:-1]`` with ids below the vocabulary."""
    for i, value in enumerate(flat_inputs):
        if (isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool
                and tuple(value.shape) == tuple(logits.shape[:-1]) and value.numel()
                and int(value.min()) >= 0 and int(value.max()) < logits.shape[-1] and logits.dim() >= 2
                and logits.shape[-2] > 1):
            return i
    return None


_SHAPE_OPS = {"view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "permute", "transpose", "t", "clone",
              "contiguous", "_to_copy", "flatten", "expand", "select", "slice"}


def _first_float_output_node(gm: fx.GraphModule) -> fx.Node | None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    for node in flat:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            return node
    return None


def output_is_linear(gm: fx.GraphModule) -> bool:
    """Whether the graph's first float output is computed by a linear (through views): the
    logits of a head, as opposed to hidden states or embeddings out of a norm or pooling."""
    node = _first_float_output_node(gm)
    while isinstance(node, fx.Node) and node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name in ("linear", "addmm", "mm", "matmul"):
            return True
        if name not in _SHAPE_OPS:
            return False
        node = node.args[0]
    return False


def detect_loss(gm: fx.GraphModule, flat_inputs: list[Any]) -> str:
    """For a graph whose first float output is computed by a linear (a head's logits):
    ``"lm"`` when that output is ``[..., T, V]`` over an integer input ``[..., T]`` with ids
    in ``[0, V)`` (a language model), else ``"kl"`` (a classifier). ``"mse"`` when the output
    does not come from a linear (hidden states, embeddings: a softmax over their channels
    means nothing)."""
    if not output_is_linear(gm):
        return "mse"
    with torch.no_grad():
        logits = first_float_output(gm(*flat_inputs))
    return "lm" if label_input(flat_inputs, logits) is not None else "kl"


def loss_value(kind: str, out: torch.Tensor, reference: torch.Tensor | None, labels: torch.Tensor | None):
    if kind == "lm":
        logits = out[..., :-1, :].reshape(-1, out.shape[-1])
        return F.cross_entropy(logits, labels[..., 1:].reshape(-1))
    if kind == "kl":
        ref_logp = F.log_softmax(reference, dim=-1)
        logp = F.log_softmax(out, dim=-1)
        return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
    return (out - reference).pow(2).mean()


class LossHessian:
    """Hessian-vector products of a graph's loss with respect to its linears' weights.

    ``hvp(flat, vectors)``: ``H v`` for one batch of flattened inputs, ``vectors`` keyed by
    the weights' attribute names (:attr:`targets`), ``H`` the Hessian of the loss (see the
    module docstring) over all those weights jointly, at the graph's weights.
    """

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node], kind: str):
        if kind not in ("lm", "kl", "mse"):
            raise ValueError(f'kind must be "lm", "kl" or "mse", got {kind!r}')
        self.kind = kind
        self.twin = _differentiable_copy(gm)
        self.targets = {node: node.args[1].target for node in nodes}
        self.params = {t: getattr(self.twin, t).detach() for t in dict.fromkeys(self.targets.values())}

    def _loss_inputs(self, flat: tuple) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        with torch.no_grad():
            out = first_float_output(self.twin(*flat)).detach()
        if self.kind != "lm":
            return out, None
        index = label_input(list(flat), out)
        if index is None:
            raise ValueError('loss="lm" needs an integer input shaped like the logits without their last '
                             "dimension (the token ids)")
        return None, flat[index]

    def hvp(self, flat: list[Any], vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flat = tuple(flat)
        reference, labels = self._loss_inputs(flat)

        def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
            out = first_float_output(functional_call(self.twin, p, flat))
            return loss_value(self.kind, out, reference, labels)

        _, pullback = vjp(grad(loss_of), self.params)
        return pullback(vectors)[0]


def hutchinson_traces(
    gm: fx.GraphModule,
    batches: list[list[Any]],
    nodes: list[fx.Node],
    *,
    samples: int = 16,
    loss: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> TraceEstimate:
    """Estimate ``tr(H_l)`` for the weight of every linear in ``nodes`` (read-only).

    Args:
        gm: the canonical graph (weights as constants; not modified).
        batches: flattened inputs; sample ``i`` uses ``batches[i % len(batches)]``.
        nodes: ``aten.linear`` nodes whose weight is a constant.
        samples: Rademacher vectors (one Hessian-vector product each); at least 2 for a
            standard error.
        loss: one of :data:`LOSSES`.
        seed: seed of the Rademacher vectors.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if samples < 2:
        raise ValueError(f"Hutchinson needs at least 2 samples for a standard error, got {samples}")
    if not batches:
        raise ValueError("Hutchinson trace estimation needs at least one input batch")
    start = time.perf_counter()
    kind = detect_loss(gm, batches[0]) if loss == "auto" else loss
    hessian = LossHessian(gm, nodes, kind)
    params = hessian.params
    generator = torch.Generator().manual_seed(seed)
    estimates = torch.zeros(samples, len(params), dtype=torch.float64)
    for s in tqdm(range(samples), desc="Hutchinson HVPs", unit="sample", disable=not progress, leave=False):
        vectors = {t: (torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w.dtype) for t, w in params.items()}
        hv = hessian.hvp(batches[s % len(batches)], vectors)
        for j, t in enumerate(params):
            estimates[s, j] = (vectors[t].double() * hv[t].double()).sum()
    means = estimates.mean(0)
    errors = estimates.std(0, unbiased=True) / math.sqrt(samples)
    index = {t: j for j, t in enumerate(params)}
    traces = {layer_name(n): float(means[index[t]]) for n, t in hessian.targets.items()}
    std_errors = {layer_name(n): float(errors[index[t]]) for n, t in hessian.targets.items()}
    return TraceEstimate(traces, std_errors, samples, kind, time.perf_counter() - start)
