"""Lazy loading of a local Hugging Face checkpoint folder (sharded safetensors).

The model is instantiated from ``config.json`` with its parameters on the ``meta`` device
(buffers computed in ``__init__``, such as rotary frequencies, stay real), then every
parameter becomes a zero-stride placeholder (one element, expanded to the parameter's
shape: a few bytes whatever the size) so the model can run once on example inputs and
be captured. The weights themselves are read from the shards only when the stage that
reads them runs (:meth:`LazyCheckpoint.read`): each tensor is memory-mapped on its own
(its byte range of the shard, copy-on-write), so its pages are read when first touched
and leave the process's resident set when that tensor is freed. (A map of the whole
shard, as ``safetensors.safe_open`` makes, stays mapped while any tensor of the shard is
alive: the pages an embedding lookup touched — with readahead and large page-cache
folios, most of the table for a few hundred random tokens — would stay resident through
the next stages reading the same shard.) Nothing is ever unpickled.

Every shard named by ``model.safetensors.index.json`` must exist and have a readable
header; a missing or corrupt shard, or a parameter with no tensor (or the wrong shape) in
the checkpoint, raises :class:`qcompile.errors.ModelLoadError` naming the file/parameter.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ModelLoadError

__all__ = ["LazyCheckpoint", "empty_model", "placeholder_model", "is_placeholder", "checkpoint_bytes",
           "write_safetensors", "write_synthetic_checkpoint"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safe_open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint folder, read on demand (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"{index} is not a safetensors index (no valid 'weight_map'): {exc}") from exc
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            raise ModelLoadError(f"{self.folder} holds neither {INDEX} nor {SINGLE}: not a safetensors checkpoint")
        self.files: dict[str, tuple[str, tuple[int, ...], str]] = {}  # key -> (file, shape, dtype)
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}  # file -> (header, data start), as read
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ModelLoadError(f"checkpoint shard {path} is missing (named in {INDEX})")
            try:
                with _safe_open(path) as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.files[key] = (name, tuple(sl.get_shape()), sl.get_dtype())
            except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
                raise ModelLoadError(
                    f"checkpoint shard {path} is corrupt or unreadable: {type(exc).__name__}: {exc}"
                ) from exc
            if path.stat().st_size != _expected_size(path):
                raise ModelLoadError(f"checkpoint shard {path} is truncated or has trailing bytes "
                                     f"({path.stat().st_size} bytes, its header describes {_expected_size(path)})")
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.files.get(key, (name,))[0] != name:
                    raise ModelLoadError(f"{INDEX} puts {key!r} in {name}, which does not hold it")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[key][1]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys``, each a view of its own copy-on-write memory map of its bytes
        in the shard: its pages are read from disk when first touched, and the map goes away
        with the tensor (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key not in self.files:
                raise ModelLoadError(f"checkpoint {self.folder} has no tensor {key!r}")
            path = self.folder / self.files[key][0]
            try:
                out[key] = _map_tensor(*self.raw(key))
            except (OSError, ValueError) as exc:  # re-raised naming the file: it changed or broke since it was indexed
                raise ModelLoadError(f"cannot read {key!r} from checkpoint shard {path}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return out

    def raw(self, key: str) -> tuple[Path, int, int, str, list[int]]:
        """Where ``key``'s bytes lie: ``(shard path, start, end, safetensors dtype, shape)``,
        for copying a tensor between files without reading it into memory."""
        name = self.files[key][0]
        if name not in self._headers:
            self._headers[name] = _header(self.folder / name)
        header, data_start = self._headers[name]
        entry = header[key]
        begin, end = entry["data_offsets"]
        return self.folder / name, data_start + begin, data_start + end, entry["dtype"], entry["shape"]


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _map_tensor(path: Path, begin: int, end: int, dtype: str, shape: list[int]) -> torch.Tensor:
    """The tensor stored in bytes ``[begin, end)`` of ``path``, as a view of a copy-on-write
    memory map of just those bytes (from the page boundary before ``begin``); the map is
    unmapped when the tensor (the last reference to it) is freed."""
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    numel = 1
    for size in shape:
        numel *= size
    if numel * torch_dtype.itemsize != end - begin:
        raise ValueError(f"{end - begin} bytes cannot hold a {dtype} tensor of shape {list(shape)}")
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    base = begin - begin % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), end - base, offset=base, access=mmap.ACCESS_COPY)
    # the tensor holds the only reference to the map: it is unmapped when the tensor is freed
    return torch.frombuffer(mapped, dtype=torch_dtype, count=numel, offset=begin - base).reshape(shape)


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      copies: dict[str, tuple[Path, int, int, str, list[int]]], metadata: dict[str, str]) -> None:
    """Write a safetensors file holding ``tensors`` (in memory) and ``copies`` (byte ranges of
    other safetensors files, from :meth:`LazyCheckpoint.raw`, copied in 64 MiB chunks so a
    large tensor is never held in memory)."""
    names = _DTYPE_NAMES
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    blobs: list[tuple[str, Any]] = []
    for key, t in tensors.items():
        data = t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(("bytes", data))
    for key, (src, begin, end, dtype, shape) in copies.items():
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
        blobs.append(("copy", (src, begin, end)))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for kind, blob in blobs:
            if kind == "bytes":
                out.write(blob)
                continue
            src, begin, end = blob
            with open(src, "rb") as f:
                f.seek(begin)
                left = end - begin
                while left:
                    chunk = f.read(min(left, 64 << 20))
                    if not chunk:
                        raise ModelLoadError(f"checkpoint shard {src} ended early while copying")
                    out.write(chunk)
                    left -= len(chunk)


def _expected_size(path: Path) -> int:
    """8 + header length + the end of the last tensor's data, from the safetensors header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Total size of the checkpoint's safetensors files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device (buffers stay real)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is a zero-stride placeholder made by :func:`empty_model`."""
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def checkpoint_key(ck: LazyCheckpoint, name: str, prefix: str) -> str:
    """The checkpoint key of parameter ``name`` (as is, or under the base model's prefix)."""
    for key in (name, f"{prefix}.{name}" if prefix else name):
        if key in ck:
            return key
    raise ModelLoadError(f"checkpoint {ck.folder} has no tensor for parameter {name!r}"
                         + (f" (looked for {name!r} and {prefix + '.' + name!r})" if prefix else ""))


def placeholder_model(folder: str | os.PathLike) -> torch.nn.Module:
    """The model of ``folder/config.json`` (``transformers.AutoModel.from_config``, in eval
    mode) with every parameter a zero-stride placeholder of its shape and dtype (buffers
    computed in ``__init__`` stay real); needs no weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        with _parameters_on_meta():
            model = transformers.AutoModel.from_config(config)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"transformers cannot build the model of {folder}/config.json: {exc}") from exc
    model.eval()
    for module in model.modules():
        for p_name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[p_name] = torch.nn.Parameter(
                    torch.zeros((), dtype=param.dtype).expand(param.shape), requires_grad=False)
    return model


def empty_model(folder: str | os.PathLike, ck: LazyCheckpoint) -> tuple[torch.nn.Module, dict[str, str]]:
    """The model of ``folder/config.json`` with placeholder parameters (:func:`placeholder_model`),
    and the map from parameter name to checkpoint key (every parameter checked against the
    checkpoint)."""
    model = placeholder_model(folder)
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module._parameters.items():
            if param is None:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            key = checkpoint_key(ck, full, prefix)
            if tuple(ck.shape(key)) != tuple(param.shape):
                raise ModelLoadError(f"checkpoint tensor {key!r} in {ck.files[key][0]} has shape {ck.shape(key)}; "
                                     f"the model's parameter {full!r} has {tuple(param.shape)}")
            keys[full] = key
    return model, keys


def write_synthetic_checkpoint(config: Any, folder: str | os.PathLike, *, shard_bytes: int = 1 << 30,
                               seed: int = 0, dtype: torch.dtype = torch.float32) -> int:
    """Write a random-weight checkpoint of ``config``'s ``*ForCausalLM`` model into ``folder``:
    ``config.json``, safetensors shards of at most ``shard_bytes`` (one tensor may exceed it)
    and their index, holding one shard in memory at a time. Matrices ~ N(0, 0.02²), vectors
    ~ 1 + N(0, 0.1²) (norm weights); each tensor seeded from ``seed`` and its index.
    Returns the bytes written in shards."""
    import transformers
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    config.save_pretrained(str(folder))
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    del model
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in params:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    index_of = {name: i for i, (name, _) in enumerate(params)}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + index_of[name])
            t = torch.randn(shape, generator=gen)
            tensors[name] = (t * 0.02 if len(shape) >= 2 else 1.0 + 0.1 * t).to(dtype)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += (folder / file).stat().st_size
        del tensors
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total
