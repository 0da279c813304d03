"""Recipes are validated data; presets are data."""
from __future__ import annotations

import pytest

from qcompile.errors import RecipeError
from qcompile.recipe import CLIP_SEARCH, PRESETS, Recipe, resolve_recipe


def test_presets():
    w8, w4 = PRESETS["w8a16"], PRESETS["w4a16"]
    assert (w8.weight_bits, w8.group_size, w8.symmetric, w8.clip_ratios) == (8, None, True, ())
    assert (w4.weight_bits, w4.group_size, w4.symmetric) == (4, 128, False)
    assert w4.clip_ratios == CLIP_SEARCH and CLIP_SEARCH[0] == 1.0 and len(set(CLIP_SEARCH)) == 20


def test_resolve_forms():
    assert resolve_recipe(None) is PRESETS["w8a16"]
    assert resolve_recipe("w4a16") is PRESETS["w4a16"]
    r = resolve_recipe({"preset": "w4a16", "group_size": 64, "keep_float": ["lm_head"]})
    assert (r.group_size, r.keep_float, r.weight_bits) == (64, ("lm_head",), 4)
    assert r.keeps_float("lm_head") and not r.keeps_float("model.lm_head_x")
    custom = Recipe(weight_bits=4, group_size=32, symmetric=True)
    assert resolve_recipe(custom) is custom


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"weight_bits": 5}, "weight_bits"),
        ({"weight_bits": 2}, "weight_bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": "128"}, "group_size"),
        ({"weight_bits": 4, "group_size": 33}, "even"),
        ({"weight_bits": 3, "group_size": 33}, "3-bit groups"),
        ({"activation_bits": 2}, "activation_bits"),
        ({"activation_bits": 8, "weight_bits": 8, "group_size": 128}, "symmetric per-channel"),
        ({"activation_bits": 8, "symmetric": False}, "symmetric=False"),
        ({"activation_bits": 8, "activation_format": "fp8", "activation_scale": "static"}, "per token"),
        ({"activation_format": "fp8"}, "apply to quantized activations"),
        ({"smooth": True}, "smooth"),
        ({"smooth_alpha": -0.1}, "smooth_alpha"),
        ({"smooth_online": "yes"}, "smooth_online"),
        ({"method": "awq"}, "method"),
        ({"method": "gptq", "gptq_damp": 0.0}, "gptq_damp"),
        ({"gptq_damp": 1.5}, "gptq_damp"),
        ({"gptq_damp": True}, "gptq_damp"),
        ({"gptq_act_order": 1}, "gptq_act_order"),
        ({"gptq_static_groups": None}, "gptq_static_groups"),
        ({"gptq_block_size": 0}, "gptq_block_size"),
        ({"gptq_block_size": 64.0}, "gptq_block_size"),
        ({"method": "gptq", "weight_bits": 8, "activation_bits": 8, "activation_format": "fp8"}, "fp8"),
        ({"clip_ratios": (1.0, 1.5)}, "clip_ratios"),
        ({"keep_float": "lm_head"}, "keep_float"),
        ({"min_in_features": 0}, "min_in_features"),
    ],
)
def test_malformed_recipes_are_rejected_at_construction(fields, words):
    with pytest.raises(RecipeError, match=words):
        Recipe(**fields)


def test_unknown_names_and_fields():
    with pytest.raises(RecipeError, match="w4a16"):  # the message lists the presets
        resolve_recipe("w3a16")
    with pytest.raises(RecipeError, match="unknown recipe field"):
        resolve_recipe({"preset": "w4a16", "groupsize": 64})
    with pytest.raises(RecipeError):
        resolve_recipe(42)


def test_activation_and_smoothing_presets():
    w8a8, static, fp8, awq = (PRESETS[n] for n in ("w8a8", "w8a8-static", "fp8", "w4a16-awq"))
    assert (w8a8.activation_bits, w8a8.activation_scale, w8a8.smooth) == (8, "dynamic", "search")
    assert (static.smooth, fp8.smooth) == ("search", "search")
    assert (w8a8.weight_bits, w8a8.group_size, w8a8.symmetric) == (8, None, True)
    assert static.activation_scale == "static" and static.needs_calibration
    assert (fp8.activation_format, fp8.weight_format) == ("fp8", "fp8")
    assert (awq.weight_bits, awq.group_size, awq.smooth, awq.activation_bits) == (4, 128, "search", 16)
    assert w8a8.smooth_alphas == tuple(i / 10 for i in range(11))  # the default grid fills in
    assert awq.smooth_alphas == tuple(i / 20 for i in range(20))  # AWQ's own grid (n_grid=20)
    assert awq.clip_objective == "hessian" and "clip_objective" in awq.needs_calibration
    assert "smooth" in w8a8.needs_calibration and not PRESETS["w8a16"].needs_calibration
    assert w8a8.method == "gptq" and "gptq" in w8a8.needs_calibration
    # dynamic per-token int8 without calibration: no smoothing, round-to-nearest weights
    off = resolve_recipe({"preset": "w8a8", "smooth": "off", "method": "rtn"})
    assert off.smooth == "off" and not off.needs_calibration and off.activation_bits == 8
    assert "gptq" in resolve_recipe({"preset": "w8a8", "smooth": "off"}).needs_calibration


def test_gptq_and_three_bit_recipes():
    gptq = PRESETS["w4a16-gptq"]
    assert (gptq.weight_bits, gptq.group_size, gptq.symmetric, gptq.method) == (4, 128, False, "gptq")
    assert (gptq.gptq_act_order, gptq.gptq_damp, gptq.gptq_block_size) == (True, 0.01, 128)
    assert isinstance(gptq.gptq_static_groups, bool)
    assert "gptq" in gptq.needs_calibration and "Hessian" in gptq.needs_calibration
    assert not PRESETS["w4a16"].needs_calibration and PRESETS["w4a16"].method == "rtn"
    w3 = resolve_recipe({"preset": "w4a16-gptq", "weight_bits": 3, "gptq_damp": 0.1, "gptq_act_order": False})
    assert (w3.weight_bits, w3.weight_storage_bits, w3.weight_format) == (3, 4, "w3a16")
    assert (w3.gptq_damp, w3.gptq_act_order, w3.method) == (0.1, False, "gptq")
    assert Recipe(weight_bits=3, group_size=None, symmetric=True).weight_storage_bits == 4  # per-channel is fine
    assert resolve_recipe({"preset": "w8a8", "method": "gptq"}).needs_calibration
    assert Recipe(gptq_damp=1).gptq_damp == 1.0 and isinstance(Recipe(gptq_damp=1).gptq_damp, float)
