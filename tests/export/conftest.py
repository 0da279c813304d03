"""Fixtures of the export tests: quantized zoo models and their ONNX exports, made once per
session and shared (quantizing and exporting dominate the tests' time)."""
from __future__ import annotations

import pytest

import qcompile
from qcompile.export import to_onnx
from tests.export.helpers import calibration_batches
from tests.models import zoo


@pytest.fixture(scope="session")
def quantized_zoo():
    """``get(arch, preset) -> QuantizedModel`` of a zoo architecture, quantized on its first
    example; presets that need calibration (smoothing, static activation scales) get
    :func:`tests.export.helpers.calibration_batches`."""
    cache: dict = {}

    def get(arch: str, preset: str):
        if (arch, preset) not in cache:
            entry = zoo.ARCHITECTURES[arch]
            args, kwargs = entry.inputs(0)
            calibration = calibration_batches(entry) if qcompile.resolve_recipe(preset).needs_calibration else None
            # verify=False: the passes' own tests verify them; here only the result matters.
            cache[arch, preset] = qcompile.quantize(
                entry.build(0), args, kwargs, recipe=preset, calibration=calibration, progress=False, verify=False
            )
        return cache[arch, preset]

    return get


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
