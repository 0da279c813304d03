"""Perplexity of a causal language model on held-out standard-library text.

The model is ``benchmarks/tiny_llama/``: a small Llama-architecture decoder (RMSNorm,
SwiGLU, RoPE, grouped-query attention; ``transformers.LlamaForCausalLM``) trained by
``benchmarks/tiny_llama/train.py`` on standard-library docstrings. Its tokenizer is
byte-level and needs no files: token ``b`` (0..255) is the UTF-8 byte ``b`` and token
256 (``BOS``) starts every document.

Text (:func:`lm_texts`): the docstrings of ``qcompile.data.stdlib_docstrings()`` split by
document, with the convention of ``qcompile.data.calibration_and_heldout`` (shuffle with
``random.Random(0)``; held-out texts from the back, calibration texts from the front);
everything in between is the training set. The calibration and held-out texts the model
was trained without are stored in ``benchmarks/tiny_llama/texts.json``, because
docstrings change between Python versions: on any Python the held-out set is the one
the recorded figures were measured on, and the training set is the live corpus minus
every stored text.

Perplexity (:func:`perplexity`): the documents of a split are encoded (``BOS`` + bytes)
and concatenated into one token stream, cut into non-overlapping windows of
``WINDOW = 256`` tokens (the remainder is dropped); in each window, tokens 1..255 are
predicted from the tokens before them in that window (token 0 is context only), and the
perplexity is ``exp(mean NLL)`` over all predicted tokens, in nats per token (= per byte),
accumulated in float64.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import calibration_and_heldout, stdlib_docstrings

__all__ = [
    "BOS",
    "VOCAB_SIZE",
    "WINDOW",
    "N_CALIBRATION",
    "N_HELDOUT",
    "SPLIT_SEED",
    "TRAIN_COMMAND",
    "LMTexts",
    "tiny_llama_dir",
    "encode",
    "decode",
    "token_stream",
    "make_windows",
    "lm_texts",
    "split_texts_live",
    "texts_digest",
    "load_tiny_llama",
    "tiny_llama_metadata",
    "heldout_windows",
    "calibration_inputs",
    "logits_of",
    "nll_sum",
    "mean_nll",
    "perplexity",
    "unigram_cross_entropy",
]

#: Byte-level vocabulary: 256 byte tokens and one beginning-of-document token.
BOS = 256
VOCAB_SIZE = 257
#: Window length of training and evaluation (= the model's max_position_embeddings).
WINDOW = 256
#: The document split (see the module docstring).
N_CALIBRATION = 128
N_HELDOUT = 160
SPLIT_SEED = 0

TRAIN_COMMAND = "python benchmarks/tiny_llama/train.py"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_METADATA = "training.json"
_TEXTS = "texts.json"


def tiny_llama_dir() -> Path:
    """``<repository root>/benchmarks/tiny_llama`` (found from this file: benchmarks/ is not a package)."""
    return Path(__file__).resolve().parent.parent / "benchmarks" / "tiny_llama"


def _require(name: str, folder: str | Path | None = None) -> Path:
    path = (tiny_llama_dir() if folder is None else Path(folder)) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the tiny Llama model folder is made by the training script; "
            f"run `{TRAIN_COMMAND}` from the repository root (about 17 minutes of training on 1 CPU thread)"
        )
    return path


# --------------------------------------------------------------------------- tokenizer

def encode(text: str) -> list[int]:
    """``[BOS] + list(text.encode("utf-8"))``: the byte-level tokens of one document."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return [BOS, *text.encode("utf-8")]


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """Inverse of :func:`encode` over a stream: ``BOS`` becomes a newline, bytes are decoded (invalid UTF-8 replaced)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    out = bytearray()
    for i in ids:
        if not 0 <= i <= BOS:
            raise ValueError(f"token id {i} is outside the byte-level vocabulary 0..{BOS}")
        out += b"\n" if i == BOS else bytes((i,))
    return out.decode("utf-8", errors="replace")


def token_stream(texts: Sequence[str]) -> torch.Tensor:
    """1-D int64 tensor: the documents encoded and concatenated, in order."""
    if isinstance(texts, str):
        raise TypeError("token_stream expects a sequence of texts, got a single str; wrap it in a list")
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text))
    return torch.tensor(ids, dtype=torch.int64)


def make_windows(texts: Sequence[str], length: int = WINDOW) -> torch.Tensor:
    """``[N, length]`` int64: the token stream of ``texts`` cut into non-overlapping windows (remainder dropped)."""
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"a window needs at least 2 tokens (one context, one target), got length={length!r}")
    stream = token_stream(texts)
    n = stream.numel() // length
    if n == 0:
        raise ValueError(f"the texts hold {stream.numel()} tokens, fewer than one window of {length}")
    return stream[: n * length].view(n, length).clone()


# --------------------------------------------------------------------------- text splits

@dataclass(frozen=True)
class LMTexts:
    """Disjoint document splits: ``train`` (the model learned from these), ``calibration``, ``heldout``."""

    train: tuple[str, ...]
    calibration: tuple[str, ...]
    heldout: tuple[str, ...]


def split_texts_live(
    n_calibration: int = N_CALIBRATION, n_heldout: int = N_HELDOUT, seed: int = SPLIT_SEED
) -> LMTexts:
    """The split computed from this Python's ``stdlib_docstrings()`` (what the training script stores).

    ``calibration_and_heldout``'s convention: the corpus shuffled with ``random.Random(seed)``,
    held-out texts from the back, calibration texts from the front, training texts between.
    """
    n_texts = len(stdlib_docstrings())
    if n_calibration < 0 or n_heldout < 0 or n_calibration + n_heldout >= n_texts:
        raise ValueError(
            f"cannot split {n_texts} texts into {n_calibration} calibration + {n_heldout} held-out + a training set"
        )
    # Everything but the held-out texts, in shuffled order; a calibration set is a prefix of it.
    rest, heldout = calibration_and_heldout(n_texts - n_heldout, n_heldout, seed)
    return LMTexts(train=tuple(rest[n_calibration:]), calibration=tuple(rest[:n_calibration]), heldout=tuple(heldout))


def lm_texts(folder: str | Path | None = None) -> LMTexts:
    """The split the stored model was trained with.

    Calibration and held-out texts are read from ``benchmarks/tiny_llama/texts.json``
    (identical on every Python version); the training texts are this Python's
    ``stdlib_docstrings()`` minus every stored text (exactly the training set of the
    recorded run on the Python version recorded in ``training.json``). ``folder``
    defaults to :func:`tiny_llama_dir`.
    """
    path = _require(_TEXTS, folder)
    stored = json.loads(path.read_text(encoding="utf-8"))
    calibration, heldout = tuple(stored["calibration"]), tuple(stored["heldout"])
    if set(calibration) & set(heldout):
        raise ValueError(f"{path}: calibration and held-out texts overlap")
    exclude = set(calibration) | set(heldout)
    corpus = stdlib_docstrings()
    random.Random(stored["seed"]).shuffle(corpus)
    train = tuple(t for t in corpus if t not in exclude)
    return LMTexts(train=train, calibration=calibration, heldout=heldout)


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 of the texts (order-sensitive): identifies a split in the recorded metadata."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------- the model

def tiny_llama_metadata(folder: str | Path | None = None) -> dict[str, Any]:
    """The training record ``benchmarks/tiny_llama/training.json`` (losses, split, settings, time)."""
    return json.loads(_require(_METADATA, folder).read_text(encoding="utf-8"))


def load_tiny_llama(
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    folder: str | Path | None = None,
) -> torch.nn.Module:
    """The trained tiny Llama (``LlamaForCausalLM``) in eval mode, with ``use_cache=False``.

    Built from ``config.json`` and loaded from ``model.safetensors`` (never a pickle) with
    a strict state-dict load. The stored weights are bfloat16; they are cast to ``dtype``
    (float32 holds them exactly). ``config.use_cache`` is False so the forward returns no
    ``DynamicCache`` and ``torch.export`` / ``qcompile.quantize`` can capture it.
    ``folder`` defaults to :func:`tiny_llama_dir`.
    """
    config_path, weights_path = _require(_CONFIG, folder), _require(_WEIGHTS, folder)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise ImportError("load_tiny_llama needs the 'transformers' package: pip install transformers") from exc
    from safetensors.torch import load_file

    config = LlamaConfig.from_json_file(str(config_path))
    config.use_cache = False
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if config.model_type != "llama":
        raise ValueError(f"{config_path} describes a {config.model_type!r} model, expected 'llama'")
    model = LlamaForCausalLM(config)
    state = load_file(str(weights_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied head would be absent from the file; this model's head is untied, so nothing may be missing.
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match {config_path}: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval()


def heldout_windows(length: int = WINDOW) -> torch.Tensor:
    """``[N, length]`` int64 windows of the held-out texts (the recorded perplexity's data)."""
    return make_windows(lm_texts().heldout, length)


def calibration_inputs(n_batches: int = 8, batch_size: int = 4, length: int = WINDOW) -> list[tuple[torch.Tensor]]:
    """Calibration batches for ``qcompile.quantize(..., calibration=...)``: ``[(input_ids,), ...]``.

    Consecutive ``[batch_size, length]`` windows of the calibration texts (never the
    held-out ones). Raises if the calibration texts hold fewer windows than asked for.
    """
    windows = make_windows(lm_texts().calibration, length)
    need = n_batches * batch_size
    if need > windows.shape[0]:
        raise ValueError(f"asked for {need} calibration windows of {length} tokens; the calibration texts hold {windows.shape[0]}")
    return [(windows[i * batch_size:(i + 1) * batch_size],) for i in range(n_batches)]


# --------------------------------------------------------------------------- perplexity

def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, ``.logits``, ``["logits"]`` or the first tuple element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; expected a tensor, "
        "an object with .logits, a dict with 'logits' or a tuple whose first element is the logits"
    )


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size]


