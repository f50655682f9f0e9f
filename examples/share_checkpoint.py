"""A converted checkpoint ready to share: model card, record in config.json, verified load, pipeline().

    python examples/share_checkpoint.py [--out runs/smollm2-mqa-shared] [--eval-tokens 1024]

Converts SmolLM2-135M to one KV head (training-free, mean pooling), evaluates it beside the original, saves it with
the table in its model card (README.md), shows what the card and config.json carry, loads it back (every file
checked against its sha256; a Hub id works the same way once uploaded) and generates with
`pipeline("text-generation")`. About a minute on 2 CPU cores.
"""

import argparse
import json
import tempfile
from pathlib import Path

from transformers import pipeline

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import evaluate_models, load_model, to_markdown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    args = ap.parse_args(argv)

    model, tok = load_model("smollm2-135m")
    new = hfa.convert(model, "gqa", num_kv_heads=1, method="mean")
    reports = evaluate_models([("smollm2-135m", model, tok), ("smollm2-135m gqa kv=1 mean", new, tok)], None,
                              max_tokens=args.eval_tokens, speed_contexts=(), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = hfa.save(new, args.out or f"{tmp}/smollm2-mqa", tokenizer=tok,
                        eval_table=to_markdown(reports))                  # <- card with the eval table
        card = (Path(path) / "README.md").read_text()
        config = json.loads((Path(path) / "config.json").read_text())
        print(f"saved {path}: model card {len(card):,} characters; config.json carries "
              f"{len(config['hfa_conversions'])} record(s): {config['hfa_conversions'][0]['conversion']}")
        print("card, first lines after the metadata:")
        body = card.split("---", 2)[-1].strip().splitlines()
        print("\n".join("  " + line for line in body[:8]))
        back = hfa.load(path)                                             # <- or hfa.load("you/smollm2-mqa")
        gen = pipeline("text-generation", model=back, tokenizer=tok)
        text = gen("def fibonacci(n):", max_new_tokens=12, do_sample=False)[0]["generated_text"]
        print(f"pipeline('text-generation') on the loaded checkpoint: {text!r}")


if __name__ == "__main__":
    main()
