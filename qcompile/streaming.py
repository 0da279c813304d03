"""Streaming quantization: a checkpoint larger than memory, quantized stage by stage.

:func:`quantize_checkpoint` captures the model of a local Hugging Face checkpoint folder
without its weights (``qcompile.checkpoint``), cuts the canonical graph into stages at
single-tensor cut points (``qcompile.stages``), and runs them in order
(``qcompile.sequential.run_stages``): a stage's weights are read from the shards, its
linears' statistics/Hessians collected on the outputs of the already quantized earlier
stages, its weights rounded (``passes.quantize_weights.quantize_stage``, the code the
in-memory path runs), its quantized weights written, and its float weights dropped.
Peak memory is about one stage (weights + Hessians + GPTQ's working copies) plus the
calibration activations of one stage boundary; the embedding lookup table is a stage of
its own (``find_stages(..., separate_tables=True)``), so it is never resident together
with a block's weights and GPTQ working set; large weights are rounded a block of rows at
a time (``qcompile.quantizers.row_blocks``); and freed temporaries go back to the system
(``qcompile.heap``). Weight-only recipes without smoothing or rotation (those need the
whole graph at once).

Output (``out``), written incrementally and atomically: the run works in
``out.partial/``; every finished stage is one ``stage-NNNNN.safetensors`` (written to a
temporary name, then renamed) holding the stage's quantized linears (``<param>.qweight``,
``.scales``, ``.zeros``) and its other constants in float (``<param>``, copied from the
checkpoint's shards byte for byte), with the
report rows and the quantized layouts in its metadata; ``manifest.json`` (replaced
atomically) lists the finished stages. When every stage is done, ``config.json``, the
example inputs (``example.safetensors``, their order in its metadata) and the report
(``report.txt``, ``report.json``) are added (and whatever ``before_publish`` writes) and
``out.partial`` is renamed ``out``: a run that fails never leaves ``out``. Run again with
the same arguments, it resumes after the last finished stage (earlier stages are re-run
from their written weights to remake the activations, not re-calibrated); different
arguments are refused.
``qcompile.streamed_model.load_streamed(out)`` rebuilds the quantized model from ``out``.

Distributed: with a ``torch.distributed`` process ``group`` each rank calibrates on its
share of the batches and the statistics are all-reduced (``qcompile.distributed``);
every rank rounds the same weights and rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.quantize_weights import quantize_stage

from .calibration import flatten_calibration, normalize_batch
from .capture import capture
from .checkpoint import LazyCheckpoint, empty_model, is_placeholder, write_safetensors
from .distributed import rank_and_world, shard_batches
from .errors import CalibrationError, ModelLoadError, OutputExistsError, RecipeError
from .graph_utils import QWEIGHT_META, get_constant, layer_name
from .heap import return_large_frees
from .pipeline import PassContext, run_passes
from .quantizers import QuantizedWeight, dequantize_weight
from .recipe import Recipe, resolve_recipe
from .report import Report
from .sequential import peak_rss_bytes, run_stages
from .stages import Stage, find_stages, stage_module

__all__ = ["StreamResult", "quantize_checkpoint", "read_stage", "FORMAT"]

FORMAT = "qcompile-stream/1"
MANIFEST = "manifest.json"
# the report's "out err" inputs: no layer output error is measured when streaming
ERROR_INPUTS = "calibration batches (not measured when streaming)"


@dataclasses.dataclass
class StreamResult:
    """What :func:`quantize_checkpoint` did."""

    out: Path | None  # the finished folder (None on ranks other than 0)
    stages: int
    resumed: int  # stages taken from an earlier, interrupted run
    stage_seconds: dict[int, float]
    peak_rss: int  # bytes, this process
    rows: list[dict[str, Any]]


def _stage_file(index: int) -> str:
    return f"stage-{index:05d}.safetensors"


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _fingerprint(folder: Path, recipe: Recipe, batches: list[list[Any]] | None,
                 stages: list[Stage] | None) -> dict[str, Any]:
    """What must match for a run to resume another: recipe, checkpoint files, calibration, stages
    (without batches and stages: the first two only)."""
    digest = hashlib.sha256()
    for flat in batches or []:
        for value in flat:
            if isinstance(value, torch.Tensor):
                digest.update(str((value.dtype, tuple(value.shape))).encode())
                digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    out = {
        "format": FORMAT,
        "recipe": json.loads(json.dumps(dataclasses.asdict(recipe))),
        "checkpoint": {name: (folder / name).stat().st_size for name in files},
    }
    if batches is not None and stages is not None:
        out["calibration_sha256"] = digest.hexdigest()
        out["stages"] = [[layer_name(n) for n in s.linears] for s in stages]
    return out


def _check_recipe(recipe: Recipe) -> Recipe:
    if recipe.activation_bits != 16:
        raise RecipeError(f"streaming quantization needs a weight-only recipe (w8a16, w4a16, w4a16-gptq); "
                          f"{recipe.name!r} quantizes activations")
    if recipe.smooth != "off" or recipe.rotate != "off":
        raise RecipeError(f"streaming quantization cannot run recipe {recipe.name!r}: smoothing and rotations "
                          "rewrite the whole graph before quantization")
    return recipe.replace(sequential=True)


def _qweight_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.qweight": qw.qweight, f"{prefix}.scales": qw.scales}
    if qw.zeros is not None:
        out[f"{prefix}.zeros"] = qw.zeros
    return out


def read_stage(path: str | os.PathLike) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], list[dict]]:
    """A stage file's quantized weights (by parameter name), float constants, and report rows."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = json.loads(f.metadata()["qcompile"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    qweights = {}
    for param, layout in meta["quantized"].items():
        qweights[param] = QuantizedWeight(
            tensors.pop(f"{param}.qweight"), tensors.pop(f"{param}.scales"), tensors.pop(f"{param}.zeros", None),
            **layout)
    return qweights, tensors, meta["rows"]


