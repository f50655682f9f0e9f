"""SmolLM2-135M -> the Mamba-2 form (Mamba-in-the-Llama): q/k/v reused as C/B/x, a data-dependent decay per KV
head, a per-head output norm; healed in two stages (layer-by-layer attention transfer, then the logits).

    python conversions/mamba2_smollm2.py                                   # the full budget
    python conversions/mamba2_smollm2.py --transfer-tokens 8192 --heal-tokens 4096 --eval-tokens 2048  # minutes

Steps, on the bundled corpus (Python docs, split by document: train / held-out eval):
1. convert: every attention layer keeps its q/k/v/o weights (and norms) and gets the decay (dt_proj = 0,
   a_t = exp(-1/256) for every token at the start) and the output norm (``hfa.convert(model, "mamba2")``;
   ``--rope`` keeps RoPE on q/k, ``--no-output-norm`` drops the norm, ``--keep-softmax 0,15`` keeps layers);
2. stage "attention": every converted layer trains (q/k/v/o, norms, decay), each to reproduce the original
   layer's output on the original's own inputs (``--transfer-tokens``);
3. stage "logits": KL to the original's next-token distribution (``--heal-tokens``), training the converted
   layers again (``--heal-trainable mamba2``, Mamba-in-the-Llama's end-to-end step) or LoRA (``lora``);
4. evaluate every step on the held-out split under one protocol (disjoint ``--context``-token windows),
   with KV-cache bytes from the real cache after ``--kv-tokens`` tokens.

The default learning rate (``DEFAULT_LR["mamba2"]``) is not yet measured on this model: pass ``--transfer-lr`` /
``--heal-lr`` to sweep it. ``--save DIR`` also writes the final model (``hfa.load`` reads it back).
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
    ap.add_argument("--rope", action="store_true", help="keep RoPE on q/k (default: dropped)")
    ap.add_argument("--no-output-norm", action="store_true", help="no per-head output RMS norm")
    ap.add_argument("--keep-softmax", default="", help="comma-separated layer indices to keep as softmax")
    ap.add_argument("--transfer-tokens", type=int, default=65536, help="stage 1 tokens (attention transfer)")
    ap.add_argument("--transfer-lr", type=float, default=None, help="stage 1 peak lr (default DEFAULT_LR['mamba2'])")
    ap.add_argument("--heal-tokens", type=int, default=32768, help="stage 2 tokens (KL); 0: skip")
    ap.add_argument("--heal-lr", type=float, default=None, help="stage 2 peak lr (default by --heal-trainable)")
    ap.add_argument("--heal-trainable", default="mamba2", choices=["mamba2", "lora"], help="what stage 2 trains")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    ap.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens to score")
    ap.add_argument("--context", type=int, default=512, help="evaluation window, tokens")
    ap.add_argument("--kv-tokens", type=int, default=4096, help="tokens before the cache is measured")
    ap.add_argument("--out", default="runs/mamba2_smollm2", help="folder for report.json / report.md")
    ap.add_argument("--save", default=None, help="also save the final model under this folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def _timing(res) -> dict:
    return {"tokens": res.tokens, "seconds": round(res.seconds, 1), "first loss": round(res.losses[0], 4),
            "last loss": round(res.losses[-1], 4)}


def main(argv=None):
    args = parse_args(argv)
    keep = [int(i) for i in args.keep_softmax.split(",") if i.strip()] or None
    model, tok = load_model(args.model)
    train = load_text(None, split="train")
    entries, timings = [(args.model, model, tok)], {}
    train_opts = dict(tokenizer=tok, seq_len=args.seq_len, batch_size=args.batch_size, bf16=args.bf16,
                      progress=not args.quiet)
    label = "mamba2" + (" + rope" if args.rope else "") + (", no output norm" if args.no_output_norm else "") + \
        (f", softmax layers {keep}" if keep else "")
    new = hfc.convert(model, "mamba2", layers=keep, rope=args.rope, output_norm=not args.no_output_norm)
    entries.append((f"{label}, no training", copy.deepcopy(new), tok))
    res = hfc.distill(new, model, train, stage="attention", max_tokens=args.transfer_tokens, lr=args.transfer_lr,
                      **train_opts)
    timings[f"{label}: attention transfer"] = _timing(res)
    print(f"{label}: attention transfer on {res.tokens} tokens in {res.seconds:.0f} s, "
          f"relative MSE {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
    entries.append((f"{label}, attention transfer {res.tokens // 1024}k tok", copy.deepcopy(new).eval(), tok))
    if args.heal_tokens:
        res = hfc.distill(new, model, train, stage="logits", trainable=args.heal_trainable,
                          max_tokens=args.heal_tokens, lr=args.heal_lr, **train_opts)
        timings[f"{label}: logits ({args.heal_trainable})"] = _timing(res)
        print(f"{label}: logits heal ({args.heal_trainable}) on {res.tokens} tokens in {res.seconds:.0f} s, "
              f"KL {res.losses[0]:.3f} -> {res.losses[-1]:.3f}")
        entries.append((f"{label}, + logits heal {res.tokens // 1024}k tok", new.eval(), tok))
    if args.save:
        hfc.save(entries[-1][1], Path(args.save) / "mamba2", tokenizer=tok, overwrite=True)

    t0 = time.perf_counter()
    reports = evaluate_models(entries, None, context_length=args.context, max_tokens=args.eval_tokens,
                              kv_tokens=args.kv_tokens, speed_contexts=(), progress=not args.quiet)
    timings["evaluation s"] = round(time.perf_counter() - t0, 1)
    print()
    print(format_table(reports))
    files = write_report(reports, args.out, extra={"recipe": "mamba2_smollm2", "args": vars(args),
                                                   "timings": timings}, plots=False)
    print(f"wrote {files['json']}, {files['markdown']}")
    return reports


if __name__ == "__main__":
    main()
