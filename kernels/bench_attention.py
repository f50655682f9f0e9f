"""Benchmark the Triton softmax attention kernels against torch SDPA (and flash-attn when installed).

    python kernels/bench_attention.py            # every shape below, bf16, on the GPU
    python kernels/bench_attention.py --quick    # fewer shapes (what kernels/gpu_check.sh runs)
    python kernels/bench_attention.py --dry-run  # tiny shapes on CPU in the Triton interpreter: checks the
                                                 # code path only, its timings mean nothing

Prefill: 16k tokens per batch (B = 16384 / S), hidden size 2048 (H = 2048 / D), S from 1k to 16k, head
dim 64 and 128, causal and not. Forward FLOPs = 4 * B * H * S^2 * D (x 0.5 when causal); backward
FLOPs = 2.5 x forward. Times are medians of triton.testing.do_bench. Torch SDPA runs with each of its
GPU backends (cuDNN, flash, memory-efficient) that accepts the call; the fastest is reported with its
name. Decode: one new token (and 4) against a 32k-token cache; GB/s counts the K/V bytes read, and
is compared with the device's copy bandwidth measured here (a 1 GiB clone: read + write).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--autotune", action="store_true", help="HFA_TRITON_AUTOTUNE=1: search tiles (slow first call)")
    p.add_argument("--json", default=None, help="write every measurement here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if args.autotune:
        os.environ["HFA_TRITON_AUTOTUNE"] = "1"
    sys.path.insert(0, ROOT)
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_efficient_attn.kernels.softmax.triton_decode import decode_attention
    from hf_efficient_attn.kernels.softmax.triton_flash import flash_attention

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --dry-run to check the code path on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None

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

    sdpa_backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if device == "cpu":
        sdpa_backends = {"math": SDPBackend.MATH}

    def time_fwd_bwd(attn, q, k, v, backward):
        """(forward ms, backward ms or None, output) of attn(q, k, v) -> out [B, H, S, D]."""
        with torch.no_grad():
            out = attn(q, k, v)
            fwd = bench_ms(lambda: attn(q, k, v))
        bwd = None
        if backward:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            y = attn(*leaves)
            dy = torch.randn_like(y)
            bwd = bench_ms(lambda: y.backward(dy, retain_graph=True), grad_to_none=leaves)
        return fwd, bwd, out

    def best_sdpa(q, k, v, causal, backward):
        """Fastest SDPA backend that accepts the call: (name, fwd ms, bwd ms, out, every backend's times)."""
        gqa = k.shape[1] != q.shape[1]
        Sq, Skv = q.shape[2], k.shape[2]
        mask = None
        if causal and Sq != Skv:  # SDPA's is_causal is top-left aligned; ours is bottom-right
            mask = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device).tril(Skv - Sq)
        timings, best = {}, None
        for name, backend in sdpa_backends.items():
            def attn(q_, k_, v_, backend=backend):
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q_, k_, v_, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)
            try:
                fwd, bwd, out = time_fwd_bwd(attn, q, k, v, backward)
            except RuntimeError:  # this backend does not serve the call on this GPU
                continue
            timings[name] = {"fwd_ms": fwd, "bwd_ms": bwd}
            if best is None or fwd < best[1]:
                best = (name, fwd, bwd, out)
        if best is None:
            return None, None, None, None, timings
        return (*best, timings)

    def rel_err(a, b):
        a, b = a.double(), b.double()
        return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()

    def tflops(flops, ms):
        return None if ms is None else flops / ms / 1e9

    rows = []
    # -- prefill: forward and backward
    if args.dry_run:
        seqlens, head_dims, tokens, hidden = (130,), (64,), 260, 128
    elif args.quick:
        seqlens, head_dims, tokens, hidden = (1024, 4096, 16384), (64, 128), 16384, 2048
    else:
        seqlens, head_dims, tokens, hidden = (1024, 2048, 4096, 8192, 16384), (64, 128), 16384, 2048
    for D in head_dims:
        for S in seqlens:
            for causal in (False, True):
                B, H = max(1, tokens // S), hidden // D
                q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
                flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
                tri_fwd, tri_bwd, tri_out = time_fwd_bwd(
                    lambda q_, k_, v_: flash_attention(q_, k_, v_, causal=causal)[0], q, k, v, True)
                name, sd_fwd, sd_bwd, sd_out, sd_all = best_sdpa(q, k, v, causal, True)
                fa_fwd = fa_bwd = None
                if flash_attn_func is not None and device == "cuda":
                    fa_fwd, fa_bwd, _ = time_fwd_bwd(
                        lambda q_, k_, v_: flash_attn_func(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                           causal=causal).transpose(1, 2), q, k, v, True)
                rows.append(dict(
                    kind="prefill", B=B, H=H, S=S, D=D, causal=causal, dtype=args.dtype,
                    triton_fwd_ms=tri_fwd, triton_bwd_ms=tri_bwd,
                    triton_fwd_tflops=tflops(flops, tri_fwd), triton_bwd_tflops=tflops(2.5 * flops, tri_bwd),
                    sdpa_backend=name, sdpa_fwd_ms=sd_fwd, sdpa_bwd_ms=sd_bwd,
                    sdpa_fwd_tflops=tflops(flops, sd_fwd), sdpa_bwd_tflops=tflops(2.5 * flops, sd_bwd),
                    sdpa_all_backends=sd_all, flash_attn_fwd_ms=fa_fwd, flash_attn_bwd_ms=fa_bwd,
                    flash_attn_fwd_tflops=tflops(flops, fa_fwd), flash_attn_bwd_tflops=tflops(2.5 * flops, fa_bwd),
                    rel_err_vs_sdpa=None if sd_out is None else rel_err(tri_out, sd_out),
                ))
                del q, k, v, tri_out, sd_out

    # -- decode: the device's copy bandwidth, then split-KV decode against a long cache
    n_copy = (1 << 30) if device == "cuda" else (1 << 20)
    buf = torch.empty(n_copy, dtype=torch.uint8, device=device)
    copy_gbs = 2 * n_copy / bench_ms(buf.clone) / 1e6  # read + write
    del buf
    if args.dry_run:
        decode_shapes = [(1, 4, 2, 300, 64, 1), (2, 4, 2, 300, 64, 4)]
    else:
        decode_shapes = [(b, 32, 8, 32768, 128, ql) for b in (1, 8) for ql in ((1,) if args.quick else (1, 4))]
    for B, Hq, Hkv, Skv, D, q_len in decode_shapes:
        q = torch.randn(B, Hq, q_len, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, Hkv, Skv, D, device=device, dtype=dtype) for _ in range(2))
        kv_bytes = 2 * k.numel() * k.element_size()
        causal = q_len > 1
        with torch.no_grad():
            tri = bench_ms(lambda: decode_attention(q, k, v, causal=causal))
            tri_out = decode_attention(q, k, v, causal=causal)[0]
        name, sd, _, sd_out, sd_all = best_sdpa(q, k, v, causal, False)
        gbs = kv_bytes / tri / 1e6
        rows.append(dict(kind="decode", B=B, Hq=Hq, Hkv=Hkv, Skv=Skv, D=D, q_len=q_len, dtype=args.dtype,
                         triton_ms=tri, triton_gbs=gbs, pct_of_copy_bandwidth=100 * gbs / copy_gbs,
                         sdpa_backend=name, sdpa_ms=sd, sdpa_gbs=None if sd is None else kv_bytes / sd / 1e6,
                         sdpa_all_backends=sd_all, copy_gbs=copy_gbs,
                         rel_err_vs_sdpa=None if sd_out is None else rel_err(tri_out, sd_out)))

    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else f"cpu (interpreter, {platform.machine()})",
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, dtype=args.dtype,
               flash_attn=flash_attn_func is not None, copy_gbs=copy_gbs, dry_run=args.dry_run,
               autotune=args.autotune, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    print(format_table(env, rows))
    return rows