def quantize_checkpoint(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    recipe: "str | Recipe | dict[str, Any]" = "w4a16-gptq",
    calibration: list[Any] | None = None,
    example: Any = None,
    group: Any = None,
    progress: bool = True,
    on_stage_done: Callable[[int, float], None] | None = None,
    before_publish: Callable[[Path], None] | None = None,
) -> StreamResult:
    """Quantize the checkpoint in ``folder`` stage by stage into ``out`` (module docstring).

    Args:
        folder: a local Hugging Face model folder (``config.json`` + safetensors shards).
        out: output folder; must not exist (``out.partial`` from an interrupted run with
            the same arguments is resumed).
        recipe: a weight-only recipe (preset name, Recipe or dict); run with ``sequential``.
        calibration: batches (tuples of args or dicts of kwargs) as for ``qcompile.quantize``;
            default: the example alone.
        example: one batch to capture the model with; default: the first calibration batch.
        group: a ``torch.distributed`` process group to calibrate across (see module docstring).
        on_stage_done: called with ``(stage index, seconds)`` after each stage is written.
        before_publish: called (rank 0) with the finished ``out.partial`` folder before it is
            renamed ``out``, to add files to the result atomically (the CLI's ``model.onnx``);
            if it raises, ``out.partial`` stays, complete, and a run with the same arguments
            resumes it (every stage done) and calls it again.
    """
    folder, out = Path(folder), Path(out)
    recipe_obj = _check_recipe(resolve_recipe(recipe))
    # large temporaries go back to the system when freed, not into a heap that only grows
    # (qcompile.heap; process-wide, as a streaming run is meant to be bounded in memory)
    return_large_frees()
    rank, _world = rank_and_world(group)
    if out.exists():
        raise OutputExistsError(f"output folder {out} exists; choose another or remove it first")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    if calibration is None and example is None:
        raise CalibrationError("give calibration batches (or at least an example batch) to quantize with")
    calibration = list(calibration) if calibration is not None else [example]
    example = calibration[0] if example is None else example
    ck = LazyCheckpoint(folder)
    work = out.with_name(out.name + ".partial")
    if rank == 0:  # refuse a mismatched resume before the (slow) capture
        _resume_state(work, _fingerprint(folder, recipe_obj, None, None))
    model, keys = empty_model(folder, ck)
    ex_args, ex_kwargs = normalize_batch(example)
    captured = capture(model, ex_args, ex_kwargs)
    del model
    example_flat = captured.flatten_inputs(ex_args, ex_kwargs)
    ctx = PassContext(recipe_obj, example_flat, verify=False, progress=False)
    gm = run_passes(captured.graph_module, [canonicalize], ctx)
    all_batches = flatten_calibration(captured, calibration)
    stages = find_stages(gm, separate_tables=True)  # the embedding table is never held with a block's weights
    fingerprint = _fingerprint(folder, recipe_obj, all_batches, stages)
    # each rank runs and calibrates on its own share of the batches only
    batches = shard_batches(all_batches, group) if group is not None else all_batches
    done = _resume_state(work, fingerprint) if rank == 0 else set()
    if group is not None:
        done = _broadcast_done(done, group)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        if not done:
            _atomic_json(work / MANIFEST, {**fingerprint, "done": []})
    sources = _constant_sources(gm, keys)
    rows: dict[str, dict] = {}
    seconds: dict[int, float] = {}

    def load(stage: Stage):
        wanted = [keys[sources[n]] for n in stage.constants if n in sources]
        tensors = ck.read(wanted)
        own = {}
        if stage.index in done:  # written by the interrupted run: its quantized weights, dequantized
            qweights, _floats, stage_rows = read_stage(work / _stage_file(stage.index))
            own = {param: dequantize_weight(qw) for param, qw in qweights.items()}
            for row in stage_rows:
                rows[row["layer"]] = row

        def constant(node: fx.Node) -> torch.Tensor:
            current = get_constant(gm, node)
            if node not in sources:
                return current
            if sources[node] in own:
                return own[sources[node]].to(current.dtype)
            return tensors[keys[sources[node]]].to(current.dtype)

        return stage_module(gm, stage, constant)

    def process(stage: Stage, module: fx.GraphModule, node_map: dict, stage_batches: list[list[Any]]) -> None:
        pairs = [(node_map[n], node_map[n]) for n in stage.linears]
        stage_rows: dict[str, dict] = {}
        quantize_stage(module, pairs, stage_batches, recipe_obj, stage_rows, group=group)
        rows.update(stage_rows)
        if rank == 0:
            _write_stage(work, stage, node_map, sources, ck, keys, stage_rows)

    def finished(stage: Stage, secs: float) -> None:
        seconds[stage.index] = secs
        if rank == 0 and stage.index not in done:
            manifest = json.loads((work / MANIFEST).read_text())
            manifest["done"] = sorted(set(manifest["done"]) | {stage.index})
            _atomic_json(work / MANIFEST, manifest)
        if on_stage_done is not None:
            on_stage_done(stage.index, secs)

    run_stages(gm, stages, batches, load=load, process=process, skip=lambda s: s.index in done,
               progress=progress, on_done=finished)
    result_out = None
    if rank == 0:
        _finish(work, folder, example_flat, captured, recipe_obj, rows, seconds)
        if before_publish is not None:
            before_publish(work)
        os.replace(work, out)
        result_out = out
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group)
    order = [layer_name(n) for s in stages for n in s.linears]
    return StreamResult(result_out, len(stages), len(done), seconds, peak_rss_bytes(),
                        [rows[name] for name in order if name in rows])


