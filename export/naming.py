"""Names in the exported ONNX graph: inputs, outputs and dynamic axes.

* Inputs are named after the model's arguments (``input_ids``, ``attention_mask``,
  ``pixel_values``): the captured graph's placeholders already carry those names.
* Outputs are named after their place in the model's output structure:
  ``logits``, ``past_key_values.layers.0.keys``; a plain tensor is ``output``, the
  elements of a returned tuple ``output_0``, ``output_1``, ...
* Dynamic axes: dimension 0 is ``batch``; dimension 1 of a 2-D integer input (token ids,
  masks) is ``sequence``; any other dynamic dimension is ``<input>_dim<d>``. Dimensions
  that had the same size in the example share a name across inputs (``input_ids`` and
  ``attention_mask`` are both ``[batch, sequence]``); a second, different size for the
  same role is ``sequence_2``, and so on.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import onnx_ir as ir
import torch
import torch.utils._pytree as pytree

__all__ = ["output_names", "axis_names", "rename_axes", "sanitize"]

_UNSAFE = re.compile(r"[^0-9A-Za-z_.]")


def sanitize(name: str) -> str:
    name = _UNSAFE.sub("_", name).strip("._") or "value"
    return name


def _key_part(key: object) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def output_names(out_spec: pytree.TreeSpec, taken: Iterable[str] = ()) -> list[str]:
    """One unique name per flat output of a graph whose outputs have structure ``out_spec``."""
    n = out_spec.num_leaves
    names: list[str] = []
    try:
        dummy = pytree.tree_unflatten([torch.empty(0) for _ in range(n)], out_spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(dummy)[0]]
    except (TypeError, ValueError, AttributeError, KeyError):  # a container that cannot hold dummies: use positions
        paths = []
    if len(paths) != n:
        names = [f"output_{i}" for i in range(n)]
    else:
        for path in paths:
            parts = [_key_part(k) for k in path]
            if not parts:
                names.append("output")
                continue
            if parts[0].isdigit():
                parts[0] = f"output_{parts[0]}"
            names.append(sanitize(".".join(parts)))
    return _unique(names, taken)


def _unique(names: Sequence[str], taken: Iterable[str]) -> list[str]:
    seen = set(taken)
    out = []
    for name in names:
        candidate, i = name, 2
        while candidate in seen:
            candidate, i = f"{name}_{i}", i + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def axis_names(
    inputs: Sequence[tuple[str, torch.dtype, int, dict[int, int]]],
) -> list[dict[int, str]]:
    """Names for the dynamic dimensions of each input.

    ``inputs``: per input ``(name, dtype, rank, {dynamic dim: example size})``. Returns per
    input ``{dim: axis name}`` (see the module docstring for the rule).
    """
    by_role_and_size: dict[tuple[str, int], str] = {}
    per_role_count: dict[str, int] = {}
    out: list[dict[int, str]] = []
    for name, dtype, rank, dims in inputs:
        names: dict[int, str] = {}
        for d, size in sorted(dims.items()):
            if d == 0:
                role = "batch"
            elif d == 1 and rank == 2 and not dtype.is_floating_point:
                role = "sequence"
            else:
                role = f"{sanitize(name)}_dim{d}"
            key = (role, size)
            if key not in by_role_and_size:
                count = per_role_count.get(role, 0) + 1
                per_role_count[role] = count
                by_role_and_size[key] = role if count == 1 else f"{role}_{count}"
            names[d] = by_role_and_size[key]
        out.append(names)
    return out


def rename_axes(model: ir.Model, names: Sequence[dict[int, str]]) -> None:
    """Rename the symbolic dimensions of ``model`` after its inputs' axis ``names``.

    The exporter names symbolic sizes after torch's symbols (``s72``); every shape in the
    graph that mentions one (also in expressions such as ``s72*s70``) gets the new name.
    """
    mapping: dict[str, str] = {}
    for value, dims in zip(model.graph.inputs, names):
        if value.shape is None:
            continue
        for d, new in dims.items():
            if d < len(value.shape):
                dim = value.shape[d]
                if isinstance(dim, ir.SymbolicDim) and dim.value:
                    mapping[dim.value] = new
    if not mapping:
        return
    pattern = re.compile(r"(?<![0-9A-Za-z_])(" + "|".join(map(re.escape, sorted(mapping, key=len, reverse=True)))
                         + r")(?![0-9A-Za-z_])")

    def fix(value: ir.Value) -> None:
        shape = value.shape
        if shape is None:
            return
        dims = []
        changed = False
        for dim in shape:
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                new = pattern.sub(lambda m: mapping[m.group(0)], dim.value)
                changed |= new != dim.value
                dims.append(new)
            else:
                dims.append(dim)
        if changed:
            value.shape = ir.Shape(dims)

    for value in (*model.graph.inputs, *model.graph.outputs):
        fix(value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            fix(value)
