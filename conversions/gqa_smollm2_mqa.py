"""SmolLM2-135M: 3 -> 1 KV heads (MQA), mean vs aligned vs pca, training-free and healed by distillation.

    python conversions/gqa_smollm2_mqa.py                  # the README figures (hours on 2 shared CPU cores)
    python conversions/gqa_smollm2_mqa.py --heal-tokens 4096 --eval-tokens 1024 --calibration-tokens 1024  # minutes

Steps, on the bundled corpus (Python docs, split by document: calibration / train / held-out eval):
1. convert with ``method="mean"`` (Ainslie et al. 2023), ``"aligned"`` (RoPE-commuting rotations from
   the calibration split, then the mean) and ``"pca"`` (merge through the principal directions of the
   calibration activations), all training-free;
2. heal each by distillation from the original (KL to its logits) on the train split,
   ``--heal-tokens`` tokens, only the k/v projections trainable by default;
3. evaluate all on the held-out split under one protocol (disjoint ``--context``-token windows) and
   print the ``hfa eval`` table: perplexity, Δppl, KV-cache bytes/token from the real cache.

``--save DIR`` also writes each converted model as a native checkpoint (``hfa eval DIR/...`` reads it).

Measured (2 CPU cores shared with other jobs, torch 2.13 CPU, transformers 5.24; 8,176 held-out tokens,
context 512, disjoint windows, fp32), with
``--calibration-tokens 8192 --heal-tokens 40960 --seq-len 256 --batch-size 4 --bf16 --trainable kv``
(55 min wall in all; healing ran at 31-71 tokens/s depending on the other jobs):

    model                                        ppl   KV bytes/token @512
    smollm2-135m (3 KV heads)                  12.72   46,080
    gqa 3->1 mean, training-free            33991.58   15,360
    gqa 3->1 mean, healed 40k tok (kv)       5459.11   15,360
    gqa 3->1 aligned, training-free           739.36   15,360
    gqa 3->1 aligned, healed 40k tok (kv)      56.01   15,360
    gqa 3->1 pca, training-free               140.53   15,360
    gqa 3->1 pca, healed 40k tok (kv)          27.63   15,360

Energy of the calibration keys / values lost by the merge (mean over layers): mean 68% / 67%,
aligned 37% / 28%, pca 13% / 17%. Distillation KL (nats/token) over the 40 steps: mean 7.94 -> 5.55,
aligned 4.15 -> 1.20, pca 2.43 -> 0.77.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import hf_efficient_attn.conversions as hfc
from hf_efficient_attn.eval import evaluate_models, format_table, load_model, load_text, write_report


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="bundled name, local checkpoint or Hub id")
    ap.add_argument("--num-kv-heads", type=int, default=1)
    ap.add_argument("--methods", default="mean,aligned,pca", help="comma-separated: mean, aligned, pca")
    ap.add_argument("--calibration-tokens", type=int, default=16384, help="calibration tokens for 'aligned'")
    ap.add_argument("--heal-tokens", type=int, default=100_000, help="distillation tokens per method (0: no healing)")
    ap.add_argument("--trainable", default="kv", help="kv, attention, all or lora")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by --trainable)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per step and process")
    ap.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="checkpoint healing here (one subfolder per method); rerunning resumes")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens to score")
    ap.add_argument("--context", type=int, default=512, help="evaluation window, tokens")
    ap.add_argument("--out", default="runs/gqa_smollm2_mqa", help="folder for report.json / report.md")
    ap.add_argument("--save", default=None, help="also save every converted model under this folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    model, tok = load_model(args.model)
    calibration = load_text(None, split="calibration")
    train = load_text(None, split="train")
    hkv = model.config.num_key_value_heads
    entries, timings = [(f"{args.model} ({hkv} KV heads)", model, tok)], {}

    for method in methods:
        t0 = time.perf_counter()
        new = hfc.convert(model, "gqa", num_kv_heads=args.num_kv_heads, method=method, calibration=calibration,
                          tokenizer=tok, calibration_tokens=args.calibration_tokens, progress=not args.quiet)
        timings[f"convert {method} s"] = round(time.perf_counter() - t0, 1)
        rec = new.hfa_conversions[-1]
        if "energy_lost" in rec:
            print(f"{method}: energy lost by merging, on calibration data (mean over layers): "
                  f"{json.dumps(rec['energy_lost'])}")
        label = f"gqa {hkv}->{args.num_kv_heads} {method}"
        entries.append((f"{label}, training-free", new, tok))
        if args.heal_tokens:
            healed = copy.deepcopy(new)
            res = hfc.distill(healed, model, train, tokenizer=tok, max_tokens=args.heal_tokens,
                              trainable=args.trainable, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size,
                              bf16=args.bf16, progress=not args.quiet,
                              checkpoint_dir=args.checkpoint_dir and Path(args.checkpoint_dir) / method,
                              checkpoint_every=args.checkpoint_dir and args.checkpoint_every)
            trained = (res.steps - res.resumed_from) * res.tokens // res.steps     # this call's share, if resumed
            timings[f"heal {method}"] = {"tokens": res.tokens, "seconds": round(res.seconds, 1),
                                         "tokens/s": round(trained / max(res.seconds, 1e-9), 1),
                                         "resumed_from_step": res.resumed_from,
                                         "first loss": round(res.losses[0], 4), "last loss": round(res.losses[-1], 4)}
            print(f"{method}: healed on {res.tokens} tokens ({trained} in this run, {res.seconds:.0f} s, "
                  f"{trained / max(res.seconds, 1e-9):.0f} tokens/s), KL {res.losses[0]:.3f} -> {res.losses[-1]:.3f}")
            entries.append((f"{label}, healed {res.tokens // 1000}k tok ({args.trainable})", healed.eval(), tok))
        if args.save:
            for name, m, _ in entries[-(2 if args.heal_tokens else 1):]:
                slug = name.replace(" ", "_").replace(",", "").replace(">", "").replace("(", "").replace(")", "")
                hfc.save(m, Path(args.save) / slug, tokenizer=tok, overwrite=True)

    reports = evaluate_models(entries, None, context_length=args.context, max_tokens=args.eval_tokens,
                              speed_contexts=(), progress=not args.quiet)
    print()
    print(format_table(reports))
    files = write_report(reports, args.out, extra={"recipe": "gqa_smollm2_mqa", "args": vars(args),
                                                   "timings": timings}, plots=False)
    print(f"wrote {files['json']}, {files['markdown']}")
    return reports


if __name__ == "__main__":
    main()