def _constant_sources(gm: fx.GraphModule, keys: dict[str, str]) -> dict[fx.Node, str]:
    """get_attr node -> parameter name, for the constants read from the checkpoint."""
    sources = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        source = node.meta.get("qcompile.source")
        tensor = get_constant(gm, node)
        if source in keys:
            if not is_placeholder(tensor):
                raise ModelLoadError(
                    f"constant {node.target!r} (parameter {source!r}) was computed from the weights while capturing "
                    "(e.g. a transposed Conv1D weight): streaming needs linears that read their weights as stored")
            sources[node] = source
        elif tensor is not None and is_placeholder(tensor):
            raise ModelLoadError(f"constant {node.target!r} of the graph has no checkpoint tensor")
    return sources


def _resume_state(work: Path, fingerprint: dict[str, Any]) -> set[int]:
    """The finished stages of an interrupted run in ``work`` (empty if none); refuses a run
    whose manifest differs from ``fingerprint`` in any key ``fingerprint`` holds."""
    manifest_path = work / MANIFEST
    if not work.exists():
        return set()
    if not manifest_path.is_file():
        raise OutputExistsError(f"{work} exists without {MANIFEST}: not a resumable run; remove it")
    manifest = json.loads(manifest_path.read_text())
    differs = [k for k in fingerprint if manifest.get(k) != fingerprint[k]]
    if differs:
        raise OutputExistsError(f"{work} is an interrupted run with a different {', '.join(differs)}; "
                                "remove it or run with the same arguments to resume")
    done = set(manifest["done"])
    missing = [i for i in sorted(done) if not (work / _stage_file(i)).is_file()]
    if missing:
        raise OutputExistsError(f"{work}: stage file {_stage_file(missing[0])} listed as done is missing; remove {work}")
    return done


