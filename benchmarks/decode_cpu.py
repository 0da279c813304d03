"""Decode speed on CPU: tokens per second of ``generate()`` with a KV cache.

A Llama (``--size``: the trained tiny Llama, or TinyLlama widths with random weights,
``llama_sizes.py``) generates greedily from a prompt of ``--prompt`` random tokens,
``--new`` new tokens, at each batch size of ``--batches``, under each candidate:

* ``eager-fp32`` / ``eager-bf16``: the Hugging Face model as is / cast to bfloat16;
* ``inductor-fp32`` / ``inductor-bf16``: ``model.forward = torch.compile(model.forward)``;
* ``quantize-<preset>``: ``qcompile.quantize(model, (ids,), recipe=preset)`` and
  ``qm.generate`` (its prefill and decode graphs, ``qcompile.generation``);
* ``backend-<preset>``: ``model.forward = torch.compile(model.forward, backend="qcompile",
  options={"recipe": preset})``.

Every candidate is warmed up first (compiled candidates compile then: that first
``generate`` of ``--new`` tokens is reported as "first generate"); then ``--rounds`` rounds
run the candidates interleaved (the machine is shared: each round sees the same load).
Decode speed is ``batch * (new - 1) / (t(new tokens) - t(1 token))`` (the prefill taken
out), the median over rounds; prefill is ``t(1 token)``. The ratios are against eager
fp32 of the same round. The bandwidth floor is the most tokens per second a step that
reads every weight once can reach: measured copy bandwidth / bytes of weights read per
step (the candidate's linear weights and scales as stored plus the float weights it reads;
the embedding table is gathered, not read, and is left out). Greedy tokens are compared
with eager fp32's (quantization changes some; the float candidates should agree).

    python benchmarks/decode_cpu.py --size tiny --batches 1 --new 48               # seconds
    python benchmarks/decode_cpu.py --size 1.1B --batches 1,8 --prompt 128 --new 128 \\
        --candidates eager-fp32,eager-bf16,inductor-bf16,quantize-w8a16,quantize-w4a16
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_sizes import SIZES, VOCAB, build_llama  # noqa: E402

CANDIDATES = ("eager-fp32", "eager-bf16", "inductor-bf16", "quantize-w8a16", "quantize-w4a16")


def copy_bandwidth(torch) -> float:
    """Bytes per second of a 512 MiB copy (read + write), best of 5."""
    src = torch.empty(128 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def load_model(size: str, torch):
    if size == "tiny":
        from qcompile.lm_eval import load_tiny_llama

        return load_tiny_llama()
    return build_llama(size, torch.float32)


def float_step_bytes(model) -> int:
    """Bytes of the weights a decode step reads: every parameter but the embedding table."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def graph_step_bytes(gm, embedding_shape) -> int:
    """Bytes of the constants of a quantized graph, less the embedding table (gathered)."""
    total = 0
    for name, buf in gm.named_buffers():
        if tuple(buf.shape) == tuple(embedding_shape):
            continue
        total += buf.numel() * buf.element_size()
    return total


def make_candidate(name: str, model, example, torch, verify: bool):
    """(generate function, bytes read per step, seconds to prepare)."""
    import qcompile

    start = time.perf_counter()
    embedding_shape = model.get_input_embeddings().weight.shape
    if name in ("eager-fp32", "inductor-fp32"):
        target = copy.deepcopy(model) if name == "inductor-fp32" else model
    elif name in ("eager-bf16", "inductor-bf16"):
        target = copy.deepcopy(model).to(torch.bfloat16)
    elif name.startswith("backend-"):
        target = copy.deepcopy(model)
        target.forward = torch.compile(target.forward, backend="qcompile",
                                       options={"recipe": name[len("backend-"):], "verify": verify})
    elif name.startswith("quantize-"):
        qm = qcompile.quantize(model, (example,), recipe=name[len("quantize-"):], progress=False, verify=verify,
                               generation=True)
        step_bytes = graph_step_bytes(qm.generation.decode.graph_module, embedding_shape)
        return qm.generate, step_bytes, time.perf_counter() - start
    else:
        raise SystemExit(f"unknown candidate {name!r}; known: eager-fp32, eager-bf16, inductor-fp32, inductor-bf16, "
                         "quantize-<preset>, backend-<preset>")
    if name.startswith("inductor-"):
        target.forward = torch.compile(target.forward)
    step_bytes = float_step_bytes(target)
    if name.startswith("backend-"):
        step_bytes = None  # the quantized graphs live inside torch.compile's cache
    return target.generate, step_bytes, time.perf_counter() - start


def timed_generate(generate, ids, new: int, torch) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        start = time.perf_counter()
        out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.1B", choices=["tiny", *SIZES])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--verify", action="store_true",
                   help="run qcompile's float64 checks while quantizing (same result; slower to prepare)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model = load_model(args.size, torch)
    vocab = model.config.vocab_size if args.size == "tiny" else VOCAB
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, vocab, (1, 16), generator=gen)
    bandwidth = copy_bandwidth(torch)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"model: {args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; prompt "
          f"{args.prompt}, {args.new} new tokens, greedy; qcompile verification {'on' if args.verify else 'off'}",
          flush=True)

    names = args.candidates.split(",")
    candidates = {}
    for name in names:
        generate, step_bytes, prepare = make_candidate(name, model, example, torch, args.verify)
        candidates[name] = (generate, step_bytes, prepare)
        print(f"prepared {name} in {prepare:.1f} s", flush=True)

    for batch in (int(b) for b in args.batches.split(",")):
        ids = torch.randint(1, vocab, (batch, args.prompt), generator=gen)
        first = {}
        for name in names:
            first[name], _ = timed_generate(candidates[name][0], ids, args.new, torch)
        times = {name: [] for name in names}
        tokens = {}
        for _ in range(args.rounds):
            for name in names:
                t1, _ = timed_generate(candidates[name][0], ids, 1, torch)
                tn, out = timed_generate(candidates[name][0], ids, args.new, torch)
                times[name].append((t1, tn))
                tokens[name] = out[:, args.prompt:]
        print(f"\nbatch {batch}:")
        print("| candidate | decode tokens/s | vs eager fp32 | prefill | bandwidth floor | of floor "
              "| first generate | tokens = eager fp32's |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for name in names:
            rates = [batch * (args.new - 1) / max(tn - t1, 1e-9) for t1, tn in times[name]]
            rate = statistics.median(rates)
            prefill = statistics.median(t1 for t1, _ in times[name])
            base = rate if name == "eager-fp32" else base
            ratio = f"{rate / base:.2f}x" if base else "-"
            step_bytes = candidates[name][1]
            floor = bandwidth / step_bytes * batch if step_bytes else None
            floor_text = f"{floor:.1f}" if floor else "-"
            of_floor = f"{rate / floor:.0%}" if floor else "-"
            same = (tokens[name] == tokens["eager-fp32"]).float().mean().item() if "eager-fp32" in tokens else None
            same_text = f"{same:.0%}" if same is not None else "-"
            print(f"| {name} | {rate:.2f} | {ratio} | {prefill:.2f} s | {floor_text} | {of_floor} | "
                  f"{first[name]:.1f} s | {same_text} |", flush=True)


if __name__ == "__main__":
    main()
