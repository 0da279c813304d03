"""Run a graph stage by stage over calibration batches, keeping only the live values.

The driver of sequential (and streaming) quantization: for every stage of
``qcompile.stages.find_stages`` in order, ``load`` builds the stage's module, ``process``
quantizes it in place given the stage's inputs for every batch, and the driver then runs
the (now quantized) stage to make the next stages' inputs. Between stages only the values
later stages read are kept (the main tensor plus side values such as masks, per batch);
a stage's module — and so its weights — is dropped (and collected, and the freed heap
trimmed) once its outputs are made.
A progress bar shows each stage's wall time and the process's peak resident memory.
"""
from __future__ import annotations

import gc
import resource
import sys
import time
from typing import Any, Callable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .heap import trim_heap
from .stages import Stage

__all__ = ["LoadFn", "ProcessFn", "peak_rss_bytes", "run_stages"]

LoadFn = Callable[[Stage], "tuple[fx.GraphModule, dict[fx.Node, fx.Node]]"]
ProcessFn = Callable[[Stage, fx.GraphModule, "dict[fx.Node, fx.Node]", "list[list[Any]]"], None]


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes.

    On Linux the high-water mark of this process's own memory (``VmHWM``): ``getrusage``'s
    ``ru_maxrss`` is kept across ``fork`` + ``exec``, so a subprocess started by a large
    parent would report the parent's resident memory at the fork as its own peak.
    Elsewhere ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:  # not Linux: no /proc
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_stages(
    gm: fx.GraphModule,
    stages: list[Stage],
    batches: list[list[Any]],
    *,
    load: LoadFn,
    process: ProcessFn,
    skip: Callable[[Stage], bool] | None = None,
    progress: bool = True,
    on_done: Callable[[Stage, float], None] | None = None,
) -> None:
    """Run ``stages`` of ``gm`` over ``batches`` (flat graph inputs), in order.

    ``load(stage) -> (module, parent->copy node map)``; ``process(stage, module, map,
    stage_batches)`` is called before the module runs (it may change its weights);
    ``skip(stage)`` true means the stage was already processed (a resumed run): its module
    is loaded and run but not processed. ``on_done(stage, seconds)`` follows each stage.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    envs: list[dict[fx.Node, Any]] = [dict(zip(placeholders, flat)) for flat in batches]
    last_reader: dict[fx.Node, int] = {}
    for stage in stages:
        for n in stage.inputs:
            last_reader[n] = stage.index
    bar = tqdm(stages, desc="stages", unit="stage", disable=not progress)
    for stage in bar:
        start = time.perf_counter()
        module, node_map = load(stage)
        stage_batches = [[env[n] for n in stage.inputs] for env in envs]
        if skip is None or not skip(stage):
            process(stage, module, node_map, stage_batches)
        with torch.no_grad():
            for env, flat in zip(envs, stage_batches):
                env.update(zip(stage.outputs, module(*flat)))
        del module, node_map, stage_batches
        for env in envs:
            for n in [n for n in env if last_reader.get(n, -1) <= stage.index]:
                del env[n]
        # a GraphModule sits in reference cycles: without a collection its weights (memory
        # maps of the checkpoint when streaming) would outlive the stage until the cyclic
        # collector happens to run, and accumulate over stages
        gc.collect()
        trim_heap()  # and the heap pages the stage freed go back to the system
        seconds = time.perf_counter() - start
        bar.set_postfix(stage=f"{seconds:.1f}s", peak_rss=f"{peak_rss_bytes() / 2**30:.2f}GiB")
        if on_done is not None:
            on_done(stage, seconds)
