"""Peak memory and time of GPTQ's inverse factor: qcompile's against the textbook computation.

    .venv/bin/python benchmarks/gptq_inverse_memory.py [--k 2048,5632]

GPTQ needs the upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` for a ``[K, K]`` float64
Hessian. Two ways, each in a fresh subprocess on the same ``H = Xᵀ X``:

* textbook: ``L = cholesky(H + λI)``, ``(H + λI)⁻¹ = cholesky_solve(I, L)``, ``U =
  cholesky(inverse, upper=True)`` (what GPTQ implementations do, with ``cholesky_inverse``);
* qcompile (``qcompile.gptq._inverse_cholesky``): the factor of the order-reversed matrix
  in place, its triangular inverse in place (LAPACK ``trtri``), and the storage reversed:
  ``U = J M⁻¹ J`` — no inverse formed, no second matrix.

Reported: the peak resident memory above the process's resident memory just before the
call (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), also in units of one
``[K, K]`` float64 matrix; the wall time of the call; and the largest difference between
the two factors relative to the largest entry (both are exact in exact arithmetic).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, sys, time, torch
k, how = int(sys.argv[1]), sys.argv[2]
gen = torch.Generator().manual_seed(0)
x = torch.randn(k + 256, k, generator=gen, dtype=torch.float64)
h = x.T @ x
del x
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
if how == "qcompile":
    from qcompile.gptq import _inverse_cholesky
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
base = status("VmRSS")
start = time.perf_counter()
if how == "textbook":
    damped = h.clone()
    damped.diagonal().add_(0.01 * float(h.diagonal().mean()))
    factor = torch.linalg.cholesky(damped)
    del damped
    inverse = torch.cholesky_solve(torch.eye(k, dtype=torch.float64), factor)
    del factor
    u = torch.linalg.cholesky(inverse, upper=True)
else:
    u, _ = _inverse_cholesky(lambda: h.clone(), 0.01)
seconds = time.perf_counter() - start
above = status("VmHWM") - base
torch.save(u.contiguous(), sys.argv[3])
print(json.dumps({"above": above, "seconds": seconds}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="2048,5632", help="comma-separated Hessian sizes")
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415  (the parent only compares the saved results)

    print("| K | one [K, K] float64 | textbook: peak above base | qcompile: peak above base | textbook s | "
          "qcompile s | max difference / max entry |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in (int(v) for v in args.k.split(",")):
        matrix = k * k * 8
        runs, results = {}, {}
        for how in ("textbook", "qcompile"):
            path = f"/tmp/gptq_inverse_{how}_{k}.pt"
            out = subprocess.run([sys.executable, "-c", WORKER, str(k), how, path], check=True, capture_output=True,
                                 text=True).stdout
            runs[how] = json.loads(out.strip().splitlines()[-1])
            results[how] = torch.load(path)
        ref = results["textbook"]
        diff = float((results["qcompile"] - ref).abs().max() / ref.abs().max())
        t, q = runs["textbook"], runs["qcompile"]
        print(f"| {k} | {matrix / 2**20:.0f} MiB | {t['above'] / 2**20:.0f} MiB ({t['above'] / matrix:.1f}) | "
              f"{q['above'] / 2**20:.0f} MiB ({q['above'] / matrix:.1f}) | {t['seconds']:.2f} | {q['seconds']:.2f} | "
              f"{diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
