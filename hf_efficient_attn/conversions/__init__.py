"""Layer 2: checkpoint surgery — turn a model into one whose attention is cheaper, heal it, save it.

    from hf_efficient_attn.conversions import convert, distill, save, load
    new = convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=texts, tokenizer=tok)
    distill(new, model, train_texts, tokenizer=tok, max_tokens=200_000)    # heals `new` in place
    save(new, "out/mqa", tokenizer=tok)      # a native checkpoint: stock from_pretrained loads it
    new = load("out/mqa")                    # bit-identical logits

Imports only `attention` and `kernels` below it, never `eval`.
"""

from __future__ import annotations

from .convert import CONVERSIONS, convert, options_of, register_conversion
from .distill import STAGES, TRAINABLE, DistillResult, Stage, distill, register_stage
from .gqa import convert_gqa, expand_kv_heads
from .io import load, save, text_documents, token_blocks

__all__ = [
    "CONVERSIONS", "STAGES", "TRAINABLE", "DistillResult", "Stage", "convert", "convert_gqa", "demo_conversions",
    "distill", "expand_kv_heads", "load", "options_of", "register_conversion", "register_stage", "save",
    "text_documents", "token_blocks",
]


def demo_conversions(heal_tokens: int = 8192, calibration_tokens: int = 8192):
    """The conversions ``hfa demo`` shows, as ``[(label, build)]`` with
    ``build(model, tokenizer, calibration, max_tokens=None) -> new model`` (`calibration`: text, or anything
    with ``.documents``; `max_tokens` is unused, for the demo's signature). Defaults take about two minutes
    in all on 2 CPU cores with SmolLM2-135M; the healed entry trains on the calibration text itself."""

    def mean(model, tok, calibration, max_tokens=None):
        return convert(model, "gqa", num_kv_heads=1, method="mean")

    def aligned(model, tok, calibration, max_tokens=None):
        return convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=calibration, tokenizer=tok,
                       calibration_tokens=calibration_tokens)

    def aligned_healed(model, tok, calibration, max_tokens=None):
        new = aligned(model, tok, calibration)
        distill(new, model, calibration, tokenizer=tok, max_tokens=heal_tokens, seq_len=256, batch_size=4)
        return new.eval()

    return [("gqa kv=1 mean", mean), ("gqa kv=1 aligned", aligned),
            (f"gqa kv=1 aligned + {heal_tokens // 1000}k-token heal", aligned_healed)]
