"""The trained tiny Llama (benchmarks/tiny_llama) and the perplexity numerics of qcompile.lm_eval."""
from __future__ import annotations

import hashlib
import math
import platform

import pytest
import torch

import qcompile.lm_eval as lm

transformers = pytest.importorskip("transformers")

# The architecture the folder README and train.py state.
STATED = {
    "vocab_size": 257,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}

# Recorded losses come from the stored bfloat16 weights evaluated in float32. Another thread
# count, CPU or torch version changes the float32 summation order (logits move by ~1e-6
# relative), which moves a mean NLL over 8k tokens by far less than 1e-4 nats; wrong or
# differently rounded weights (e.g. the float32 weights before bfloat16 rounding) move it by
# more than 1e-3.
LOSS_TOL = 2e-4


@pytest.fixture(scope="module")
def tiny():
    return lm.load_tiny_llama(), lm.tiny_llama_metadata()


def test_stored_model_is_the_stated_llama(tiny):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

    model, meta = tiny
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    for key, value in STATED.items():
        assert getattr(model.config, key) == value == meta["model"][key], key
    assert model.config.hidden_act == "silu" and model.config.use_cache is False
    # RMSNorm, SwiGLU (gate, up, down with SiLU) and rotary position embeddings: the real HF modules.
    assert isinstance(model.model.norm, LlamaRMSNorm)
    assert isinstance(model.model.rotary_emb, LlamaRotaryEmbedding)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, LlamaRMSNorm) and isinstance(layer.mlp, LlamaMLP)
    assert tuple(layer.mlp.gate_proj.weight.shape) == (768, 256) and tuple(layer.mlp.down_proj.weight.shape) == (256, 768)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (128, 256)  # 2 KV heads x head dim 64
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == meta["model"]["parameters"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The weights hold bfloat16 values exactly (as stored), and the file is the recorded one.
    weights = lm.tiny_llama_dir() / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["model"]["safetensors_sha256"]
    w = model.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(w, w.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_stored_split_is_the_recorded_one_and_disjoint():
    texts = lm.lm_texts()
    meta = lm.tiny_llama_metadata()["split"]
    assert lm.texts_digest(texts.heldout) == meta["heldout_sha256"]
    assert lm.texts_digest(texts.calibration) == meta["calibration_sha256"]
    assert not (set(texts.train) & set(texts.heldout)) and not (set(texts.calibration) & set(texts.heldout))
    assert not (set(texts.train) & set(texts.calibration))
    assert lm.heldout_windows().shape == (meta["heldout_windows"], lm.WINDOW)


def test_training_split_reproduces_on_the_recorded_python():
    meta = lm.tiny_llama_metadata()["split"]
    if platform.python_version() != meta["python"]:
        pytest.skip(f"docstrings differ between Python versions; the training split was recorded on {meta['python']}")
    texts = lm.lm_texts()
    assert lm.texts_digest(texts.train) == meta["train_sha256"]
    assert lm.split_texts_live() == texts


def test_heldout_loss_matches_the_record(tiny):
    model, meta = tiny
    key = next(k for k in meta["results"] if k.startswith("heldout_loss_first_"))
    n = int(key.split("_")[3])
    loss = lm.mean_nll(model, lm.heldout_windows()[:n], batch_size=16)
    assert abs(loss - meta["results"][key]) < LOSS_TOL, (loss, meta["results"][key])
    # The model learned something: well below the unigram baseline and the uniform 257-way guess.
    assert meta["results"]["heldout_loss"] < meta["results"]["unigram_heldout_loss"] - 1.0
    assert meta["results"]["unigram_heldout_loss"] < math.log(lm.VOCAB_SIZE)


def _random_llama(vocab: int = 67):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(cfg).double().eval()


def test_perplexity_is_exp_mean_nll_in_float64():
    torch.manual_seed(1234)
    model = _random_llama()
    # Larger logits than the default init, so the distribution is far from uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    windows = torch.randint(0, 67, (5, 19))
    # Independent reference: one window at a time, softmax written out, -log p of each next token.
    nlls = []
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0]
            for t in range(row.numel() - 1):
                z = logits[t] - logits[t].max()
                p = torch.exp(z) / torch.exp(z).sum()
                nlls.append(-math.log(float(p[row[t + 1]])))
    expected = math.exp(sum(nlls) / len(nlls))
    assert expected > 2.0  # not a degenerate near-uniform or near-certain case
    # batch_size 2 splits 5 windows unevenly (2, 2, 1); float64 throughout: only summation order differs.
    got = lm.perplexity(model, windows, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-12)
    total, count = lm.nll_sum(lambda ids: (model(ids).logits,), windows, batch_size=3)
    assert count == 5 * 18 and total / count == pytest.approx(sum(nlls) / len(nlls), rel=1e-12)


def test_perplexity_rejects_bad_inputs():
    model = _random_llama(vocab=10)
    with pytest.raises(ValueError, match="outside the model's 10 logits"):
        lm.perplexity(lambda ids: torch.zeros(*ids.shape, 10), torch.full((2, 8), 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-finite"):
        lm.perplexity(lambda ids: torch.full((*ids.shape, 10), float("nan")), torch.zeros((2, 8), dtype=torch.int64))
    with pytest.raises(ValueError, match="int64 tensor"):
        lm.perplexity(model, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected logits"):
        lm.perplexity(lambda ids: torch.zeros(ids.shape[0], 10), torch.zeros((2, 8), dtype=torch.int64))
    with pytest.raises(TypeError, match="cannot find logits"):
        lm.perplexity(lambda ids: "nope", torch.zeros((2, 8), dtype=torch.int64))


def test_byte_tokenizer_and_windows():
    text = "naïve café ∑"
    ids = lm.encode(text)
    assert ids[0] == lm.BOS and bytes(ids[1:]) == text.encode("utf-8")
    assert lm.decode(ids) == "\n" + text
    w = lm.make_windows([text, "abc"], length=5)
    stream = lm.token_stream([text, "abc"])
    assert w.shape == (stream.numel() // 5, 5) and torch.equal(w.reshape(-1), stream[: w.numel()])


def test_missing_model_folder_names_the_train_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks/tiny_llama/train.py"):
        lm.load_tiny_llama(folder=tmp_path)
