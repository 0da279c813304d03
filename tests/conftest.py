"""Shared fixtures: the real MiniLM, the zoo's canonical graphs and its quantized models are
built once per session."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _drop_repository_root_from_sys_path() -> None:
    """The repository's top-level folders (kernels/, export/, passes/) are installed as
    ``qcompile.kernels`` etc.; with the root on sys.path they would also be found as top-level
    packages and shadow installed ones (transformers imports the ``kernels`` distribution).
    ``pytest`` with the configured ``--import-mode=importlib`` never adds the root; ``python -m
    pytest`` does (the working directory), so it is taken out again before any test imports."""
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]


_drop_repository_root_from_sys_path()

import torch  # noqa: E402  (after the sys.path clean-up: torch imports nothing of ours, but stay safe)


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``, the README's test command) each worker process runs on
    one core with one torch thread: two workers with two threads each on the 2-core machines
    this runs on would stall every multi-threaded kernel at its barriers."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


# Test files that take minutes, started first: the suite runs under pytest-xdist with
# --dist loadfile (a file stays on one worker) and --no-loadscope-reorder (xdist would
# otherwise order files by their number of tests, which puts the 3 long MiniLM tests last),
# and a long file begun last would run on alone at the end while the other worker idles.
LONG_FILES_FIRST = (
    "tests/test_minilm.py",
    "tests/export/test_parity.py",
    "tests/models/test_zoo_multimodal.py",
    "tests/models/test_zoo_decoders.py",
    "tests/models/test_zoo_encoders.py",
    "tests/models/test_architectures.py",
    "tests/test_generation.py",
)


def pytest_collection_modifyitems(config, items):
    """Long files first (:data:`LONG_FILES_FIRST`), the rest in collection order. Every xdist
    worker sorts the same way, so the collections agree."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}

    def key(item):
        path = Path(str(item.fspath)).resolve()
        relative = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.as_posix()
        return rank.get(relative, len(rank))

    items[:] = sorted(items, key=key)  # stable: the order within and among the other files stays


@pytest.fixture(scope="session")
def minilm():
    from qcompile.data import load_minilm

    model, tokenizer = load_minilm()
    return model, tokenizer


@pytest.fixture(autouse=True)
def _sys_path_restored():
    """A test that extends sys.path (the CLI's factory loader appends the working directory,
    the spawned-worker tests append the root) gives it back afterwards, so no later test in
    the same worker process finds the repository root there."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


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


@pytest.fixture(scope="session")
def quantized_zoo():
    """``get(arch, preset) -> QuantizedModel`` of a zoo architecture (``build(0)``; any entry of
    ``zoo.ALL_ARCHITECTURES``, the core zoo and the wider one), quantized on its first example
    (``inputs(0)``), once per session (under pytest-xdist: once per worker) for every test that
    asks: the architecture tests, the ONNX parity tests and the backend tests share them. Presets that
    need calibration get
    :func:`tests.export.helpers.calibration_batches` (GPTQ's Hessians, smoothing, static
    activation scales). Quantized with the pass manager's verification on (measured: no slower
    than without it, within noise, on these small models), so every model a test gets has had
    its function-preserving passes checked. Tests must not modify the model they get."""
    import qcompile
    from tests.export.helpers import calibration_batches
    from tests.models import zoo

    cache: dict = {}

    def get(arch: str, preset: str):
        if (arch, preset) not in cache:
            entry = zoo.ALL_ARCHITECTURES[arch]
            args, kwargs = entry.inputs(0)
            calibration = calibration_batches(entry) if qcompile.resolve_recipe(preset).needs_calibration else None
            cache[arch, preset] = qcompile.quantize(
                entry.build(0), args, kwargs, recipe=preset, calibration=calibration, progress=False
            )
        return cache[arch, preset]

    return get
