"""Loading a model named on the command line, with example and calibration inputs.

``MODEL`` is a local Hugging Face model folder (``config.json`` inside; loaded offline
with ``transformers.AutoModel``) or ``package.module:factory``, a callable returning
either a model or ``(model, example)`` where ``example`` is a tuple of positional args
or a dict of keyword args.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError, ModelLoadError

__all__ = ["LoadedModel", "load_model", "load_calibration"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example: tuple[tuple, dict]
    tokenizer: Any = None
    description: str = ""


def _example_as_call(example: Any) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, torch.Tensor):
        return (example,), {}
    raise ModelLoadError(f"a factory's example must be a tuple of args or a dict of kwargs, got {type(example).__name__}")


def _load_factory(spec: str) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    # The console script's sys.path holds the script's folder, not the working directory
    # (unlike ``python -m``); look there too, as ``python -m`` and uvicorn/gunicorn do, but
    # last: a folder there named like an installed package (qcompile's own repository has
    # kernels/, which transformers would import instead of the `kernels` distribution) must
    # not shadow it. Only while the factory is imported and called: the caller's sys.path is
    # left as it was.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import module {module_name!r} named in {spec!r}: {exc}") from exc
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ModelLoadError(f"{module_name} has no callable {attr!r}")
        made = factory()
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    if isinstance(made, torch.nn.Module):
        raise ModelLoadError(
            f"{spec} returned a model without example inputs; return (model, example) where example is a tuple "
            "of positional args or a dict of keyword args"
        )
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise ModelLoadError(f"{spec} must return (model, example), got {type(made).__name__}")
    return LoadedModel(made[0].eval(), _example_as_call(made[1]), description=spec)


def _load_hf_folder(path: Path) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        model = transformers.AutoModel.from_pretrained(str(path)).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"transformers cannot load the model in {path}: {exc}") from exc
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        from .data import stdlib_docstrings

        enc = tokenizer(stdlib_docstrings()[:2], padding=True, truncation=True, max_length=64, return_tensors="pt")
        example = ((), dict(enc))
    else:
        config = model.config
        if hasattr(config, "image_size") and hasattr(config, "num_channels"):
            size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
            example = ((), {"pixel_values": torch.randn(2, config.num_channels, size, size)})
        elif hasattr(config, "vocab_size"):
            example = ((), {"input_ids": torch.randint(0, config.vocab_size, (2, 16))})
        else:
            raise ModelLoadError(f"cannot make example inputs for {type(model).__name__} in {path}: no tokenizer")
    return LoadedModel(model, example, tokenizer, description=str(path))


def load_model(spec: str) -> LoadedModel:
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a folder without config.json: not a Hugging Face model folder")
        return _load_hf_folder(path)
    if ":" in spec and not path.exists():
        return _load_factory(spec)
    raise ModelLoadError(
        f"MODEL {spec!r} is neither a local Hugging Face model folder nor package.module:factory"
    )


def load_calibration(path: str, loaded: LoadedModel, *, batch_size: int = 8, max_length: int = 128) -> list[Any]:
    """Calibration batches from a text file (one text per line; needs a tokenizer) or a ``.pt`` file.

    A ``.pt`` file holds a list of batches (tuples of args or dicts of kwargs) and is
    read with ``torch.load(weights_only=True)``: no pickled code is ever executed.
    """
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    if file.suffix == ".pt":
        try:
            data = torch.load(file, weights_only=True)
        except Exception as exc:  # a corrupt file, or pickled objects weights_only refuses
            raise CalibrationError(
                f"cannot read calibration file {path} with torch.load(weights_only=True): {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            ) from exc
        if not isinstance(data, (list, tuple)):
            raise CalibrationError(f"{path} must hold a list of batches, got {type(data).__name__}")
        return list(data)
    if loaded.tokenizer is None:
        raise CalibrationError(f"{path} is a text file but {loaded.description} has no tokenizer; pass a .pt file")
    texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise CalibrationError(f"calibration file {path} holds no text")
    keys = set(loaded.example[1])
    out = []
    for i in range(0, len(texts), batch_size):
        enc = loaded.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in keys})
    return out
