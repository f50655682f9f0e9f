"""The patch on real pretrained models (offline PyPI packages): SmolLM2, Gemma 3, MiniLM."""

import math

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval.data import load_text
from hf_efficient_attn.eval.models import load_model
from hf_efficient_attn.eval.patch_check import FIXED_TEXT, patch_check

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def _eval_ids(tokenizer, n_tokens):
    text = "\n\n".join(load_text(None, split="eval").documents[:40])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= n_tokens, "bundled eval split too short for this test"
    return ids[:n_tokens]


def _nll(model, ids, context=512):
    """Mean next-token NLL over disjoint chunks (the same protocol for both implementations)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel(), context):
            chunk = ids[start:start + context][None]
            logits = model(chunk, use_cache=False).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", attn_implementation="sdpa")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_smollm2_greedy_32_tokens_identical(smollm2, backend):
    model, tok = smollm2
    res = patch_check(model, backend=backend, tokenizer=tok, new_tokens=32)
    assert res["greedy_identical"], res
    assert res["max_abs_logit_diff"] <= 1e-3, res
    assert model.config._attn_implementation == "sdpa"  # patch_check restores the model


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_smollm2_perplexity_within_0p1_percent(smollm2, backend):
    model, tok = smollm2
    ids = _eval_ids(tok, 2048)
    ref = _nll(model, ids)
    with hfa.patched(model, backend=backend):
        got = _nll(model, ids)
    assert abs(math.exp(got) / math.exp(ref) - 1) <= 1e-3, (math.exp(ref), math.exp(got))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gemma3_perplexity_within_0p1_percent(backend):
    # context 1024 > the 512-token sliding window: the window really cuts in 15 of 18 layers
    model, tok = load_model("gemma3-270m", attn_implementation="sdpa")
    ids = _eval_ids(tok, 2048)
    ref = _nll(model, ids, context=1024)
    with hfa.patched(model, backend=backend):
        got = _nll(model, ids, context=1024)
    assert abs(math.exp(got) / math.exp(ref) - 1) <= 1e-3, (math.exp(ref), math.exp(got))


def test_minilm_encoder_with_padding_equals_eager():
    model, tok = load_model("minilm-l6", attn_implementation="eager")
    texts = [FIXED_TEXT, "A short sentence.", "Attention is all you need, they said."]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        for backend in ("auto", "reference"):
            with hfa.patched(model, backend=backend):
                out = model(**enc).last_hidden_state
            valid = enc["attention_mask"].bool()
            assert (out - ref)[valid].abs().max().item() <= 1e-4, backend
