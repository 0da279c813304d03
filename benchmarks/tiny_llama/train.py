"""Train the tiny Llama that qcompile measures perplexity on; write this folder's artifacts.

    .venv/bin/python benchmarks/tiny_llama/train.py [--steps 360] [--out benchmarks/tiny_llama] [--readme-only]

Model: ``transformers.LlamaForCausalLM`` (RMSNorm, SwiGLU MLP, RoPE, grouped-query
attention) with hidden 256, 4 layers, 4 query heads / 2 key-value heads (head dim 64),
MLP 768, byte-level vocabulary of 257 (256 bytes + BOS), context 256, untied head.

Data (``qcompile.lm_eval``): standard-library docstrings split by document into
training / calibration (128 texts) / held-out (160 texts) with the convention of
``qcompile.data.calibration_and_heldout`` (seed 0). The first run stores the calibration
and held-out texts in ``texts.json``; a later run (on any Python version) reuses them and
trains on every other docstring.

Training: batches of 16 windows of 256 tokens drawn uniformly at random (seeded) from the
training token stream; AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak
learning rate 2e-3, 50 warm-up steps then cosine decay to 10%, gradient-norm clip 1.0,
float32, one CPU thread, ``torch.use_deterministic_algorithms(True)``: a rerun on the
same machine, Python and torch gives the same losses.

Written: ``config.json`` and ``model.safetensors`` (bfloat16 weights: float32 would
exceed the 8 MB budget; float32 holds them exactly), ``texts.json``, ``training.json``
(settings, split digests, losses of the stored bfloat16 weights, loss curve, time) and
``README.md``. Files are written to a temporary folder and moved in at the end, so a
failed run leaves the previous artifacts intact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import qcompile.lm_eval as lm

SEED = 0
BATCH = 16
PEAK_LR = 2e-3
FINAL_LR_FRACTION = 0.1
WARMUP = 50
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
DEFAULT_STEPS = 360
EVAL_EVERY = 60
THREADS = 1
CHECK_WINDOWS = 32


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=lm.VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=lm.WINDOW,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=lm.BOS,
        eos_token_id=None,
        pad_token_id=None,
    )


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def split_for(out: Path) -> lm.LMTexts:
    """The stored split if ``out`` has one, else this Python's live split (then stored)."""
    if (out / "texts.json").is_file():
        return lm.lm_texts(out)
    return lm.split_texts_live()


