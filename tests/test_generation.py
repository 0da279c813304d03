"""Quantized causal LMs generate with a KV cache (``qcompile.generation``).

``qcompile.quantize`` of a transformers causal LM gives a model whose ``generate()`` runs
the quantized prefill and decode graphs. The reference for its tokens is the float model
with the same quantized weights dequantized (``fake_quantized``), run in float64 on the
generated sequence without a cache (teacher forcing): every step's logits must agree with
it to the kernels' bfloat16-activation tolerance, and every generated token must be the
reference's argmax unless the reference's top-two margin at that step is within the
quantized model's own measured logit error there (a near tie that rounding may flip). A
wrong cache (positions, masks, padding, sliding window) moves logits by order one.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qcompile
import qcompile.lm_eval as lm
from qcompile.errors import CaptureError, InputMismatchError, ReplayError
from qcompile.graph_utils import get_constant
from qcompile.testing import count_ops
from tests.export.helpers import calibration_batches
from tests.models.checks import BF16_ACTIVATION_RTOL, fake_quantized
from tests.models.zoo import ARCHITECTURES

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 12
# zoo decoders for the kinds the issue names: sliding-window attention (mistral, window 8 <
# prompt + new tokens), grouped-query attention (qwen2: 2 heads, 1 KV head), a LayerNorm
# decoder with a tied head and Conv1D linears (gpt2)
ZOO = ["mistral", "qwen2", "gpt2"]


def _quantized(name: str, recipe: str):
    if name == "tiny_llama":
        model = lm.load_tiny_llama()
        example = (lm.calibration_inputs(1, 2, 16)[0][0],), {}
    else:
        entry = ARCHITECTURES[name]
        model = entry.build(0)
        example = entry.inputs(0)
    qm = qcompile.quantize(model, *example, recipe=recipe, progress=False, generation=True)
    return model, qm


@pytest.fixture(scope="module", params=[("tiny_llama", "w4a16"), *[(name, "w8a16") for name in ZOO]],
                ids=lambda p: f"{p[0]}-{p[1]}")
def quantized(request):
    name, recipe = request.param
    model, qm = _quantized(name, recipe)
    return name, model, qm


def _prompts(model, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` prompts of 7 tokens; from batch 2 on the second is left-padded by 3."""
    gen = torch.Generator().manual_seed(seed)
    if model.config.vocab_size == lm.VOCAB_SIZE:  # the tiny Llama: real held-out text
        windows = lm.heldout_windows(7)
        ids = windows[torch.randint(0, windows.shape[0], (batch,), generator=gen)].clone()
    else:
        ids = torch.randint(4, model.config.vocab_size, (batch, 7), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :3] = 0
        ids[1, :3] = model.config.pad_token_id or 0
    return ids, mask


def _check_against_reference(model, qm, ids, mask, out) -> None:
    prompt = ids.shape[1]
    sequences = out.sequences
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], sequences.shape[1] - prompt, dtype=mask.dtype)], dim=1)
    reference = fake_quantized(model, qm).double()
    with torch.no_grad():
        ref = reference(input_ids=sequences, attention_mask=full_mask, use_cache=False).logits[:, prompt - 1:-1]
    got = torch.stack(out.logits, dim=1).double()
    assert got.shape == ref.shape
    assert (got - ref).norm() / ref.norm() < BF16_ACTIVATION_RTOL
    tokens = sequences[:, prompt:]
    wrong = tokens != ref.argmax(-1)
    if wrong.any():
        top2 = ref.topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]
        own_error = (got - ref).abs().amax(-1)
        assert bool((margin[wrong] <= 2 * own_error[wrong]).all()), (margin[wrong], own_error[wrong])
        assert wrong.float().mean() < 0.2


