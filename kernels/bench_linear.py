"""Benchmark the Triton chunked linear attention kernels against the PyTorch chunked form and softmax FlashAttention.

    python kernels/bench_linear.py            # every shape below, bf16, on the GPU
    python kernels/bench_linear.py --quick    # fewer shapes (what kernels/gpu_check.sh runs)
    python kernels/bench_linear.py --dry-run  # tiny shapes on CPU in the Triton interpreter: checks the code
                                              # path only, its timings mean nothing

Prefill: 32k tokens per batch (B = 32768 / T), 16 query heads over 4 KV heads (GQA 4), feature dim F = 128,
value dim D = 128, T from 1k to 32k, plain and gated (log_decay), normalised, chunks of 64. Each row times the
forward and the backward of `linear_attention_triton`, of `linear_attention_chunked` (the PyTorch form, its
backward through autograd) and of causal softmax `flash_attention` on q, k, v of the same shapes (head dim
128). FLOPs counted for the chunked algorithm (every C x C block whole): forward = B T (H (2 C F + 2 C D +
2 F D) + Hkv 2 F D); backward = 2 x forward. Softmax FLOPs as in bench_attention.py (causal: 2 B H T^2 D
forward, 2.5 x that backward). Times are medians of triton.testing.do_bench.

Decode: one new token per sequence, B in 1..128: `linear_attention_step_triton` (reads and writes the fp32
state: bytes = 2 B Hkv (F D + F) 4 + q, k, v, out) vs the PyTorch recurrent form on one token, and softmax
split-KV decode against a 32k-token cache (what linear attention replaces). GB/s is compared with the
device's copy bandwidth (a 1 GiB clone: read + write).

Hybrid (LoLCATs: sliding-window softmax + linear, one normaliser; see `bench_hybrid`): forward and backward of
`hybrid_attention_triton` vs its PyTorch chunked form and causal softmax flash on the same q, k, v.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--json", default=None, help="write every measurement here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, ROOT)
    import torch
    import triton

    from hf_efficient_attn.kernels.linear.reference import linear_attention_chunked, linear_attention_recurrent
    from hf_efficient_attn.kernels.linear.triton_chunked import linear_attention_step_triton, linear_attention_triton
    from hf_efficient_attn.kernels.softmax.triton_decode import decode_attention
    from hf_efficient_attn.kernels.softmax.triton_flash import flash_attention

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --dry-run to check the code path on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def bench_ms(fn, grad_to_none=None):
        if device == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        fn()  # the interpreter: one warm call, then the median of three
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    def time_fwd_bwd(attn, inputs):
        """(forward ms, backward ms, output) of attn(*inputs) -> out."""
        with torch.no_grad():
            out = attn(*inputs)
            fwd = bench_ms(lambda: attn(*inputs))
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = attn(*leaves)
        dy = torch.randn_like(y)
        bwd = bench_ms(functools.partial(y.backward, dy, retain_graph=True), grad_to_none=leaves)
        del y, leaves
        return fwd, bwd, out

    def rel_err(a, b):
        a, b = a.double(), b.double()
        return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()

    def tflops(flops, ms):
        return None if ms is None else flops / ms / 1e9

    rows = []
    # -- prefill: forward and backward
    if args.dry_run:
        seqlens, tokens, H, Hkv, F, D, C = (40,), 40, 2, 1, 16, 16, 16
    elif args.quick:
        seqlens, tokens, H, Hkv, F, D, C = (1024, 8192, 32768), 32768, 16, 4, 128, 128, 64
    else:
        seqlens, tokens, H, Hkv, F, D, C = (1024, 2048, 4096, 8192, 16384, 32768), 32768, 16, 4, 128, 128, 64
    for T in seqlens:
        B = max(1, tokens // T)
        gen = torch.Generator(device=device).manual_seed(0)
        q = (torch.rand(B, H, T, F, device=device, generator=gen) + 0.05).to(dtype)  # positive feature maps
        k = (torch.rand(B, Hkv, T, F, device=device, generator=gen) + 0.05).to(dtype)
        v = torch.randn(B, Hkv, T, D, device=device, generator=gen).to(dtype)
        # softmax on q, k, v of the same shapes (once per T: it does not depend on the gate)
        sm_fwd, sm_bwd, _ = time_fwd_bwd(lambda q_, k_, v_: flash_attention(q_, k_, v_, causal=True)[0], (q, k, v))
        sm_flops = 2 * B * H * T * T * D
        for gated in (False, True):
            ld = -torch.rand(B, Hkv, T, device=device, generator=gen) * 0.1 if gated else None
            flops = B * T * (H * (2 * C * F + 2 * C * D + 2 * F * D) + Hkv * 2 * F * D)
            tri_fwd, tri_bwd, tri_out = time_fwd_bwd(
                lambda q_, k_, v_: linear_attention_triton(q_, k_, v_, log_decay=ld, chunk_size=C), (q, k, v))
            ch_fwd, ch_bwd, ch_out = time_fwd_bwd(
                lambda q_, k_, v_: linear_attention_chunked(q_, k_, v_, log_decay=ld, chunk_size=C), (q, k, v))
            rows.append(dict(
                kind="prefill", B=B, H=H, Hkv=Hkv, T=T, F=F, D=D, chunk=C, gated=gated, dtype=args.dtype,
                triton_fwd_ms=tri_fwd, triton_bwd_ms=tri_bwd,
                triton_fwd_tflops=tflops(flops, tri_fwd), triton_bwd_tflops=tflops(2 * flops, tri_bwd),
                torch_chunked_fwd_ms=ch_fwd, torch_chunked_bwd_ms=ch_bwd,
                softmax_flash_fwd_ms=sm_fwd, softmax_flash_bwd_ms=sm_bwd,
                softmax_flash_fwd_tflops=tflops(sm_flops, sm_fwd),
                softmax_flash_bwd_tflops=tflops(2.5 * sm_flops, sm_bwd),
                rel_err_vs_torch_chunked=rel_err(tri_out, ch_out),
            ))
            del tri_out, ch_out
        del q, k, v

    # -- decode: the device's copy bandwidth, then one token against the state (and softmax against a cache)
    n_copy = (1 << 30) if device == "cuda" else (1 << 20)
    buf = torch.empty(n_copy, dtype=torch.uint8, device=device)
    copy_gbs = 2 * n_copy / bench_ms(buf.clone) / 1e6  # read + write
    del buf
    if args.dry_run:
        batches, cache = (2,), 64
    else:
        batches, cache = ((1, 128) if args.quick else (1, 16, 128)), 32768
    for B in batches:
        for gated in (False, True):
            q = (torch.rand(B, H, 1, F, device=device) + 0.05).to(dtype)
            k = (torch.rand(B, Hkv, 1, F, device=device) + 0.05).to(dtype)
            v = torch.randn(B, Hkv, 1, D, device=device).to(dtype)
            ld = -torch.rand(B, Hkv, 1, device=device) * 0.1 if gated else None
            state = (torch.rand(B, Hkv, F, D, device=device), torch.rand(B, Hkv, F, device=device) + 1.0)
            io_bytes = (q.numel() + k.numel() + v.numel() + B * H * D) * q.element_size()
            state_bytes = 2 * B * Hkv * (F * D + F) * 4  # read + write, fp32
            with torch.no_grad():
                tri = bench_ms(lambda: linear_attention_step_triton(q, k, v, state, log_decay=ld))
                tri_out = linear_attention_step_triton(q, k, v, state, log_decay=ld)[0]
                rec = bench_ms(lambda: linear_attention_recurrent(q, k, v, log_decay=ld, initial_state=state,
                                                                  return_state=True))
                rec_out = linear_attention_recurrent(q, k, v, log_decay=ld, initial_state=state)
            sm = None
            if not gated:  # softmax decode of the same heads against a long cache (independent of the gate)
                kc = torch.randn(B, Hkv, cache, D, device=device, dtype=dtype)
                vc = torch.randn(B, Hkv, cache, D, device=device, dtype=dtype)
                with torch.no_grad():
                    sm = bench_ms(lambda: decode_attention(q, kc, vc))
                del kc, vc
            gbs = (state_bytes + io_bytes) / tri / 1e6
            rows.append(dict(kind="decode", B=B, H=H, Hkv=Hkv, F=F, D=D, gated=gated, dtype=args.dtype,
                             triton_ms=tri, triton_gbs=gbs, pct_of_copy_bandwidth=100 * gbs / copy_gbs,
                             torch_recurrent_ms=rec, softmax_decode_ms=sm, softmax_cache=cache, copy_gbs=copy_gbs,
                             rel_err_vs_torch_recurrent=rel_err(tri_out, rec_out)))

    rows += bench_hybrid(args, device, dtype, time_fwd_bwd, rel_err)

    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else f"cpu (interpreter, {platform.machine()})",
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, dtype=args.dtype,
               copy_gbs=copy_gbs, dry_run=args.dry_run, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    print(format_table(env, rows))
    return rows


def _f(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(env, rows):
    lines = [f"# linear attention | {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['dtype']} | "
             f"copy bandwidth {env['copy_gbs']:.0f} GB/s" + (" | DRY RUN: timings meaningless" if env["dry_run"] else ""),
             "",
             "| prefill B x H/Hkv x T x F/D | gated | triton fwd ms | TFLOP/s | bwd ms | TFLOP/s | torch chunked fwd/bwd ms "
             "| triton speedup fwd/bwd | softmax flash fwd/bwd ms | vs softmax fwd/bwd | err vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "prefill":
            continue
        lines.append(
            f"| {r['B']}x{r['H']}/{r['Hkv']}x{r['T']}x{r['F']}/{r['D']} | {'yes' if r['gated'] else 'no'} | "
            f"{_f(r['triton_fwd_ms'], '.3f')} | {_f(r['triton_fwd_tflops'], '.1f')} | {_f(r['triton_bwd_ms'], '.3f')} | "
            f"{_f(r['triton_bwd_tflops'], '.1f')} | {_f(r['torch_chunked_fwd_ms'], '.2f')}/"
            f"{_f(r['torch_chunked_bwd_ms'], '.2f')} | {_f(r['torch_chunked_fwd_ms'] / r['triton_fwd_ms'], '.1f')}x/"
            f"{_f(r['torch_chunked_bwd_ms'] / r['triton_bwd_ms'], '.1f')}x | {_f(r['softmax_flash_fwd_ms'], '.3f')}/"
            f"{_f(r['softmax_flash_bwd_ms'], '.3f')} | {_f(r['softmax_flash_fwd_ms'] / r['triton_fwd_ms'], '.2f')}x/"
            f"{_f(r['softmax_flash_bwd_ms'] / r['triton_bwd_ms'], '.2f')}x | {_f(r['rel_err_vs_torch_chunked'], '.1e')} |")
    lines += ["", "| decode B x H/Hkv x F/D | gated | triton ms | GB/s | % of copy bw | torch recurrent ms | "
              "softmax decode ms (cache) | err vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "decode":
            continue
        lines.append(
            f"| {r['B']}x{r['H']}/{r['Hkv']}x{r['F']}/{r['D']} | {'yes' if r['gated'] else 'no'} | "
            f"{_f(r['triton_ms'], '.4f')} | {_f(r['triton_gbs'], '.0f')} | {_f(r['pct_of_copy_bandwidth'], '.0f')}% | "
            f"{_f(r['torch_recurrent_ms'], '.4f')} | {_f(r['softmax_decode_ms'], '.4f')} ({r['softmax_cache']}) | "
            f"{_f(r['rel_err_vs_torch_recurrent'], '.1e')} |")
    lines += format_hybrid(rows)
    return "\n".join(lines)



# -- hybrid (sliding-window softmax + linear attention): a separate case, kept apart from the code above ------

def bench_hybrid(args, device, dtype, time_fwd_bwd, rel_err):
    """Rows of kind "hybrid": 32k tokens per batch, 16 query heads over 4 KV heads, head dim 64 (softmax part and
    values), hedgehog features F = 128 (2 x 64), window 64: `hybrid_attention_triton` vs `hybrid_attention_chunked`
    (PyTorch, chunks of 64, backward through autograd) vs causal softmax `flash_attention` on the same q, k, v."""
    import torch

    from hf_efficient_attn.kernels.linear.reference import hybrid_attention_chunked
    from hf_efficient_attn.kernels.linear.triton_hybrid import hybrid_attention_triton
    from hf_efficient_attn.kernels.softmax.triton_flash import flash_attention

    if args.dry_run:
        seqlens, tokens, H, Hkv, Dk, F, D, w = (40,), 40, 2, 1, 16, 16, 16, 8
    else:
        seqlens, tokens, H, Hkv, Dk, F, D, w = ((1024, 8192) if args.quick else (1024, 4096, 16384)), 32768, 16, 4, \
            64, 128, 64, 64
    rows = []
    for T in seqlens:
        B = max(1, tokens // T)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, H, T, Dk, device=device, generator=gen).to(dtype)
        k = torch.randn(B, Hkv, T, Dk, device=device, generator=gen).to(dtype)
        v = torch.randn(B, Hkv, T, D, device=device, generator=gen).to(dtype)
        fq = torch.softmax(torch.randn(B, H, T, F, device=device, generator=gen), -1).to(dtype)  # like hedgehog
        fk = torch.softmax(torch.randn(B, Hkv, T, F, device=device, generator=gen), -1).to(dtype)
        opts = dict(window=w, window_factor=0.5)
        tri_fwd, tri_bwd, tri_out = time_fwd_bwd(lambda *x: hybrid_attention_triton(*x, **opts), (q, k, v, fq, fk))
        ch_fwd, ch_bwd, ch_out = time_fwd_bwd(lambda *x: hybrid_attention_chunked(*x, **opts, chunk_size=64),
                                              (q, k, v, fq, fk))
        sm_fwd, sm_bwd, _ = time_fwd_bwd(lambda q_, k_, v_: flash_attention(q_, k_, v_, causal=True)[0], (q, k, v))
        rows.append(dict(kind="hybrid", gated=False, B=B, H=H, Hkv=Hkv, T=T, Dk=Dk, F=F, D=D, window=w,
                         dtype=args.dtype, triton_fwd_ms=tri_fwd, triton_bwd_ms=tri_bwd,
                         torch_chunked_fwd_ms=ch_fwd, torch_chunked_bwd_ms=ch_bwd,
                         softmax_flash_fwd_ms=sm_fwd, softmax_flash_bwd_ms=sm_bwd,
                         rel_err_vs_torch_chunked=rel_err(tri_out, ch_out)))
        del q, k, v, fq, fk, tri_out, ch_out
    return rows


def format_hybrid(rows):
    lines = ["", "| hybrid B x H/Hkv x T x Dk/F/D, window | triton fwd/bwd ms | torch chunked fwd/bwd ms | "
             "triton speedup fwd/bwd | softmax flash fwd/bwd ms | vs softmax fwd/bwd | err vs torch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "hybrid":
            continue
        lines.append(
            f"| {r['B']}x{r['H']}/{r['Hkv']}x{r['T']}x{r['Dk']}/{r['F']}/{r['D']}, {r['window']} | "
            f"{_f(r['triton_fwd_ms'], '.3f')}/{_f(r['triton_bwd_ms'], '.3f')} | "
            f"{_f(r['torch_chunked_fwd_ms'], '.2f')}/{_f(r['torch_chunked_bwd_ms'], '.2f')} | "
            f"{_f(r['torch_chunked_fwd_ms'] / r['triton_fwd_ms'], '.1f')}x/"
            f"{_f(r['torch_chunked_bwd_ms'] / r['triton_bwd_ms'], '.1f')}x | "
            f"{_f(r['softmax_flash_fwd_ms'], '.3f')}/{_f(r['softmax_flash_bwd_ms'], '.3f')} | "
            f"{_f(r['softmax_flash_fwd_ms'] / r['triton_fwd_ms'], '.2f')}x/"
            f"{_f(r['softmax_flash_bwd_ms'] / r['triton_bwd_ms'], '.2f')}x | "
            f"{_f(r['rel_err_vs_torch_chunked'], '.1e')} |")
    return lines


if __name__ == "__main__":
    main()
