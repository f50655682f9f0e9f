"""Convert a Llama or Gemma 3 model to multi-head latent attention (MLA) and check what it costs.

    python examples/convert_mla.py                      # a tiny random Llama: seconds, no downloads
    python examples/convert_mla.py --model tiny-gemma3  # a tiny random Gemma 3 (q/k norms, sliding windows)
    python examples/convert_mla.py --model smollm2-135m --rank 224 --rope-dim 32 --tokens 2048   # the real one
    python examples/convert_mla.py --model gemma3-270m --rank 224 --rope-dim 32 --tokens 1024

Shows: (1) at full rank with every RoPE plane kept the MLA model reproduces the original logits; (2) a lower
rank caches (r + d_r) values per token and layer instead of 2 x KV heads x head_dim, measured on the real
cache; (3) greedy generation with the latent cache equals generation without a cache; (4) hfa.save /
hfa.load round-trips bit-exactly.
"""

import argparse
import tempfile

import torch
import transformers

from hf_efficient_attn.conversions import convert, load, save
from hf_efficient_attn.conversions.mla import mla_ranks
from hf_efficient_attn.eval import kv_cache_bytes


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), None


def tiny_gemma3():
    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                        query_pre_attn_scalar=32, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)    # norms start at exactly 0 (= gain 1): make them matter
    return model, None


def cached_tokens(model, tokens):
    """Tokens each layer's cache holds after `tokens` tokens: sliding-window layers keep their last window - 1."""
    cfg = model.config
    return [min(tokens, cfg.sliding_window - 1) if t == "sliding_attention" else tokens
            for t in (getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny",
                    help="'tiny' (random Llama), 'tiny-gemma3' (random Gemma 3), or a bundled name / local path")
    ap.add_argument("--rank", type=int, default=None, help="kv_lora_rank of the lossy model (default: half of full)")
    ap.add_argument("--rope-dim", type=int, default=None, help="rope_dim of the lossy model (default: one head dim)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the probe sequence")
    args = ap.parse_args(argv)

    if args.model in ("tiny", "tiny-gemma3"):
        model, tok = tiny_llama() if args.model == "tiny" else tiny_gemma3()
        calibration = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    else:
        from hf_efficient_attn.eval import load_model, load_text
        model, tok = load_model(args.model)
        calibration = load_text(None, split="calibration")
    lim = mla_ranks(model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits

    # (1) lossless: every RoPE plane kept, latent rank = rank of [K_nope; V]
    full = convert(model, "mla", kv_lora_rank=lim["full_rank"](lim["max_rope_dim"]), rope_dim=lim["max_rope_dim"],
                   method="weights")
    with torch.no_grad():
        print(f"full rank: max |logits - original| = {(full(ids).logits - ref).abs().max().item():.2e}")

    # (2) compressed
    rope_dim = args.rope_dim or lim["head_dim"]
    rank = args.rank or lim["full_rank"](rope_dim) // 2
    new = convert(model, "mla", kv_lora_rank=rank, rope_dim=rope_dim, method="activations", calibration=calibration,
                  tokenizer=tok, calibration_tokens=4096)
    before, after = (kv_cache_bytes(m, tokens=args.tokens) / args.tokens for m in (model, new))
    with torch.no_grad():
        err = (new(ids).logits - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    held = cached_tokens(model, args.tokens)
    windows = "" if len(set(held)) == 1 else f" (tokens cached per layer {held}: sliding windows)"
    print(f"r={rank} d_r={rope_dim}: KV cache {after:.0f} B/token vs {before:.0f} ({100 * after / before:.1f}%), "
          f"expected (r + d_r) x cached tokens x 4 / tokens = {(rank + rope_dim) * sum(held) * 4 / args.tokens:g}"
          f"{windows}; relative RMS logit error {err:.3f}")

    # (3) the latent cache in generate()
    prompt = ids[:, :8]
    with torch.no_grad():
        cached = new.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = new.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    print(f"greedy generation with the latent cache == without a cache: {torch.equal(cached, uncached)}")

    # (4) save / load
    with tempfile.TemporaryDirectory() as tmp:
        back = load(save(new, f"{tmp}/mla", tokenizer=tok))
        with torch.no_grad():
            same = torch.equal(back(ids).logits, new(ids).logits)
    print(f"hfa.save -> hfa.load bit-identical logits: {same} ({type(back).__name__}, "
          f"model_type {back.config.model_type!r})")


if __name__ == "__main__":
    main()
