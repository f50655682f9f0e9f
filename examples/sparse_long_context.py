"""Sparse prefill at long context, measured as the README's table is: perplexity at each context length, passkey
retrieval at several prompt lengths, block density and per-layer error against dense, each pattern beside dense.

    python examples/sparse_long_context.py [--model smollm2-135m] [--contexts 4096,8192] [--max-tokens 8192]
        [--passkey 1024,2048,4096,8192] [--sparse top_p:gamma=0.95 --sparse ...] [--json out.json] [--markdown out.md]

Every row reads the same tokens of the bundled held-out text (disjoint windows of each context length, the first
``--max-tokens`` tokens) and the same passkey prompts (5 depths, seeded keys: ``hf_efficient_attn.eval.passkey``).
Sparse rows run ``hfa.patch(model, sparse=pattern)`` (backend auto: Triton on CUDA, the block-gather path on CPU):
their density is the mean fraction of causal blocks computed over the windows, "layer err" the mean over layers of
``||sparse - dense|| / ||dense||`` on the first window, each layer fed the exact model's input
(``hfa.sparse.layer_errors``). The dense row is our exact attention (equal to eager). Passkey prompts at or beyond
the model's window are flagged. This is ``hfa eval MODEL --sparse ... --passkey ...`` run once per context length.
"""

import argparse
import json
from pathlib import Path

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import evaluate_models, load_model, load_text

DEFAULT_PATTERNS = ("top_p:gamma=0.95", "vertical_slash:vertical=256,slash=256", "streaming:sinks=4,window=1024")


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def run(model_name, contexts, max_tokens, passkey, specs, progress=False) -> list[dict]:
    """One dict per row (dense first): ppl and density per context, layer error, passkey per length."""
    model, tok = load_model(model_name)
    hfa.patch(model)  # the dense row on our exact attention; sparse rows add their pattern to the same patch
    patterns = [hfa.sparse.from_spec(s) for s in specs]
    text = load_text(None)
    rows = None
    for i, ctx in enumerate(contexts):
        reports = evaluate_models([(model_name, model, tok)], text, context_length=ctx, max_tokens=max_tokens,
                                  speed_contexts=(), sparse=patterns, passkey_lengths=passkey if i == 0 else (),
                                  progress=progress)
        if rows is None:
            rows = [dict(model=r.model, pattern=r.pattern, approximate=r.approximate, ppl={}, density={},
                         layer_error={}, passkey=r.passkey, passkey_detail=r.passkey_detail) for r in reports]
        for row, r in zip(rows, reports):
            row["ppl"][ctx], row["density"][ctx], row["layer_error"][ctx] = r.ppl, r.density, r.layer_error
            row["tokens"] = r.tokens
    return rows


def markdown(rows, contexts, passkey) -> str:
    head = (["pattern"] + [f"density @{c}" for c in contexts] + [f"ppl @{c}" for c in contexts]
            + [f"layer err @{contexts[-1]}"] + [f"passkey @{n}" for n in passkey])
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    base = rows[0]["ppl"]
    for r in rows:
        name = r["pattern"] or "dense (exact)"
        name += " (approx.)" if r["approximate"] else ""
        dens = ["1.000" if r["density"][c] is None else f"{r['density'][c]:.3f}" for c in contexts]
        ppl = [f"{r['ppl'][c]:.3f}" + ("" if r is rows[0] else f" ({r['ppl'][c] / base[c] - 1:+.1%})")
               for c in contexts]
        err = r["layer_error"][contexts[-1]]
        keys = [f"{r['passkey'][n]:.0%}" for n in passkey]
        out.append("| " + " | ".join([name, *dens, *ppl, "—" if err is None else f"{err:.3f}", *keys]) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=_ints, default=(4096, 8192), help="perplexity context lengths")
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored at each context")
    ap.add_argument("--passkey", type=_ints, default=(1024, 2048, 4096, 8192), help="passkey prompt lengths")
    ap.add_argument("--sparse", action="append", default=None, help=f"pattern specs (default: {DEFAULT_PATTERNS})")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.model, args.contexts, args.max_tokens, args.passkey, args.sparse or DEFAULT_PATTERNS,
               args.progress)
    table = markdown(rows, args.contexts, args.passkey)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(contexts=args.contexts, max_tokens=args.max_tokens, rows=rows),
                                              indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
