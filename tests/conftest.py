"""Shared fixtures: the real MiniLM, and the zoo's canonical graphs, are built once per session."""
from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="session")
def minilm():
    from qcompile.data import load_minilm

    model, tokenizer = load_minilm()
    return model, tokenizer


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with Dynamo's caches empty, so compiled frames never leak across tests."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def canonical_zoo():
    """``get(name) -> (gm, example, other)``: a fresh copy of the zoo architecture's
    canonicalized graph and its two flattened input sets (captured once per session)."""
    from qcompile.capture import capture
    from qcompile.passes.canonicalize import canonicalize
    from qcompile.pipeline import PassContext, run_passes
    from qcompile.recipe import Recipe
    from tests.models import zoo

    cache = {}

    def get(name: str):
        if name not in cache:
            model, (args, kwargs), (args2, kwargs2) = zoo.build(name)
            cap = capture(model, args, kwargs)
            example = cap.flatten_inputs(args, kwargs)
            gm = run_passes(cap.graph_module, [canonicalize], PassContext(Recipe(), example, progress=False))
            cache[name] = (gm, example, cap.flatten_inputs(args2, kwargs2))
        gm, example, other = cache[name]
        return copy.deepcopy(gm), example, other

    return get
