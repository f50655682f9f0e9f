"""Tiny random-init models of each supported family, built from configs (no downloads)."""

import torch
import transformers

W = 6  # sliding window: shorter than the test sequences so windows really cut
COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)


def _cfg(name, **kw):
    return getattr(transformers, name)(**{**COMMON, **kw})


# family -> (model class, config factory); every family exercises one feature of the contract
FAMILIES = {
    "llama": ("LlamaForCausalLM", lambda: _cfg("LlamaConfig", num_attention_heads=6, num_key_value_heads=2)),
    "mistral": ("MistralForCausalLM", lambda: _cfg("MistralConfig", num_attention_heads=4, num_key_value_heads=1,
                                                     sliding_window=W, head_dim=12)),
    "qwen2": ("Qwen2ForCausalLM", lambda: _cfg("Qwen2Config", num_attention_heads=4, num_key_value_heads=2,
                                                 use_sliding_window=True, sliding_window=W, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", lambda: _cfg("Qwen3Config", num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2ForCausalLM", lambda: _cfg("Gemma2Config", num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16, sliding_window=W, attn_logit_softcapping=5.0,
                                                   final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3ForCausalLM", lambda: _cfg("Gemma3TextConfig", num_attention_heads=4, num_key_value_heads=1,
                                                   head_dim=16, sliding_window=W, num_hidden_layers=3,
                                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": ("Phi3ForCausalLM", lambda: _cfg("Phi3Config", num_attention_heads=4, num_key_value_heads=2,
                                               bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXForCausalLM", lambda: _cfg("GPTNeoXConfig", num_attention_heads=4, rotary_pct=0.5)),
    "gpt_oss": ("GptOssForCausalLM", lambda: _cfg("GptOssConfig", num_attention_heads=4, num_key_value_heads=2,
                                                    head_dim=12, num_local_experts=4, num_experts_per_tok=2,
                                                    sliding_window=W, layer_types=["sliding_attention", "full_attention"])),
    "bert": ("BertModel", lambda: transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64,
                                                          max_position_embeddings=64)),
}
DECODERS = [f for f in FAMILIES if f != "bert"]


def make_model(family, attn="eager", dtype=torch.float32, seed=0):
    cls_name, cfg_fn = FAMILIES[family]
    cfg = cfg_fn()
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).to(dtype).eval()
    # random init leaves some norms at exactly 1/0; perturb everything a little so bugs cannot hide
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
    return model


def outputs(model, **kw):
    out = model(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# options that convert a tiny model fast and without calibration text, one entry per conversion
TINY_CONVERSIONS = {
    "gqa": {"num_kv_heads": 1, "method": "mean"},
    "mla": {"kv_lora_rank": 8, "rope_dim": 4, "method": "weights"},
    "linear": {"window": 4},
    "mamba2": {},
    "adaptive_span": {"max_span": 64, "ramp": 4},
    "duo": {"sinks": 2, "window": 8},
    "longformer": {"window": 8, "global_tokens": 2},
}


def converted(conversion, family="llama"):
    """A tiny `family` model converted by `conversion` with its `TINY_CONVERSIONS` options."""
    import hf_efficient_attn as hfa

    return hfa.convert(make_model(family), conversion, **TINY_CONVERSIONS[conversion])
