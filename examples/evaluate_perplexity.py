"""Perplexity and KV-cache size of a model on held-out text, with the protocol that produced them.

    python examples/evaluate_perplexity.py                         # SmolLM2-135M, the bundled eval split
    python examples/evaluate_perplexity.py --model gemma3-270m --max-tokens 4096
    python examples/evaluate_perplexity.py --data my_corpus.txt --context 1024 --stride 512

Both protocols are shown: disjoint windows (every window starts from scratch) and a sliding window
(every token gets at least context - stride tokens of context), which always reads lower.
"""

import argparse
import json

import torch

from hf_efficient_attn.eval import kv_cache_bytes, load_model, load_text, parameter_count, perplexity


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="bundled name, local path or Hub id")
    ap.add_argument("--data", default=None, help="text file, folder, datasets:NAME[:CONFIG]; default: bundled eval split")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256, help="stride of the sliding-window protocol")
    ap.add_argument("--max-tokens", type=int, default=2048, help="token budget (default 2048: ~10 s on 2 CPU cores)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    text = load_text(args.data)  # loaded once: both protocols read the same text
    print(f"{args.model}: {parameter_count(model) / 1e6:.1f}M parameters; data {text!r}")

    results = {}
    for label, stride in (("disjoint", None), (f"stride {args.stride}", args.stride)):
        res = perplexity(model, tok, text, context_length=args.context, stride=stride, max_tokens=args.max_tokens)
        results[label] = res.to_dict()
        print(f"  {label:>12}: {res}")

    kv = kv_cache_bytes(model, tokens=args.context)
    print(f"  KV cache after {args.context} tokens: {kv:,} bytes ({kv / args.context:,.0f} bytes/token, "
          f"{str(model.dtype).removeprefix('torch.')})")
    results["kv_cache_bytes"] = kv
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
