"""Patch a model in one line, check it against stock, and undo it.

    python examples/patch_model.py [--model smollm2-135m] [--backend auto] [--new-tokens 16]
"""

import argparse

import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval.models import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    enc = tok("The three laws of thermodynamics state that", return_tensors="pt")
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        stock = model.generate(**enc, **kw)
        hfa.patch(model, backend=args.backend)          # <- the one line
        print("attention implementation:", model.config._attn_implementation)
        ours = model.generate(**enc, **kw)
        hfa.unpatch(model)                              # <- and back
    print("stock  :", tok.decode(stock[0], skip_special_tokens=True))
    print("patched:", tok.decode(ours[0], skip_special_tokens=True))
    same = torch.equal(stock, ours)
    print("identical greedy continuation:", same)
    return same


if __name__ == "__main__":
    main()
