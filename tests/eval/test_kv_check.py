"""kv_check / kv_perplexity / format_kv_check: the streaming protocol, a shared full-cache baseline, refusals."""

import math

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval import format_kv_check, kv_check
from hf_efficient_attn.eval.kv_check import kv_perplexity

from .tiny import TEXT, byte_tokenizer, tiny_llama

OPTS = dict(prompt_tokens=40, eval_tokens=12)


def test_the_protocol_scores_each_token_with_the_cache_after_the_previous_one():
    tok, model = byte_tokenizer(), tiny_llama(seed=0)
    got = kv_perplexity(model, tok, TEXT * 3, **OPTS)
    ids = tok(TEXT * 3, return_tensors="pt").input_ids[:, :OPTS["prompt_tokens"] + OPTS["eval_tokens"]]
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits[0, OPTS["prompt_tokens"] - 1:]
    want = torch.nn.functional.cross_entropy(logits, ids[0, OPTS["prompt_tokens"]:], reduction="none")
    assert got["nll"].shape == (12,) and torch.allclose(got["nll"], want, atol=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(float(want.mean())), rel=1e-4)
    assert kv_perplexity(model, tok, TEXT * 3, chunk=5, **OPTS)["nll"].allclose(got["nll"], atol=1e-4)
    with pytest.raises(ValueError, match="eval_tokens must be an integer"):
        kv_perplexity(model, tok, TEXT, prompt_tokens=40, eval_tokens=0)
    with pytest.raises(ValueError, match="the protocol needs"):
        kv_perplexity(model, tok, TEXT[:20], **OPTS)


def test_a_shared_baseline_gives_the_same_check_and_a_wrong_one_is_refused():
    tok, model = byte_tokenizer(), tiny_llama(seed=0)
    small, lossless = hfa.kv.streaming(2, 8), hfa.kv.streaming(2, 500)
    alone = kv_check(model, tok, small, TEXT * 3, **OPTS)
    full = kv_perplexity(model, tok, TEXT * 3, **OPTS)
    shared = kv_check(model, tok, small, TEXT * 3, full=full, **OPTS)
    assert shared.ppl == alone.ppl and shared.ppl_full == alone.ppl_full and shared.curve == alone.curve
    assert alone.delta != pytest.approx(0, abs=1e-3) and alone.cache_bytes < alone.cache_bytes_full
    assert kv_check(model, tok, lossless, TEXT * 3, full=full, **OPTS).delta == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="not this model's full-cache run.*eval_tokens"):
        kv_check(model, tok, small, TEXT * 3, full=full, prompt_tokens=40, eval_tokens=8)
    with hfa.patched(model, kv=small):
        with pytest.raises(ValueError, match="already runs KV policy streaming_s2_w8"):
            kv_check(model, tok, small, TEXT * 3, **OPTS)
        policy_run = kv_perplexity(model, tok, TEXT * 3, **OPTS)
    with pytest.raises(ValueError, match="not this model's full-cache run.*policy"):
        kv_check(model, tok, small, TEXT * 3, full=policy_run, **OPTS)
    with pytest.raises(ValueError, match="scored other tokens"):
        kv_check(model, tok, small, TEXT.upper() * 3, full=full, **OPTS)
    table = format_kv_check([alone]).splitlines()
    assert table[0].startswith("| policy |") and "streaming_s2_w8" in table[2] and f"{alone.ppl:.3f}" in table[2]
