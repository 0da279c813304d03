"""Run a test file's Triton kernel cases under Triton's interpreter, in a subprocess.

TRITON_INTERPRET=1 must be set before triton is first imported, so a test file whose kernel
cases need the interpreter runs itself again in a fresh interpreter process with it set,
and asserts that the run passed and ran at least the number of cases it expects (so cases
that silently stopped being collected fail the test)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_kernel_cases(test_file: str, min_passed: int, *pytest_args: str) -> None:
    """Run ``pytest test_file *pytest_args`` with TRITON_INTERPRET=1; assert it passed with
    at least ``min_passed`` tests."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider",
           *pytest_args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"interpreter cases failed (rc {done.returncode}):\n{output[-12000:]}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= min_passed, f"too few interpreter cases ran:\n{output[-4000:]}"


# Markers shared by the test files whose kernel cases run through run_kernel_cases from a
# test named test_kernel_cases_under_the_interpreter (in-process on a CUDA machine instead).
try:
    import triton  # noqa: F401

    from qcompile.kernels import _triton_common as common

    INTERPRETED = common.interpreter_active()
    HAVE_TRITON = True
except ImportError:
    INTERPRETED = HAVE_TRITON = False
ON_CUDA = HAVE_TRITON and torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_CUDA else "cpu"
kernel_case = pytest.mark.skipif(
    not (INTERPRETED or ON_CUDA),
    reason="kernel case: runs under the interpreter in test_kernel_cases_under_the_interpreter's subprocess",
)
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
not_interpreted = pytest.mark.skipif(INTERPRETED, reason="main-process test")
