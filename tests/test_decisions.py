"""The decisions store (``qcompile.decisions``): fingerprints, strict and lenient replay."""
from __future__ import annotations

import pytest
import torch

from qcompile.decisions import Decisions, weight_fingerprint
from qcompile.errors import ReplayError
from qcompile.quantizers import ROW_BLOCK_ELEMENTS


@pytest.mark.parametrize("shape", [(7, 5), (ROW_BLOCK_ELEMENTS // 64 + 3, 64), (33,)])
def test_a_fingerprint_tells_changed_scaled_and_permuted_weights_apart(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    same = weight_fingerprint(w.clone())
    assert weight_fingerprint(w) == same
    changed = w.clone()
    changed.view(-1)[-1] += 1e-3
    assert weight_fingerprint(changed) != same
    assert weight_fingerprint(w * 1.0001) != same
    if w.dim() == 2:
        assert weight_fingerprint(w.flip(0)) != same  # the same values in other rows
        assert weight_fingerprint(w.t().contiguous().t()) == same  # layout does not matter
    assert weight_fingerprint(w.to(torch.bfloat16)) != same  # dtype is part of it


def test_strict_replay_names_what_is_missing_or_changed():
    decisions = Decisions()
    w = torch.randn(4, 8)
    decisions.record_weight("layers.0.q_proj", w, {"m": 1}, {"layer": "layers.0.q_proj"})
    decisions.replay("the decode step of generation")
    assert decisions.replay_weight("layers.0.q_proj", w.clone()).meta == {"m": 1}
    with pytest.raises(ReplayError, match="the decode step of generation has a linear 'layers.0.k_proj'.*"
                                          "it had: layers.0.q_proj"):
        decisions.replay_weight("layers.0.k_proj", w)
    with pytest.raises(ReplayError, match="float weight of linear 'layers.0.q_proj' differs"):
        decisions.replay_weight("layers.0.q_proj", w + 1)
    decisions.record_smoothing(("a", "b"), [w, w], "chosen")
    assert decisions.replay_smoothing(("a", "b"), [w, w]) == (True, "chosen")
    with pytest.raises(ReplayError, match="smoothing group"):
        decisions.replay_smoothing(("a", "b"), [w, 2 * w])


def test_lenient_replay_returns_nothing_where_it_cannot_replay():
    decisions = Decisions()
    w = torch.randn(4, 8)
    decisions.record_weight("fc", w, {}, {"layer": "fc"})
    decisions.record_smoothing(("fc",), [w], "chosen")
    decisions.replay("a backend graph", strict=False)
    assert decisions.replay_weight("fc", w) is not None
    assert decisions.replay_weight("fc", w + 1) is None
    assert decisions.replay_weight("other", w) is None
    assert decisions.replay_smoothing(("fc",), [w + 1]) == (False, None)
    assert decisions.lookup("precision", "fc") is None


def test_a_store_that_is_not_recording_fingerprints_nothing():
    decisions = Decisions(recording=False)
    w = torch.randn(4, 8)
    decisions.record_weight("fc", w, {}, {"layer": "fc"})
    decisions.record_smoothing(("fc",), [w], "chosen")
    assert not decisions.weights and not decisions.smoothing
