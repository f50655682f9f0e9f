"""Layer 2: checkpoint surgery — turn a model into one whose attention is cheaper, heal it, save it.

    from hf_efficient_attn.conversions import convert, distill, save, load
    new = convert(model, "gqa", num_kv_heads=1, method="pca", calibration=texts, tokenizer=tok)
    distill(new, model, train_texts, tokenizer=tok, max_tokens=200_000)    # heals `new` in place
    save(new, "out/mqa", tokenizer=tok)      # a native checkpoint: stock from_pretrained loads it; README.md is its card
    new = load("out/mqa")                    # bit-identical logits; load("user/name") takes a Hub id

The conversions are listed in `CONVERSIONS` (convert.py), the distillation stages and what trains in `STAGES`
and `TRAINABLE` (distill.py); what every conversion does the same way (calibration forward, rebuilding the model,
its provenance record, atomic writes, text basics) is in toolkit.py; the model card `save` writes, in card.py. Imports only `attention` and `kernels` below
it, never `eval`.
"""

from __future__ import annotations

from .convert import CONVERSIONS, convert, options_of, register_conversion
from .distill import STAGES, TRAINABLE, DistillResult, Stage, default_trainable, distill, register_stage
from .gqa import convert_gqa, expand_kv_heads
from .span import freeze
from .io import (check_target, download_checkpoint, is_main_process, load, save, text_documents, token_blocks,
                 verify_checkpoint)

__all__ = [
    "CONVERSIONS", "STAGES", "TRAINABLE", "DistillResult", "Stage", "check_target", "convert", "convert_gqa",
    "default_trainable", "distill", "download_checkpoint", "expand_kv_heads", "freeze", "is_main_process", "load", "options_of",
    "register_conversion", "register_stage", "save", "text_documents", "token_blocks", "verify_checkpoint",
]

