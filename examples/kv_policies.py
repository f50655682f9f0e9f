"""KV-cache policies on a real model, measured as the README's table is: perplexity under the streaming protocol and
passkey retrieval for each policy at a fraction of the full cache, beside the full cache; cache bytes; Quest's
decode speed at a long context; and StreamingLLM running past the model's own window.

    python examples/kv_policies.py [--model smollm2-135m] [--contexts 4096,8192] [--fractions 0.25,0.1]
        [--eval-tokens 256] [--passkey-depths 0.25,0.5,0.75] [--speed-contexts 1024,4096,16384] [--past 8192:2000]
        [--json out.json]

Protocol (``hf_efficient_attn.eval.kv_check``): the first C tokens of the bundled held-out text are one prefill
with the policy active, the next ``--eval-tokens`` are fed one at a time through the cache the policy left, each
scored by its next-token loss; the full cache runs the same tokens the same way. A policy "at fraction f" keeps
f·C tokens: ``streaming(4, f·C - 4)``, ``snapkv(f·C)``, ``quest(16, f·C)`` (Quest keeps everything and reads
f·C tokens' worth of pages per step). Passkey: the landmark prompt of C tokens with the key at each depth
(``hf_efficient_attn.eval.passkey``), greedy, exact match, with the policy active for the prefill and the answer.
Speed: ``measure_speed`` (a prefill of each ``--speed-contexts`` length of random tokens, then 16 greedy steps),
the full cache and each policy at 10%, side by side in one run. ``--past P:N``: streaming(4, 1024) fed N tokens
past a P-token prompt (chunks of 250, exact for this policy), perplexity by position, the cache bytes after 2k and
16k tokens, then ``generate`` of N greedy tokens after the same prompt (past the model's window when P + N exceeds
it) and the bytes of generate's own cache at the end.
"""

import argparse
import json
import time

import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import kv_cache_bytes, load_model, measure_speed, passkey_retrieval, tokenize_stream
from hf_efficient_attn.eval.cost import _deduplicated_bytes, cache_tensors
from hf_efficient_attn.eval.data import load_text
from hf_efficient_attn.eval.kv_check import kv_check, kv_perplexity


def _list(text, kind=int):
    """'1024,4096' -> (1024, 4096); 'none' -> () (skip that part)."""
    return () if text.strip().lower() == "none" else tuple(kind(x) for x in text.split(",") if x.strip())


def policies_at(context: int, fraction: float):
    budget = max(64, int(round(context * fraction)))  # SnapKV needs more than its 32-query window
    return [hfa.kv.streaming(4, budget - 4), hfa.kv.snapkv(budget), hfa.kv.quest(16, budget)]


