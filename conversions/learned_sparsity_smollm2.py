"""SmolLM2-135M -> learned sparsity: adaptive span, duo (retrieval/streaming heads) and Longformer, each converted,
trained, frozen and measured beside the dense model, on one protocol (the README's learned-sparsity table).

    python conversions/learned_sparsity_smollm2.py [--model smollm2-135m] [--heal-tokens 32768] [--seq-len 2048]
        [--context 2048] [--max-tokens 8192] [--passkey 1024,2048,4096,8192] [--kv-tokens 8192]
        [--methods adaptive_span,duo,longformer] [--json out.json] [--markdown out.md] [--save DIR]

What runs (each on its own copy of the model; the original is the teacher and the first row):
* ``adaptive_span``: ``hfa.convert(model, "adaptive_span", max_span=--max-span, ramp=32, sinks=4)`` (exact at
  init), the spans trained by ``hfa.distill(stage="sparsity", stage_options={"penalty": --span-penalty})`` on the
  bundled train split in --seq-len blocks (only the spans train), then ``hfa.freeze``: one window per KV head;
* ``duo``: ``hfa.convert(model, "duo", sinks=4, window=256)``, the gates trained the same way on --duo-tokens of
  synthetic passkey prompts of --duo-seq-len tokens (``eval.passkey.passkey_training_ids``, seed 1: never the evaluation's keys), then ``hfa.freeze(new,
  full_heads=0.25)``: a quarter of the KV heads keep the full cache;
* ``longformer``: ``hfa.convert(model, "longformer", window=256, global_tokens=4)``, first training-free, then
  healed (``hfa.distill``, stage "logits", its attention projections) on the train split;
* the training-free longformer row is the same reach as ``hfa.sparse.longformer(256, 4)`` on the prefill and
  ``hfa.kv.streaming(4, 256, positions="original")`` in the cache; ``hfa demo`` has the other training-free rows.
Every row: perplexity on the bundled held-out split (disjoint --context windows, the first --max-tokens tokens),
passkey retrieval at each --passkey length (5 depths, seed 0), and the KV-cache bytes per token after --kv-tokens
tokens (``hfa.eval.cost.kv_cache_bytes_at_length``: the real cache object, on a meta copy).
"""

import argparse
import json
import time
from pathlib import Path

