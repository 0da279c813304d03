"""Fixtures of the export tests: ONNX exports of the quantized zoo models (``quantized_zoo``,
tests/conftest.py), made once per session and shared (exporting dominates these tests' time)."""
from __future__ import annotations

import pytest

from qcompile.export import to_onnx


@pytest.fixture(scope="session")
def exported_zoo(tmp_path_factory, quantized_zoo):
    """``get(arch, preset, flavor) -> (QuantizedModel, OnnxExport)``, exported with the defaults."""
    folder = tmp_path_factory.mktemp("zoo_onnx")
    cache: dict = {}

    def get(arch: str, preset: str, flavor: str):
        if (arch, preset, flavor) not in cache:
            qm = quantized_zoo(arch, preset)
            cache[arch, preset, flavor] = qm, to_onnx(qm, folder / f"{arch}_{preset}_{flavor}.onnx", flavor=flavor)
        return cache[arch, preset, flavor]

    return get
