"""An MHA model back to GQA: SmolLM2-135M expanded exactly to 9 KV heads (one per query head), reduced to 3.

    python conversions/gqa_mha_model.py                       # ~10 min on 2 shared CPU cores
    python conversions/gqa_mha_model.py --eval-tokens 512 --calibration-tokens 512   # a smoke run

SmolLM2 has 9 query heads sharing 3 KV heads. Copying each KV head 3 times gives an MHA model with
exactly the same function (``expand_kv_heads``). By default each copy is then disguised, still
exactly: its keys rotated inside every RoPE plane, its values by a random orthogonal matrix (q_proj
and o_proj compensate), and the 9 heads shuffled per layer. Reducing it back to 3 KV heads is then
a test with a known answer at real scale: a method that finds which heads belong together and how
they are rotated recovers the original model (its perplexity to float precision), and mean pooling
of contiguous heads does not. ``--no-scramble`` keeps the plain copies (every method recovers them).

Ends with the ``hfa eval`` table on the held-out split of the bundled corpus (ppl, KV bytes/token).
"""

import argparse

import torch

import hf_efficient_attn.conversions as hfc
from hf_efficient_attn.conversions.gqa import (key_rotation_space, permute_kv_heads, rotate_keys, rotate_values,
                                               transform_heads, value_rotation_space)
from hf_efficient_attn.eval import evaluate_models, format_table, load_model, load_text, write_report


def scramble(model, seed: int = 0):
    """The same function, heads disguised: per layer, random RoPE-plane rotations of each KV head's keys, random
    orthogonal maps of its values (both compensated exactly), and a random order of the KV heads."""
    gen = torch.Generator().manual_seed(seed)
    hkv = model.config.num_key_value_heads
    head_dim = model.get_decoder().layers[0].self_attn.head_dim

    def surgery(i, w):
        keys, values = key_rotation_space(model, i), value_rotation_space(head_dim)
        w = rotate_keys(w, torch.stack([keys.random(gen) for _ in range(hkv)]))
        w = rotate_values(w, torch.stack([values.random(gen) for _ in range(hkv)]))
        return permute_kv_heads(w, torch.randperm(hkv, generator=gen))

    return transform_heads(model, surgery, hkv, record={"conversion": "scramble_kv_heads", "seed": seed})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-kv-heads", type=int, default=3, help="KV heads after the reduction")
    ap.add_argument("--methods", default="mean,aligned,pca")
    ap.add_argument("--no-scramble", action="store_true", help="keep the plain copies")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default="runs/gqa_mha_model")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    mha = hfc.expand_kv_heads(model, hq)
    entries = [(f"{args.model} ({hkv} KV heads)", model, tok), (f"expanded to MHA ({hq} KV heads)", mha, tok)]
    if not args.no_scramble:
        mha = scramble(mha)
        entries.append((f"MHA, heads rotated and shuffled ({hq} KV heads)", mha, tok))
    calibration = load_text(None, split="calibration")
    for method in [m for m in args.methods.split(",") if m]:
        new = hfc.convert(mha, "gqa", num_kv_heads=args.num_kv_heads, method=method, calibration=calibration,
                          tokenizer=tok, calibration_tokens=args.calibration_tokens)
        entries.append((f"MHA -> {args.num_kv_heads} KV heads, {method}", new, tok))

    reports = evaluate_models(entries, None, context_length=args.context, max_tokens=args.eval_tokens,
                              speed_contexts=(), progress=not args.quiet)
    print()
    print(format_table(reports))
    files = write_report(reports, args.out, extra={"recipe": "gqa_mha_model", "args": vars(args)}, plots=False)
    print(f"wrote {files['json']}, {files['markdown']}")
    return reports


if __name__ == "__main__":
    main()