def write_texts(folder: Path, texts: lm.LMTexts) -> None:
    payload = {
        "about": "calibration and held-out texts of the tiny Llama (qcompile.lm_eval); the model never trained on them",
        "seed": lm.SPLIT_SEED,
        "calibration": list(texts.calibration),
        "heldout": list(texts.heldout),
    }
    (folder / "texts.json").write_text(json.dumps(payload, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


def batch_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(steps: int, texts: lm.LMTexts) -> tuple[torch.nn.Module, dict]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_config()).train()
    stream = lm.token_stream(texts.train)
    calib_windows = lm.make_windows(texts.calibration)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=BETAS, eps=1e-8,
    )
    gen = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(lm.WINDOW)
    curve, recent = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="training", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps)
        starts = torch.randint(0, stream.numel() - lm.WINDOW + 1, (BATCH,), generator=gen)
        ids = stream[starts[:, None] + offsets]
        loss = batch_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        recent = (recent + [loss.item()])[-EVAL_EVERY:]
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{learning_rate(step, steps):.2e}")
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            model.eval()
            calib = lm.mean_nll(model, calib_windows)
            model.train()
            running = sum(recent) / len(recent)
            curve.append({"step": step + 1, "train_loss_running": round(running, 4), "calibration_loss": round(calib, 4)})
            tqdm.write(f"step {step + 1:5d}  train (mean of last {len(recent)} steps) {running:.4f}  calibration {calib:.4f}")
    seconds = time.perf_counter() - t0
    return model.eval(), {"train_seconds": round(seconds, 1), "curve": curve,
                          "train_loss_running": round(sum(recent) / len(recent), 4)}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_model(model, folder: Path) -> None:
    from safetensors.torch import save_file

    config = model.config
    config.dtype = torch.bfloat16
    config.use_cache = False
    config.to_json_file(str(folder / "config.json"))
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def readme(meta: dict) -> str:
    r, m, s, t = meta["results"], meta["model"], meta["split"], meta["training"]
    return f"""# tiny_llama: a small trained Llama for perplexity measurements

Made by `{t['command']}` (from the repository root; {t['train_seconds'] / 60:.1f} minutes of
training on {t['threads']} CPU thread of a shared 2-core machine, {t['steps']} steps). Loaded with
`qcompile.lm_eval.load_tiny_llama()`; every figure below is in `training.json`.

- Model: `transformers.LlamaForCausalLM` (RMSNorm, SwiGLU, RoPE, GQA): hidden {m['hidden_size']},
  {m['num_hidden_layers']} layers, {m['num_attention_heads']} query / {m['num_key_value_heads']} key-value heads,
  MLP {m['intermediate_size']}, vocabulary {m['vocab_size']} (256 bytes + BOS = id 256), context {m['max_position_embeddings']},
  untied head; {m['parameters']:,} parameters. `model.safetensors` holds them in **bfloat16**
  ({m['file_bytes'] / 1e6:.2f} MB); loaded as float32 (exact). All losses are of these stored weights.
- Text: Python {s['python']} standard-library docstrings (`qcompile.data.stdlib_docstrings()`), split
  by document (shuffle seed {s['seed']}): {s['train_texts']} training texts ({s['train_tokens']:,} tokens),
  {s['calibration_texts']} calibration and {s['heldout_texts']} held-out texts (stored in `texts.json`).
- Loss: nats per byte over non-overlapping {s['window']}-token windows (token 0 of a window is context only).

| split | loss (nats/byte) | perplexity |
|---|---|---|
| training ({s['train_windows']} windows) | {r['train_loss']:.4f} | {math.exp(r['train_loss']):.3f} |
| calibration ({s['calibration_windows']} windows) | {r['calibration_loss']:.4f} | {math.exp(r['calibration_loss']):.3f} |
| **held-out** ({s['heldout_windows']} windows) | **{r['heldout_loss']:.4f}** | **{r['heldout_perplexity']:.3f}** |
| unigram baseline on held-out (fitted on training bytes) | {r['unigram_heldout_loss']:.4f} | {math.exp(r['unigram_heldout_loss']):.3f} |

Deterministic: seed {t['seed']}, one thread, `torch.use_deterministic_algorithms(True)`; a rerun on the same
machine, Python and torch ({t['torch']}, transformers {t['transformers']}) reproduces these losses.
Quantized perplexities: `.venv/bin/python benchmarks/tiny_llama/perplexity.py`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    parser.add_argument("--out", type=Path, default=lm.tiny_llama_dir(), help="folder for the artifacts (default: this folder)")
    parser.add_argument("--readme-only", action="store_true", help="only rewrite README.md from the folder's training.json")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be positive")
    if args.readme_only:
        (args.out / "README.md").write_text(readme(lm.tiny_llama_metadata(args.out)), encoding="utf-8")
        return 0

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    texts = split_for(out)
    if set(texts.train) & (set(texts.calibration) | set(texts.heldout)):
        raise RuntimeError("training texts overlap the calibration or held-out texts")

    model, record = train(args.steps, texts)

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tiny_llama-") as tmp_name:
        tmp = Path(tmp_name)
        save_model(model, tmp)
        write_texts(tmp, texts)
        stored = lm.load_tiny_llama(folder=tmp)  # what every user gets: the bfloat16 weights, in float32
        windows = {name: lm.make_windows(getattr(texts, name)) for name in ("train", "calibration", "heldout")}
        losses = {name: lm.mean_nll(stored, w) for name, w in tqdm(windows.items(), desc="evaluating")}
        unigram = lm.unigram_cross_entropy(windows["train"], windows["heldout"])
        # a quick check for tests: the same measurement on the first CHECK_WINDOWS held-out windows
        heldout_check = lm.mean_nll(stored, windows["heldout"][:CHECK_WINDOWS])
        cfg = stored.config
        meta = {
            "model": {
                "architecture": "LlamaForCausalLM",
                **{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                                "tie_word_embeddings")},
                "parameters": sum(p.numel() for p in stored.parameters()),
                "stored_dtype": "bfloat16",
                "file_bytes": (tmp / "model.safetensors").stat().st_size,
                "safetensors_sha256": sha256_file(tmp / "model.safetensors"),
            },
            "split": {
                "python": platform.python_version(),
                "seed": lm.SPLIT_SEED,
                "window": lm.WINDOW,
                "train_texts": len(texts.train),
                "calibration_texts": len(texts.calibration),
                "heldout_texts": len(texts.heldout),
                "train_tokens": int(lm.token_stream(texts.train).numel()),
                **{f"{k}_windows": int(w.shape[0]) for k, w in windows.items()},
                **{f"{k}_sha256": lm.texts_digest(getattr(texts, k)) for k in ("train", "calibration", "heldout")},
            },
            "training": {
                "command": "python benchmarks/tiny_llama/train.py" + (f" --steps {args.steps}" if args.steps != DEFAULT_STEPS else ""),
                "seed": SEED, "steps": args.steps, "batch": BATCH, "window": lm.WINDOW, "peak_lr": PEAK_LR,
                "final_lr_fraction": FINAL_LR_FRACTION, "warmup": WARMUP, "weight_decay": WEIGHT_DECAY,
                "betas": list(BETAS), "grad_clip": GRAD_CLIP, "dtype": "float32", "threads": THREADS,
                "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "train_seconds": record["train_seconds"],
            },
            "results": {
                "train_loss": round(losses["train"], 5),
                "calibration_loss": round(losses["calibration"], 5),
                "heldout_loss": round(losses["heldout"], 5),
                "heldout_perplexity": round(math.exp(losses["heldout"]), 4),
                "unigram_heldout_loss": round(unigram, 5),
                f"heldout_loss_first_{CHECK_WINDOWS}_windows": round(heldout_check, 5),
                f"train_loss_mean_of_last_{EVAL_EVERY}_steps": record["train_loss_running"],
                "curve": record["curve"],
            },
        }
        (tmp / "training.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(meta), encoding="utf-8")
        for name in ("config.json", "model.safetensors", "texts.json", "training.json", "README.md"):
            os.chmod(tmp / name, 0o644)  # safetensors writes its file owner-only
            os.replace(tmp / name, out / name)
    r = meta["results"]
    print(f"wrote {out}: train {r['train_loss']:.4f}  calibration {r['calibration_loss']:.4f}  "
          f"held-out {r['heldout_loss']:.4f} nats/byte (perplexity {r['heldout_perplexity']:.3f}); "
          f"unigram {r['unigram_heldout_loss']:.4f}; {record['train_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
