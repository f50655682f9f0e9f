"""SmolLM2-135M -> linear attention (LoLCATs): Hedgehog feature maps, with and without a 64-token softmax window,
healed in two stages (attention transfer, then LoRA on the logits).

    python conversions/linear_smollm2.py                                   # the README figures
    python conversions/linear_smollm2.py --transfer-tokens 8192 --heal-tokens 4096 --eval-tokens 2048  # minutes

Steps, on the bundled corpus (Python docs, split by document: train / held-out eval):
1. convert: every attention layer keeps its q/k/v/o weights and gets Hedgehog feature maps (identity start)
   and, with a window, a per-head softmax/linear mix (``hfa.convert(model, "linear", window=w)``);
2. stage "attention": only the feature maps and the mix train, each layer to reproduce the original layer's
   output on the original's own inputs (``--transfer-tokens``, lr 3e-2);
3. stage "logits": LoRA (r=8) on q/k/v/o, KL to the original's next-token distribution (``--heal-tokens``);
4. evaluate every step on the held-out split under one protocol (disjoint ``--context``-token windows),
   with KV-cache bytes from the real cache after ``--kv-tokens`` tokens.

``--save DIR`` also writes the final models (``hfa.load`` reads them back).
"""

import argparse
import copy
import time
from pathlib import Path

import hf_efficient_attn.conversions as hfc
from hf_efficient_attn.eval import evaluate_models, format_table, load_model, load_text, write_report


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="bundled name, local checkpoint or Hub id")
    ap.add_argument("--windows", default="64,0", help="comma-separated softmax windows (0: pure linear)")
    ap.add_argument("--feature-map", default="hedgehog", help="hedgehog, elu or relu")
    ap.add_argument("--transfer-tokens", type=int, default=65536, help="stage 1 tokens (attention transfer)")
    ap.add_argument("--transfer-lr", type=float, default=None, help="stage 1 peak lr (default 3e-2)")
    ap.add_argument("--heal-tokens", type=int, default=32768, help="stage 2 tokens (LoRA, KL); 0: skip")
    ap.add_argument("--heal-lr", type=float, default=None, help="stage 2 peak lr (default 1e-3)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    ap.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens to score")
    ap.add_argument("--context", type=int, default=512, help="evaluation window, tokens")
    ap.add_argument("--kv-tokens", type=int, default=4096, help="tokens before the cache is measured")
    ap.add_argument("--out", default="runs/linear_smollm2", help="folder for report.json / report.md")
    ap.add_argument("--save", default=None, help="also save the final model of each window under this folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    model, tok = load_model(args.model)
    train = load_text(None, split="train")
    entries, timings = [(args.model, model, tok)], {}
    train_opts = dict(tokenizer=tok, seq_len=args.seq_len, batch_size=args.batch_size, bf16=args.bf16,
                      progress=not args.quiet)
    for w in windows:
        label = f"linear {args.feature_map}" + (f" + window {w}" if w else "")
        new = hfc.convert(model, "linear", feature_map=args.feature_map, window=w)
        entries.append((f"{label}, no training", copy.deepcopy(new), tok))
        res = hfc.distill(new, model, train, stage="attention", max_tokens=args.transfer_tokens,
                          lr=args.transfer_lr, **train_opts)
        timings[f"{label}: attention transfer"] = {"tokens": res.tokens, "seconds": round(res.seconds, 1),
                                                   "first loss": round(res.losses[0], 4),
                                                   "last loss": round(res.losses[-1], 4)}
        print(f"{label}: attention transfer on {res.tokens} tokens in {res.seconds:.0f} s, "
              f"relative MSE {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
        entries.append((f"{label}, attention transfer {res.tokens // 1024}k tok", copy.deepcopy(new).eval(), tok))
        if args.heal_tokens:
            res = hfc.distill(new, model, train, stage="logits", trainable="lora", max_tokens=args.heal_tokens,
                              lr=args.heal_lr, **train_opts)
            timings[f"{label}: logits (lora)"] = {"tokens": res.tokens, "seconds": round(res.seconds, 1),
                                                  "first loss": round(res.losses[0], 4),
                                                  "last loss": round(res.losses[-1], 4)}
            print(f"{label}: LoRA heal on {res.tokens} tokens in {res.seconds:.0f} s, KL {res.losses[0]:.3f} -> "
                  f"{res.losses[-1]:.3f}")
            entries.append((f"{label}, + LoRA heal {res.tokens // 1024}k tok", new.eval(), tok))
        if args.save:
            hfc.save(entries[-1][1], Path(args.save) / f"window{w}", tokenizer=tok, overwrite=True)

    t0 = time.perf_counter()
    reports = evaluate_models(entries, None, context_length=args.context, max_tokens=args.eval_tokens,
                              kv_tokens=args.kv_tokens, speed_contexts=(), progress=not args.quiet)
    timings["evaluation s"] = round(time.perf_counter() - t0, 1)
    print()
    print(format_table(reports))
    files = write_report(reports, args.out, extra={"recipe": "linear_smollm2", "args": vars(args),
                                                   "timings": timings}, plots=False)
    print(f"wrote {files['json']}, {files['markdown']}")
    return reports


if __name__ == "__main__":
    main()
