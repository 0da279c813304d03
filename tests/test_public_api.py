"""``import qcompile`` gives access to what the README uses, stays light, and every public
module says what it exports (``__all__``)."""
from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import qcompile


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.expanduser("~"))


def test_import_qcompile_imports_no_exporter_or_model_library():
    """Submodules come on first use: ``import qcompile`` leaves onnx, onnxscript, onnxruntime
    and transformers unimported (they cost seconds), and ``qcompile.export`` then brings them."""
    heavy = ["onnx", "onnxscript", "onnxruntime", "transformers"]
    done = _fresh(
        "import sys, qcompile\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "qcompile.export.to_onnx\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stdout.splitlines()[-2:]
    assert before == "[]"
    assert "onnx" in after and "onnxscript" in after


@pytest.mark.parametrize("path", [
    "export.to_onnx", "export.EXACT_CONFIG", "testing.count_ops", "lm_eval.perplexity", "lm_eval.load_tiny_llama",
    "lm_eval.heldout_windows", "stages.find_stages", "streaming.quantize_checkpoint",
    "calibration.collect_linear_stats", "passes.canonicalize", "data.load_minilm",
])
def test_readme_attributes_resolve_after_import_qcompile(path):
    obj = qcompile
    for part in path.split("."):
        obj = getattr(obj, part)
    assert obj is not None


def test_readme_module_paths_import():
    pytest.importorskip("triton")
    module = importlib.import_module("qcompile.kernels.triton_quantize_rotated")
    assert callable(module.triton_quantize_rotated)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        qcompile.not_a_module  # noqa: B018
    assert not hasattr(qcompile, "_private")


def _public_modules() -> list[str]:
    names = []
    for package in ("qcompile", "qcompile.passes", "qcompile.export"):
        mod = importlib.import_module(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(mod.__path__) if not m.name.startswith("_")]
    return [n for n in names if n not in ("qcompile.passes", "qcompile.export", "qcompile.kernels")]


@pytest.mark.parametrize("name", _public_modules())
def test_public_module_declares_all(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    assert len(set(module.__all__)) == len(module.__all__)
