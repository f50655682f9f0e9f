"""Layer 2: checkpoint surgery — turn a model into one whose attention is cheaper, heal it, save it.

    from hf_efficient_attn.conversions import convert, distill, save, load
    new = convert(model, "gqa", num_kv_heads=1, method="pca", calibration=texts, tokenizer=tok)
    distill(new, model, train_texts, tokenizer=tok, max_tokens=200_000)    # heals `new` in place
    save(new, "out/mqa", tokenizer=tok)      # a native checkpoint: stock from_pretrained loads it
    new = load("out/mqa")                    # bit-identical logits

Imports only `attention` and `kernels` below it, never `eval`.
"""

from __future__ import annotations

from .convert import CONVERSIONS, convert, options_of, register_conversion
from .distill import STAGES, TRAINABLE, DistillResult, Stage, distill, register_stage
from .gqa import convert_gqa, expand_kv_heads
from .io import check_target, is_main_process, load, save, text_documents, token_blocks, verify_checkpoint

__all__ = [
    "CONVERSIONS", "STAGES", "TRAINABLE", "DistillResult", "Stage", "check_target", "convert", "convert_gqa",
    "demo_conversions", "distill", "expand_kv_heads", "is_main_process", "load", "options_of", "register_conversion",
    "register_stage", "save", "text_documents", "token_blocks", "verify_checkpoint",
]


def demo_conversions(heal_tokens: int = 8192, calibration_tokens: int = 4096):
    """The conversions ``hfa demo`` shows on SmolLM2-135M (3 -> 1 KV heads), as ``[(label, build)]`` with
    ``build(model, tokenizer, calibration, max_tokens=None) -> new model`` (calibration: text, or anything with
    ``.documents``; max_tokens is unused, there for the demo's signature). About 3 minutes in all on 2 idle CPU
    cores; the healed entry trains on the calibration text (the demo evaluates on the held-out split)."""

    def gqa(method):
        def build(model, tok, calibration, max_tokens=None):
            return convert(model, "gqa", num_kv_heads=1, method=method, calibration=calibration, tokenizer=tok,
                           calibration_tokens=calibration_tokens)
        build.__name__ = f"gqa_kv1_{method}"
        return build

    def pca_healed(model, tok, calibration, max_tokens=None):
        new = gqa("pca")(model, tok, calibration)
        distill(new, model, calibration, tokenizer=tok, max_tokens=heal_tokens, seq_len=256, batch_size=4)
        return new.eval()

    return [("gqa kv=1 mean", gqa("mean")), ("gqa kv=1 aligned", gqa("aligned")), ("gqa kv=1 pca", gqa("pca")),
            (f"gqa kv=1 pca + {heal_tokens // 1024}k-token heal", pca_healed)]
