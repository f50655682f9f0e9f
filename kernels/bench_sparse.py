"""Benchmark block-sparse attention against dense attention on the same inputs, side by side.

    python kernels/bench_sparse.py --cpu        # CPU: the reference's block-gather path vs dense torch SDPA, 16k
    python kernels/bench_sparse.py              # GPU: Triton block-sparse vs our dense Triton kernels, 32k
    python kernels/bench_sparse.py --quick      # GPU, fewer shapes (what kernels/gpu_check.sh runs)
    python kernels/bench_sparse.py --dry-run    # tiny shapes, both parts on CPU (Triton in its interpreter):
                                                # checks the code paths only, its timings mean nothing

Layouts: ``BlockLayout.random`` (per query block the causal diagonal block, the first block and random others),
64 x 64 blocks, tuned to the target density of causal blocks (10% by default) and reported as measured.

CPU: one causal attention call, B = 1, H = 9 query heads, D = 64, S = 16384, fp32: torch SDPA (dense, its
CPU flash kernel, which skips the blocks above the diagonal) vs ``block_sparse_attention_reference`` (gathers
only the selected blocks), with 9 KV heads (MHA) and 3 (SmolLM2's GQA). Times are the median of alternating
runs (sparse, dense, sparse, ...) so load from other processes hits both. The sparse result is checked against
the dense-mask spec on the last 256 queries.

GPU (bf16): forward (and forward + backward) of ``block_sparse_attention`` at 32k tokens vs our dense
``flash_attention`` (causal), and one decode token against a 32k cache, ``block_sparse_decode`` vs dense
``decode_attention``; medians of ``triton.testing.do_bench``; error vs the fp32 gather reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the CPU comparison (reference gather path vs SDPA)")
    p.add_argument("--quick", action="store_true", help="GPU: fewer shapes")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton in the interpreter)")
    p.add_argument("--density", type=float, default=0.10, help="target fraction of causal blocks computed")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 16384 on CPU, 32768 on GPU)")
    p.add_argument("--reps", type=int, default=3, help="CPU: timed runs of each (median)")
    p.add_argument("--json", default=None, help="write every measurement here")
    return p.parse_args(argv)


def layout_at(BlockLayout, B, H, S, block, density, device, seed=0):
    """A random causal layout whose measured density of causal blocks is close to ``density``.

    block: the block size, or (block_m, block_n)."""
    bm, bn = (block, block) if isinstance(block, int) else block
    lo, hi = 0.0, density
    best = None
    for _ in range(12):  # the diagonal and first blocks come on top of the random share: search the share
        mid = (lo + hi) / 2
        lay = BlockLayout.random(B, H, S, S, bm, bn, mid, causal=True, seed=seed, device=device)
        d = lay.density()
        if best is None or abs(d - density) < abs(best[1] - density):
            best = (lay, d)
        lo, hi = (mid, hi) if d < density else (lo, mid)
        if abs(d - density) < 0.002:
            break
    return best


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def cpu_rows(args):
    import torch

    from hf_efficient_attn.kernels.sparse import (
        BlockLayout,
        block_sparse_attention_naive,
        block_sparse_attention_reference,
    )
    S = args.seq or (256 if args.dry_run else 16384)
    # (Hq, Hkv, block_m, block_n): MHA and SmolLM2's GQA with 64 x 64 blocks, and MHA with 128 x 128 blocks (the
    # gather path's matmuls have G * block_m rows: taller tiles run closer to the CPU's matmul peak)
    shapes = [(9, 9, 32, 32), (9, 3, 32, 32)] if args.dry_run else [(9, 9, 64, 64), (9, 3, 64, 64), (9, 9, 128, 128)]
    check = 64 if args.dry_run else 256
    rows = []
    for Hq, Hkv, bm, bn in shapes:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, Hq, S, 64, generator=g)
        k, v = (torch.randn(1, Hkv, S, 64, generator=g) for _ in range(2))
        layout, density = layout_at(BlockLayout, 1, Hkv, S, (bm, bn), args.density, "cpu")

        def sparse():
            return block_sparse_attention_reference(q, k, v, layout, causal=True)[0]

        def dense():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != Hq)

        with torch.no_grad():
            out = sparse()
            dense()  # warm
            t_sparse, t_dense = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                sparse()
                t1 = time.perf_counter()
                dense()
                t2 = time.perf_counter()
                t_sparse.append((t1 - t0) * 1e3)
                t_dense.append((t2 - t1) * 1e3)
            # -- correctness on the last `check` queries: the dense-mask spec of the same layout rows
            nq = layout.n_q_blocks
            sub = BlockLayout.from_block_mask(layout.to_block_mask()[:, :, nq - check // bm:], bm, bn, check, S)
            ref, _ = block_sparse_attention_naive(q[:, :, -check:], k, v, sub, causal=True)
        ms_sparse, ms_dense = sorted(t_sparse)[len(t_sparse) // 2], sorted(t_dense)[len(t_dense) // 2]
        rows.append(dict(kind="cpu", B=1, Hq=Hq, Hkv=Hkv, S=S, D=64, block=f"{bm}x{bn}", density=density,
                         threads=torch.get_num_threads(), sparse_ms=ms_sparse, sdpa_ms=ms_dense,
                         speedup=ms_dense / ms_sparse, sparse_ms_all=t_sparse, sdpa_ms_all=t_dense,
                         rel_err_vs_spec=rel_err(out[:, :, -check:], ref)))
    return rows


def gpu_rows(args):
    import torch
    import triton

    from hf_efficient_attn.kernels.softmax.triton_decode import decode_attention
    from hf_efficient_attn.kernels.softmax.triton_flash import flash_attention
    from hf_efficient_attn.kernels.sparse import BlockLayout, block_sparse_attention_reference
    from hf_efficient_attn.kernels.sparse.triton_block_sparse import block_sparse_attention, block_sparse_decode

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.bfloat16

    def bench_ms(fn, grad_to_none=None):
        if device == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    S = args.seq or (128 if args.dry_run else 32768)
    if args.dry_run:
        shapes, block = [(1, 4, 2, 64)], 32
    elif args.quick:
        shapes, block = [(1, 16, 4, 128), (1, 9, 3, 64)], 64
    else:
        shapes, block = [(1, 16, 4, 128), (1, 32, 8, 128), (1, 9, 3, 64), (2, 16, 16, 64)], 64
    rows = []
    for B, Hq, Hkv, D in shapes:
        q = torch.randn(B, Hq, S, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
        layout, density = layout_at(BlockLayout, B, Hkv, S, block, args.density, device)
        with torch.no_grad():
            sp_out = block_sparse_attention(q, k, v, layout, causal=True)[0]
            sp_fwd = bench_ms(lambda: block_sparse_attention(q, k, v, layout, causal=True))
            fl_fwd = bench_ms(lambda: flash_attention(q, k, v, causal=True))
            ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), layout, causal=True)[0]
        # -- forward + backward
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        dy = torch.randn_like(q)

        def sp_train():
            block_sparse_attention(*leaves, layout, causal=True)[0].backward(dy)

        def fl_train():
            flash_attention(*leaves, causal=True)[0].backward(dy)
        sp_fb, fl_fb = bench_ms(sp_train, grad_to_none=leaves), bench_ms(fl_train, grad_to_none=leaves)
        rows.append(dict(kind="prefill", B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, block=block, density=density,
                         sparse_fwd_ms=sp_fwd, dense_fwd_ms=fl_fwd, fwd_speedup=fl_fwd / sp_fwd,
                         sparse_fwd_bwd_ms=sp_fb, dense_fwd_bwd_ms=fl_fb, fwd_bwd_speedup=fl_fb / sp_fb,
                         rel_err_vs_reference=rel_err(sp_out, ref)))
        # -- decode: one new token against the S-token cache, the layout's last query block row
        q1 = q[:, :, -1:].contiguous()
        last = layout.to_block_mask()[:, :, -1:]
        dec_layout = BlockLayout.from_block_mask(last, block, block, 1, S)
        with torch.no_grad():
            sp_dec = bench_ms(lambda: block_sparse_decode(q1, k, v, dec_layout, causal=True))
            de_dec = bench_ms(lambda: decode_attention(q1, k, v, causal=True))
            dec_out = block_sparse_decode(q1, k, v, dec_layout, causal=True)[0]
            dec_ref = block_sparse_attention_reference(q1.float(), k.float(), v.float(), dec_layout, causal=True)[0]
        rows.append(dict(kind="decode", B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, block=block,
                         density=dec_layout.density(causal=True), sparse_ms=sp_dec, dense_ms=de_dec,
                         speedup=de_dec / sp_dec, rel_err_vs_reference=rel_err(dec_out, dec_ref)))
    return rows


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(env, rows):
    lines = [f"# {env['device']} | torch {env['torch']} | triton {env['triton']}"
             + (" | DRY RUN: timings meaningless" if env["dry_run"] else ""), ""]
    cpu = [r for r in rows if r["kind"] == "cpu"]
    if cpu:
        lines += ["| CPU causal B x Hq/Hkv x S x D | block | density | threads | block-gather ms | SDPA ms | "
                  "speedup | err vs spec |", "|---|---|---|---|---|---|---|---|"]
        for r in cpu:
            lines.append(f"| 1x{r['Hq']}/{r['Hkv']}x{r['S']}x{r['D']} | {r['block']} | {r['density']:.1%} | "
                         f"{r['threads']} | {r['sparse_ms']:.0f} | {r['sdpa_ms']:.0f} | {r['speedup']:.2f}x | "
                         f"{r['rel_err_vs_spec']:.1e} |")
    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        lines += ["", "| GPU causal B x Hq/Hkv x S x D | block | density | sparse fwd ms | dense fwd ms | fwd speedup | "
                  "sparse fwd+bwd ms | dense fwd+bwd ms | speedup | err vs ref |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in pre:
            lines.append(f"| {r['B']}x{r['Hq']}/{r['Hkv']}x{r['S']}x{r['D']} | {r['block']} | {r['density']:.1%} | "
                         f"{r['sparse_fwd_ms']:.3f} | {r['dense_fwd_ms']:.3f} | {r['fwd_speedup']:.2f}x | "
                         f"{r['sparse_fwd_bwd_ms']:.3f} | {r['dense_fwd_bwd_ms']:.3f} | {r['fwd_bwd_speedup']:.2f}x | "
                         f"{r['rel_err_vs_reference']:.1e} |")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        lines += ["", "| GPU decode B x Hq/Hkv x cache x D | density | sparse ms | dense ms | speedup | err vs ref |",
                  "|---|---|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['B']}x{r['Hq']}/{r['Hkv']}x{r['S']}x{r['D']} | {r['density']:.1%} | "
                         f"{r['sparse_ms']:.3f} | {r['dense_ms']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['rel_err_vs_reference']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, ROOT)
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = not args.cpu
    if gpu and not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --cpu for the CPU comparison, or --dry-run to check the code paths")
    rows = []
    if args.cpu or args.dry_run:
        rows += cpu_rows(args)
    if gpu:
        rows += gpu_rows(args)
    device = torch.cuda.get_device_name() if gpu and not args.dry_run else f"cpu ({platform.processor() or platform.machine()})"
    env = dict(device=device, torch=torch.__version__, triton=triton_version, dry_run=args.dry_run,
               target_density=args.density, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    print(format_table(env, rows))
    return rows


if __name__ == "__main__":
    main()
