"""Ring attention: per-rank peak memory, bytes sent and time of ONE attention call vs the number of ranks W.

    python kernels/bench_ring.py --seq 16384 --worlds 1,2,4            # CPU, gloo (the README's table)
    python kernels/bench_ring.py --dry-run                             # tiny, seconds (what the test runs)

Each W runs in W fresh processes (torch.multiprocessing, gloo; one torch thread per process, so per-thread BLAS
buffers are the same for every W and the memory comparison is like for like). Every
rank builds only its own share of q/k/v (the values depend on the token position alone, so all W see the same
sequence), then measures the call:

* peak memory: the growth of the process's peak resident set during the call (``/proc/self/clear_refs`` resets
  the peak first; Linux only; glibc's mmap threshold is pinned at 128 KiB so a freed buffer leaves the resident
  set and the peak is the live peak): everything the call allocates (fp32 accumulators, the arriving K/V block,
  tiles); "with inputs" adds the rank's q/k/v, what one rank must hold for the call. Compared with the W = 1
  figure (target: at most ``1/W + 10%`` of it);
* bytes sent by the rank (``count_comm``) vs the analytic figure: ``(W - 1) x`` this rank's K/V and key padding
  (ring: W - 1 passes of one block; all-gather: the same volume, one collective);
* time: wall clock of the call on the slowest rank (the ranks share the machine's cores: on a small CPU this is
  not a speed-up figure);
* max |out - out(W=1)| over the rank's rows (the same sequence on one rank is the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from hf_efficient_attn.kernels.ring import count_comm, ring_attention, run_distributed, segments

PIECE = 64  # tokens per seeded piece: a rank's share is built piece by piece, the same values for every W


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _local(seq, world, rank, heads, kv_heads, dim, dtype):
    """This rank's q, k, v [1, H, L, D] from per-piece seeds (never the whole sequence)."""
    qs, ks, vs = [], [], []
    for start, n in segments(seq, world, rank, "zigzag"):
        for p0 in range(start - start % PIECE, start + n, PIECE):  # aligned pieces, cut to the segment
            g = torch.Generator().manual_seed(p0)
            a, b = max(start, p0) - p0, min(start + n, p0 + PIECE) - p0
            qs.append(torch.randn(1, heads, PIECE, dim, generator=g)[:, :, a:b])
            ks.append(torch.randn(1, kv_heads, PIECE, dim, generator=g)[:, :, a:b])
            vs.append(torch.randn(1, kv_heads, PIECE, dim, generator=g)[:, :, a:b])
    return tuple(torch.cat(t, dim=2).to(dtype).contiguous() for t in (qs, ks, vs))


def _rank_run(rank, world, cfg, ref_path):
    from hf_efficient_attn.kernels.ring.layout import shard_tensor
    q, k, v = _local(cfg["seq"], world, rank, cfg["heads"], cfg["kv_heads"], cfg["dim"], cfg["dtype"])
    with torch.no_grad():  # warm-up: lazy BLAS/thread-pool/transport buffers are not the call's memory
        small = [t[:, :, : 4 * world].contiguous() for t in (q, k, v)]
        ring_attention(*small, causal=True, mode=cfg["mode"])
    torch.distributed.barrier()
    with torch.no_grad():
        _reset_peak()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        with count_comm() as cc:
            out, _ = ring_attention(q, k, v, causal=True, mode=cfg["mode"])
        dt = time.perf_counter() - t0
        peak = max(0, _status("VmHWM") - base)
    kv_bytes = (k.numel() * k.element_size() + v.numel() * v.element_size()) + q.shape[0] * q.shape[2]
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    res = dict(rank=rank, seconds=dt, peak_bytes=peak, inputs=inputs, sent=cc.sent_bytes,
               analytic=(world - 1) * kv_bytes)
    if world == 1:
        torch.save(out, ref_path)
    else:
        ref = torch.load(ref_path)
        res["max_abs_diff_vs_w1"] = (out - shard_tensor(ref, 2, world, rank, "zigzag")).abs().max().item()
    return res


