"""Peak memory of GPTQ's inverse: in-place triangular solves against ``torch.cholesky_solve``.

    .venv/bin/python benchmarks/gptq_inverse_memory.py [--k 2048,5632]

``qcompile.gptq`` needs ``(H + λI)⁻¹`` from the Cholesky factor of a ``[K, K]`` float64
Hessian. Each way runs in a fresh subprocess on the same factor; the script reports the
peak resident memory above the process's resident memory just before the call
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``), in units of one
``[K, K]`` float64 matrix, and whether the two results are bit-identical. The factor is
laid out column-major, as ``torch.linalg.cholesky_ex`` returns it (with a row-major factor
the BLAS takes another path and the last bits differ).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, sys, torch
k, how = int(sys.argv[1]), sys.argv[2]
gen = torch.Generator().manual_seed(0)
lower = torch.tril(torch.randn(k, k, generator=gen, dtype=torch.float64) * 0.01) + 3 * torch.eye(k, dtype=torch.float64)
factor = lower.mT.contiguous().mT  # column-major, as torch.linalg.cholesky_ex returns it in qcompile.gptq
del lower
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
base = status("VmRSS")
if how == "cholesky_solve":
    inverse = torch.cholesky_solve(torch.eye(k, dtype=torch.float64), factor)
else:  # what qcompile.gptq does
    inverse = torch.eye(k, dtype=torch.float64).mT
    torch.linalg.solve_triangular(factor, inverse, upper=False, out=inverse)
    torch.linalg.solve_triangular(factor.mT, inverse, upper=True, out=inverse)
torch.save(inverse, sys.argv[3])
print(json.dumps({"above": status("VmHWM") - base}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="2048,5632", help="comma-separated Hessian sizes")
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415  (the parent only compares the saved results)

    print("| K | one [K, K] float64 | cholesky_solve: peak above base | in-place solves: peak above base | bit-identical |")
    print("|---:|---:|---:|---:|:---|")
    for k in (int(v) for v in args.k.split(",")):
        matrix = k * k * 8
        above, results = {}, {}
        for how in ("cholesky_solve", "in_place"):
            path = f"/tmp/gptq_inverse_{how}_{k}.pt"
            out = subprocess.run([sys.executable, "-c", WORKER, str(k), how, path], check=True, capture_output=True,
                                 text=True).stdout
            above[how] = json.loads(out.strip().splitlines()[-1])["above"]
            results[how] = torch.load(path)
        same = torch.equal(results["cholesky_solve"], results["in_place"])
        print(f"| {k} | {matrix / 2**20:.0f} MiB | {above['cholesky_solve'] / 2**20:.0f} MiB "
              f"({above['cholesky_solve'] / matrix:.1f}) | {above['in_place'] / 2**20:.0f} MiB "
              f"({above['in_place'] / matrix:.1f}) | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