def run(model_name="smollm2-135m", contexts=(4096, 8192), fractions=(0.25, 0.1), eval_tokens=256,
        depths=(0.25, 0.5, 0.75), speed_contexts=(1024, 4096, 16384), past=(8192, 2000), log=print) -> dict:
    model, tok = load_model(model_name)
    hfa.patch(model)  # our exact attention for every row; policies add kv= to the same patch
    out = {"model": model_name, "rows": [], "speed": None, "past": None}
    for ctx in contexts:
        full_keys = passkey_retrieval(model, tok, lengths=(ctx,), depths=depths) if depths else []
        full_acc = full_keys[0].accuracy if full_keys else None
        full = kv_perplexity(model, tok, prompt_tokens=ctx, eval_tokens=eval_tokens)  # one baseline per context
        for f in fractions:
            for policy in policies_at(ctx, f):
                t0 = time.perf_counter()
                c = kv_check(model, tok, policy, prompt_tokens=ctx, eval_tokens=eval_tokens, full=full)
                acc = None
                if depths:
                    with hfa.patched(model, kv=policy):
                        acc = passkey_retrieval(model, tok, lengths=(ctx,), depths=depths)[0].accuracy
                row = dict(context=ctx, fraction=f, policy=policy.name, ppl_full=c.ppl_full, ppl=c.ppl,
                           delta=c.delta, passkey_full=full_acc, passkey=acc, cache_bytes_full=c.cache_bytes_full,
                           cache_bytes=c.cache_bytes, read_fraction=c.read_fraction,
                           seconds=time.perf_counter() - t0)
                out["rows"].append(row)
                log(f"{ctx:>6} {f:>5.0%} {policy.name:<26} ppl {c.ppl_full:.3f} -> {c.ppl:.3f} ({c.delta:+.1%})  "
                    f"passkey {full_acc} -> {acc}  cache {c.cache_bytes_full / 2**20:.1f} -> "
                    f"{c.cache_bytes / 2**20:.1f} MiB  read {c.read_fraction:.2f}")
    out["speed"] = []
    for ctx in speed_contexts:
        full = measure_speed(model, (ctx,), decode_tokens=16)[0]
        row = dict(context=ctx, full_tok_s=full.decode_tok_s, policies={})
        for policy in policies_at(ctx, 0.1):
            with hfa.patched(model, kv=policy):
                got = measure_speed(model, (ctx,), decode_tokens=16)[0]
            row["policies"][policy.name] = dict(tok_s=got.decode_tok_s, ratio=got.decode_tok_s / full.decode_tok_s)
        out["speed"].append(row)
        log(f"decode at {ctx}: full {full.decode_tok_s:.2f} tok/s; at 10%: " + ", ".join(
            f"{name} {v['tok_s']:.2f} ({v['ratio']:.2f}x)" for name, v in row["policies"].items()))
    if past:
        prompt, n = past
        policy = hfa.kv.streaming(4, 1024)
        with hfa.patched(model, kv=policy):
            got = kv_perplexity(model, tok, prompt_tokens=prompt, eval_tokens=n, chunk=250)
            b2k, b16k = kv_cache_bytes(model, 2048), kv_cache_bytes(model, 16384)
            # and generation itself: n greedy tokens after the same prompt, through generate's own cache
            ids = tokenize_stream(tok, load_text(None), max_tokens=prompt)[None, :prompt]
            t0 = time.perf_counter()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, return_dict_in_generate=True)
            gen_s = time.perf_counter() - t0
            gen_bytes = _deduplicated_bytes(cache_tensors(gen.past_key_values))
        buckets = 4
        curve = [(prompt + i * n // buckets,
                  float(got["nll"][i * n // buckets:(i + 1) * n // buckets].mean().exp()))
                 for i in range(buckets)]
        generated = gen.sequences.shape[1] - prompt
        out["past"] = dict(policy=policy.name, prompt=prompt, tokens=n, ppl=got["ppl"], curve=curve,
                           window=model.config.max_position_embeddings, bytes_2k=b2k, bytes_16k=b16k,
                           generated=generated, generate_seconds=gen_s, generate_cache_bytes=gen_bytes)
        log(f"{policy.name} past a {prompt}-token prompt: {n} tokens, ppl {got['ppl']:.3f}, by position "
            + ", ".join(f"{p}: {v:.2f}" for p, v in curve) + f"; cache bytes after 2k {b2k} / after 16k {b16k}; "
            f"generate: {generated} new tokens to position {prompt + generated} in {gen_s:.0f} s, cache {gen_bytes} "
            f"bytes at the end")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=_list, default=(4096, 8192))
    p.add_argument("--fractions", type=lambda t: _list(t, float), default=(0.25, 0.1))
    p.add_argument("--eval-tokens", type=int, default=256)
    p.add_argument("--passkey-depths", type=lambda t: _list(t, float), default=(0.25, 0.5, 0.75))
    p.add_argument("--speed-contexts", type=_list, default=(1024, 4096, 16384),
                   help="contexts of the decode-speed check (full vs each policy at 10%%); 'none' skips it")
    p.add_argument("--past", default="8192:2000", help="PROMPT:TOKENS for the past-the-window run; 'none' skips it")
    p.add_argument("--json")
    a = p.parse_args(argv)
    past = None if a.past.lower() == "none" else tuple(int(x) for x in a.past.split(":"))
    res = run(a.model, a.contexts, a.fractions, a.eval_tokens, a.passkey_depths, a.speed_contexts, past,
              log=lambda s: print(s, flush=True))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
