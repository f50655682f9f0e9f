"""Downstream tasks through lm-eval-harness on models in memory: the original and a converted copy, offline.

    python examples/downstream_tasks.py [--tasks hfa_lastword,hfa_passkey] [--limit 200] [--method gqa]

Runs lm-eval's HFLM on SmolLM2-135M and on its training-free MLA conversion (50 % of the KV cache) — the bundled
tasks need no network (`hfa_lastword`: the last word of held-out prose paragraphs; `hfa_passkey`: a key hidden in
1,024 tokens) — and prints one table with perplexity beside lm-eval's numbers. Needs
`pip install "hf_efficient_attn[tasks]"`. About 3 minutes on 2 CPU cores with the defaults.
"""

import argparse

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import evaluate_models, format_table, load_model, load_text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="hfa_lastword,hfa_passkey", help="lm-eval task names, comma-separated")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    args = ap.parse_args(argv)

    model, tok = load_model("smollm2-135m")
    mla = hfa.convert(model, "mla", kv_lora_rank=160, rope_dim=32, calibration=load_text(None, split="calibration"),
                      tokenizer=tok, calibration_tokens=args.calibration_tokens)
    reports = evaluate_models([("smollm2-135m", model, tok), ("smollm2-135m mla r=160 d_r=32", mla, tok)], None,
                              max_tokens=args.eval_tokens, speed_contexts=(), tasks=args.tasks.split(","),
                              task_limit=args.limit, progress=False)       # <- lm-eval beside perplexity
    print(format_table(reports))


if __name__ == "__main__":
    main()
