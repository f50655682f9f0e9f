"""Patched ("auto") vs stock SDPA prefill time on a real model, measured side by side.

    python examples/patch_speed.py --model smollm2-135m --tokens 4096 --repeats 3

Runs one forward pass over `--tokens` tokens with the stock implementation and with the patch,
alternating (so drift in machine load hits both alike), and prints the median of each and the ratio.
"""

import argparse
import json
import statistics
import time

import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval.models import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    ap.add_argument("--stock", default="sdpa")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model, _ = load_model(args.model, attn_implementation=args.stock)
    torch.manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.tokens))
    times = {"stock": [], "patched": []}
    with torch.no_grad():
        model(ids[:, :64])  # warm-up
        for _ in range(args.repeats):
            for which in ("stock", "patched"):
                if which == "patched":
                    hfa.patch(model, backend=args.backend)
                t0 = time.perf_counter()
                model(ids, use_cache=False)
                times[which].append(time.perf_counter() - t0)
                hfa.unpatch(model)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = dict(model=args.model, tokens=args.tokens, backend=args.backend, stock=args.stock,
               median_s=med, ratio=med["patched"] / med["stock"], threads=torch.get_num_threads(), runs=times)
    print(f"{args.model}, {args.tokens} tokens, {torch.get_num_threads()} threads: "
          f"stock {args.stock} {med['stock']:.2f} s, patched {args.backend} {med['patched']:.2f} s, "
          f"ratio {res['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
