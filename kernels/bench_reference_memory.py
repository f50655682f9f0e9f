"""Time and peak memory of ONE call of the blockwise reference at long context, on CPU.

    python kernels/bench_reference_memory.py --seq 32768 --heads 9 --head-dim 64

Peak memory is the growth of the process's peak resident set (ru_maxrss) during the call, after
q/k/v are allocated and touched: everything the call itself allocates, at its high-water mark.
It is compared with one S x S fp32 score matrix (S * S * 4 bytes), what a naive implementation
allocates per head.
"""

import argparse
import json
import resource
import time

import torch

from hf_efficient_attn.kernels.softmax import softmax_attention_reference


def rss_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: same as --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--block-q", type=int, default=512)
    ap.add_argument("--block-k", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    S, H, D = args.seq, args.heads, args.head_dim
    Hkv = args.kv_heads or H
    torch.manual_seed(0)
    q = torch.randn(1, H, S, D)
    k = torch.randn(1, Hkv, S, D)
    v = torch.randn(1, Hkv, S, D)
    before = rss_peak_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        out, lse = softmax_attention_reference(q, k, v, causal=not args.non_causal,
                                               block_q=args.block_q, block_k=args.block_k)
    dt = time.perf_counter() - t0
    peak = max(rss_peak_bytes() - before, 0)
    sxs = S * S * 4
    res = dict(seq=S, heads=H, kv_heads=Hkv, head_dim=D, causal=not args.non_causal, seconds=round(dt, 2),
               peak_extra_bytes=peak, sxs_fp32_bytes=sxs, peak_fraction_of_sxs=round(peak / sxs, 4),
               threads=torch.get_num_threads(), finite=bool(torch.isfinite(out).all()))
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
