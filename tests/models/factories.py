"""Small models for the command line, named as ``tests.models.factories:NAME``.

``qcompile quantize MODEL`` takes ``package.module:factory``: a callable returning
``(model, example)``, with ``example`` a tuple of positional args or a dict of keyword
args. The factories here build real Hugging Face architectures from the tiny configs of
:mod:`tests.models.zoo` (random weights, no download).

:func:`write_tiny_bert_folder` writes a tiny Hugging Face model folder
(``save_pretrained`` of a small BERT plus a ``BertTokenizerFast`` built from a vocabulary
file written here, no network) for ``qcompile quantize DIR``.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "tiny_llama",
    "tiny_bert",
    "tiny_mlp",
    "bare_model",
    "not_a_model",
    "data_dependent",
    "TINY_VOCAB",
    "write_tiny_bert_folder",
]


def tiny_llama() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer Llama (hidden 128, intermediate 192, 15 linears incl. lm_head) and its kwargs."""
    from tests.models import zoo  # imported here: transformers is slow to import, tiny_mlp needs none

    model, (_, kwargs), _ = zoo.build("llama")
    return model, kwargs


def tiny_bert() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer BERT encoder (12 linears + pooler) and its kwargs."""
    from tests.models import zoo

    model, (_, kwargs), _ = zoo.build("bert")
    return model, kwargs


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Two linears, one positional input: the smallest thing the CLI can quantize."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _MLP().eval()
        x = torch.randn(4, 64)
    return model, (x,)


def bare_model() -> torch.nn.Module:
    """Wrong on purpose: a model without example inputs."""
    return _MLP().eval()


def not_a_model() -> tuple[str, dict]:
    """Wrong on purpose: not ``(model, example)``."""
    return "model", {}


class _DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:  # data-dependent Python control flow: torch.export cannot capture it
            return y * 2
        return y - 1


def data_dependent() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A model torch.export cannot capture (branches on a tensor's value)."""
    return _DataDependent().eval(), (torch.randn(2, 32),)


# --------------------------------------------------------------------------------------
# A tiny Hugging Face model folder

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = (
    "the a an of to in and or is are was be for on with as by at from this that it not "
    "return returns value values object objects list lists string strings file files name "
    "names type types module modules function functions class classes method methods "
    "argument arguments default true false none if else when which each new data path "
    "number numbers text line lines error errors key keys dict set get call called use "
    "used python standard library test tests model models input output"
).split()
#: The vocabulary of the tiny tokenizer: special tokens, words, letters and digits
#: (every lowercase ASCII word tokenizes through the single characters and ``##`` pieces).
TINY_VOCAB: list[str] = list(dict.fromkeys(
    _SPECIAL
    + _WORDS
    + list("abcdefghijklmnopqrstuvwxyz0123456789")
    + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    + list(".,;:!?'\"()[]{}-_=+*/\\<>#@%&|`~^$")
))


def write_tiny_bert_folder(path: str | Path, *, seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a tiny BERT (``save_pretrained``) and, optionally, its tokenizer into ``path``.

    The model is ``transformers.BertModel`` with a 2-layer config (hidden 64, so
    in-features are multiples of 32), vocabulary = :data:`TINY_VOCAB`. The tokenizer is a
    ``BertTokenizerFast`` built from a ``vocab.txt`` written here (no network). Returns
    ``path``.
    """
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.BertConfig(
        vocab_size=len(TINY_VOCAB), hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertModel(config).eval()
    model.save_pretrained(str(path))
    if tokenizer:
        vocab_file = path / "vocab.txt"
        vocab_file.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
        # from_pretrained on the folder holding only vocab.txt: the one way to build it from a
        # vocabulary file that both transformers 4 (vocab_file=) and 5 (vocab=) accept.
        tok = transformers.BertTokenizerFast.from_pretrained(str(path), do_lower_case=True, model_max_length=128)
        if tok.vocab_size != len(TINY_VOCAB):
            raise RuntimeError(f"tokenizer built with {tok.vocab_size} tokens, expected {len(TINY_VOCAB)}")
        tok.save_pretrained(str(path))
    return path


def example_texts() -> list[str]:
    """A few lines of text for a calibration file."""
    return [
        "Return the value of the named attribute of object.",
        "A list of strings, one for each line in the file.",
        "If the key is not in the dict, return the default value.",
        "Call the function with each argument and use the returned data.",
        "The standard library module for paths and files.",
    ]