def _f(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(env, rows):
    lines = [f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['dtype']} | "
             f"copy bandwidth {env['copy_gbs']:.0f} GB/s" + (" | DRY RUN: timings meaningless" if env["dry_run"] else ""),
             "",
             "| prefill B x H x S x D | causal | triton fwd ms | TFLOP/s | bwd ms | TFLOP/s | SDPA (backend) fwd | "
             "TFLOP/s | bwd TFLOP/s | triton/SDPA fwd | flash-attn fwd/bwd TFLOP/s | err vs SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "prefill":
            continue
        ratio = None if r["sdpa_fwd_ms"] is None else r["sdpa_fwd_ms"] / r["triton_fwd_ms"]
        lines.append(
            f"| {r['B']}x{r['H']}x{r['S']}x{r['D']} | {'yes' if r['causal'] else 'no'} | {_f(r['triton_fwd_ms'], '.3f')} | "
            f"{_f(r['triton_fwd_tflops'], '.0f')} | {_f(r['triton_bwd_ms'], '.3f')} | {_f(r['triton_bwd_tflops'], '.0f')} | "
            f"{_f(r['sdpa_fwd_ms'], '.3f')} ({r['sdpa_backend'] or 'none'}) | {_f(r['sdpa_fwd_tflops'], '.0f')} | "
            f"{_f(r['sdpa_bwd_tflops'], '.0f')} | {_f(ratio, '.2f')}x | "
            f"{_f(r['flash_attn_fwd_tflops'], '.0f')}/{_f(r['flash_attn_bwd_tflops'], '.0f')} | "
            f"{_f(r['rel_err_vs_sdpa'], '.1e')} |")
    lines += ["", "| decode B x Hq/Hkv x Skv x D | q_len | triton ms | GB/s | % of copy bw | SDPA (backend) ms | "
              "SDPA GB/s | err vs SDPA |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "decode":
            continue
        lines.append(
            f"| {r['B']}x{r['Hq']}/{r['Hkv']}x{r['Skv']}x{r['D']} | {r['q_len']} | {_f(r['triton_ms'], '.3f')} | "
            f"{_f(r['triton_gbs'], '.0f')} | {_f(r['pct_of_copy_bandwidth'], '.0f')}% | "
            f"{_f(r['sdpa_ms'], '.3f')} ({r['sdpa_backend'] or 'none'}) | {_f(r['sdpa_gbs'], '.0f')} | "
            f"{_f(r['rel_err_vs_sdpa'], '.1e')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
