"""``qcompile.demo``'s parts that need no compilation: recipe names, fixed-shape batches, the table.

The whole demo (compiling and timing every candidate on the real MiniLM) runs in
tests/test_cli.py::test_demo_smallest, through the console script.
"""
from __future__ import annotations

import math

import pytest
import torch

from qcompile.demo import (
    BASELINES,
    DEFAULT_RECIPES,
    SLOW_INT8_RATIO,
    CandidateResult,
    DemoResult,
    _fixed_shape_batches,
    bf16_matmul_slowdown,
    format_demo,
    int8_matmul_slowdown,
    resolve_recipes,
    skip_slow_int8,
    uses_int8_matmul,
)
from qcompile.errors import RecipeError
from qcompile.recipe import PRESETS


def test_default_recipes_are_presets():
    assert DEFAULT_RECIPES == ("w8a8", "w4a16-gptq")
    assert [r.name for r in resolve_recipes(DEFAULT_RECIPES)] == list(DEFAULT_RECIPES)
    assert all(name in PRESETS for name in DEFAULT_RECIPES)


@pytest.mark.parametrize(
    "names, message",
    [
        (["w8a8", "w9a9"], "unknown recipe 'w9a9'; presets: "),
        (["w8a8", " w8a8"], "recipe(s) w8a8 named twice"),
        ([], "one or more preset names"),
        (["w8a8", ""], "one or more preset names"),
    ],
)
def test_resolve_recipes_errors(names, message):
    with pytest.raises(RecipeError) as exc:
        resolve_recipes(names)
    assert message in str(exc.value)


class _Tokenizer:
    """Whitespace 'tokenizer' with the call signature the demo uses (padding="max_length")."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert (padding, truncation, return_tensors) == ("max_length", True, "pt")
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [int(w) for w in text.split()][:max_length]
            ids[i, :len(words)] = torch.tensor(words)
            mask[i, :len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask, "note": "not a tensor"}


def test_fixed_shape_batches_fill_the_last_batch_with_its_own_texts():
    texts = ["1 2", "3 4 5 6 7", "8", "9 10", "11"]
    out = _fixed_shape_batches(_Tokenizer(), texts, batch=2, seq=3)
    assert [n for _, n in out] == [2, 2, 1]
    for enc, _ in out:
        assert set(enc) == {"input_ids", "attention_mask"}  # tensors only
        assert enc["input_ids"].shape == enc["attention_mask"].shape == (2, 3)
    assert out[0][0]["input_ids"].tolist() == [[1, 2, 0], [3, 4, 5]]  # padded / truncated to 3 tokens
    assert out[2][0]["input_ids"].tolist() == [[11, 0, 0], [11, 0, 0]]  # 1 real row, repeated
    one = _fixed_shape_batches(_Tokenizer(), ["1", "2", "3"], batch=8, seq=2)
    assert len(one) == 1 and one[0][1] == 3 and one[0][0]["input_ids"][:, 0].tolist() == [1, 2, 3, 1, 2, 3, 1, 2]


def _row(name, ms, speed, recipe=None):
    return CandidateResult(name, f"how {name}", 0.99912345, 0.9981, 3 * 2**20, 2**20, ms, speed, 12.34,
                           recipe=PRESETS[recipe] if recipe else None)


def test_format_demo():
    result = DemoResult(
        rows=[_row("Inductor fp32", 600.0, 1.0), _row("Inductor bf16", 300.0, 2.0),
              _row("qcompile w8a8", 250.0, 2.4, "w8a8"), _row("qcompile w4a16-gptq", 7.5, 80.0, "w4a16-gptq")],
        n_calib=64, n_eval=128, batch=32, seq=128, real_tokens=2485, rounds=7, threads=2, seconds=171.2)
    lines = format_demo(result).splitlines()
    assert lines[0].startswith("all-MiniLM-L6-v2 (real weights)")
    assert lines[1] == ("calibration: 64 texts; evaluation: 128 other texts, cosine to the eager fp32 model's "
                        "embeddings")
    assert lines[2] == ("latency: one batch of 32 x 128 tokens (2485 of them text), 2 threads, median of 7 "
                        "interleaved rounds; speed = Inductor fp32 ms / model ms")
    head = lines.index(next(line for line in lines if line.startswith("model ")))
    assert lines[head + 1].split() == ["Inductor", "fp32", "0.99912", "0.99810", "3.0", "1.0", "600.0", "1.00x",
                                       "12.3"]
    assert lines[head + 3].split()[:2] == ["qcompile", "w8a8"] and lines[head + 3].split()[7] == "2.40x"
    assert lines[head + 4].split()[6:8] == ["7.50", "80.00x"]  # short latencies keep their digits
    hows = lines[head + 6:head + 10]
    assert hows[0].split(None, 2)[2] == "how Inductor fp32"
    assert hows[2].endswith("(w8a8: int8 weights per channel rounded by GPTQ, int8 activations (per token), "
                            "smoothing)")
    assert hows[3].endswith("(w4a16: int4 weights in groups of 128 rounded by GPTQ, 16-bit activations)")
    assert lines[-1].startswith("(size: every weight;") and lines[-1].endswith("total 171 s)")
    assert [r.name for r in result.rows[:2]] == list(BASELINES)
    result.notes = ["skipped w8a8: because"]
    assert format_demo(result).splitlines()[-1] == "note: skipped w8a8: because"


def test_uses_int8_matmul():
    assert [name for name in sorted(PRESETS) if uses_int8_matmul(PRESETS[name])] == ["w8a8", "w8a8-static"]


@pytest.mark.parametrize("slowdown, kept", [(70.0, ["w4a16-gptq"]), (0.4, ["w8a8", "w4a16-gptq"])])
def test_skip_slow_int8(monkeypatch, slowdown, kept):
    import qcompile.demo

    monkeypatch.setattr(qcompile.demo, "int8_matmul_slowdown", lambda: slowdown)
    recipes, notes = skip_slow_int8(resolve_recipes(["w8a8", "w4a16-gptq"]))
    assert [r.name for r in recipes] == kept
    if slowdown > SLOW_INT8_RATIO:
        assert len(notes) == 1 and notes[0].startswith("skipped w8a8: on this CPU (torch CPU capability ")
        assert "int8 matmul takes 70x as long as a float32 one" in notes[0] and "--no-cpu-check" in notes[0]
    else:
        assert notes == []
    monkeypatch.setattr(qcompile.demo, "int8_matmul_slowdown", lambda: pytest.fail("measured without need"))
    assert skip_slow_int8(resolve_recipes(["w4a16-gptq"])) == (resolve_recipes(["w4a16-gptq"]), [])


@pytest.mark.parametrize("probe", [int8_matmul_slowdown, bf16_matmul_slowdown])
def test_matmul_slowdown_is_a_ratio(probe):
    ratio = probe(m=16, k=32, n=32, reps=1)
    assert math.isfinite(ratio) and ratio > 0
