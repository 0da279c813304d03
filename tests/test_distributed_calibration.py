"""Calibration across 2 processes (torch.distributed, gloo on CPU) against one process:
each rank calibrates on its share of the batches and the statistics are all-reduced."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qcompile.calibration import collect_linear_stats
from qcompile.capture import capture
from qcompile.distributed import shard_batches
from qcompile.graph_utils import QWEIGHT_META, layer_name
from qcompile.passes.quantize_weights import quantize_stage
from qcompile.recipe import resolve_recipe
from qcompile.sequential import run_stages
from qcompile.stages import find_stages, stage_module

RECIPE = resolve_recipe({"preset": "w4a16-gptq", "group_size": 16, "sequential": True})


class _Mlp(torch.nn.Module):
    """Three stages (residual blocks) with odd widths."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.ModuleList(torch.nn.Linear(48, 80) for _ in range(3))
        self.down = torch.nn.ModuleList(torch.nn.Linear(80, 48) for _ in range(3))

    def forward(self, x):
        for up, down in zip(self.up, self.down):
            x = x + down(torch.nn.functional.gelu(up(x)))
        return x


def _setup():
    gen = torch.Generator().manual_seed(7)
    batches = [[torch.randn(2, 3 + i, 48, generator=gen)] for i in range(5)]  # 5 batches: uneven shares
    gm = capture(_Mlp().eval(), (batches[0][0],)).graph_module
    return gm, batches


def _calibrate(gm, batches, group):
    """Float statistics of every linear, and the sequentially quantized weights."""
    stats = collect_linear_stats(gm, batches, hessian=True, progress=False, group=group).layers
    out = {}
    for name, s in stats.items():
        out[f"{name}.absmax"], out[f"{name}.hessian"], out[f"{name}.sq_sum"] = s.absmax, s.hessian, s.sq_sum
        out[f"{name}.tokens"] = torch.tensor(s.tokens)
    stages = find_stages(gm)

    def process(stage, module, node_map, stage_batches):
        quantize_stage(module, [(node_map[n], node_map[n]) for n in stage.linears], stage_batches, RECIPE, {},
                       group=group)
        for n in stage.linears:
            qw = node_map[n].meta[QWEIGHT_META]
            out[f"{layer_name(n)}.qweight"], out[f"{layer_name(n)}.scales"] = qw.qweight, qw.scales

    run_stages(gm, stages, batches, load=lambda s: stage_module(gm, s), process=process, progress=False)
    return out


def _worker(rank, world, store, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        gm, batches = _setup()
        out = _calibrate(gm, shard_batches(batches), dist.group.WORLD)
        torch.save(out, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path, monkeypatch):
    # The spawned processes unpickle ``_worker`` by its module name (tests.test_distributed_
    # calibration) with the parent's sys.path, which pytest's importlib mode keeps free of the
    # repository root: append the root for this test, after the installed packages, so
    # ``tests`` is found and no top-level folder of ours shadows an installed package.
    monkeypatch.setattr(sys, "path", [*sys.path, str(Path(__file__).resolve().parent.parent)])
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    gm, batches = _setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a matmul's float32 rounding may depend on the thread count
    try:
        single = _calibrate(gm, batches, None)
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == single.keys() and len(single) == 6 * 6
    for key, expected in single.items():
        for got in ranks:
            if key.endswith((".hessian", ".sq_sum")):
                # float64 sums added in another order (per rank, then across ranks): equal up
                # to float64 rounding of a sum of 5 batches' terms, relative to the largest
                # entry (off-diagonal Hessian entries near 0 come from cancellation)
                torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-13 * float(expected.abs().max()))
            else:
                # abs-max (MAX), token counts (integer SUM) and the rounded weights are bitwise
                # equal: GPTQ's decisions do not move under a 1e-16 relative change of H here
                assert torch.equal(got[key], expected), key
    # every rank calibrated on part of the data only, and the reduction saw it all
    assert int(single["up.0.tokens"]) == sum(2 * (3 + i) for i in range(5))
