"""Decode speed and cache size of a linear-attention model against its softmax original, side by side.

    python examples/linear_decode_speed.py                           # SmolLM2-135M at 1k, 4k, 16k tokens (~15 min CPU)
    python examples/linear_decode_speed.py --checkpoint runs/linear_models/window64   # a healed checkpoint
    python examples/linear_decode_speed.py --model tiny --contexts 64,256 --decode-tokens 4    # seconds

For each context length L, each model (alternating, so both see the same machine load) runs one prefill of L
tokens with the cache, then greedy single-token decode steps (`hfa.eval.measure_speed`); the table gives the
bytes the real cache holds after the prefill and the decode tokens/s. Speed does not depend on the weights'
values, so without --checkpoint the linear model is a fresh conversion (untrained feature maps).
"""

import argparse
import json
from pathlib import Path

import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import measure_speed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="the softmax original: bundled name, path, or 'tiny'")
    ap.add_argument("--checkpoint", default=None, help="a saved linear-attention model (default: convert now)")
    ap.add_argument("--window", type=int, default=64, help="softmax window when converting now")
    ap.add_argument("--contexts", default="1024,4096,16384", help="comma-separated prompt lengths")
    ap.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed per context")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model == "tiny":
        import transformers
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                       num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=1 << 16)
        torch.manual_seed(0)
        original = transformers.LlamaForCausalLM(cfg).eval()
    else:
        original, _ = hfa.load_model(args.model)
    linear = hfa.load(args.checkpoint) if args.checkpoint else hfa.convert(original, "linear", window=args.window)
    linear.eval()
    label = linear.config.hfa_linear
    print(f"linear model: feature map {label['feature_map']}, window {label['window']}, softmax layers "
          f"{label['softmax_layers'] or 'none'}; torch threads {torch.get_num_threads()}")

    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        soft = measure_speed(original, (ctx,), decode_tokens=args.decode_tokens, warmup=not rows)[0]
        lin = measure_speed(linear, (ctx,), decode_tokens=args.decode_tokens, warmup=not rows)[0]
        rows.append({"context": ctx, "softmax_cache_bytes": soft.cache_bytes, "linear_cache_bytes": lin.cache_bytes,
                     "softmax_decode_tok_s": soft.decode_tok_s, "linear_decode_tok_s": lin.decode_tok_s,
                     "speedup": lin.decode_tok_s / soft.decode_tok_s,
                     "softmax_prefill_s": soft.prefill_s, "linear_prefill_s": lin.prefill_s})
        r = rows[-1]
        print(f"context {ctx:>6}: cache softmax {r['softmax_cache_bytes'] / 2**20:8.2f} MiB, linear "
              f"{r['linear_cache_bytes'] / 2**20:6.2f} MiB | decode softmax {r['softmax_decode_tok_s']:7.2f} tok/s, "
              f"linear {r['linear_decode_tok_s']:7.2f} tok/s, x{r['speedup']:.2f} | prefill {r['softmax_prefill_s']:.1f} s"
              f" / {r['linear_prefill_s']:.1f} s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
