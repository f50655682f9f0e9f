"""Convert a BERT encoder (all-MiniLM-L6-v2) to Linformer attention, heal it, and check what it costs and saves.

    python examples/convert_linformer.py                                  # MiniLM, k=64: ~5 min on 2 CPU cores
    python examples/convert_linformer.py --heal-tokens 16384 --eval-inputs 16 --repeats 3   # ~2 minutes
    python examples/convert_linformer.py --model tiny                     # a tiny random BERT: seconds

The measured run (262k heal tokens, its curve, the figures in the report) is conversions/linformer_minilm.py.

Shows, on the bundled corpus (Python docs; train and held-out eval splits, by document):
(1) exactness: held-out sentences of at most k tokens, padded into one batch, give the original's outputs;
(2) the approximation at ``--seq-len`` tokens (default 256): mean (and min) cosine similarity of the mean-pooled
    embeddings (sentence-transformers' pooling) to the original's, on ``--eval-inputs`` held-out inputs of
    [CLS] + text + [SEP], before and after healing;
(3) the heal: stage "encoder" (MSE of the token outputs + 1 - cosine of the pooled embeddings), training the E/F
    projections and query/key/value (``--trainable linformer_attention``, measured better than E/F alone,
    ``linformer``), on ``--heal-tokens`` tokens of the train split in the same input shape; its tokens and wall
    time, and the cosine on the short sentences of (1) afterwards (healing moves E's first k columns and q/k/v
    too, so short inputs are no longer exact);
(4) speed: one encoder forward at ``--speed-length`` tokens (default 512), original vs Linformer, the same
    inputs, ``--repeats`` interleaved rounds, median seconds;
(5) ``--save DIR``: hfa.save to DIR/linformer-k<k>, then hfa.load: bit-identical outputs.
"""

import argparse
import json
from pathlib import Path

import torch
import transformers

import hf_efficient_attn as hfa
from hf_efficient_attn.conversions.linformer import convert_linformer, encoder_token_blocks, pooled_cosine
from hf_efficient_attn.eval.encoder_check import forward_seconds


