"""Every core zoo architecture (``zoo.ARCHITECTURES``), unchanged code, through qcompile.quantize
and torch.compile(backend="qcompile"); the checks and their tolerances are in
tests/models/checks.py, shared with the wider zoo's files (test_zoo_decoders.py,
test_zoo_encoders.py, test_zoo_multimodal.py: w8a16, the backend and ONNX Runtime on each of
``zoo.EXTENDED``).

The graph finds the linears (no module-name tables); the report's layer names are checked
against the model's own modules only to prove that every linear was found, and nothing else.
"""
from __future__ import annotations

import pytest
import torch

from qcompile.testing import relative_error
from tests.models.checks import check_backend_converges, check_quantize
from tests.models.zoo import ARCHITECTURES

NAMES = sorted(ARCHITECTURES)


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16"])
@pytest.mark.parametrize("name", NAMES)
def test_quantize(quantized_zoo, name, recipe):
    check_quantize(quantized_zoo, name, recipe)


# Dynamo's capture against torch.export's, one architecture of each structural kind (each
# compile costs ~6 s; quantize itself runs on every architecture above): RMSNorm + gated MLP
# + GQA, fused qkv / gate_up, Conv1D weights, parallel residual, post-LN encoder, vision.
BACKEND_NAMES = ["llama", "phi3", "gpt2", "gpt_neox", "bert", "vit"]


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_torch_compile_backend_converges_with_quantize(quantized_zoo, name):
    check_backend_converges(quantized_zoo, name)


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_torch_compile_backend_follows_new_shapes(name):
    entry = ARCHITECTURES[name]
    model = entry.build(0)
    compiled = torch.compile(model, backend="qcompile", options={"inner": "eager"})
    with torch.no_grad():
        for make in (entry.inputs, entry.other_inputs):
            args, kwargs = make(2)
            assert relative_error(model(*args, **kwargs), compiled(*args, **kwargs)) < 0.05
