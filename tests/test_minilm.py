"""The real all-MiniLM-L6-v2: fidelity on held-out text, calibrated on other text."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.data import batches, calibration_and_heldout, embedding_cosine, mean_pooled_embeddings
from qcompile.testing import count_ops

# Issue thresholds; measured on these 256 held-out docstrings (benchmarks/minilm_fidelity.py):
# w8a16 0.99956 mean, w4a16 (g128 asym, range search) 0.9597 mean. The split is fixed and
# the kernels deterministic, so the margins below are the distance to the requirement.
THRESHOLDS = {"w8a16": 0.999, "w4a16": 0.955}
# w8a8 (searched smoothing, GPTQ int8 weights, per-token int8 activations): 0.99927 mean on
# these held-out texts when calibrated on 64 texts with the preset's 11-point grid
# (BENCHMARKS.md); to keep the suite fast this test searches 3 exponents on 32 texts
# (measured 0.99926; 0.99896 with round-to-nearest weights), against the 0.999.
W8A8_THRESHOLD = 0.999
W8A8_TEST_RECIPE = {"preset": "w8a8", "smooth_alphas": [0.5, 0.7, 0.9]}


@pytest.fixture(scope="module")
def texts(minilm):
    """(calibration batches, held-out batches, the float model's held-out embeddings)."""
    model, tokenizer = minilm
    calib, heldout = calibration_and_heldout(32, 256)
    heldout_batches = list(batches(heldout, tokenizer, 64, 128))
    return list(batches(calib, tokenizer, 16, 128)), heldout_batches, _embed(model, heldout_batches)


def _embed(model, encs):
    with torch.no_grad():
        return torch.cat([mean_pooled_embeddings(model(**e).last_hidden_state, e["attention_mask"]) for e in encs])


# w8a16 is far above its threshold and runs in `make test-all`; w4a16 (closest to its
# threshold) and w8a8 below run in `make test` too.
@pytest.mark.parametrize("recipe", [pytest.param("w8a16", marks=pytest.mark.slow), "w4a16"])
def test_minilm_fidelity_on_held_out_text(minilm, texts, recipe):
    model, _ = minilm
    calib, heldout, reference = texts
    qm = qcompile.quantize(model, kwargs=calib[0], recipe=recipe, calibration=calib, progress=False)
    cosine = embedding_cosine(_embed(qm, heldout), reference)
    assert cosine.mean() >= THRESHOLDS[recipe], float(cosine.mean())
    assert count_ops(qm)[f"qcompile.linear_{recipe}"] == 6 * 6 + 1  # 6 per layer + pooler
    report = qm.report()
    assert report.float_bytes / report.quantized_bytes > (3.9 if recipe == "w8a16" else 6.5)
    assert "32 calibration batch" not in report.error_inputs and "calibration batch" in report.error_inputs


def test_minilm_w8a8_on_held_out_text(minilm, texts):
    model, _ = minilm
    calib, heldout, reference = texts
    qm = qcompile.quantize(model, kwargs=calib[0], recipe=W8A8_TEST_RECIPE, calibration=calib, progress=False)
    cosine = embedding_cosine(_embed(qm, heldout), reference)
    assert cosine.mean() >= W8A8_THRESHOLD, float(cosine.mean())
    counts = count_ops(qm)
    assert counts["qcompile.linear_w8a8"] == 6 * 6 + 1 and counts.get("aten.linear", 0) == 0
    rows = {r["layer"]: r for r in qm.report().layers}
    # post-norm BERT: V -> attention -> O is the only group a producer absorbs (where the
    # search smooths it at all); everything else is smoothed online or not at all
    folded = {name for name, r in rows.items() if "fold into" in r.get("smoothing", "")}
    assert folded <= {f"encoder.layer.{i}.attention.output.dense" for i in range(6)}
    assert all("online" not in rows[f"encoder.layer.{i}.attention.output.dense"]["smoothing"] for i in range(6))
    assert sum("online" in r.get("smoothing", "") for r in rows.values()) >= 20
