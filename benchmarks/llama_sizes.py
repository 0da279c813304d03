"""Llama shapes of the CPU benchmarks (``memory.py``, ``decode_cpu.py``), random weights.

TinyLlama-1.1B's widths: hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocabulary 32000,
untied head; 22 layers for 1.1B, 8 for 0.5B. 0.1B is hidden 768, MLP 2048, 12 heads / 4 KV
heads, 12 layers.
"""
from __future__ import annotations

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads)
    "0.1B": (768, 2048, 12, 12, 4),
    "0.5B": (2048, 5632, 8, 32, 4),
    "1.1B": (2048, 5632, 22, 32, 4),
}
VOCAB = 32000


def build_llama(size: str, dtype, seed: int = 0):
    """``LlamaForCausalLM`` at ``size`` in ``dtype`` (built in it: no float32 copy on the way), eval mode."""
    import torch
    import transformers

    hidden, intermediate, layers, heads, kv_heads = SIZES[size]
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
