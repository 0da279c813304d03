"""Real Hugging Face ``transformers`` architectures with tiny random configs.

Every entry is model code that nobody in this project wrote, built from a small
config with seeded random weights (no download), in eval mode and float32.

Two registries (``ALL_ARCHITECTURES`` is both, 36 entries):

* ``ARCHITECTURES`` — the core zoo (12): llama, qwen2, qwen3, mistral, gemma, phi3, gpt2, opt,
  gpt_neox, bert, roberta, vit. Every deep test runs on these (all recipes, smoothing groups,
  rotations, every export flavor); their names and behaviour are fixed.
* ``EXTENDED`` — the wider zoo (24), one or two of each further structural kind, run by the
  cheaper tests (w8a16 through ``qcompile.quantize``, the torch.compile backend, ONNX Runtime):
  decoders gemma2, phi (phi-1/2), falcon, bloom, gptj, stablelm, cohere, olmo, starcoder2,
  gpt_bigcode; encoders with task heads distilbert (sequence classification), deberta_v2
  (sequence classification), albert (question answering, one layer group shared by both
  layers), electra (token classification), xlm_roberta (masked LM, tied head);
  encoder-decoders t5, bart, whisper; vision swin, deit (image classification; BEiT left out
  for time: DeiT covers the ViT structure);
  multimodal clip (CLIPModel); audio wav2vec2 (CTC), hubert (audio classification);
  state-space mamba2. One layer each (encoder-decoders: one encoder and one decoder layer;
  CLIP: one per tower; Swin: one block per stage, depths [1, 1]; ALBERT: its one shared layer
  group used twice), hidden size 64: their tests' time goes into capture, torch.export, Dynamo
  and the ONNX export, in proportion to the graph.

``ZooEntry.kind`` is one of ``KINDS``: "decoder", "encoder", "vision", "encoder-decoder",
"multimodal", "audio", "ssm"; ``names_of(kind, ...)`` lists them. Left out: Mamba (v1), whose
torch path scans with a Python loop over the sequence (``for i in range(seq_len)`` in
transformers' ``MambaMixer``), so torch.export specializes the sequence length; Gemma2, BLOOM
and DeBERTa-v2 refuse "sdpa" in transformers 5.25 and are built with "eager".

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
The wider zoo adds: ``decoder_input_ids`` (decoder start token, then target tokens; 8 tokens,
other shape 5) for encoder-decoders; Whisper's ``input_features`` (16 mel bins x 32 frames, a
fixed length as WhisperFeatureExtractor pads to) instead of ``input_ids``; ``input_values``
(400 samples, other shape 320, zero-padded at the end of the last row, with an
``attention_mask`` for wav2vec2's layer-norm feature extractor and none for hubert's group-norm
one, as their processors do); CLIP's text (an end-of-text token after the last word) and images
together. Decoders and the state-space model are padded on the left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers

__all__ = [
    "ZooEntry", "ARCHITECTURES", "EXTENDED", "ALL_ARCHITECTURES", "KINDS", "DECODERS", "ENCODERS", "ENCODER_DECODERS",
    "AUDIO", "SSMS", "ATTN_IMPLEMENTATION", "build", "names_of", "linear_in_features", "linear_calls",
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
    decoder = kind in ("decoder", "ssm")  # causal LMs: left padding, a cache in the output

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


# =========================================================================== the wider zoo
# More families, one or two of each structural kind, run by the cheaper tests (w8a16 through
# quantize, the torch.compile backend and ONNX Runtime): EXTENDED; ALL_ARCHITECTURES is both.


def _text_seq2seq_inputs(vocab: int, pad: int, start: int, shape: tuple[int, int, int], dec_len: int,
                         seed: int) -> Inputs:
    """A tokenizer's encoder batch (right padding) and ``decoder_input_ids`` (the decoder
    start token, then target tokens: what shifting the labels right gives)."""
    _, kwargs = _text_inputs(vocab, pad, shape, seed, left_padding=False, token_type_ids=False)
    gen = torch.Generator().manual_seed(seed * 1000 + shape[0] * 100 + dec_len + 7)
    dec = torch.randint(4, vocab, (shape[0], dec_len), generator=gen, dtype=torch.long)
    dec[:, 0] = start
    kwargs["decoder_input_ids"] = dec
    return (), kwargs


#: decoder lengths of the encoder-decoder entries at the first and the other shape
DECODER_LEN_A, DECODER_LEN_B = 8, 5


def _seq2seq_entry(name: str, model_cls: type, make_config: Callable[..., transformers.PretrainedConfig],
                   **entry_kw: Any) -> ZooEntry:
    probe = make_config()
    vocab, pad, start = probe.vocab_size, probe.pad_token_id, probe.decoder_start_token_id

    def build(seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION) -> torch.nn.Module:
        return _build_from(model_cls, make_config(attn_implementation), seed)

    return ZooEntry(
        name, "encoder-decoder", build,
        inputs=lambda seed=0: _text_seq2seq_inputs(vocab, pad, start, SHAPE_A, DECODER_LEN_A, seed),
        other_inputs=lambda seed=0: _text_seq2seq_inputs(vocab, pad, start, SHAPE_B, DECODER_LEN_B, seed),
        returns_cache=True, **entry_kw,
    )


def _image_entry(name: str, kind: str, model_cls: type, make_config: Callable[..., transformers.PretrainedConfig],
                 image: tuple[int, int, int] = VIT_IMAGE, **entry_kw: Any) -> ZooEntry:
    """Images of a fixed size (what an image processor gives); the other shape changes the batch."""

    def build(seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION) -> torch.nn.Module:
        return _build_from(model_cls, make_config(attn_implementation), seed)

    def pixels(batch: int, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed * 1000 + batch)
        return (), {"pixel_values": torch.randn(batch, *image, generator=gen)}

    return ZooEntry(name, kind, build, inputs=lambda seed=0: pixels(SHAPE_A[0], seed),
                    other_inputs=lambda seed=0: pixels(SHAPE_B[0], seed), **entry_kw)


#: Whisper: 16 mel bins, 32 frames (= 2 * max_source_positions: Whisper's encoder takes one length only)
WHISPER_FEATURES = (16, 32)


def _whisper_entry(name: str, model_cls: type, make_config: Callable[..., transformers.PretrainedConfig]) -> ZooEntry:
    probe = make_config()
    vocab, start = probe.vocab_size, probe.decoder_start_token_id

    def build(seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION) -> torch.nn.Module:
        return _build_from(model_cls, make_config(attn_implementation), seed)

    def inputs(batch: int, dec_len: int, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed * 1000 + batch * 100 + dec_len)
        # log-mel features as WhisperFeatureExtractor scales them: roughly in [-1, 1]
        features = (torch.rand(batch, *WHISPER_FEATURES, generator=gen) * 2 - 1)
        dec = torch.randint(4, vocab, (batch, dec_len), generator=gen, dtype=torch.long)
        dec[:, 0] = start
        return (), {"input_features": features, "decoder_input_ids": dec}

    return ZooEntry(
        name, "encoder-decoder", build,
        inputs=lambda seed=0: inputs(SHAPE_A[0], DECODER_LEN_A, seed),
        other_inputs=lambda seed=0: inputs(SHAPE_B[0], DECODER_LEN_B, seed),
        returns_cache=True,
    )


#: raw audio: (batch, samples, padded samples in the last row) at the first and the other shape
AUDIO_A = (2, 400, 80)
AUDIO_B = (3, 320, 96)


def _audio_entry(name: str, model_cls: type, make_config: Callable[..., transformers.PretrainedConfig],
                 *, attention_mask: bool) -> ZooEntry:
    """``input_values`` as Wav2Vec2FeatureExtractor gives them: zero-mean unit-variance per
    utterance, zero-padded at the end; ``attention_mask`` only for the models whose feature
    extractor normalizes by layer (the processor returns none for the group-norm ones)."""

    def build(seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION) -> torch.nn.Module:
        return _build_from(model_cls, make_config(attn_implementation), seed)

    def inputs(shape: tuple[int, int, int], seed: int) -> Inputs:
        batch, samples, n_pad = shape
        gen = torch.Generator().manual_seed(seed * 1000 + batch * 100 + samples)
        values = torch.randn(batch, samples, generator=gen)
        mask = torch.ones(batch, samples, dtype=torch.long)
        mask[-1, samples - n_pad:] = 0
        values[-1, samples - n_pad:] = 0.0
        kwargs: dict[str, Any] = {"input_values": values}
        if attention_mask:
            kwargs["attention_mask"] = mask
        return (), kwargs

    return ZooEntry(name, "audio", build, inputs=lambda seed=0: inputs(AUDIO_A, seed),
                    other_inputs=lambda seed=0: inputs(AUDIO_B, seed))


def _clip_inputs(vocab: int, pad: int, eos: int, shape: tuple[int, int, int], seed: int) -> Inputs:
    """CLIPProcessor's output: text with an end-of-text token after the last word (CLIP pools
    there), padded on the right, and a batch of images of the same size."""
    batch, seq, n_pad = shape
    _, kwargs = _text_inputs(vocab, pad, shape, seed, left_padding=False, token_type_ids=False)
    ids = kwargs["input_ids"]
    ids[:, -1] = eos
    ids[-1, seq - n_pad - 1] = eos
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    kwargs["pixel_values"] = torch.randn(batch, *VIT_IMAGE, generator=gen)
    return (), kwargs


def _clip_entry(name: str, model_cls: type, make_config: Callable[..., transformers.PretrainedConfig]) -> ZooEntry:
    probe = make_config().text_config
    vocab, pad, eos = probe.vocab_size, probe.pad_token_id, probe.eos_token_id

    def build(seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION) -> torch.nn.Module:
        return _build_from(model_cls, make_config(attn_implementation), seed)

    return ZooEntry(name, "multimodal", build,
                    inputs=lambda seed=0: _clip_inputs(vocab, pad, eos, SHAPE_A, seed),
                    other_inputs=lambda seed=0: _clip_inputs(vocab, pad, eos, SHAPE_B, seed))


# --------------------------------------------------------------------------- configs (wider zoo)
# One layer (encoder-decoders: one encoder and one decoder layer; ALBERT keeps two uses of its
# shared layer group, the structure it is here for): the quantize / torch.compile / ONNX tests
# cost time in proportion to the graph (capture, export and Dynamo trace every op), and one
# block of each kind is all the structure these tests look at.
_ONE = dict(num_hidden_layers=1)
_SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_attention_heads=2,
              max_position_embeddings=128, **_ONE)
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _no_sdpa(attn: str) -> str:
    """Gemma2, BLOOM and DeBERTa-v2 refuse "sdpa" in transformers 5.25 ("does not support an
    attention implementation through torch.nn.functional.scaled_dot_product_attention"): they
    get "eager", what transformers itself picks for them by default."""
    return "eager" if attn == "sdpa" else attn


def _gemma2(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Logit soft-capping, pre- and post-norms; layer 0, the only one, is a sliding-window layer
    # (Gemma2 alternates them with global ones; the global kind is llama's, tested in the core zoo).
    return transformers.Gemma2Config(
        num_key_value_heads=1, head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
        attn_implementation=_no_sdpa(attn), **_SMALL, **_SPECIAL,
    )


def _phi(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # phi-1/phi-2: parallel attention + MLP off one LayerNorm, partial rotary, dense output.
    return transformers.PhiConfig(partial_rotary_factor=0.5, attn_implementation=attn, **_SMALL, **_SPECIAL)


def _falcon(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # falcon-7b layout: multi-query attention, parallel attention + MLP, fused query_key_value.
    return transformers.FalconConfig(
        vocab_size=384, hidden_size=64, num_attention_heads=2, max_position_embeddings=128,
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False,
        ffn_hidden_size=128, attn_implementation=attn, **_ONE, **_SPECIAL,
    )


def _bloom(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # ALiBi position biases (no position embeddings), LayerNorm after the embedding.
    return transformers.BloomConfig(vocab_size=384, hidden_size=64, n_layer=1, n_head=2,
                                    attn_implementation=_no_sdpa(attn), **_SPECIAL)


def _gptj(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Interleaved partial rotary (rotary_dim 16 of head_dim 32), parallel residual.
    return transformers.GPTJConfig(vocab_size=384, n_embd=64, n_layer=1, n_head=2, n_inner=128, rotary_dim=16,
                                   n_positions=128, attn_implementation=attn, **_SPECIAL)


def _stablelm(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # LayerNorm with bias, partial rotary 25%, q/k/v biases.
    return transformers.StableLmConfig(num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True,
                                       attn_implementation=attn, **_SMALL, **_SPECIAL)


def _cohere(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Parallel block off one LayerNorm, interleaved rotary, scaled tied logits.
    return transformers.CohereConfig(num_key_value_heads=1, attn_implementation=attn, **_SMALL, **_SPECIAL)


def _olmo(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Non-parametric LayerNorm (no weight, no bias), q/k/v clipping.
    return transformers.OlmoConfig(num_key_value_heads=2, clip_qkv=8.0, attn_implementation=attn,
                                   **_SMALL, **_SPECIAL)


def _starcoder2(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # GQA, LayerNorm with bias, GELU MLP (c_fc / c_proj) with biases.
    return transformers.Starcoder2Config(num_key_value_heads=1, attn_implementation=attn, **_SMALL, **_SPECIAL)


def _gpt_bigcode(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # santacoder / starcoder-1: multi-query attention with a fused c_attn (nn.Linear, not Conv1D).
    return transformers.GPTBigCodeConfig(vocab_size=384, n_embd=64, n_layer=1, n_head=2, n_inner=128,
                                         n_positions=128, multi_query=True, attn_implementation=attn, **_SPECIAL)


def _distilbert(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # 4 labels: the report's per-layer output error of a 2-label head is relative to 2 x 2 small
    # logits and measured 5.6e-2 at one layer (4 labels: 7e-3, like every other layer's 6e-3).
    return transformers.DistilBertConfig(vocab_size=384, dim=64, n_layers=1, n_heads=2, hidden_dim=128,
                                         max_position_embeddings=128, pad_token_id=0, num_labels=4,
                                         attn_implementation=attn)


def _deberta_v2(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Disentangled attention (content-to-position and position-to-content with relative buckets).
    return transformers.DebertaV2Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_attention_heads=2, max_position_embeddings=128,
        relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        norm_rel_ebd="layer_norm", share_att_key=True, pad_token_id=0, num_labels=3, type_vocab_size=0,
        attn_implementation=_no_sdpa(attn), **_ONE,
    )


def _albert(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Factorized embedding (32 -> 64) and one layer group shared by both layers.
    return transformers.AlbertConfig(
        vocab_size=384, embedding_size=32, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        max_position_embeddings=128, pad_token_id=0, attn_implementation=attn, **_COMMON,
    )


def _electra(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Embedding size 32 projected to hidden 64 (embeddings_project).
    return transformers.ElectraConfig(
        vocab_size=384, embedding_size=32, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        max_position_embeddings=128, pad_token_id=0, num_labels=5, attn_implementation=attn, **_ONE,
    )


def _xlm_roberta(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.XLMRobertaConfig(
        vocab_size=448, hidden_size=64, intermediate_size=128, num_attention_heads=2, max_position_embeddings=130,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, attn_implementation=attn, **_ONE,
    )


def _t5(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Relative position buckets, RMS-style LayerNorm without mean, gated-GELU FFN (flan-t5 / t5 v1.1).
    return transformers.T5Config(
        vocab_size=384, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, attn_implementation=attn,
    )


def _bart(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    return transformers.BartConfig(
        vocab_size=384, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        attn_implementation=attn,
    )


def _whisper(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Two Conv1d over the mel features (not quantized), sinusoidal encoder positions.
    return transformers.WhisperConfig(
        vocab_size=384, num_mel_bins=WHISPER_FEATURES[0], encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, d_model=64,
        max_source_positions=WHISPER_FEATURES[1] // 2, max_target_positions=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None,
        attn_implementation=attn,
    )


def _swin(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # 32x32 image, 4x4 patches: an 8x8 grid in windows of 4 with relative position bias, then
    # patch merging (4 * 32 = 128 inputs) to a 4x4 grid, one block per stage (the smallest valid
    # depths; a stage's second block would shift its windows, left out for time: Swin's symbolic
    # window arithmetic makes it the zoo's most expensive capture and export).
    return transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[1, 2],
                                   window_size=4, num_labels=10, attn_implementation=attn)


def _deit(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # CLS and distillation tokens, two heads averaged.
    return transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=2, num_labels=10, attn_implementation=attn, **_ONE)


def _clip(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # Text and image towers, projections to a shared 32-d space, logits_per_image / per_text.
    text = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2, **_ONE)
    vision = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                  **_ONE)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32,
                                   attn_implementation=attn)


def _wav2vec2(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # wav2vec2-large-lv60 layout (layer-norm feature extractor, pre-LN "stable" encoder), CTC head.
    # Conv feature extractor: 400 samples -> 79 -> 39 frames of 32 channels.
    return transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True,
        pad_token_id=0, attn_implementation=attn,
    )


def _hubert(attn: str = ATTN_IMPLEMENTATION) -> transformers.PretrainedConfig:
    # hubert-base layout (group-norm feature extractor, post-LN encoder), mean-pooled classifier.
    return transformers.HubertConfig(
        vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="group", do_stable_layer_norm=False,
        classifier_proj_size=64, num_labels=4, attn_implementation=attn,
    )


def _mamba2(attn: str = ATTN_IMPLEMENTATION, chunk_size: int = 32) -> transformers.PretrainedConfig:
    # Chunked structured state-space duality scan (the torch path: no mamba_ssm kernels on CPU),
    # depthwise causal Conv1d, gated RMSNorm; no attention. chunk_size 32 > both sequence lengths:
    # one zero-padded chunk, as with the default 256 and prompts shorter than that. (A sequence
    # that fills whole chunks takes another branch: see MAMBA2_CHUNKED in test_wide_zoo.py.)
    return transformers.Mamba2Config(vocab_size=384, hidden_size=64, state_size=16, expand=2, num_heads=4,
                                     head_dim=32, n_groups=1, conv_kernel=4, chunk_size=chunk_size,
                                     num_hidden_layers=1, **_SPECIAL)


EXTENDED: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _text_entry("gemma2", "decoder", transformers.Gemma2ForCausalLM, _gemma2, min_dynamic_seq=8),
        _text_entry("phi", "decoder", transformers.PhiForCausalLM, _phi),
        _text_entry("falcon", "decoder", transformers.FalconForCausalLM, _falcon),
        _text_entry("bloom", "decoder", transformers.BloomForCausalLM, _bloom),
        _text_entry("gptj", "decoder", transformers.GPTJForCausalLM, _gptj),
        _text_entry("stablelm", "decoder", transformers.StableLmForCausalLM, _stablelm),
        _text_entry("cohere", "decoder", transformers.CohereForCausalLM, _cohere),
        _text_entry("olmo", "decoder", transformers.OlmoForCausalLM, _olmo),
        _text_entry("starcoder2", "decoder", transformers.Starcoder2ForCausalLM, _starcoder2),
        _text_entry("gpt_bigcode", "decoder", transformers.GPTBigCodeForCausalLM, _gpt_bigcode),
        _text_entry("distilbert", "encoder", transformers.DistilBertForSequenceClassification, _distilbert),
        _text_entry("deberta_v2", "encoder", transformers.DebertaV2ForSequenceClassification, _deberta_v2),
        _text_entry("albert", "encoder", transformers.AlbertForQuestionAnswering, _albert, token_type_ids=True),
        _text_entry("electra", "encoder", transformers.ElectraForTokenClassification, _electra,
                    token_type_ids=True),
        _text_entry("xlm_roberta", "encoder", transformers.XLMRobertaForMaskedLM, _xlm_roberta),
        _seq2seq_entry("t5", transformers.T5ForConditionalGeneration, _t5),
        _seq2seq_entry("bart", transformers.BartForConditionalGeneration, _bart),
        _whisper_entry("whisper", transformers.WhisperForConditionalGeneration, _whisper),
        _image_entry("swin", "vision", transformers.SwinForImageClassification, _swin),
        _image_entry("deit", "vision", transformers.DeiTForImageClassificationWithTeacher, _deit),
        _clip_entry("clip", transformers.CLIPModel, _clip),
        _audio_entry("wav2vec2", transformers.Wav2Vec2ForCTC, _wav2vec2, attention_mask=True),
        _audio_entry("hubert", transformers.HubertForSequenceClassification, _hubert, attention_mask=False),
        _text_entry("mamba2", "ssm", transformers.Mamba2ForCausalLM, _mamba2),
    ]
}
"""The wider zoo, by name: more decoders, encoders with task heads, encoder-decoders, vision,
multimodal, audio and state-space models."""

ALL_ARCHITECTURES: dict[str, ZooEntry] = {**ARCHITECTURES, **EXTENDED}

#: every ``ZooEntry.kind``, in registry order
KINDS = ("decoder", "encoder", "vision", "encoder-decoder", "multimodal", "audio", "ssm")
assert {e.kind for e in ALL_ARCHITECTURES.values()} == set(KINDS)


def names_of(*kinds: str) -> tuple[str, ...]:
    """Names of every architecture (both registries) of the given kinds, in registry order."""
    return tuple(n for n, e in ALL_ARCHITECTURES.items() if e.kind in kinds)


DECODERS = names_of("decoder")  # causal LMs with a KV cache
ENCODERS = names_of("encoder", "vision")  # bidirectional encoders, text and image
ENCODER_DECODERS = names_of("encoder-decoder")
AUDIO = names_of("audio")
SSMS = names_of("ssm")


def build(
    name: str, seed: int = 0, attn_implementation: str = ATTN_IMPLEMENTATION
) -> tuple[torch.nn.Module, Inputs, Inputs]:
    """``(model, inputs, other_inputs)`` for the architecture ``name``."""
    try:
        entry = ALL_ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown zoo architecture {name!r}; known: {sorted(ALL_ARCHITECTURES)}") from None
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


def linear_calls(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, int]:
    """``{module name: number of calls}`` of every nn.Linear / Conv1D of ``model`` in one forward
    on ``(args, kwargs)``: a module shared by several layers (ALBERT's layer group) is called,
    and so appears as a linear in the graph, once per use; an unused one (a pooler a task head
    skips) not at all."""
    counts = dict.fromkeys(linear_in_features(model), 0)
    hooks = []
    for name in counts:
        def count(_module, _inputs, _output, name=name):
            counts[name] += 1
        hooks.append(model.get_submodule(name).register_forward_hook(count))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return counts
