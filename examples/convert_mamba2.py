"""Convert a model to the Mamba-2 form (gated linear attention, Mamba-in-the-Llama mapping), heal it, check it.

    python examples/convert_mamba2.py                                   # a tiny random Llama: seconds
    python examples/convert_mamba2.py --model smollm2-135m --transfer-tokens 16384 --heal-tokens 8192 \
        --eval-tokens 2048                                              # the real one: tens of minutes on 2 CPU cores

Shows: (1) each converted layer IS its specification: with the decay at 1 and no output norm, linear attention
with the identity feature map and no normaliser over the original q/k/v; (2) the cache holds the same bytes
after 64 or 640 tokens, against a softmax cache that grows; (3) greedy generation with the constant-size cache
equals generation without a cache; (4) the two healing stages (layer-by-layer attention transfer, then the
logits, both training the converted layers) and held-out perplexity before / after each, on the same tokens;
(5) hfa.save / hfa.load round-trips bit-exactly.
"""

import argparse
import tempfile

import torch
import transformers

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import kv_cache_bytes
from hf_efficient_attn.kernels.linear.reference import linear_attention_reference


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


def spec_diff(model) -> float:
    """max |converted layer 0 - unnormalised linear attention over the original q/k/v| with the decay at 1."""
    new = hfa.convert(model, "mamba2", output_norm=False)
    attn, orig = new.model.layers[0].self_attn, model.model.layers[0].self_attn
    with torch.no_grad():
        attn.A_log.fill_(float("-inf"))                 # exp(A_log) = 0: log decay 0, a_t = 1
        h = torch.randn(1, 40, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
        pe = model.model.rotary_emb(h, torch.arange(40)[None])
        q, k, v = (proj(h).view(1, 40, -1, orig.head_dim).transpose(1, 2)
                   for proj in (orig.q_proj, orig.k_proj, orig.v_proj))
        y = linear_attention_reference(q * orig.scaling, k, v, normalize=False)          # rope=False: no rotation
        want = orig.o_proj(y.transpose(1, 2).reshape(1, 40, -1))
        return (attn(h, pe)[0] - want).abs().max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (a random Llama) or a bundled name / local path")
    ap.add_argument("--rope", action="store_true", help="keep RoPE on q/k (default: dropped, as Mamba-in-the-Llama)")
    ap.add_argument("--transfer-tokens", type=int, default=4096, help="stage 1 (attention transfer) tokens")
    ap.add_argument("--heal-tokens", type=int, default=2048, help="stage 2 (logits) tokens; 0: skip")
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
    out = {}

    # (1) the layer is its specification
    out["spec_diff"] = spec_diff(model)
    print(f"layer 0, decay 1, no norm: max |layer - unnormalised linear attention| = {out['spec_diff']:.2e}")

    new = hfa.convert(model, "mamba2", rope=args.rope)
    # (2) the cache
    sizes = [kv_cache_bytes(new, tokens=n) for n in (64, 640)]
    soft = [kv_cache_bytes(model, tokens=n) for n in (64, 640)]
    out["cache_constant"] = sizes[0] == sizes[1]
    print(f"cache after 64 / 640 tokens: mamba2 {sizes[0]:,} / {sizes[1]:,} B, softmax {soft[0]:,} / {soft[1]:,} B")

    # (3) generate with the cache
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        out["generate_same"] = torch.equal(new.generate(ids, use_cache=True, **kw),
                                           new.generate(ids, use_cache=False, **kw))
    print(f"greedy generation with the constant-size cache == without a cache: {out['generate_same']}")

    # (4) heal in two stages; perplexity on the same held-out tokens
    def ppl(m):
        if tok is None:
            with torch.no_grad():
                return torch.exp(m(held_out, labels=held_out).loss).item()
        return hfa.perplexity(m, tok, held_out, context_length=512, max_tokens=args.eval_tokens, progress=False).ppl

    print(f"held-out ppl: original {ppl(model):.3f}, converted (decay and norm at their start) {ppl(new):.3f}")
    opts = dict(tokenizer=tok, seq_len=args.seq_len, batch_size=4 if tok else 1, progress=False)
    res = hfa.distill(new, model, train, stage="attention", max_tokens=args.transfer_tokens, **opts)
    out["transfer_mse"] = (res.losses[0], res.losses[-1])
    trained = new.hfa_conversions[-1]["trainable"]
    print(f"stage 'attention' on {res.tokens} tokens ({res.seconds:.0f} s, trainable={trained}): relative MSE "
          f"{res.losses[0]:.4f} -> {res.losses[-1]:.4f}; ppl {ppl(new):.3f}")
    if args.heal_tokens:
        res = hfa.distill(new, model, train, stage="logits", max_tokens=args.heal_tokens, **opts)
        print(f"stage 'logits' on {res.tokens} tokens ({res.seconds:.0f} s): KL {res.losses[0]:.4f} -> "
              f"{res.losses[-1]:.4f}; ppl {ppl(new):.3f}")

    # (5) save / load
    with tempfile.TemporaryDirectory() as tmp:
        back = hfa.load(hfa.save(new, f"{tmp}/mamba2", tokenizer=tok))
        probe = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            out["reload_same"] = torch.equal(back(probe).logits, new(probe).logits)
    print(f"hfa.save -> hfa.load bit-identical logits: {out['reload_same']} ({type(back).__name__}, "
          f"model_type {back.config.model_type!r})")
    return out


if __name__ == "__main__":
    main()
