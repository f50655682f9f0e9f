"""Convert SmolLM2-135M to one KV head (MQA), heal it briefly, check it, save it, reload it with stock transformers.

    python examples/convert_gqa.py [--method pca] [--heal-tokens 8192] [--eval-tokens 4096] [--out runs/smollm2-mqa]

About 10 minutes on 2 CPU cores with the defaults (most of it the 8k-token heal); the ppl after such a short
heal is still far above the original (see conversions/gqa_smollm2_mqa.py for longer heals).
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM

import hf_efficient_attn.conversions as hfc
from hf_efficient_attn.eval import kv_cache_bytes, load_model, load_text, perplexity


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="bundled name, local checkpoint or Hub id")
    ap.add_argument("--method", default="pca", choices=["mean", "aligned", "pca"])
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--heal-tokens", type=int, default=8192, help="distillation tokens (0: training-free)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    new = hfc.convert(model, "gqa", num_kv_heads=1, method=args.method,            # <- the conversion
                      calibration=load_text(None, split="calibration"), tokenizer=tok,
                      calibration_tokens=args.calibration_tokens)
    if args.heal_tokens:
        hfc.distill(new, model, load_text(None, split="train"), tokenizer=tok,   # <- the healing
                    max_tokens=args.heal_tokens, seq_len=256, batch_size=4)

    ppl = lambda m: perplexity(m, tok, None, max_tokens=args.eval_tokens, progress=False)
    before, after = ppl(model), ppl(new.eval())
    kv = lambda m: kv_cache_bytes(m, tokens=512) / 512
    print(f"held-out ppl: {before.ppl:.3f} -> {after.ppl:.3f} ({args.method}, healed on {args.heal_tokens} tokens); "
          f"{after.tokens} tokens, context 512")
    print(f"KV cache: {kv(model):,.0f} -> {kv(new):,.0f} bytes/token")

    with tempfile.TemporaryDirectory() as tmp:
        path = hfc.save(new, args.out or f"{tmp}/smollm2-mqa", tokenizer=tok)   # <- a native checkpoint
        stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
        with torch.no_grad():
            same = torch.equal(stock(ids).logits, hfc.load(path)(ids).logits)
        print(f"saved to {path}; stock AutoModelForCausalLM loads it ({type(stock).__name__}, "
              f"{stock.config.num_key_value_heads} KV head); reload bit-identical: {same}")
    return {"ppl_before": before.ppl, "ppl_after": after.ppl, "kv_before": kv(model), "kv_after": kv(new), "same": same}


if __name__ == "__main__":
    main()