import hf_efficient_attn as hfa
from hf_efficient_attn.conversions.span import reach_summary
from hf_efficient_attn.eval import evaluate_models, load_model, load_text
from hf_efficient_attn.eval.passkey import passkey_training_ids


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def build(method, model, tok, args, train_docs, say=print):
    """[(label, model, info)] for one method: its rows, each with what it cost."""
    trace = []                                    # per step: KL and mean reach (span / max_span, or gate)
    heal = dict(tokenizer=tok, max_tokens=args.heal_tokens, seq_len=args.seq_len, batch_size=1, progress=False,
                on_step=lambda step, m: trace.append({k: round(v, 5) for k, v in m.items()}))
    rows = []
    t0 = time.perf_counter()
    if method == "adaptive_span":
        new = hfa.convert(model, "adaptive_span", max_span=args.max_span, ramp=32, sinks=4)
        res = hfa.distill(new, model, train_docs, stage="sparsity", stage_options={"penalty": args.span_penalty},
                          **heal)
        spans = [z for v in reach_summary(new)["layers"].values() for z in v["span"]]
        new = hfa.freeze(new).eval()
        info = dict(heal_tokens=res.tokens, seconds=time.perf_counter() - t0, mean_span=sum(spans) / len(spans),
                    windows=reach_summary(new)["layers"], trace=list(trace))
        rows.append((f"adaptive span (max {args.max_span}, penalty {args.span_penalty}) frozen", new, info))
    elif method == "duo":
        new = hfa.convert(model, "duo", sinks=4, window=256)
        n = max(1, args.duo_tokens // args.duo_seq_len)
        data = passkey_training_ids(tok, n, args.duo_seq_len)
        res = hfa.distill(new, model, data, stage="sparsity", stage_options={"penalty": args.duo_penalty},
                          **{**heal, "tokenizer": None, "max_tokens": args.duo_tokens, "seq_len": args.duo_seq_len})
        gates = reach_summary(new)["layers"]
        new = hfa.freeze(new, full_heads=args.full_heads).eval()
        info = dict(heal_tokens=res.tokens, seconds=time.perf_counter() - t0, gates=gates,
                    windows=reach_summary(new)["layers"], trace=list(trace))
        rows.append((f"duo s4 w256, {args.full_heads:.0%} full heads", new, info))
    elif method == "longformer":
        free = hfa.convert(model, "longformer", window=256, global_tokens=4).eval()
        rows.append(("longformer w256 g4 (training-free)", free, dict(heal_tokens=0, seconds=0.0)))
        new = hfa.convert(model, "longformer", window=256, global_tokens=4)
        res = hfa.distill(new, model, train_docs, **heal)
        info = dict(heal_tokens=res.tokens, seconds=time.perf_counter() - t0, first_loss=res.losses[0],
                    last_loss=res.losses[-1], trace=list(trace))
        rows.append(("longformer w256 g4 + heal", new.eval(), info))
    else:
        raise SystemExit(f"unknown method {method!r}; choose from adaptive_span, duo, longformer")
    for label, _, info in rows:
        last = info.get("trace", [{}])[-1] if info.get("trace") else {}
        say(f"  {label}: {info['heal_tokens']:,} heal tokens, {info['seconds']:.0f} s; last step {last}")
    trace.clear()
    return rows


def markdown(reports, infos, args) -> str:
    base = reports[0]
    head = ["model", f"KV B/token @{args.kv_tokens}", "KV vs dense", f"ppl @{args.context}", "Δppl"]
    head += [f"passkey @{n}" for n in args.passkey] + ["heal tokens"]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r, info in zip(reports, infos):
        kv = r.kv_long_bytes_per_token
        row = [r.model, f"{kv:,.0f}", f"{kv / base.kv_long_bytes_per_token:.1%}", f"{r.ppl:.3f}",
               "" if r is base else f"{r.ppl / base.ppl - 1:+.1%}"]
        row += [f"{r.passkey.get(n, float('nan')):.0%}" for n in args.passkey]
        row += [f"{info.get('heal_tokens', 0):,}"]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="adaptive_span,duo,longformer")
    p.add_argument("--heal-tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-span", type=int, default=2048, help="adaptive span: the longest span (exact up to it)")
    p.add_argument("--span-penalty", type=float, default=0.05, help="adaptive span: weight of the mean span")
    p.add_argument("--duo-penalty", type=float, default=0.05, help="duo: weight of the mean gate")
    p.add_argument("--duo-tokens", type=int, default=16384, help="duo: tokens of synthetic passkey prompts")
    p.add_argument("--duo-seq-len", type=int, default=1024, help="duo: length of each passkey prompt")
    p.add_argument("--full-heads", type=float, default=0.25, help="duo: fraction of KV heads kept full")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--passkey", type=_ints, default=(1024, 2048, 4096, 8192))
    p.add_argument("--kv-tokens", type=int, default=8192)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--save", type=Path, help="also save every trained model under this folder (hfa.load reads them)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    train = list(load_text(None, split="train").documents)
    entries, infos = [(args.model, model, tok)], [dict(heal_tokens=0)]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        print(f"{method}: converting and training ...", flush=True)
        for label, new, info in build(method, model, tok, args, train):
            entries.append((label, new, tok))
            infos.append(info)
    if args.save:
        for i, (label, new, _) in enumerate(entries[1:], 1):
            if infos[i].get("heal_tokens"):
                hfa.save(new, args.save / label.split(" ")[0].replace(" ", "_"), tokenizer=tok, overwrite=True)
    print("evaluating every row on the same protocol ...", flush=True)
    reports = evaluate_models(entries, None, split="eval", context_length=args.context, max_tokens=args.max_tokens,
                              speed_contexts=(), passkey_lengths=args.passkey, kv_long_tokens=args.kv_tokens,
                              stream=False, progress=False)
    table = markdown(reports, infos, args)
    print(table)
    print(f"protocol: held-out split, disjoint {args.context}-token windows, {reports[0].tokens:,} tokens; passkey "
          f"5 depths, seed 0; KV bytes after {args.kv_tokens:,} tokens (fp32). Wall time "
          f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [{**r.to_dict(), **i} for r, i in zip(reports, infos)]},
                                        indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return reports


if __name__ == "__main__":
    main()