def run(seq, worlds, heads, kv_heads, dim, modes, dtype=torch.float32, threads=1, repeats=1):
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # read by glibc in the spawned ranks
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "w1.pt")
        for world in sorted(set(worlds) | {1}):
            for mode in (modes if world > 1 else ["ring"]):
                cfg = dict(seq=seq, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype, mode=mode)
                runs = []
                for _ in range(repeats):  # each in fresh processes; per run the worst rank
                    ranks = run_distributed(_rank_run, world, args=(cfg, ref_path), threads=threads)
                    runs.append(dict(seconds=max(r["seconds"] for r in ranks),
                                     peak_bytes=max(r["peak_bytes"] for r in ranks),
                                     with_inputs=max(r["peak_bytes"] + r["inputs"] for r in ranks),
                                     sent=max(r["sent"] for r in ranks), analytic=max(r["analytic"] for r in ranks),
                                     diff=max((r.get("max_abs_diff_vs_w1", 0.0) for r in ranks))))
                med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                rows.append(dict(world=world, mode=mode, repeats=repeats, seconds=med["seconds"],
                                 peak_bytes=med["peak_bytes"], with_inputs=med["with_inputs"],
                                 with_inputs_range=(min(r["with_inputs"] for r in runs),
                                                    max(r["with_inputs"] for r in runs)),
                                 sent=med["sent"], analytic=med["analytic"],
                                 max_abs_diff_vs_w1=max(r["diff"] for r in runs)))
    base, base_in = rows[0]["peak_bytes"], rows[0]["with_inputs"]
    for r in rows:
        r["peak_vs_w1"] = r["peak_bytes"] / base if base else float("nan")
        r["with_inputs_vs_w1"] = r["with_inputs"] / base_in
        r["with_inputs_vs_w1_range"] = tuple(x / base_in for x in r["with_inputs_range"])
        r["target"] = 1 / r["world"] + 0.1
    return rows


def table(rows, env) -> str:
    lines = [f"# ring attention, one causal call: S={env['seq']}, {env['heads']} query / {env['kv_heads']} KV heads, "
             f"head dim {env['dim']}, {env['dtype']}, {env['threads']} thread(s) per rank on {env['cores']} cores, gloo" + (" (DRY RUN)" if env["dry_run"] else ""),
             "(medians of the repeats; per repeat the worst rank)",
             "| W | mode | call peak MiB / rank | vs W=1 | with inputs MiB | vs W=1 (range) | target 1/W+10% | "
             "sent MiB / rank | analytic MiB | max abs diff vs W=1 | s (slowest rank) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['mode']} | {r['peak_bytes'] / 2**20:.1f} | {r['peak_vs_w1']:.3f} | "
                     f"{r['with_inputs'] / 2**20:.1f} | {r['with_inputs_vs_w1']:.3f} "
                     f"({r['with_inputs_vs_w1_range'][0]:.3f}-{r['with_inputs_vs_w1_range'][1]:.3f}) | "
                     f"{r['target']:.3f} | {r['sent'] / 2**20:.2f} | {r['analytic'] / 2**20:.2f} | "
                     f"{r['max_abs_diff_vs_w1']:.1e} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--heads", type=int, default=9, help="default: SmolLM2-135M's 9 query heads")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--modes", default="ring,allgather")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (fresh processes each); medians reported")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, W = 1, 2: seconds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("bench_ring measures memory through /proc (Linux only)")
    seq, worlds = (512, [1, 2]) if args.dry_run else (args.seq, [int(w) for w in args.worlds.split(",")])
    repeats = 1 if args.dry_run else args.repeats
    cores = os.cpu_count() or 1
    rows = run(seq, worlds, args.heads, args.kv_heads, args.dim, args.modes.split(","), threads=args.threads,
               repeats=repeats)
    env = dict(seq=seq, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, dtype="fp32", cores=cores,
               threads=args.threads, repeats=repeats,
               torch=torch.__version__, dry_run=args.dry_run)
    print(table(rows, env))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return rows


if __name__ == "__main__":
    main()
