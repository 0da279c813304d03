"""Shared fixtures: the real MiniLM and texts are loaded once per session."""
from __future__ import annotations

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
