"""The data-dependent choices of one quantization, shared by every graph of the model.

One model can need several graphs: the call the user captured, and for a language model
the prefill and decode steps of generation (``qcompile.generation``), each a code path of
its own that torch.export traces separately. They must compute with *the same* quantized
weights: the weights are rounded once, from the calibration data, and every graph uses
the result.

A :class:`Decisions` store records, per weight, what the passes that look at data chose
(``fold_smoothing``'s scale per smoothing group, ``assign_precision``'s format per linear,
``quantize_weights``' rounded weight per linear), keyed by the layer names of
``qcompile.graph_utils.layer_name`` (the model's own parameter names, the same in every
graph of one model). A pipeline run with a replaying store applies the recorded choices
instead of computing them (it needs no calibration data), so the function-preserving
passes still rewrite and are verified on each graph, and the quantized tensors are the
very same objects in every graph (no copy).

Each replayed weight is checked against the one recorded by a fingerprint of its values
(as the pass sees it, after smoothing and rotation), and each smoothing scale against the
fingerprints of the weights it was chosen for: a graph whose weight differs raises
:class:`qcompile.errors.ReplayError` rather than pairing a quantized weight with another
tensor. The ``torch.compile`` backend replays leniently (``strict=False``): a graph with
choices missing or weights changed has them computed (from its own calibration data) and
recorded, the rest replayed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ReplayError
from .quantizers import row_blocks

__all__ = ["Decisions", "WeightDecision", "weight_fingerprint"]


def weight_fingerprint(weight: torch.Tensor) -> tuple:
    """Shape, dtype and three float64 sums of ``weight`` (plain, squared, row-weighted),
    computed a block of rows at a time (no float64 copy of a large weight). Equal tensors
    give equal fingerprints bit for bit; a changed, scaled or permuted one does not."""
    w = weight.detach()
    if w.dim() == 1:
        w = w.unsqueeze(0)
    flat = w.reshape(w.shape[0], -1)
    total = squares = weighted = 0.0
    for rows in row_blocks(flat.shape[0], flat.shape[1]):
        block = flat[rows].to(torch.float64)
        row_sums = block.sum(dim=1)
        index = torch.arange(rows.start + 1, rows.start + 1 + block.shape[0], dtype=torch.float64)
        total += float(row_sums.sum())
        squares += float(block.square().sum())
        weighted += float((row_sums * index).sum())
    return tuple(weight.shape), weight.dtype, total, squares, weighted


@dataclass
class WeightDecision:
    """What ``quantize_weights`` chose for one linear: the node metadata it attached (the
    rounded weight, and the activation format where there is one; empty when the weight
    stays float), the report row, and the fingerprint of the float weight it rounded."""

    meta: dict[str, Any]
    row: dict[str, Any]
    fingerprint: tuple


@dataclass
class Decisions:
    """Choices recorded by one pipeline run, replayed by the runs on the model's other graphs.

    ``replaying`` is False while the first graph is quantized (the passes compute and
    :meth:`record`) and True for the other graphs (the passes look their choices up).
    """

    smoothing: dict[tuple[str, ...], Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, WeightDecision] = field(default_factory=dict)
    replaying: bool = False
    graph: str = "the captured call"  # which graph is being quantized, for error messages
    # strict: a choice missing (or a weight changed) is an error; lenient (the torch.compile
    # backend, whose graphs are whatever Dynamo hands it): the pass computes it instead
    strict: bool = True
    # False where no other graph will replay (a model without generation steps, streaming):
    # nothing is recorded, so no weight is fingerprinted (a float64 pass over each)
    recording: bool = True

    def replay(self, graph: str, *, strict: bool = True) -> "Decisions":
        """This store, switched to replaying for ``graph`` (e.g. "the decode step")."""
        self.replaying = True
        self.graph = graph
        self.strict = strict
        return self

    def lookup(self, table: str, key: Any) -> Any:
        """The recorded choice; when it is missing: ReplayError (strict) or None (lenient)."""
        store = getattr(self, table)
        if key not in store and not self.strict:
            return None
        if key not in store:
            what = {"smoothing": "smoothing group of", "precision": "precision choice for",
                    "weights": "linear"}[table]
            known = ", ".join(map(str, list(store)[:6])) + (", ..." if len(store) > 6 else "")
            raise ReplayError(
                f"{self.graph} has a {what} {key!r} that the first quantized graph did not have "
                f"(it had: {known or 'none'}); every graph of one model must compute with the same weights"
            )
        return store[key]

    def record_smoothing(self, key: tuple[str, ...], weights: list[torch.Tensor], chosen: Any) -> None:
        """Record a smoothing group's choice and the fingerprints of the weights it was made for."""
        if not self.recording:
            return
        self.smoothing[key] = (tuple(weight_fingerprint(w) for w in weights), chosen)

    def replay_smoothing(self, key: tuple[str, ...], weights: list[torch.Tensor]) -> tuple[bool, Any]:
        """(found, choice) for a smoothing group whose linears read ``weights`` (unscaled)."""
        entry = self.lookup("smoothing", key)
        if entry is None:
            return False, None
        fingerprints, chosen = entry
        if tuple(weight_fingerprint(w) for w in weights) != fingerprints:
            if not self.strict:
                return False, None
            raise ReplayError(f"{self.graph}: the weights of the smoothing group {key!r} differ from the ones the "
                              "first graph's scale was chosen for; the graphs do not compute with the same weights")
        return True, chosen

    def record_weight(self, name: str, weight: torch.Tensor, meta: dict[str, Any], row: dict[str, Any]) -> None:
        if not self.recording:
            return
        self.weights[name] = WeightDecision(dict(meta), dict(row), weight_fingerprint(weight))

    def replay_weight(self, name: str, weight: torch.Tensor) -> WeightDecision | None:
        """The recorded rounding of linear ``name`` if ``weight`` is the one it rounded; else
        ReplayError (strict) or None (lenient: the weight is to be rounded again)."""
        decision = self.lookup("weights", name)
        if decision is None:
            return None
        found = weight_fingerprint(weight)
        if found != decision.fingerprint and not self.strict:
            return None
        if found != decision.fingerprint:
            raise ReplayError(
                f"{self.graph}: the float weight of linear {name!r} differs from the one the first graph "
                f"quantized (fingerprint {found[:2]} sums {found[2:]} vs {decision.fingerprint[:2]} "
                f"{decision.fingerprint[2:]}); the graphs do not compute with the same weights"
            )
        return decision
