"""Convert a model to linear attention (LoLCATs: Hedgehog feature maps + a softmax window), heal it, check it.

    python examples/convert_linear.py                                   # a tiny random Llama: seconds
    python examples/convert_linear.py --model smollm2-135m --transfer-tokens 16384 --heal-tokens 8192 \
        --eval-tokens 2048                                              # the real one: ~20 min on 2 CPU cores

Shows: (1) with a window longer than the text the converted model IS the original (the linear part reads
nothing); (2) the cache holds the same bytes after 64 or 640 tokens, against a softmax cache that grows;
(3) greedy generation with the constant-size cache equals generation without a cache; (4) the two healing
stages (attention transfer, then LoRA on the logits) and held-out perplexity before / after each, on the
same tokens; (5) hfa.save / hfa.load round-trips bit-exactly.
"""

import argparse
import tempfile

import torch
import transformers

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import kv_cache_bytes


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (a random Llama) or a bundled name / local path")
    ap.add_argument("--window", type=int, default=64, help="softmax window of the hybrid (0: pure linear)")
    ap.add_argument("--feature-map", default="hedgehog", help="hedgehog, elu or relu")
    ap.add_argument("--transfer-tokens", type=int, default=4096, help="stage 1 (attention transfer) tokens")
    ap.add_argument("--heal-tokens", type=int, default=2048, help="stage 2 (LoRA on the logits) tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored before / after")
    args = ap.parse_args(argv)

    if args.model == "tiny":
        model = tiny_llama()
        tok = None
        g = torch.Generator().manual_seed(1)
        train = torch.randint(0, 256, (max(1, args.transfer_tokens // args.seq_len), args.seq_len), generator=g)
        held_out = torch.randint(0, 256, (1, args.eval_tokens), generator=g)
    else:
        model, tok = hfa.load_model(args.model)
        train = hfa.load_text(None, split="train")
        held_out = hfa.load_text(None, split="eval")

    # (1) lossless: the softmax window covers the whole probe
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    wide = hfa.convert(model, "linear", window=64)
    with torch.no_grad():
        diff = (wide(ids).logits - model(ids).logits).abs().max().item()
    print(f"window 64 over 48 tokens: max |logits - original| = {diff:.2e}")

    new = hfa.convert(model, "linear", feature_map=args.feature_map, window=args.window)
    # (2) the cache
    sizes = [kv_cache_bytes(new, tokens=n) for n in (64, 640)]
    soft = [kv_cache_bytes(model, tokens=n) for n in (64, 640)]
    print(f"cache after 64 / 640 tokens: linear {sizes[0]:,} / {sizes[1]:,} B, softmax {soft[0]:,} / {soft[1]:,} B")

    # (3) generate with the cache
    with torch.no_grad():
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        same = torch.equal(new.generate(ids[:, :8], use_cache=True, **kw), new.generate(ids[:, :8], use_cache=False, **kw))
    print(f"greedy generation with the linear cache == without a cache: {same}")

    # (4) heal in two stages; perplexity on the same held-out tokens
    def ppl(m):
        if tok is None:
            with torch.no_grad():
                return torch.exp(m(held_out, labels=held_out).loss).item()
        return hfa.perplexity(m, tok, held_out, context_length=512, max_tokens=args.eval_tokens, progress=False).ppl

    print(f"held-out ppl: original {ppl(model):.3f}, converted (untrained maps) {ppl(new):.3f}")
    opts = dict(tokenizer=tok, seq_len=args.seq_len, batch_size=4 if tok else 1, progress=False)
    res = hfa.distill(new, model, train, stage="attention", max_tokens=args.transfer_tokens, **opts)
    print(f"stage 'attention' on {res.tokens} tokens ({res.seconds:.0f} s): relative MSE {res.losses[0]:.4f} -> "
          f"{res.losses[-1]:.4f}; ppl {ppl(new):.3f}")
    if args.heal_tokens:
        res = hfa.distill(new, model, train, stage="logits", trainable="lora", max_tokens=args.heal_tokens, **opts)
        print(f"stage 'logits' (LoRA) on {res.tokens} tokens ({res.seconds:.0f} s): KL {res.losses[0]:.4f} -> "
              f"{res.losses[-1]:.4f}; ppl {ppl(new):.3f}")

    # (5) save / load
    with tempfile.TemporaryDirectory() as tmp:
        back = hfa.load(hfa.save(new, f"{tmp}/linear", tokenizer=tok))
        with torch.no_grad():
            same = torch.equal(back(ids).logits, new(ids).logits)
    print(f"hfa.save -> hfa.load bit-identical logits: {same} ({type(back).__name__}, "
          f"model_type {back.config.model_type!r})")


if __name__ == "__main__":
    main()
