"""Learned sparsity in a few lines: convert, train the reach, freeze, measure the cache, save and load.

    python examples/learned_sparsity.py [--method adaptive_span|duo|longformer] [--model smollm2-135m]
        [--heal-tokens 4096] [--seq-len 512] [--eval-tokens 2048] [--out DIR]

* ``adaptive_span``: ``hfa.convert(model, "adaptive_span", max_span=seq_len)`` equals the model on texts up to
  max_span; ``hfa.distill(new, model, text, stage="sparsity", stage_options={"penalty": 0.05})`` trains only the
  spans (the penalty pulls them in, the KL to the original pushes back); ``hfa.freeze(new)`` turns each span into a
  hard window;
* ``duo``: the same with one gate per KV head between full attention and sinks + window, trained on synthetic
  passkey prompts; ``hfa.freeze(new, full_heads=0.25)`` keeps a quarter of the KV heads full;
* ``longformer``: a window + global first tokens from the start, healed on the text (its attention projections).

It prints what each KV head reads, the cache bytes per token at 8k tokens against the original's, and perplexity
before and after on the bundled held-out split; the conversions recipe (``conversions/learned_sparsity_smollm2.py``)
makes the README's table.
"""

import argparse
import tempfile
from pathlib import Path

import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.conversions.span import kv_fraction, reach_summary
from hf_efficient_attn.eval import load_model, load_text, perplexity
from hf_efficient_attn.eval.cost import kv_cache_bytes_at_length
from hf_efficient_attn.eval.passkey import passkey_training_ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="adaptive_span", choices=["adaptive_span", "duo", "longformer"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heal-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--kv-tokens", type=int, default=8192)
    p.add_argument("--out", type=Path, default=None, help="where to save the result (default: a temporary folder)")
    args = p.parse_args(argv)

    model, tok = load_model(args.model)
    train = list(load_text(None, split="train").documents)
    heal = dict(max_tokens=args.heal_tokens, seq_len=args.seq_len, batch_size=1, progress=False)
    if args.method == "adaptive_span":
        new = hfa.convert(model, "adaptive_span", max_span=args.seq_len, ramp=32, sinks=4)
        hfa.distill(new, model, train, tokenizer=tok, stage="sparsity", stage_options={"penalty": 0.05}, **heal)
        print("learned spans (tokens), layer 0:", reach_summary(new)["layers"][0]["span"])
        new = hfa.freeze(new)
    elif args.method == "duo":
        new = hfa.convert(model, "duo", sinks=4, window=64)
        data = passkey_training_ids(tok, max(1, args.heal_tokens // args.seq_len), args.seq_len)
        hfa.distill(new, model, data, stage="sparsity", stage_options={"penalty": 0.05}, **heal)
        print("learned gates, layer 0:", reach_summary(new)["layers"][0]["gate"])
        new = hfa.freeze(new, full_heads=0.25)
    else:
        new = hfa.convert(model, "longformer", window=128, global_tokens=4)
        hfa.distill(new, model, train, tokenizer=tok, **heal)
    new.eval()
    windows = reach_summary(new)["layers"]
    print("windows per KV head (None: full), first layers:", {i: windows[i]["window"] for i in list(windows)[:3]})
    base_kv = kv_cache_bytes_at_length(model, args.kv_tokens)
    new_kv = kv_cache_bytes_at_length(new, args.kv_tokens)
    print(f"KV cache after {args.kv_tokens} tokens: {new_kv:,} bytes vs {base_kv:,} "
          f"({new_kv / base_kv:.1%}; analytic {kv_fraction(new, args.kv_tokens):.1%})")
    text = load_text(None, split="eval")
    ctx = min(args.seq_len, 512)
    before = perplexity(model, tok, text, context_length=ctx, max_tokens=args.eval_tokens, progress=False)
    after = perplexity(new, tok, text, context_length=ctx, max_tokens=args.eval_tokens, progress=False)
    print(f"perplexity (held-out, disjoint {ctx}-token windows, {after.tokens} tokens): {before.ppl:.3f} -> "
          f"{after.ppl:.3f} ({after.ppl / before.ppl - 1:+.1%})")
    with tempfile.TemporaryDirectory() as tmp:
        path = hfa.save(new, args.out or Path(tmp) / args.method, tokenizer=tok, overwrite=True)
        again = hfa.load(path)
        ids = torch.randint(0, model.config.vocab_size, (1, 64))
        same = torch.equal(again(input_ids=ids).logits, new(input_ids=ids).logits)
        print(f"saved to {path}; reloaded bit-exact: {same}")
    return {"kv_before": base_kv, "kv_after": new_kv, "ppl_before": before.ppl, "ppl_after": after.ppl,
            "same": same, "windows": windows}


if __name__ == "__main__":
    main()
