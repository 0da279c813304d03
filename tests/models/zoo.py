"""Real Hugging Face ``transformers`` architectures with tiny random configs.

Every entry is model code that nobody in this project wrote, built from a small
config with seeded random weights (no download), in eval mode and float32.

Sizes follow one rule: every ``nn.Linear`` / ``Conv1D`` has ``in_features`` a
multiple of 32 where the architecture allows, so grouped weight quantization
with group 32 always applies.  A few sizes are *intentionally odd* so that a
group-size fallback is exercised (see ``ZooEntry.odd_sizes``):

* llama:  intermediate 192  (a multiple of 64, not of 128)
* qwen2:  intermediate 160  (a multiple of 32 only)
* opt:    ffn_dim 200       (not even a multiple of 32: fc2 has in_features 200)
* gemma:  head_dim 48       (o_proj in_features 96: a multiple of 32, not of 64)

Attention implementation: ``"sdpa"`` (``ATTN_IMPLEMENTATION``), what users get by
default; every builder takes ``attn_implementation="eager"`` too.  Measured on
torch 2.13 / transformers 5.23: with either one every entry exports with
``torch.export.export(model, args, kwargs, strict=False)`` (decoders once their
``DynamicCache`` output is a registered pytree node, or with ``use_cache=False``),
with ``Dim.AUTO`` on every input dimension, and the program is exact on the other
shape.  One catch, and the reason the zoo keeps "sdpa": GPT-2 + "sdpa" breaks
``ExportedProgram.run_decompositions()`` with the default table (Conv1D's
``x.view(-1, n)`` after the decomposed attention: "Cannot view a tensor with shape
[s43, s70, 64] and strides (64, 64*s43, 1) as a tensor with shape (s43*s70, 64)");
keeping ``aten.scaled_dot_product_attention`` and ``aten.linear`` out of the
decomposition table fixes it.  Capture must cope with that graph, so the zoo shows it.

Decoder entries keep the config default ``use_cache=True``: their forward
returns a ``DynamicCache`` inside the output, exactly as a user's model does.
That is the case the capture code must handle; ``ZooEntry.returns_cache`` flags it.

Inputs are what a user (or a tokenizer) passes: ``input_ids`` + ``attention_mask``
(+ ``token_type_ids`` for BERT), padded on the left for decoders and on the right
for encoders, with the pad token id in padded positions; ``pixel_values`` for ViT.
``inputs()`` is batch 2 x 16 tokens; ``other_inputs()`` is batch 3 x 11 tokens (for
dynamic-shape tests; ViT keeps its image size and changes the batch only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers

__all__ = [
    "ZooEntry", "ARCHITECTURES", "DECODERS", "ENCODERS", "ATTN_IMPLEMENTATION", "build", "linear_in_features",
]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]

# Attention implementation for every entry (see the module docstring).
ATTN_IMPLEMENTATION = "sdpa"

#: (batch, sequence length, number of padded positions in the last row)
SHAPE_A = (2, 16, 3)
SHAPE_B = (3, 11, 5)


@dataclass(frozen=True)
class ZooEntry:
    """One architecture.

    name:          registry key, e.g. ``"llama"``.
    kind:          ``"decoder"`` (causal LM), ``"encoder"`` (text) or ``"vision"``.
    build:         ``build(seed=0, attn_implementation=ATTN_IMPLEMENTATION)`` -> eval-mode float32
                   model; same weights for the same seed.
    inputs:        ``inputs(seed=0)`` -> ``(args, kwargs)`` at batch 2 x 16 tokens.
    other_inputs:  ``other_inputs(seed=0)`` -> ``(args, kwargs)`` at batch 3 x 11 tokens (ViT: batch 3).
    returns_cache: the forward's output holds a ``transformers.DynamicCache``.
    odd_sizes:     human-readable list of sizes chosen to miss a power-of-two group size.
    min_dynamic_seq: smallest sequence length a program exported at 16 tokens with ``Dim.AUTO``
                   accepts (measured).  Mistral's sliding-window cache keeps ``sliding_window - 1``
                   = 7 tokens, so its trace guards ``seq >= 7`` and ``seq != 7``: 8 and up.
    """

    name: str
    kind: str
    build: Callable[..., torch.nn.Module]
    inputs: Callable[..., Inputs]
    other_inputs: Callable[..., Inputs]
    returns_cache: bool = False
    odd_sizes: tuple[str, ...] = field(default_factory=tuple)
    min_dynamic_seq: int = 2

    def example(self, seed: int = 0) -> tuple[torch.nn.Module, Inputs]:
        """The model and its first example inputs."""
        return self.build(seed), self.inputs(seed)


def _build_from(model_cls: type, config: transformers.PretrainedConfig, seed: int) -> torch.nn.Module:
    # fork_rng: building a zoo model never disturbs the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    # Parameters keep requires_grad=True, as in a user's model.
    return model.to(torch.float32).eval()


def _text_inputs(
    vocab_size: int,
    pad_token_id: int,
    shape: tuple[int, int, int],
    seed: int,
    *,
    left_padding: bool,
    token_type_ids: bool,
    low: int = 4,
) -> Inputs:
    batch, seq, n_pad = shape
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 100 + seq)
    ids = torch.randint(low, vocab_size, (batch, seq), generator=gen, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad = slice(0, n_pad) if left_padding else slice(seq - n_pad, seq)
    mask[-1, pad] = 0
    ids[-1, pad] = pad_token_id
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if token_type_ids:
        kwargs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return (), kwargs


def _text_entry(
    name: str,
    kind: str,
    model_cls: type,
    make_config: Callable[..., transformers.PretrainedConfig],
    *,
    odd_sizes: tuple[str, ...] = (),
    token_type_ids: bool = False,
    min_dynamic_seq: int = 2,
) -> ZooEntry:
    probe = make_config()
    vocab = probe.vocab_size
    pad = probe.pad_token_id if probe.pad_token_id is not None else 0
    decoder = kind == "decoder"

    def build(seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION) -> torch.nn.Module:
        return _build_from(model_cls, make_config(attn_implementation), seed)

    def inputs(seed: int = 0) -> Inputs:
        return _text_inputs(vocab, pad, SHAPE_A, seed, left_padding=decoder, token_type_ids=token_type_ids)

    def other_inputs(seed: int = 0) -> Inputs:
        return _text_inputs(vocab, pad, SHAPE_B, seed, left_padding=decoder, token_type_ids=token_type_ids)

    return ZooEntry(
        name, kind, build, inputs, other_inputs,
        returns_cache=decoder, odd_sizes=odd_sizes, min_dynamic_seq=min_dynamic_seq,
    )


# --------------------------------------------------------------------------- configs
# Common to all: 2 layers (the attention implementation is a parameter of every config).
_COMMON = dict(num_hidden_layers=2)


def _llama(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=192, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn, **_COMMON,
    )


def _qwen2(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        vocab_size=640, hidden_size=64, intermediate_size=160, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn, **_COMMON,
    )


def _qwen3(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn, **_COMMON,
    )


def _mistral(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # sliding_window 8 < both sequence lengths: the sliding-window mask is really used.
    return transformers.MistralConfig(
        vocab_size=448, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, sliding_window=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn, **_COMMON,
    )


def _gemma(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.GemmaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=1, head_dim=48, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=1, attn_implementation=attn, **_COMMON,
    )


def _phi3(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Fused qkv_proj and gate_up_proj.
    return transformers.Phi3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, original_max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn, **_COMMON,
    )


def _gpt2(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # transformers.pytorch_utils.Conv1D instead of nn.Linear (weight stored as [in, out]).
    return transformers.GPT2Config(
        vocab_size=500, n_embd=64, n_layer=2, n_head=2, n_positions=128, n_inner=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn,
    )


def _opt(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.OPTConfig(
        vocab_size=600, hidden_size=64, word_embed_proj_dim=64, ffn_dim=200, num_attention_heads=2,
        max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2, attn_implementation=attn, **_COMMON,
    )


def _gpt_neox(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Fused query_key_value, parallel residual, partial rotary.
    return transformers.GPTNeoXConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        rotary_pct=0.5, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=0, eos_token_id=2, attn_implementation=attn, **_COMMON,
    )


def _bert(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.BertConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=512, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=0, attn_implementation=attn, **_COMMON,
    )


def _roberta(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Position ids come from the padding (pad_token_id + cumsum of the mask).
    return transformers.RobertaConfig(
        vocab_size=700, hidden_size=64, intermediate_size=256, num_attention_heads=2,
        max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        num_labels=3, attn_implementation=attn, **_COMMON,
    )


def _vit(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # 32x32 image, 8x8 patches: 16 patches + CLS; the patch embedding is a Conv2d (3*8*8 = 192 inputs).
    return transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, intermediate_size=256,
        num_attention_heads=2, num_labels=10, attn_implementation=attn, **_COMMON,
    )


VIT_IMAGE = (3, 32, 32)


def _vit_entry() -> ZooEntry:
    def build(seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION) -> torch.nn.Module:
        return _build_from(transformers.ViTForImageClassification, _vit(attn_implementation), seed)

    def pixels(batch: int, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed * 1000 + batch)
        return (), {"pixel_values": torch.randn(batch, *VIT_IMAGE, generator=gen)}

    return ZooEntry(
        "vit", "vision", build,
        inputs=lambda seed=0: pixels(SHAPE_A[0], seed),
        other_inputs=lambda seed=0: pixels(SHAPE_B[0], seed),
    )


ARCHITECTURES: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _text_entry("llama", "decoder", transformers.LlamaForCausalLM, _llama,
                    odd_sizes=("intermediate_size=192: mlp.down_proj in_features not a multiple of 128",)),
        _text_entry("qwen2", "decoder", transformers.Qwen2ForCausalLM, _qwen2,
                    odd_sizes=("intermediate_size=160: mlp.down_proj in_features a multiple of 32 only",)),
        _text_entry("qwen3", "decoder", transformers.Qwen3ForCausalLM, _qwen3),
        _text_entry("mistral", "decoder", transformers.MistralForCausalLM, _mistral, min_dynamic_seq=8),
        _text_entry("gemma", "decoder", transformers.GemmaForCausalLM, _gemma,
                    odd_sizes=("head_dim=48: o_proj in_features 96, a multiple of 32 only",)),
        _text_entry("phi3", "decoder", transformers.Phi3ForCausalLM, _phi3),
        _text_entry("gpt2", "decoder", transformers.GPT2LMHeadModel, _gpt2),
        _text_entry("opt", "decoder", transformers.OPTForCausalLM, _opt,
                    odd_sizes=("ffn_dim=200: fc2 in_features 200, not a multiple of 32",)),
        _text_entry("gpt_neox", "decoder", transformers.GPTNeoXForCausalLM, _gpt_neox),
        _text_entry("bert", "encoder", transformers.BertModel, _bert, token_type_ids=True),
        _text_entry("roberta", "encoder", transformers.RobertaForSequenceClassification, _roberta),
        _vit_entry(),
    ]
}
"""Registry of architectures by name (insertion order: decoders, then encoders, then vision)."""

DECODERS = tuple(n for n, e in ARCHITECTURES.items() if e.kind == "decoder")
ENCODERS = tuple(n for n, e in ARCHITECTURES.items() if e.kind != "decoder")


def build(
    name: str, seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION
) -> tuple[torch.nn.Module, Inputs, Inputs]:
    """``(model, inputs, other_inputs)`` for the architecture ``name``."""
    try:
        entry = ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown zoo architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    return entry.build(seed, attn_implementation), entry.inputs(seed), entry.other_inputs(seed)


def linear_in_features(model: torch.nn.Module) -> dict[str, int]:
    """``{module name: in_features}`` of every nn.Linear and transformers Conv1D in ``model``."""
    from transformers.pytorch_utils import Conv1D

    out: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[name] = mod.in_features
        elif isinstance(mod, Conv1D):
            out[name] = mod.weight.shape[0]
    return out