@pytest.mark.parametrize("batch,static", [(1, False), (3, False), (3, True)])
def test_generate_matches_the_float64_fake_quant_reference(quantized, batch, static):
    name, model, qm = quantized
    sliding = getattr(model.config, "sliding_window", None) is not None
    if static and sliding:
        pytest.skip("a static cache of a sliding-window model is refused (test_bad_input_gets_a_clear_error)")
    ids, mask = _prompts(model, batch, seed=batch + 10 * static)
    calls = dict(qm.generation.calls)
    extra = {"cache_implementation": "static"} if static else {}
    out = qm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                      do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True,
                      pad_token_id=model.config.pad_token_id or 0, **extra)
    assert out.sequences.shape == (batch, ids.shape[1] + NEW_TOKENS)
    # one prefill, then one decode step per further token: nothing captured or quantized again
    assert qm.generation.calls["prefill"] - calls["prefill"] == 1
    assert qm.generation.calls["decode"] - calls["decode"] == NEW_TOKENS - 1
    _check_against_reference(model, qm, ids, mask, out)


def test_the_steps_share_the_call_graphs_quantized_weights(quantized):
    """One set of quantized weights: every quantized linear of the prefill and decode graphs
    reads the very tensors (same storage) the call graph's does, and the counts of quantized
    ops are the call graph's."""
    _, _, qm = quantized

    def weight_tensors(gm):
        out = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("qcompile."):
                out[node.name] = get_constant(gm, node.args[1]).data_ptr()
        return out

    call = weight_tensors(qm.graph_module)
    assert call
    for graph in (qm.generation.prefill.graph_module, qm.generation.decode.graph_module):
        ops = {op: n for op, n in count_ops(graph).items() if op.startswith("qcompile.linear")}
        assert ops == {op: n for op, n in count_ops(qm.graph_module).items() if op.startswith("qcompile.linear")}
        assert sorted(weight_tensors(graph).values()) == sorted(call.values())


def test_one_step_on_the_call_graphs_cache():
    """``qm(next_ids, cache=out.cache)`` (the call that failed before): one decode step on the
    cache the quantized call returned equals the call on the whole sequence."""
    entry = ARCHITECTURES["llama"]
    qm = qcompile.quantize(entry.build(0), *entry.inputs(0), recipe="w8a16", progress=False)
    ids = torch.randint(4, 500, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    first = qm(input_ids=ids, attention_mask=mask)
    token = first.logits[:, -1:].argmax(-1)
    longer = torch.cat([mask, torch.ones_like(token)], dim=1)
    step = qm(input_ids=token, attention_mask=longer, cache=first.cache)
    whole = qm(input_ids=torch.cat([ids, token], dim=1), attention_mask=longer)
    assert step.cache is first.cache and first.cache.get_seq_length() == 10
    # the same kernels on the same inputs; only the decode graph's M=1 GEMMs may round otherwise
    err = (step.logits[:, -1] - whole.logits[:, -1]).norm() / whole.logits[:, -1].norm()
    assert err < 1e-5


@pytest.mark.parametrize("recipe", [pytest.param("w4a16-awq", marks=pytest.mark.slow), "w8a8", "w4a8", "auto"])
def test_recipes_that_smooth_rotate_or_choose_precision_replay_on_the_steps(recipe):
    """Smoothing scales, rotations, GPTQ and a budget's precision choice are made once on the
    call graph and replayed on the steps: generation computes what the call graph computes."""
    entry = ARCHITECTURES["llama"]
    qm = qcompile.quantize(entry.build(0), *entry.inputs(0), recipe=recipe, calibration=calibration_batches(entry),
                           progress=False, generation=True)
    ids = torch.randint(4, 500, (2, 7))
    out = qm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                      do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True)
    seq = out.sequences
    call = qm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, 6:-1]
    got = torch.stack(out.logits, dim=1)
    # the same weights and kernels; the steps' GEMMs (M = 1 when decoding) may round differently
    assert (got - call).norm() / call.norm() < 1e-2
    note = next(n for n in qm.report().notes if n.startswith("generation:"))
    assert "replayed" in note and "verified" in note


def test_steps_are_built_on_first_use_and_the_model_is_then_released():
    entry = ARCHITECTURES["qwen2"]
    model = entry.build(0)
    qm = qcompile.quantize(model, *entry.inputs(0), recipe="w8a16", progress=False)
    assert not any(n.startswith("generation:") for n in qm.report().notes)
    ids = torch.randint(4, 600, (1, 5))
    eager = qm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert any(n.startswith("generation:") for n in qm.report().notes)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # neither the steps nor generate's shell hold the float model
    again = qm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(eager, again)
    # no reference cycle: the steps (and their quantized weights) go with the model, at once
    steps = weakref.ref(qm.generation)
    gc.disable()
    try:
        del qm
        assert steps() is None
    finally:
        gc.enable()


