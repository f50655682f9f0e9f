"""The encoder step of `hfa demo`: an encoder-only conversion (Linformer) on the bundled encoder, measured against
the original on held-out text — pooled-embedding cosine before/after a short heal, and one forward side by side.

    res = encoder_check(k=64, tokens=256, heal_tokens=16384)    # all-MiniLM-L6-v2 from the bundled package
    print(format_encoder_check(res))

The approximation is labelled as one: the cosine of mean-pooled embeddings (sentence-transformers' pooling) on
held-out inputs of `tokens` tokens, beside the exact original (cosine 1). The full heal and its curve are
``conversions/linformer_minilm.py``.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["encoder_check", "format_encoder_check", "forward_seconds"]


def encoder_check(model: str = "minilm-l6", k: int = 64, tokens: int = 256, heal_tokens: int = 16384,
                  inputs: int = 16, speed_length: int = 512, repeats: int = 3, batch_size: int = 8) -> dict:
    """Convert the encoder `model` with ``convert(model, "linformer", k=k)``, heal it on `heal_tokens` tokens of the
    bundled train split (stage "encoder", trainable "linformer_attention"; 0: no heal), and measure: mean/min pooled
    cosine to the original on `inputs` held-out inputs of `tokens` tokens before and after, and the median of
    `repeats` interleaved forwards of one `speed_length`-token input, original vs Linformer."""
    from ..conversions import convert, distill
    from ..conversions.linformer import encoder_token_blocks, pooled_cosine
    from .data import load_text
    from .models import load_model

    base, tok = load_model(model)
    new = convert(base, "linformer", k=k)
    held = encoder_token_blocks(tok, load_text(None, split="eval"), tokens, max_tokens=inputs * tokens)
    out = {"model": model, "k": k, "tokens": tokens, "inputs": len(held), "approximate": True}
    cos = pooled_cosine(new, base, held)
    out.update(cosine_before=cos.mean().item(), cosine_before_min=cos.min().item(), heal_tokens=0)
    if heal_tokens:
        blocks = encoder_token_blocks(tok, load_text(None, split="train"), tokens, max_tokens=heal_tokens)
        t0 = time.perf_counter()
        res = distill(new, base, blocks, stage="encoder", trainable="linformer_attention", seq_len=tokens,
                      batch_size=min(batch_size, len(blocks)), max_tokens=heal_tokens, progress=False)
        cos = pooled_cosine(new, base, held)
        out.update(heal_tokens=res.tokens, heal_seconds=time.perf_counter() - t0)
    out.update(cosine_after=cos.mean().item(), cosine_after_min=cos.min().item())
    ids = encoder_token_blocks(tok, load_text(None, split="eval"), speed_length, max_tokens=speed_length)
    t = forward_seconds({"original": base, "linformer": new.eval()}, ids, repeats)
    out.update(speed_tokens=int(ids.numel()), original_ms=t["original"] * 1e3, linformer_ms=t["linformer"] * 1e3)
    return out


def forward_seconds(models: dict, ids, repeats: int) -> dict:
    """Median seconds of one forward of each model on `ids`, in `repeats` interleaved rounds (after a warm-up), so a
    load on the machine slows every model alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids)
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=ids)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def format_encoder_check(res: dict) -> str:
    heal = f"after a {res['heal_tokens']:,}-token heal" if res["heal_tokens"] else "(no heal)"
    return (f"{res['model']} linformer k={res['k']} (approximate): pooled cosine to the original on {res['inputs']} "
            f"held-out inputs of {res['tokens']} tokens {res['cosine_before']:.3f} -> {res['cosine_after']:.3f} "
            f"{heal} (min {res['cosine_after_min']:.3f}); one forward of {res['speed_tokens']} tokens: original "
            f"{res['original_ms']:.0f} ms, linformer {res['linformer_ms']:.0f} ms (median of interleaved rounds)")
