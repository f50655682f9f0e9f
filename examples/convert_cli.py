"""Convert a checkpoint with the `hfa convert` command, then check what it wrote.

    python examples/convert_cli.py                          # a tiny random Llama (4 -> 1 KV heads): seconds
    python examples/convert_cli.py --model smollm2-135m     # SmolLM2-135M, 3 -> 1 KV heads: a few minutes

Runs, in a fresh process as from a shell,

    hfa convert MODEL --method gqa --set num_kv_heads=1 --calibration-tokens N --heal-tokens N --eval --out DIR

(calibration and healing on the bundled corpus's calibration and train splits, the report on its held-out
split), prints its output, then shows: (1) ``hfa.load(DIR)`` gives the same logits as ``hfa.convert(...)``
called directly with the same options; (2) the report written beside the checkpoint, before and after.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import load_model, load_text

TINY_BUDGET = {"calibration": 2048, "heal": 2048, "seq_len": 128, "eval": 2048, "context": 128}
REAL_BUDGET = {"calibration": 4096, "heal": 8192, "seq_len": 256, "eval": 4096, "context": 512}


def save_tiny_llama(path: Path) -> str:
    """A random 2-layer Llama with 4 KV heads and a byte-level tokenizer, saved as a checkpoint folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return str(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (a random Llama), or a bundled name / local path / Hub id")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_arg = save_tiny_llama(work / "tiny-llama") if args.model == "tiny" else args.model
        b = TINY_BUDGET if args.model == "tiny" else REAL_BUDGET
        out = work / "checkpoint"
        command = ["convert", model_arg, "--method", "gqa", "--set", "num_kv_heads=1",
                   "--calibration-tokens", str(b["calibration"]),
                   "--heal-tokens", str(b["heal"]), "--seq-len", str(b["seq_len"]), "--batch-size", "4",
                   "--eval", "--eval-tokens", str(b["eval"]), "--context", str(b["context"]),
                   "--out", str(out), "--overwrite", "--quiet"]
        print("$ hfa " + " ".join(command), flush=True)
        proc = subprocess.run([sys.executable, "-m", "hf_efficient_attn.cli", *command], capture_output=True,
                              text=True)
        print(proc.stdout)
        if proc.returncode != 0:
            sys.exit(f"hfa convert failed ({proc.returncode}):\n{proc.stderr[-3000:]}")

        # (1) the checkpoint is what the library gives for the same options and the same data
        model, tok = load_model(model_arg)
        direct = hfa.convert(model, "gqa", num_kv_heads=1, calibration_tokens=b["calibration"], tokenizer=tok,
                             calibration=list(load_text(None, split="calibration").documents))
        hfa.distill(direct, model, list(load_text(None, split="train").documents), tokenizer=tok,
                    max_tokens=b["heal"], seq_len=b["seq_len"], batch_size=4, progress=False)
        back = hfa.load(out)
        ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, c = back(ids).logits, direct.eval()(ids).logits
        print(f"hfa.load(checkpoint) == hfa.convert(...) called directly: {torch.equal(a, c)} "
              f"(max |difference| {(a - c).abs().max().item():.1e}); KV heads "
              f"{model.config.num_key_value_heads} -> {back.config.num_key_value_heads}")

        # (2) the report beside the checkpoint
        report = json.loads((out / "report.json").read_text())
        before, after = report["models"]
        print(f"report.json: ppl {before['ppl']:.2f} -> {after['ppl']:.2f}, KV bytes/token "
              f"{before['kv_bytes_per_token']:.0f} -> {after['kv_bytes_per_token']:.0f} "
              f"({report['convert']['heal']['tokens']} heal tokens); files in {out.name}/: "
              f"{', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
