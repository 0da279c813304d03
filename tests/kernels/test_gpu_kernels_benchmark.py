"""benchmarks/gpu_kernels.py runs: its --dry-run (every kernel, reference check and table cell,
on CPU tensors under TRITON_INTERPRET=1, tiny shapes) in a subprocess, since the interpreter
must be switched on before triton is first imported; without a GPU and without --dry-run it
refuses with status 2; its argument parsers reject malformed values. Its times are not tested
(they mean nothing under the interpreter, and timed assertions do not belong in tests)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_kernels.py"
KERNELS = ("quantize_per_token", "quantize_rotated", "hadamard", "linear_w4a16", "linear_w8a8", "linear_w4a8")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _table(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def test_dry_run_covers_every_kernel_and_checks_them():
    done = _run("--dry-run", "--rows", "1,5", "--shapes", "256x96,192x40")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _table(done.stdout)
    # One row per kernel, M and shape, in the order the script runs them.
    assert [(r["kernel"], r["M"], r["K"], r["N"]) for r in rows] == [
        (kernel, m, k, n) for k, n in (("256", "96"), ("192", "40")) for m in ("1", "5") for kernel in KERNELS
    ]
    by_kernel = {kernel: [r for r in rows if r["kernel"] == kernel] for kernel in KERNELS}
    for kernel in ("quantize_per_token", "linear_w8a8", "linear_w4a8"):
        assert {r["check"] for r in by_kernel[kernel]} == {"bitwise"}, by_kernel[kernel]
    # linear_w4a16 (float16 output, float32 accumulation in another order) and hadamard
    # (float32 butterflies vs the reference's order, then float16 rounding): within a few
    # float16 ulps (2**-11 relative) of the reference's largest output.
    for kernel in ("linear_w4a16", "hadamard"):
        for r in by_kernel[kernel]:
            assert float(r["check"].removeprefix("rel err ")) < 4 * 2.0**-11, r
    # The fused rotation: only float32 summation order separates it from quantizing the
    # float32 rotation, so at most a few codes in a thousand sit on a moved rounding boundary.
    for r in by_kernel["quantize_rotated"]:
        assert float(r["check"].split()[0]) < 5e-3, r
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["floor ms"]) > 0 and float(r["baseline ms"]) > 0, r
        gemm = r["kernel"].startswith("linear_")
        assert (r["baseline"], r["TFLOP/s"] != "-") == (("fp16 cuBLAS", True) if gemm else ("copy", False)), r
    assert "CPU (dry run under TRITON_INTERPRET=1)" in done.stdout
    # Tiny shapes meet none of the goals' conditions (K, N >= 4096), which the summary says.
    assert done.stdout.count("no row measured it") == 2
    assert "fused smoothing + Hadamard + quantization: time / copy time <= 1.3: worst" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_without_a_gpu_it_refuses_with_status_2():
    done = _run("--quick")
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr and "--dry-run" in done.stderr


def test_argument_parsers_reject_malformed_values():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_kernels
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert gpu_kernels.parse_shapes("4096x11008,14336X4096") == [(4096, 11008), (14336, 4096)]
    assert gpu_kernels.parse_rows("1,16,1024") == [1, 16, 1024]
    for bad in ("4096", "4096x", "ax4096", "4096x11008x2"):
        with pytest.raises(argparse.ArgumentTypeError, match="KxN"):
            gpu_kernels.parse_shapes(bad)
    for bad in ("1,x", "0,4", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="rows"):
            gpu_kernels.parse_rows(bad)