def _broadcast_done(done: set[int], group: Any) -> set[int]:
    import torch.distributed as dist

    box = [sorted(done)]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return set(box[0])


def _write_stage(work: Path, stage: Stage, node_map: dict, sources: dict[fx.Node, str], ck: LazyCheckpoint,
                 keys: dict[str, str], stage_rows: dict[str, dict]) -> None:
    """The stage's file: quantized linears from memory, its other constants copied byte for
    byte from the checkpoint's shards (in the checkpoint's dtype; never read whole)."""
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict] = {}
    for n in stage.linears:
        qw = node_map[n].meta.get(QWEIGHT_META)
        if qw is None:
            continue
        param = sources[n.args[1]]
        tensors.update(_qweight_tensors(param, qw))
        layouts[param] = dict(bits=qw.bits, group_size=qw.group_size, in_features=qw.in_features,
                              out_features=qw.out_features, symmetric=qw.symmetric)
    copies = {sources[n]: ck.raw(keys[sources[n]]) for n in stage.constants
              if n in sources and sources[n] not in layouts}
    rows = [{k: v for k, v in r.items() if k != "node"} for r in stage_rows.values()]
    meta = {"qcompile": json.dumps({"quantized": layouts, "rows": rows}, default=str)}
    path = work / _stage_file(stage.index)
    tmp = path.with_name(f".{path.name}.tmp")
    write_safetensors(tmp, tensors, copies, meta)
    os.replace(tmp, path)


def _finish(work: Path, folder: Path, example_flat: list[Any], captured, recipe: Recipe, rows: dict,
            seconds: dict[int, float]) -> None:
    from safetensors.torch import save_file

    shutil.copyfile(folder / "config.json", work / "config.json")
    example = {path: v.contiguous() for path, v in zip(captured.input_paths, example_flat)
               if isinstance(v, torch.Tensor)}
    # the flat inputs' order (safetensors lists its keys sorted): the loader captures again
    # with the arguments in this order (qcompile.streamed_model)
    save_file(example, str(work / "example.safetensors"), metadata={"input_paths": json.dumps(captured.input_paths)})
    manifest = json.loads((work / MANIFEST).read_text())
    manifest.update(complete=True, stage_seconds=seconds)
    report = Report(recipe, list(rows.values()), error_inputs=ERROR_INPUTS)
    (work / "report.txt").write_text(str(report) + "\n")
    (work / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    _atomic_json(work / MANIFEST, manifest)