def _check_windows(windows: torch.Tensor, batch_size: int) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.int64:
        raise ValueError(
            f"windows must be an int64 tensor [N, T], got "
            f"{type(windows).__name__ if not isinstance(windows, torch.Tensor) else (windows.dtype, tuple(windows.shape))}"
        )
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must hold at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@torch.no_grad()
def nll_sum(
    model_or_fn: Callable[[torch.Tensor], Any], windows: torch.Tensor, batch_size: int = 16
) -> tuple[float, int]:
    """``(sum of NLL in nats, number of predicted tokens)`` of ``model_or_fn`` over ``windows``.

    ``model_or_fn(input_ids)`` with ``input_ids`` an int64 ``[B, T]`` slice of ``windows``
    must return logits ``[B, T, V]`` (or an output holding them, see :func:`logits_of`).
    Position ``t`` predicts token ``t + 1``; log-softmax and the sum are taken in float64.
    """
    _check_windows(windows, batch_size)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for ids in _batches(windows, batch_size):
        logits = logits_of(model_or_fn(ids))
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"expected logits [B, T, V] = [{ids.shape[0]}, {ids.shape[1]}, V], got {tuple(logits.shape)}")
        if int(ids.max()) >= logits.shape[-1]:
            raise ValueError(f"token id {int(ids.max())} is outside the model's {logits.shape[-1]} logits")
        logp = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if not torch.isfinite(nll).all():
            raise ValueError("the model produced non-finite log-probabilities (NaN/inf logits)")
        total += nll.sum()
        count += target.numel()
    return float(total), count


def mean_nll(model_or_fn: Callable[[torch.Tensor], Any], windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean negative log-likelihood in nats per predicted token (see :func:`nll_sum`)."""
    total, count = nll_sum(model_or_fn, windows, batch_size)
    return total / count


def perplexity(model_or_fn: Callable[[torch.Tensor], Any], windows: torch.Tensor, batch_size: int = 16) -> float:
    """``exp(mean NLL)`` of ``model_or_fn`` over ``windows`` (per token; tokens are bytes here).

    ``model_or_fn``: the float model, a ``qcompile.quantize`` result, or any callable
    ``logits = f(input_ids)``. Switch the model to eval mode first (dropout).
    """
    return math.exp(mean_nll(model_or_fn, windows, batch_size))


def unigram_cross_entropy(train_windows: torch.Tensor, eval_windows: torch.Tensor, vocab_size: int = VOCAB_SIZE) -> float:
    """Baseline: nats per token of a unigram model fitted on ``train_windows`` (add-one smoothed), on the
    tokens :func:`nll_sum` predicts in ``eval_windows`` (positions 1.. of each window)."""
    counts = torch.bincount(train_windows.reshape(-1), minlength=vocab_size).to(torch.float64) + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_windows[:, 1:].reshape(-1)].mean())
