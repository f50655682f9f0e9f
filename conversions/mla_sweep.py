"""The MLA recipes' shared sweep (``mla_smollm2.py``, ``mla_gemma3.py``): held-out perplexity against KV-cache
bytes/token over latent ranks, training-free and healed. Not run by itself: each recipe gives its defaults.

Steps, on the bundled corpus (Python docs, split by document into calibration / train / held-out eval):
1. for each ``r:d_r`` in ``--ranks``: ``convert(model, "mla", kv_lora_rank=r, rope_dim=d_r, method=...)``
   with the calibration split (RoPE planes ranked and [K_nope; V] factorized on its activations);
2. ``--heal r:d_r,...``: distill those from the original (KL to its logits) on the train split,
   ``--heal-tokens`` tokens, the attention projections trainable (`MLA_TRAINABLE`);
3. perplexity on the held-out split under one protocol (disjoint ``--context``-token windows, the first
   ``--eval-tokens`` tokens) and KV bytes/token from the real cache (``hfa.kv_cache_bytes`` over 256 tokens).
Prints the table, writes ``--out``/results.json and, with matplotlib, ``--out``/ppl_vs_kv.png.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from hf_efficient_attn.conversions import convert, distill
from hf_efficient_attn.conversions.distill import logits_loss
from hf_efficient_attn.conversions.io import token_blocks
from hf_efficient_attn.conversions.mla import MLA_TRAINABLE
from hf_efficient_attn.eval import kv_cache_bytes, load_model, load_text, perplexity

PROBE_TOKENS = 256       # KV bytes/token are measured on a cache of this many tokens (inside Gemma's 512 window)


@torch.no_grad()
def probe_kl(student, teacher, ids: torch.Tensor) -> float:
    """Mean KL(teacher || student) per token on FIXED held-out blocks `ids` (n, L), one block at a time. The heal's
    per-step loss is measured on a new training batch each step, so it mixes the improvement with how hard
    each batch is; this is the same text before and after."""
    was = student.training
    student.eval()
    try:
        return sum(logits_loss(student, teacher, block[None])[0].item() for block in ids) / len(ids)
    finally:
        student.train(was)


def parse_args(argv, description, model, ranks, out, calibration_tokens=16384, eval_tokens=8192,
               rope_ranking="rotation", heal_lr=3e-4, heal_warmup=0.05):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=model, help="bundled name, local checkpoint or Hub id")
    ap.add_argument("--ranks", default=ranks, help="comma-separated kv_lora_rank:rope_dim")
    ap.add_argument("--method", default="attention", choices=["weights", "activations", "attention"])
    ap.add_argument("--dropped-rope", default="keep", choices=["keep", "expected"],
                    help="RoPE planes left out of the RoPE key: unrotated, or their rotation averaged over distances")
    ap.add_argument("--rope-ranking", default=rope_ranking, choices=["norms", "rotation"],
                    help="RoPE planes kept: by |q_f||k_f| (MHA2MLA), or that times how much each plane turns")
    ap.add_argument("--calibration-tokens", type=int, default=calibration_tokens)
    ap.add_argument("--eval-tokens", type=int, default=eval_tokens)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--heal", default="", help="comma-separated r:d_r points (from --ranks) to heal")
    ap.add_argument("--heal-tokens", type=int, default=0)
    ap.add_argument("--heal-seq-len", type=int, default=256)
    ap.add_argument("--heal-lr", type=float, default=heal_lr)
    ap.add_argument("--heal-warmup", type=float, default=heal_warmup,
                    help="fraction of the heal's steps with a rising lr")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=out)
    return ap.parse_args(argv)


def _points(spec):
    return [tuple(int(x) for x in p.split(":")) for p in spec.split(",") if p.strip()]


def run(args):
    """The sweep for parsed `args` (`parse_args`); returns the rows it printed."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    model.eval()
    calib, train, held_out = (load_text(None, split=s) for s in ("calibration", "train", "eval"))

    def measure(label, m, extra):
        t0 = time.time()
        res = perplexity(m, tok, held_out, context_length=args.context, max_tokens=args.eval_tokens, progress=False)
        kv = kv_cache_bytes(m, tokens=PROBE_TOKENS) / PROBE_TOKENS
        row = {"model": label, "ppl": res.ppl, "tokens": res.tokens, "kv_bytes_per_token": kv, **extra,
               "eval_seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    rows = []
    base = measure("original", model, {"kv_lora_rank": None, "rope_dim": None})
    heal = set(_points(args.heal))
    for r, dr in _points(args.ranks):
        t0 = time.time()
        new = convert(model, "mla", kv_lora_rank=r, rope_dim=dr, method=args.method, calibration=calib,
                      tokenizer=tok, calibration_tokens=args.calibration_tokens, dropped_rope=args.dropped_rope,
                      rope_ranking=args.rope_ranking)
        rec = new.hfa_conversions[-1]
        info = {"kv_lora_rank": r, "rope_dim": dr, "method": args.method, "dropped_rope": args.dropped_rope,
                "rope_ranking": args.rope_ranking,
                "healed_tokens": 0,
                "convert_seconds": round(time.time() - t0, 1), "kv_energy_kept": rec["kv_energy_kept"],
                "rope_key_energy_kept": rec["rope_key_energy_kept"]}
        measure(f"mla r={r} d_r={dr}", new, info)
        if (r, dr) in heal and args.heal_tokens:
            probe = token_blocks(tok, held_out, args.heal_seq_len, 4 * args.heal_seq_len)[:4]
            kl_before = probe_kl(new, model, probe)
            t0 = time.time()
            res = distill(new, model, train, tokenizer=tok, max_tokens=args.heal_tokens, seq_len=args.heal_seq_len,
                          batch_size=4, trainable=MLA_TRAINABLE, lr=args.heal_lr, warmup=args.heal_warmup,
                          progress=False)
            seconds = round(time.time() - t0, 1)
            new.eval()
            measure(f"mla r={r} d_r={dr} healed", new,
                    {**info, "healed_tokens": res.tokens, "heal_seconds": seconds, "step_losses": res.losses,
                     "first_loss": res.losses[0], "last_loss": sum(res.losses[-5:]) / len(res.losses[-5:]),
                     "probe_kl_before": kl_before, "probe_kl_after": probe_kl(new, model, probe),
                     "probe_tokens": int(probe.numel())})
        del new

    print(f"\n{'model':<32}{'ppl':>9}{'Δppl':>9}{'KV B/token':>12}{'KV %':>8}")
    for row in rows:
        print(f"{row['model']:<32}{row['ppl']:>9.3f}{100 * (row['ppl'] / base['ppl'] - 1):>8.1f}%"
              f"{row['kv_bytes_per_token']:>12.0f}{100 * row['kv_bytes_per_token'] / base['kv_bytes_per_token']:>7.1f}%")
    print(f"protocol: held-out python-docs eval split, first {rows[0]['tokens']} tokens, disjoint {args.context}-token "
          f"windows; KV bytes/token from the real cache over {PROBE_TOKENS} tokens; calibration "
          f"{args.calibration_tokens} tokens; method {args.method}, RoPE planes ranked by {args.rope_ranking}, dropped ones "
          f"{args.dropped_rope}")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return rows
    fig, ax = plt.subplots(figsize=(6, 4))
    for healed, marker in ((False, "o"), (True, "s")):
        pts = [(x["kv_bytes_per_token"], x["ppl"]) for x in rows[1:] if bool(x.get("healed_tokens")) == healed]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker=marker, label="healed" if healed else "training-free")
    ax.axhline(base["ppl"], color="gray", ls="--", label="original")
    ax.axvline(base["kv_bytes_per_token"] / 2, color="gray", ls=":", label="50% KV")
    ax.set_xlabel("KV cache bytes / token (fp32)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{args.model} -> MLA ({args.method})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_kv.png", dpi=120)
    return rows
