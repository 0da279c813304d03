"""The wider zoo's decoders (``zoo.names_of("decoder")`` outside the core zoo: causal LMs with a
KV cache in their output) through ``qcompile.quantize`` (w8a16), ``torch.compile(backend=
"qcompile")`` and ONNX Runtime ("ort" export); the checks and their tolerances are in
tests/models/checks.py.

Each quantized model is made once per session (per xdist worker) by the fixture
``quantized_zoo`` and shared by the three tests of its architecture, which sit in this one
file so that ``--dist loadfile`` runs them in the same worker. w8a16 only, the recipe that
costs least: every other recipe and export flavor runs on the core zoo (test_architectures.py,
tests/export/), and rounding does not depend on the architecture.
"""
from __future__ import annotations

import pytest

from tests.models.checks import zoo_tests
from tests.models.zoo import ARCHITECTURES, names_of

NAMES = [n for n in names_of("decoder") if n not in ARCHITECTURES]
# Minutes of CPU in all: `make test-all` runs them, `make test` (CI) the core zoo only.
pytestmark = pytest.mark.slow


(
    test_quantize_w8a16,
    test_torch_compile_backend_converges_with_quantize,
    test_ort_export_w8a16_matches_quantized_model,
) = zoo_tests(NAMES)
