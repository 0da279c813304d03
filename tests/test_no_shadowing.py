"""The repository's top-level folders never shadow installed packages in a documented command.

``kernels/``, ``export/`` and ``passes/`` are installed as ``qcompile.kernels`` etc. With the
repository root on ``sys.path`` they would also be importable as top-level ``kernels`` ...,
and transformers (5.25 and later) imports Hugging Face's ``kernels`` distribution whenever a
model class is imported: every test touching a transformers model then failed at collection.
These tests run what a newcomer runs, from the repository root, with that distribution
installed (it is in the lock).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _kernels_distribution_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_kernels_distribution = pytest.mark.skipif(
    not _kernels_distribution_installed(),
    reason="Hugging Face's `kernels` distribution is not installed (transformers < 5.25 does not need it)",
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}


def test_repository_root_is_not_on_sys_path():
    assert all(Path(p or os.curdir).resolve() != REPO for p in sys.path), sys.path


@needs_kernels_distribution
def test_transformers_model_class_and_qcompile_import_together():
    import kernels
    from transformers import LlamaForCausalLM  # imports `kernels` (transformers/integrations/hub_kernels.py)

    import qcompile

    assert Path(kernels.__file__).resolve().parent != REPO / "kernels", kernels.__file__  # the installed one
    assert Path(qcompile.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert LlamaForCausalLM.__module__.startswith("transformers.")


@needs_kernels_distribution
@pytest.mark.parametrize("as_module", [False, True], ids=["pytest", "python -m pytest"])
def test_test_runner_from_the_repository_root(as_module):
    """Both ways of starting pytest from the root (``python -m`` puts the root on sys.path
    first; tests/conftest.py takes it out again) import transformers and qcompile together."""
    command = [sys.executable, "-m", "pytest"] if as_module else [str(BIN / "pytest")]
    test = f"{Path(__file__).relative_to(REPO)}::test_transformers_model_class_and_qcompile_import_together"
    done = subprocess.run([*command, test, "-q", "-p", "no:cacheprovider", "-p", "no:xdist"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "1 passed" in done.stdout


@needs_kernels_distribution
def test_command_line_loads_a_factory_from_the_repository_root(tmp_path):
    """``qcompile quantize package.module:factory`` finds the factory's module in the working
    directory, after the installed packages: a transformers model from the root quantizes."""
    script = BIN / "qcompile"
    if not script.exists():
        pytest.skip("the qcompile console script is not installed")
    out = tmp_path / "out"
    done = subprocess.run([str(script), "quantize", "tests.models.factories:tiny_llama", "--out", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "weights.safetensors").is_file()
    assert "lm_head" in (out / "report.txt").read_text()


def test_loading_a_factory_leaves_sys_path_as_it_was(monkeypatch):
    """The CLI's ``package.module:factory`` loader looks in the working directory (the
    repository root here) only while it imports and calls the factory."""
    from qcompile.model_loading import load_model

    monkeypatch.chdir(REPO)
    before = list(sys.path)
    loaded = load_model("tests.models.factories:tiny_mlp")
    assert isinstance(loaded.model, torch.nn.Module)
    assert sys.path == before
