"""Load the output of streaming quantization (``qcompile.streaming``) as a QuantizedModel.

:func:`load_streamed` rebuilds the quantized model from the output folder alone (no
original checkpoint): the model of ``out/config.json`` is built with placeholder
parameters (``qcompile.checkpoint.placeholder_model``), captured with the stored example
inputs (``example.safetensors``) and canonicalized, as the streaming run did; every
constant the run took from the checkpoint is then filled from the stage files — float
constants as stored, quantized linears as ``node.meta['qcompile.qweight']`` — and
``lower_to_kernels`` turns those linears into ``qcompile::`` ops, as the in-memory path
does. The weight constant of a quantized linear is never materialized in float: lowering
drops it; one that something else also reads (a weight tied to an embedding lookup) gets
the stage file's float copy when there is one, else the dequantized weight. So memory is
about the quantized model: packed weights, scales and the float constants (embeddings,
norms).

Refused with :class:`qcompile.errors.ModelLoadError` naming the file: a run that is not
complete (no ``manifest.json``, or one without ``complete``), a stage file that is
missing, truncated or corrupt, and stage files that do not cover the graph's constants.
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.lower_to_kernels import lower_to_kernels

from .api import QuantizedModel
from .budget import Budget
from .capture import capture
from .checkpoint import is_placeholder, placeholder_model
from .errors import ModelLoadError
from .graph_utils import QWEIGHT_META, get_constant, layer_name, quantizable_linears
from .pipeline import PassContext, run_passes
from .quantizers import QuantizedWeight, dequantize_weight
from .recipe import Recipe, resolve_recipe
from .report import Report
from .streaming import ERROR_INPUTS, FORMAT, MANIFEST, _constant_sources, _stage_file, read_stage

__all__ = ["load_streamed"]

EXAMPLE = "example.safetensors"


def load_streamed(out: str | os.PathLike, *, progress: bool = False) -> QuantizedModel:
    """The quantized model a finished ``quantize_checkpoint`` run wrote to ``out`` (module
    docstring): called like the model (any batch size and sequence length), with its
    report; ``qcompile.export.to_onnx`` exports it. ``progress``: a bar over the stage files."""
    out = Path(out)
    manifest = _complete_manifest(out)
    recipe = _recipe(manifest["recipe"], out)
    qweights, floats, rows = _read_stages(out, len(manifest["stages"]), progress)
    model = placeholder_model(out)
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    args, kwargs = _example(out, model)
    captured = capture(model, args, kwargs)
    del model
    example_flat = captured.flatten_inputs(args, kwargs)
    ctx = PassContext(recipe, example_flat, verify=False, progress=False)
    gm = run_passes(captured.graph_module, [canonicalize], ctx)
    sources = _constant_sources(gm, {name: name for name in names})
    _fill_constants(gm, sources, qweights, floats, out)
    ctx.layers.update(_attach_qweights(gm, sources, qweights, rows, out))
    gm = run_passes(gm, [lower_to_kernels], ctx)
    _fill_tied(gm, sources, qweights, out)
    captured.graph_module = gm
    return QuantizedModel(captured, Report(recipe, list(ctx.layers.values()), error_inputs=ERROR_INPUTS))


def _complete_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    partial = out.with_name(out.name + ".partial")
    if not out.exists() and partial.is_dir():
        raise ModelLoadError(f"{out} does not exist, only {partial}: the streaming run did not finish; run it again "
                             "with the same arguments to resume it")
    if not out.is_dir():
        raise ModelLoadError(f"{out} is not a folder written by streaming quantization")
    if not path.is_file():
        raise ModelLoadError(f"{out} has no {MANIFEST}: not the output of streaming quantization")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{path} has format {manifest.get('format')!r}; this qcompile reads {FORMAT!r}")
    if not manifest.get("complete"):
        raise ModelLoadError(f"{path} is not marked complete: the streaming run that wrote {out} did not finish "
                             f"({len(manifest.get('done', []))} of {len(manifest.get('stages', []))} stages done); "
                             "run it again with the same arguments to resume it")
    done, count = sorted(manifest["done"]), len(manifest["stages"])
    if done != list(range(count)):
        raise ModelLoadError(f"{path} is marked complete but lists stages {done} done of {count}")
    return manifest


def _recipe(fields: dict[str, Any], out: Path) -> Recipe:
    """The recipe of the manifest (``dataclasses.asdict`` of it, through JSON)."""
    fields = dict(fields)
    if fields.get("budget") is not None:
        fields["budget"] = Budget(**fields["budget"])
    if fields.get("precision_pins"):
        fields["precision_pins"] = tuple(tuple(pin) for pin in fields["precision_pins"])
    try:
        return resolve_recipe(fields)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"the recipe in {out / MANIFEST} is not one this qcompile reads: {exc}") from exc


def _read_stages(out: Path, count: int, progress: bool) -> tuple[dict[str, QuantizedWeight],
                                                                 dict[str, torch.Tensor], dict[str, dict]]:
    """Every stage file's quantized weights and float constants (by parameter name) and its
    report rows (by layer), in stage order."""
    qweights: dict[str, QuantizedWeight] = {}
    floats: dict[str, torch.Tensor] = {}
    rows: dict[str, dict] = {}
    for index in tqdm(range(count), desc="loading stages", unit="stage", disable=not progress):
        path = out / _stage_file(index)
        if not path.is_file():
            raise ModelLoadError(f"stage file {path} is missing ({MANIFEST} lists stage {index} as done)")
        try:
            stage_q, stage_f, stage_rows = read_stage(path)
        except Exception as exc:  # safetensors' own SafetensorError, OSError, bad JSON / layout metadata
            raise ModelLoadError(f"stage file {path} is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc
        qweights.update(stage_q)
        floats.update(stage_f)
        rows.update((row["layer"], row) for row in stage_rows)
    return qweights, floats, rows


_PATH = re.compile(r"\[([01])\]\[([^\[\]]+)\]")


def _example(out: Path, model: torch.nn.Module) -> tuple[tuple, dict[str, Any]]:
    """The example ``(args, kwargs)`` stored in ``example.safetensors``, in the order the
    streaming run captured them with (the file's metadata; else the forward's signature)."""
    from safetensors import safe_open

    path = out / EXAMPLE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: the example inputs the model is captured with")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' own SafetensorError, OSError
        raise ModelLoadError(f"{path} is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc
    if "input_paths" in meta:
        order = json.loads(meta["input_paths"])
    else:  # written before the order was recorded: positional first, keywords in the forward's order
        signature = list(inspect.signature(model.forward).parameters)

        def rank(p: str) -> tuple[int, int]:
            where, key = _key(p, path)
            return (where, key if where == 0 else signature.index(key) if key in signature else len(signature))

        order = sorted(tensors, key=rank)
    positional: dict[int, torch.Tensor] = {}
    kwargs: dict[str, Any] = {}
    for p in order:
        if p not in tensors:
            raise ModelLoadError(f"{path} has no tensor for example input {p}: the model was captured with a "
                                 "non-tensor input there, which the loader cannot rebuild")
        where, key = _key(p, path)
        if where == 0:
            positional[key] = tensors[p]
        else:
            kwargs[key] = tensors[p]
    if sorted(positional) != list(range(len(positional))):
        raise ModelLoadError(f"{path} holds positional example inputs {sorted(positional)}: not consecutive")
    return tuple(positional[i] for i in range(len(positional))), kwargs


def _key(p: str, path: Path) -> tuple[int, Any]:
    """``"[0][2]"`` -> (0, 2): the third positional argument; ``"[1]['input_ids']"`` -> (1, "input_ids")."""
    match = _PATH.fullmatch(p)
    key = ast.literal_eval(match.group(2)) if match else None
    if match is None or not isinstance(key, int if match.group(1) == "0" else str):
        raise ModelLoadError(f"{path}: example input {p!r} is not a top-level positional or keyword argument")
    return int(match.group(1)), key


def _fill_constants(gm: fx.GraphModule, sources: dict[fx.Node, str], qweights: dict[str, QuantizedWeight],
                    floats: dict[str, torch.Tensor], out: Path) -> None:
    """Every checkpoint constant of ``gm`` from the stage files: float ones as stored (in the
    graph's dtype); those stored quantized only stay placeholders until lowering."""
    for node, param in sources.items():
        current = get_constant(gm, node)
        if param in floats:
            value = floats[param]
            if tuple(value.shape) != tuple(current.shape):
                raise ModelLoadError(f"{param!r} in the stage files of {out} has shape {tuple(value.shape)}; "
                                     f"the model of {out / 'config.json'} has {tuple(current.shape)}")
            setattr(gm, node.target, value.to(current.dtype))
        elif param not in qweights:
            raise ModelLoadError(f"parameter {param!r} (constant {node.target!r}) is in none of the stage files "
                                 f"of {out}")


def _attach_qweights(gm: fx.GraphModule, sources: dict[fx.Node, str], qweights: dict[str, QuantizedWeight],
                     rows: dict[str, dict], out: Path) -> dict[str, dict]:
    """Attach each stored QuantizedWeight to the linear reading its parameter; returns the
    report rows by layer (with the linear's node, for lowering to rename), in graph order."""
    layers: dict[str, dict] = {}
    attached: set[str] = set()
    for node in quantizable_linears(gm):
        param = sources.get(node.args[1])
        name = layer_name(node)
        if name in rows:
            layers[name] = {**rows[name], "node": node.name}
        if param not in qweights:
            continue
        qw = qweights[param]
        shape = tuple(get_constant(gm, node.args[1]).shape)
        if (qw.out_features, qw.in_features) != shape:
            raise ModelLoadError(f"quantized {param!r} in the stage files of {out} is "
                                 f"{qw.out_features}x{qw.in_features}; the model's linear {name} is "
                                 f"{shape[0]}x{shape[1]}")
        node.meta[QWEIGHT_META] = qw
        attached.add(param)
    orphans = sorted(set(rows) - set(layers))
    if orphans:
        raise ModelLoadError(f"the stage files of {out} report layers the model has no linear for: "
                             f"{', '.join(orphans)}")
    unread = sorted(set(qweights) - attached)
    if unread:
        raise ModelLoadError(f"the stage files of {out} hold quantized weights no linear of the model reads: "
                             f"{', '.join(unread)}")
    return layers


def _fill_tied(gm: fx.GraphModule, sources: dict[fx.Node, str], qweights: dict[str, QuantizedWeight],
               out: Path) -> None:
    """After lowering: a quantized weight still read by another op (stored quantized only)
    gets its dequantized value; no placeholder may remain."""
    for node in gm.graph.nodes:
        tensor = get_constant(gm, node)
        if tensor is None or not is_placeholder(tensor):
            continue
        param = sources.get(node)
        if param not in qweights:  # _fill_constants filled every other checkpoint constant
            raise ModelLoadError(f"constant {node.target!r} of the loaded graph has no value in {out}")
        setattr(gm, node.target, dequantize_weight(qweights[param], tensor.dtype))