def test_a_weight_changed_after_quantize_is_refused():
    """The lazily captured steps are checked against the weights that were quantized."""
    entry = ARCHITECTURES["qwen2"]
    model = entry.build(0)
    qm = qcompile.quantize(model, *entry.inputs(0), recipe="w8a16", progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    with pytest.raises(ReplayError, match=r"model\.layers\.1\.mlp\.down_proj"):
        qm.generate(input_ids=torch.randint(4, 600, (1, 5)), max_new_tokens=2, use_cache=True)


def test_bad_input_gets_a_clear_error():
    entry = ARCHITECTURES["mistral"]
    model = entry.build(0)
    qm = qcompile.quantize(model, *entry.inputs(0), recipe="w8a16", progress=False, generation=True)
    ids = torch.randint(4, 448, (2, 5))
    with pytest.raises(InputMismatchError, match="StaticSlidingWindowLayer.*DynamicCache"):
        qm.generate(input_ids=ids, max_new_tokens=3, use_cache=True, cache_implementation="static")
    out = qm(input_ids=ids, attention_mask=torch.ones_like(ids))
    token = out.logits[:, -1:].argmax(-1)
    with pytest.raises(InputMismatchError, match="position_ids"):
        qm(input_ids=token, cache=out.cache, position_ids=torch.tensor([[5], [5]]))
    with pytest.raises(InputMismatchError, match=r"2-D padding mask.*\[2, 6\]"):
        qm(input_ids=token, attention_mask=torch.ones(2, 1, 1, 6), cache=out.cache)
    with pytest.raises(InputMismatchError, match="3 layers; the model has 2"):
        qm(input_ids=token, cache=transformers.DynamicCache(config=transformers.LlamaConfig(num_hidden_layers=3)))

    llama = ARCHITECTURES["llama"]
    qm = qcompile.quantize(llama.build(0), *llama.inputs(0), recipe="w8a16", progress=False)
    cache = transformers.StaticCache(config=llama.build(0).config, max_cache_len=8)
    qm(input_ids=torch.randint(4, 500, (2, 4)), cache=cache)
    with pytest.raises(InputMismatchError, match="static cache was built for batch 2, the input has batch 3"):
        qm(input_ids=torch.randint(4, 500, (3, 1)), cache=cache)
    with pytest.raises(InputMismatchError, match="holds 8 tokens; this step would make it 10"):
        qm(input_ids=torch.randint(4, 500, (2, 6)), cache=cache)


def test_models_without_generation_steps_say_why():
    bert = ARCHITECTURES["bert"]
    with pytest.raises(CaptureError, match="generation=True.*not a transformers model that generates"):
        qcompile.quantize(bert.build(0), *bert.inputs(0), recipe="w8a16", progress=False, generation=True)
    llama = ARCHITECTURES["llama"]
    qm = qcompile.quantize(llama.build(0), *llama.inputs(0), recipe="w8a16", progress=False, generation=False)
    assert qm.generation is None
    with pytest.raises(InputMismatchError, match="no generation steps: generation=False"):
        qm.generate(input_ids=torch.randint(4, 500, (1, 4)), max_new_tokens=2)
    args, kwargs = llama.inputs(0)
    positions = {**kwargs, "position_ids": torch.arange(kwargs["input_ids"].shape[1]).expand_as(kwargs["input_ids"])}
    qm = qcompile.quantize(llama.build(0), args, positions, recipe="w8a16", progress=False)
    assert "generation steps not built: the example call passes ['position_ids']; generation graphs take " \
        "input_ids and attention_mask" in qm.report().notes
    with pytest.raises(InputMismatchError, match="no generation steps: the example call passes"):
        qm(**kwargs, cache=transformers.DynamicCache())
    with pytest.raises(TypeError, match="generation must be None, True or False"):
        qcompile.quantize(llama.build(0), args, kwargs, progress=False, generation="yes")
