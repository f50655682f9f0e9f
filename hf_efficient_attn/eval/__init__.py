"""Layer 3: accuracy and cost checks — bundled models and text, perplexity, KV-cache accounting, reports.

    from hf_efficient_attn.eval import load_model, load_text, perplexity, kv_cache_bytes
    model, tok = load_model("smollm2-135m")
    res = perplexity(model, tok, None, context_length=512)    # None: the bundled held-out split
    res.ppl, res.nll, res.tokens, res.protocol
    kv_cache_bytes(model, tokens=1024) / 1024                  # bytes per token, from the real cache
    kv_cache_bytes_at_length(model, 65536)                     # the same count at 64k tokens, no compute (meta)
    passkey_retrieval(model, tok, lengths=(1024, 4096))         # a key hidden at 5 depths, greedy exact match
"""

from .cost import SpeedPoint, cache_tensors, kv_cache_bytes, kv_cache_bytes_at_length, measure_speed, merge_speed, parameter_count
from .data import BUNDLED_CORPORA, SPLITS, TextData, load_text, split_of
from .kv_check import KVCheck, format_kv_check, kv_check, kv_perplexity
from .models import BUNDLED_MODELS, BundledModel, cache_dir, load_model
from .passkey import PasskeyResult, format_passkey, passkey_retrieval
from .perplexity import PerplexityResult, perplexity, tokenize_stream, tokenizer_adds_bos
from .report import (DEMO_CONVERSIONS, DemoConversion, ModelReport, demo_conversions, evaluate_model,
                     evaluate_models, format_table, heal_tokens, pareto_frontier, pareto_points, run_demo, to_markdown,
                     write_report)

__all__ = [
    "BUNDLED_CORPORA", "BUNDLED_MODELS", "KVCheck", "format_kv_check", "kv_check", "kv_perplexity", "BundledModel", "DEMO_CONVERSIONS", "DemoConversion", "ModelReport",
    "PasskeyResult", "format_passkey", "passkey_retrieval",
    "PerplexityResult", "SPLITS", "SpeedPoint", "TextData", "cache_dir", "cache_tensors", "demo_conversions", "evaluate_model",
    "evaluate_models", "format_table", "heal_tokens", "kv_cache_bytes", "kv_cache_bytes_at_length", "load_model",
    "load_text", "measure_speed", "merge_speed", "pareto_frontier", "pareto_points",
    "parameter_count", "perplexity", "run_demo", "split_of", "to_markdown", "tokenize_stream",
    "tokenizer_adds_bos", "write_report",
]