def tiny_bert(vocab_size: int):
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def short_sentences(tok, held_out, k: int, n: int = 16):
    """Up to `n` held-out sentences of at most k tokens ([CLS]/[SEP] included), padded into one batch."""
    sentences = []
    for doc in held_out.documents:
        for s in doc.replace("\n", " ").split(". "):
            if 3 <= len(s.split()) and len(tok(s)["input_ids"]) <= k:
                sentences.append(s)
            if len(sentences) == n:
                break
        if len(sentences) == n:
            break
    batch = tok(sentences, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6", help="a bundled encoder, a local BERT checkpoint, or 'tiny'")
    ap.add_argument("--k", type=int, default=64, help="rows K and V are projected to")
    ap.add_argument("--no-share-kv", action="store_true", help="separate E (keys) and F (values) per layer")
    ap.add_argument("--max-length", type=int, default=None, help="longest input (default max_position_embeddings)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per heal and evaluation input")
    ap.add_argument("--heal-tokens", type=int, default=65536, help="heal budget in tokens; 0: no heal")
    ap.add_argument("--min-length", type=int, default=None,
                    help="heal on lengths drawn from [this, --seq-len] (padded) instead of --seq-len only")
    ap.add_argument("--batch-size", type=int, default=8, help="inputs per heal step")
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default DEFAULT_LR of --trainable)")
    ap.add_argument("--trainable", default="linformer_attention", help="linformer_attention | linformer | all")
    ap.add_argument("--eval-inputs", type=int, default=64, help="held-out inputs of --seq-len tokens")
    ap.add_argument("--speed-length", type=int, default=512, help="tokens per input of the speed test")
    ap.add_argument("--speed-batch", type=int, default=8, help="inputs per forward in the speed test")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved speed rounds (median)")
    ap.add_argument("--save", default=None, help="save the healed encoder under this folder and check hfa.load")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    if args.model == "tiny":     # a random BERT with MiniLM's tokenizer: every code path, in seconds
        from hf_efficient_attn.eval.models import resolve_bundled_checkpoint
        tok = transformers.AutoTokenizer.from_pretrained(resolve_bundled_checkpoint("minilm-l6"))
        model = tiny_bert(len(tok))
    else:
        model, tok = hfa.load_model(args.model)
    train, held_out = hfa.load_text(None, split="train"), hfa.load_text(None, split="eval")
    out = {"model": args.model, "k": args.k, "share_kv": not args.no_share_kv, "seq_len": args.seq_len,
           "threads": torch.get_num_threads()}
    new = convert_linformer(model, k=args.k, share_kv=not args.no_share_kv, max_length=args.max_length)

    # (1) exact at <= k tokens
    ids, mask = short_sentences(tok, held_out, args.k)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = new(input_ids=ids, attention_mask=mask).last_hidden_state
    out["short_max_abs_diff"] = (a - b)[mask.bool()].abs().max().item()
    print(f"(1) {len(ids)} held-out sentences of <= {args.k} tokens (padded to {ids.shape[1]}): max |Linformer - "
          f"original| = {out['short_max_abs_diff']:.2e}")

    # (2) the approximation at seq_len tokens, before healing
    evals = encoder_token_blocks(tok, held_out, args.seq_len, max_tokens=args.eval_inputs * args.seq_len)
    cos = pooled_cosine(new, model, evals)
    out["cosine_before"], out["cosine_before_min"] = cos.mean().item(), cos.min().item()
    print(f"(2) {len(evals)} held-out inputs of {args.seq_len} tokens, pooled-embedding cosine to the original: "
          f"mean {out['cosine_before']:.4f} (min {out['cosine_before_min']:.4f}), before healing")

    # (3) heal
    if args.heal_tokens:
        blocks = encoder_token_blocks(tok, train, args.seq_len, max_tokens=args.heal_tokens,
                                      min_length=args.min_length)
        res = hfa.distill(new, model, blocks, stage="encoder", seq_len=args.seq_len, batch_size=args.batch_size,
                          max_tokens=args.heal_tokens, trainable=args.trainable, lr=args.lr,
                          progress=not args.quiet)
        cos = pooled_cosine(new, model, evals)
        out["short_cosine_after"] = pooled_cosine(new, model, ids, mask).mean().item()   # E/F moved: no longer exact
        record = new.hfa_conversions[-1]
        out.update(heal_tokens=res.tokens, heal_seconds=round(res.seconds, 1), heal_lr=record["lr"],
                   heal_trainable=record["trainable"], heal_loss=(res.losses[0], res.losses[-1]),
                   cosine_after=cos.mean().item(), cosine_after_min=cos.min().item())
        print(f"(3) healed on {res.tokens:,} tokens in {res.seconds:.1f} s (trainable={record['trainable']}, lr "
              f"{record['lr']:g}): loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}; cosine mean "
              f"{out['cosine_after']:.4f} (min {out['cosine_after_min']:.4f}); on the short sentences of (1) "
              f"{out['short_cosine_after']:.4f}")

    # (4) speed at speed_length tokens: the same inputs, interleaved rounds
    if args.speed_length <= new.config.hfa_linformer["max_length"]:
        ids = encoder_token_blocks(tok, held_out, args.speed_length, max_tokens=args.speed_batch * args.speed_length)
        t = forward_seconds({"original": model, "linformer": new.eval()}, ids, args.repeats)
        out.update(speed_shape=list(ids.shape), original_s=t["original"], linformer_s=t["linformer"])
        print(f"(4) one forward of {tuple(ids.shape)} tokens, median of {args.repeats} interleaved rounds: original "
              f"{t['original'] * 1e3:.0f} ms, Linformer {t['linformer'] * 1e3:.0f} ms "
              f"(x{t['original'] / t['linformer']:.2f}) on {torch.get_num_threads()} threads")

    # (5) save / load
    if args.save:
        path = hfa.save(new, Path(args.save) / f"linformer-k{args.k}", tokenizer=tok, overwrite=True)
        back = hfa.load(path)
        with torch.no_grad():
            out["reload_same"] = torch.equal(back(input_ids=evals[:2]).last_hidden_state,
                                             new(input_ids=evals[:2]).last_hidden_state)
        print(f"(5) saved to {path}; hfa.load gives bit-identical outputs: {out['reload_same']} "
              f"({type(back).__name__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
