"""Quantize weights: choose each linear's weight format and round its weight (RTN).

Round-to-nearest on a min/max grid, or on the grid whose range (searched per group over
``recipe.clip_ratios``) gives the least squared weight error.

The pass attaches a :class:`qcompile.quantizers.QuantizedWeight` to each linear it
quantizes (``node.meta['qcompile.qweight']``) and records a report row per layer; the
graph's ops are rewritten later by ``lower_to_kernels``. The rounding itself is pure
numerics in ``qcompile.quantizers``.
"""
from __future__ import annotations

import torch.fx as fx
from tqdm.auto import tqdm

from qcompile.pipeline import GraphPass, PassContext, PassResult
from qcompile.quantizers import quantize_weight_rtn
from qcompile.recipe import Recipe

from qcompile.graph_utils import QWEIGHT_META, layer_name, linear_weight, quantizable_linears


def _group_for(recipe: Recipe, in_features: int) -> tuple[int | None, str]:
    """The group size to use and a note for the report when the recipe's cannot apply."""
    group = recipe.group_size
    if group is None:
        return None, ""
    if in_features % group:
        return None, f"in_features {in_features} not divisible by group {group}: per-channel"
    return group, ""


def _run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    recipe = ctx.recipe
    modified = False
    linears = quantizable_linears(gm)
    for node in tqdm(linears, desc="quantizing weights", unit="layer", disable=not ctx.progress, leave=False):
        weight = linear_weight(gm, node)
        name = layer_name(node)
        out_features, in_features = weight.shape
        row = ctx.layers.setdefault(name, {"layer": name, "shape": (out_features, in_features)})
        row["node"] = node.name
        if recipe.keeps_float(name):
            row.update(format="float", bits=weight.element_size() * 8, note="kept float by recipe.keep_float")
            continue
        if in_features < recipe.min_in_features:
            row.update(format="float", bits=weight.element_size() * 8, note=f"in_features < {recipe.min_in_features}")
            continue
        group, note = _group_for(recipe, in_features)
        qweight = quantize_weight_rtn(weight, recipe.weight_bits, group, recipe.symmetric,
                                      clip_ratios=recipe.clip_ratios or None)
        node.meta[QWEIGHT_META] = qweight
        row.update(
            format=f"int{recipe.weight_bits} " + (f"g{group}" if group else "per-channel")
            + (" sym" if recipe.symmetric else " asym") + (" clip-search" if recipe.clip_ratios else ""),
            bits=recipe.weight_bits,
            group_size=group,
            bytes=qweight.nbytes,
            float_bytes=weight.numel() * weight.element_size(),
            note=note,
        )
        modified = True
    return PassResult(gm, modified)


quantize_weights = GraphPass("quantize_weights", _run, preserves_function=False)
