"""Every training-free sparse pattern on one model and one input: the density each ran at, beside what it cost.

    python examples/sparse_patterns.py [--model smollm2-135m] [--tokens 2048] [--block 64] [--backend auto]
                                       [--json out.json]

The model reads the same ``--tokens`` tokens of the bundled text dense (our attention, no pattern: the reference),
then patched with each pattern (``hfa.patch(model, sparse=...)``). Per pattern: the mean fraction of causal blocks
computed (``hfa.sparse.density``), the max |logit difference| and the relative RMS error of the logits vs dense, how
often the top-1 next token agrees with dense, and the perplexity of the text. Accuracy beside density, never speed
alone. Pattern sizes scale with ``--tokens`` (windows of a quarter of the input, ...); ``full`` is the exact
control (every block through the sparse path). ``--model tiny`` is a random 2-layer Llama (no checkpoint).
"""

import argparse
import json
import math

import torch

import hf_efficient_attn as hfa


def patterns(tokens: int, block: int) -> list:
    """The patterns at sizes that skip something at this length (windows of a quarter of the input, ...)."""
    sp = hfa.sparse
    quarter = max(block, tokens // 4)
    return [
        sp.full(block=block),
        sp.streaming(sinks=4, window=quarter, block=block),
        sp.longformer(window=quarter, global_tokens=4, block=block),  # in a decoder: streaming with 4 global tokens
        sp.dilated(window=2 * quarter, dilation=2, block=block),
        sp.vertical_slash(vertical=max(1, tokens // 16), slash=max(1, tokens // 16), last_q=64, block=block),
        sp.top_p(0.9, block=block),
        sp.top_p(0.95, block=block),
        sp.lsh(buckets=8, rounds=2, block=block),
    ]


def load(name: str):
    if name == "tiny":  # a random Llama, for a quick look without a checkpoint
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        return LlamaForCausalLM(cfg).eval(), None
    from hf_efficient_attn.eval.models import load_model
    return load_model(name)


def input_ids(tok, tokens: int) -> torch.Tensor:
    if tok is None:
        return torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    docs, chars = [], 0
    for doc in hfa.load_text().documents:  # the bundled eval text, in order, until there is enough
        docs.append(doc)
        chars += len(doc)
        if chars > tokens * 8:
            break
    ids = tok("\n\n".join(docs)[: tokens * 8], return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"the bundled text has only {ids.shape[1]} tokens; ask for fewer with --tokens")
    return ids


def compare(logits: torch.Tensor, dense: torch.Tensor, ids: torch.Tensor) -> dict:
    """Accuracy of ``logits`` against ``dense`` on the same input: [1, S, V] each."""
    diff = (logits - dense).double()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
    return {
        "max_abs_logit_diff": diff.abs().max().item(),
        "rel_rms_error": (diff.pow(2).mean().sqrt() / dense.double().pow(2).mean().sqrt()).item(),
        "top1_agreement": (logits.argmax(-1) == dense.argmax(-1)).double().mean().item(),
        "ppl": math.exp(nll.item()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a bundled model name, a checkpoint path, or 'tiny'")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--block", type=int, default=64, help="layout block size (the Triton kernels take 16..128)")
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    model, tok = load(args.model)
    ids = input_ids(tok, args.tokens)
    rows = []
    with torch.no_grad():
        hfa.patch(model, backend=args.backend)  # dense: our attention, no pattern
        dense = model(input_ids=ids).logits
        rows.append({"pattern": "dense", "kind": "exact", "density": 1.0, **compare(dense, dense, ids)})
        for pattern in patterns(args.tokens, args.block):
            hfa.patch(model, backend=args.backend, sparse=pattern)
            logits = model(input_ids=ids).logits
            kind = ("approximate, " + ("dynamic" if pattern.dynamic else "static")) if hfa.sparse.is_sparse(model) \
                else "exact"
            rows.append({"pattern": pattern.name, "kind": kind, "density": hfa.sparse.density(model),
                         **compare(logits, dense, ids)})
        hfa.unpatch(model)

    print(f"{getattr(model, 'name_or_path', args.model) or args.model}, {args.tokens} tokens, blocks of {args.block}, "
          f"backend {args.backend}")
    print(f"{'pattern':34} {'kind':22} {'density':>8} {'max|dlogit|':>12} {'rel err':>9} {'top1':>7} {'ppl':>9}")
    for r in rows:
        print(f"{r['pattern']:34} {r['kind']:22} {r['density']:8.3f} {r['max_abs_logit_diff']:12.4g} "
              f"{r['rel_rms_error']:9.2e} {r['top1_agreement']:7.3f} {r['ppl']:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "block": args.block, "backend": args.backend,
                       "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
