"""Passkey retrieval: prompts of exactly the asked length with the needle at its depth, the same keys for every
model, exact-match scoring (an oracle that reads the needle scores 1, one that is off by one scores 0), sparse
rows labelled with their pattern and density, and SmolLM2 itself retrieving at 1k tokens, dense and sparse."""

import re
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.eval.passkey import NEEDLE, build_prompt, format_passkey, passkey_retrieval
from tests.eval.tiny import byte_tokenizer, tiny_llama


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("length,depth", [(400, 0.0), (401, 0.5), (777, 1.0), (512, 0.25)])
def test_prompt_has_the_length_and_the_needle_at_its_depth(bos, length, depth):
    tok = byte_tokenizer(bos=bos)
    ids = build_prompt(tok, length, depth, "48213")
    assert len(ids) == length
    text = tok.decode(ids, skip_special_tokens=True)
    needle = NEEDLE.format(key="48213")
    assert text.count(needle) == 1 and text.count("48213") == 2
    start, end = text.index("important information there.") + 28, text.index(" What is the pass key?")
    filler = end - start - len(needle)
    assert abs((text.index(needle) - start) - depth * filler) <= 1  # bytes = tokens here
    assert (ids[0] == 256) == bos


def test_prompt_too_short_and_bad_options_are_refused():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="at least"):
        build_prompt(tok, 50, 0.5, "12345")
    model = tiny_llama()
    for kwargs, match in [(dict(lengths=[0]), "lengths"), (dict(depths=[1.5]), "depths"), (dict(trials=0), "trials"),
                          (dict(filler="lorem"), "filler"), (dict(new_tokens=0), "new_tokens")]:
        with pytest.raises(ValueError, match=match):
            passkey_retrieval(model, tok, **{"lengths": [400], **kwargs})


@dataclass
class _Out:
    logits: torch.Tensor
    past_key_values: dict


class _Oracle(torch.nn.Module):
    """Greedy decoding from it spells the first 5-digit number of its prompt (plus ``shift``) through the model's
    cache protocol: the scoring's ground truth."""

    def __init__(self, tok, shift=0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.tok, self.shift = tok, shift

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            key = re.search(r"\d{5}", self.tok.decode(input_ids[0].tolist())).group()
            answer = self.tok(f" {int(key) + self.shift}. Remember", add_special_tokens=False)["input_ids"]
            past_key_values = {"answer": answer, "step": 0}
        ans, step = past_key_values["answer"], past_key_values["step"]
        logits = torch.zeros(1, input_ids.shape[1], 260)
        logits[0, -1, ans[min(step, len(ans) - 1)]] = 1.0
        past_key_values["step"] += 1
        return _Out(logits, past_key_values)


@pytest.mark.parametrize("shift,accuracy", [(0, 1.0), (1, 0.0)])
def test_scoring_is_exact_match_on_the_hidden_key(shift, accuracy):
    tok = byte_tokenizer()
    res = passkey_retrieval(_Oracle(tok, shift), tok, lengths=[400, 600], depths=(0, 0.5, 1), trials=2, new_tokens=8)
    assert [r.length for r in res] == [400, 600]
    assert all(len(r.trials) == 6 and r.accuracy == accuracy for r in res)
    assert res[0].pattern is None and not res[0].approximate and res[0].density is None


def test_same_keys_for_every_model_and_sparse_rows_labelled():
    tok = byte_tokenizer()
    dense = passkey_retrieval(tiny_llama(), tok, lengths=[300], depths=(0, 1), new_tokens=3)[0]
    again = passkey_retrieval(_Oracle(tok), tok, lengths=[300], depths=(0, 1), new_tokens=3)[0]
    assert [t["key"] for t in dense.trials] == [t["key"] for t in again.trials]
    assert [t["key"] for t in passkey_retrieval(_Oracle(tok), tok, lengths=[300], depths=(0, 1), seed=1)[0].trials] \
        != [t["key"] for t in dense.trials]
    model = tiny_llama()
    hfa.patch(model, sparse=hfa.sparse.streaming(1, 64, block=16))
    sparse = passkey_retrieval(model, tok, lengths=[300], depths=(0.5,), new_tokens=2)[0]
    assert sparse.pattern == "streaming_s1_w64" and sparse.approximate
    assert 0 < sparse.density < 1  # the prefill's density, not the last (dense) decode step's
    assert "streaming_s1_w64" in format_passkey([dense, sparse]) and "(approx.)" in format_passkey([sparse])
    assert passkey_retrieval(model, tok, lengths=[5000], depths=(0.5,), new_tokens=1)[0].beyond_window


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_retrieves_the_passkey_at_1k_dense_and_sparse():
    from tests.eval.test_real_models import _need
    from hf_efficient_attn.eval.models import load_model
    _need("smollm2-135m")
    model, tok = load_model("smollm2-135m")
    dense = passkey_retrieval(model, tok, lengths=[1024], depths=(0.25, 0.5, 0.75))[0]
    assert dense.accuracy == 1.0, dense.trials
    hfa.patch(model, sparse=hfa.sparse.top_p(0.95))
    sparse = passkey_retrieval(model, tok, lengths=[1024], depths=(0.25, 0.5, 0.75))[0]
    assert sparse.approximate and sparse.density < 0.9
    assert sparse.accuracy >= 2 / 3, sparse.trials
