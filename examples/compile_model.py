"""torch.compile a patched model: no graph break in our code, the same logits as eager.

    python examples/compile_model.py [--model smollm2-135m] [--backend inductor|aot_eager] [--tokens 64]

`hfa.patch(model)` then `torch.compile(model, fullgraph=True)`: fullgraph makes any graph break an error, so a run
that finishes is one graph. Prints the largest logit difference between the compiled and the eager patched model,
and the time of the first (compiling) and a second call. About a minute on 2 CPU cores with Inductor.
"""

import argparse
import time

import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="bundled name, local checkpoint or Hub id")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    hfa.patch(model)                                            # <- our attention, backend auto
    text = "The quick brown fox jumps over the lazy dog. " * 50
    ids = tok(text, return_tensors="pt").input_ids[:, :args.tokens]
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend=args.backend, fullgraph=True)   # <- one graph, or an error
        t0 = time.perf_counter()
        first = compiled(ids).logits
        t1 = time.perf_counter()
        second = compiled(ids).logits
        t2 = time.perf_counter()
    diff = (first - eager).abs().max().item()
    print(f"{args.model} patched, torch.compile(backend={args.backend!r}, fullgraph=True), {ids.shape[1]} tokens")
    print(f"max |logits compiled - eager| = {diff:.2e} (second call {(second - eager).abs().max().item():.2e})")
    print(f"first call (compiles) {t1 - t0:.1f} s, second call {t2 - t1:.3f} s")
    if diff > 1e-3:
        raise SystemExit(f"compiled logits differ from eager by {diff:.2e} (> 1e-3)")
    print("one graph, same logits: OK")


if __name__ == "__main__":
    main()
