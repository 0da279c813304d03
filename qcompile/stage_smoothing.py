"""Score smoothing candidates on a whole stage's outputs (``smooth_objective="stage"``).

The group objective (:func:`qcompile.smoothing.search_scales`) measures a candidate scale
by the error of the group's own linear outputs. The stage objective measures it by the
error of the outputs of the *stage* (``qcompile.stages``: for a transformer, one layer)
that holds the group's linears, so that what the other ops of the layer do with the
error — attention's softmax, the FFN, the residual adds and norms — counts.

With weight-only fake quantization a smoothed linear computes
``(x / s) Q(W diag(s))ᵀ = x (Q(W diag(s)) diag(1/s))ᵀ``, so a candidate ``s`` is scored by
running the group's stage with each consumer weight ``W_i`` replaced by its *effective
weight* ``Q(W_i diag(s)) diag(1/s)`` (every other weight float) on the stage's calibration
inputs, against the float stage's outputs (the root mean square of each token's relative
error, :func:`stage_output_error`). Stage inputs come from the float graph
(``qcompile.sequential.run_stages``), one stage at a time. Folding ``s`` afterwards is
function-preserving, so scoring on the unsmoothed graph scores what the folded graph will
compute.

A group falls back to the group objective when its linears lie in two stages, or when
:func:`qcompile.stages.find_stages` finds no cut (one stage: the "stage" would be the
whole model); :func:`plan_stage_search` says which and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .graph_utils import layer_name
from .sequential import run_stages
from .smoothing import Quantizer, ScaleSearch, best_candidate
from .smoothing_groups import SmoothingGroup
from .stages import Stage, find_stages, stage_module

__all__ = ["StagePlan", "plan_stage_search", "effective_weight", "stage_output_error", "search_on_stages"]

# candidates of one group: {alpha or None: scale or None}
Candidates = dict[Optional[float], Optional[torch.Tensor]]


@dataclass
class StagePlan:
    """Which groups (by index into the list given) are scored on which stage, and why the
    others fall back to the group objective."""

    stages: list[Stage]
    stage_of: dict[int, int] = field(default_factory=dict)
    fallback: dict[int, str] = field(default_factory=dict)


def plan_stage_search(gm: fx.GraphModule, groups: Sequence[SmoothingGroup]) -> StagePlan:
    """Cut ``gm`` into stages and place every group in the stage holding all its linears."""
    stages = find_stages(gm)
    plan = StagePlan(stages)
    if len(stages) < 2:
        for i in range(len(groups)):
            plan.fallback[i] = "no stage cut in the graph"
        return plan
    where = {node: stage.index for stage in stages for node in stage.nodes}
    for i, group in enumerate(groups):
        found = sorted({where[c] for c in group.consumers})
        if len(found) == 1:
            plan.stage_of[i] = found[0]
        else:
            plan.fallback[i] = "linears span stages " + ", ".join(str(s) for s in found)
    return plan


def effective_weight(weight: torch.Tensor, scale: Optional[torch.Tensor], quantize_weight: Quantizer) -> torch.Tensor:
    """``Q(W diag(s)) diag(1/s)`` in the weight's dtype (``Q(W)`` for ``scale`` None): the weight
    that, read by the unsmoothed input, computes what the smoothed quantized linear does.
    ``W s`` and the division are computed in float64 (the fold's precision); ``Q`` is given
    ``W s`` in float32, as the group objective gives it."""
    if scale is None:
        return quantize_weight(weight.detach().float()).to(weight.dtype)
    s = scale.detach().to(torch.float64)
    scaled = (weight.detach().to(torch.float64) * s).float()
    return (quantize_weight(scaled).to(torch.float64) / s).to(weight.dtype)


def _float_outputs(out: Any) -> list[torch.Tensor]:
    values = out if isinstance(out, (tuple, list)) else (out,)
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _token_error(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """``Σ_t ‖got_t − ref_t‖² / ‖ref_t‖²`` over the rows ``t`` (vectors along the last dim) and
    the number of rows, in float64; a row whose reference is zero counts its plain error."""
    diff = (got.double() - ref.double()).reshape(-1, ref.shape[-1] if ref.dim() else 1)
    norm = ref.double().reshape(diff.shape).pow(2).sum(-1)
    err = diff.pow(2).sum(-1) / torch.where(norm > 0, norm, 1.0)
    return float(err.sum()), diff.shape[0]


def stage_output_error(
    module: fx.GraphModule,
    batches: Sequence[Sequence[Any]],
    references: Sequence[Sequence[torch.Tensor]],
    replacements: dict[str, torch.Tensor],
) -> float:
    """The root mean square over tokens of the relative error ``‖f'(x)_t − f(x)_t‖ / ‖f(x)_t‖``
    (each token's vector along the last dimension, of every floating-point output of
    ``module``, over all ``batches``), in float64. ``f'`` is ``module`` with the buffers named in
    ``replacements`` replaced (``torch.func.functional_call``); ``references`` are the
    unmodified module's float outputs per batch.

    Per token rather than in total: a stage's output is read through a norm (the next
    layer's LayerNorm / RMSNorm), which removes each token's scale, so a token with a
    large residual norm should not outweigh the others (MiniLM w4a16-awq: 0.97575 mean
    cosine against 0.97504 with the plain squared error; BENCHMARKS.md)."""
    err, rows = 0.0, 0
    with torch.no_grad():
        for flat, ref in zip(batches, references):
            got = _float_outputs(torch.func.functional_call(module, replacements, tuple(flat)))
            if len(got) != len(ref):
                raise RuntimeError(f"{type(module).__name__}: {len(got)} float outputs against {len(ref)} references")
            for g, r in zip(got, ref):
                e, n = _token_error(g, r)
                err, rows = err + e, rows + n
    return (err / rows) ** 0.5 if rows else 0.0


def _search_group(
    module: fx.GraphModule, targets: list[str], weights: list[torch.Tensor], batches, references,
    candidates: Candidates, quantize_weight: Quantizer,
) -> ScaleSearch:
    errors: dict[Optional[float], float] = {}
    for alpha, s in candidates.items():
        swap = {t: effective_weight(w, s, quantize_weight) for t, w in zip(targets, weights)}
        errors[alpha] = stage_output_error(module, batches, references, swap)
    best = best_candidate(errors)
    return ScaleSearch(best, candidates[best], errors)


def search_on_stages(
    gm: fx.GraphModule,
    groups: Sequence[SmoothingGroup],
    plan: StagePlan,
    calibration: list[list[Any]],
    candidates: Callable[[SmoothingGroup], tuple[Candidates, Quantizer]],
    *,
    progress: bool = True,
) -> dict[int, ScaleSearch]:
    """The stage objective's choice for every group ``plan`` places in a stage.

    ``candidates(group) -> ({α or None: scale or None}, Q)``: the group's candidate scales
    and its weight quantizer. Errors (``ScaleSearch.errors``) are :func:`stage_output_error`'s
    per-token relative errors over the stage's float outputs. Stages run in order over
    ``calibration`` (flat graph inputs) with float weights; only one stage's inputs and
    reference outputs are held at a time. ``gm`` is not changed.
    """
    by_stage: dict[int, list[int]] = {}
    for i, stage_index in plan.stage_of.items():
        by_stage.setdefault(stage_index, []).append(i)
    found: dict[int, ScaleSearch] = {}
    last = max(by_stage, default=-1)

    def load(stage: Stage):
        return stage_module(gm, stage, with_graph_outputs=True)

    def process(stage: Stage, module: fx.GraphModule, node_map: dict[fx.Node, fx.Node], batches) -> None:
        with torch.no_grad():
            references = [_float_outputs(module(*flat)) for flat in batches]
        for i in tqdm(by_stage[stage.index], desc=f"stage {stage.index} smoothing", unit="group",
                      disable=not progress, leave=False):
            group = groups[i]
            targets, weights = [], []
            for consumer in group.consumers:
                weight_node = node_map[consumer].args[1]
                if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
                    raise ValueError(f"stage {stage.index}: layer {layer_name(consumer)} has no constant weight")
                targets.append(weight_node.target)
                weights.append(getattr(module, weight_node.target))
            cands, quantize_weight = candidates(group)
            found[i] = _search_group(module, targets, weights, batches, references, cands, quantize_weight)

    if by_stage:
        stages = plan.stages[: last + 1]  # the stages after the last one searched need not run
        run_stages(gm, stages, calibration, load=load, process=process, skip=lambda st: st.index not in by_stage,
                   progress=progress)
    return found
