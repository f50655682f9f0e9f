"""Downstream tasks through lm-eval (hf_efficient_attn.eval.tasks): the bundled tasks run offline on the model in
memory, and lm-eval's numbers are the log-probabilities we compute ourselves."""

import math
import random
import re
import sys

import pytest
import torch

from hf_efficient_attn.errors import OptionError
from hf_efficient_attn.eval import data, passkey
from hf_efficient_attn.eval import tasks as T
from tests.eval.tiny import BOS_ID, byte_tokenizer, tiny_llama


def _tokenizer():
    """Bytes + BOS (prepended) + EOS: what lm-eval needs (it stops generation at EOS)."""
    tok = byte_tokenizer(bos=True)
    tok.add_special_tokens({"eos_token": "</s>"})
    assert tok.eos_token_id == BOS_ID + 1 < 260  # inside tiny_llama's vocabulary
    return tok


def _norm(text: str) -> str:
    return " ".join(text.split())


def test_lastword_docs_are_held_out_prose_paragraphs():
    docs = T.lastword_docs()
    assert len(docs) == T.LASTWORD_DOCS == 200
    assert len({d["id"] for d in docs}) == 200 and [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    assert T.lastword_docs(20) == docs[:20]  # a smaller task is a prefix: the choice depends on the text only
    eval_text = _norm(" ".join(data.load_text(None, split="eval").documents))
    other = _norm(" ".join(data.load_text("python-docs", split="calibration").documents
                           + data.load_text("python-docs", split="train").documents))
    paragraphs = [_norm(f"{d['context']} {d['target']}.") for d in docs]
    assert all(re.fullmatch(r"[A-Za-z]{2,}", d["target"]) for d in docs)
    assert all(T.LASTWORD_WORDS[0] <= len(p.split()) <= T.LASTWORD_WORDS[1] for p in paragraphs)
    assert [p[:80] for p in paragraphs if p not in eval_text] == []
    assert [p[:80] for p in paragraphs if p in other] == []  # not even a paragraph a train document repeats
    assert [p[:80] for p in paragraphs if "::" in p or ">>>" in p] == []  # prose, not code or directives


def test_prose_paragraphs_skip_code_directives_and_headings():
    doc = ("Title\n=====\n\nIntro text that is prose.\n\nExample::\n\n    x = compute(the value)\n\n"
           ".. code-block:: python\n\n   y = 2\n\n.. note::\n\n   A note in prose.\n\n"
           ">>> 1 + 1\n2\n\nThe end of it.\n")
    assert list(T._prose_paragraphs(doc)) == ["Intro text that is prose.", "A note in prose.", "The end of it."]


def test_lastword_scores_are_our_own_log_probabilities():
    """lm-eval's loglikelihood of each continuation, its greedy flag, acc and word perplexity equal what we compute
    from the model's logits for ' ' + last word after the paragraph (BOS first, as the tokenizer adds it)."""
    model, tok = tiny_llama(seed=1), _tokenizer()
    model.train()
    vocab_before = len(tok)
    rng_before = torch.get_rng_state(), random.getstate()
    res = T.run_tasks(model, tok, "hfa_lastword", limit=6, log_samples=True)
    assert model.training and len(tok) == vocab_before and tok.pad_token_id is None  # caller's objects untouched
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]
    assert res.samples == {"hfa_lastword": 6}

    docs = T.lastword_docs()
    lls, greedy = [], []
    model.eval()
    for sample in sorted(res.lm_eval["samples"]["hfa_lastword"], key=lambda s: s["doc_id"]):
        d = docs[sample["doc_id"]]
        ctx = tok(d["context"])["input_ids"]
        whole = tok(d["context"] + " " + d["target"])["input_ids"]
        assert ctx[0] == BOS_ID and whole[:len(ctx)] == ctx
        cont = whole[len(ctx):]
        assert tok.decode(cont) == " " + d["target"]
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        rows = logp[len(ctx) - 1:len(whole) - 1]
        ll = float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum())
        is_greedy = rows.argmax(-1).tolist() == cont
        got_ll, got_greedy = sample["resps"][0][0]
        assert got_ll == pytest.approx(ll, rel=1e-5, abs=1e-3)
        assert got_greedy == is_greedy
        lls.append(ll)
        greedy.append(is_greedy)
    scores = res.scores["hfa_lastword"]
    assert scores["acc"] == pytest.approx(sum(greedy) / len(greedy))
    assert math.log(scores["perplexity"]) == pytest.approx(-sum(lls) / len(lls), rel=1e-5)
    assert scores["perplexity_stderr"] is not None and scores["acc_stderr"] is not None
    assert "hfa_lastword acc" in T.format_tasks([res]).replace("  ", " ").replace("tiny-llama-1 ", "")
    assert T.task_summary(res.scores).startswith("hfa_lastword perplexity ")


def test_passkey_docs_are_passkey_py_prompts():
    tok = _tokenizer()
    docs = T.passkey_docs(tok, length=300, depths=(0.0, 1.0), trials=2, seed=3)
    keys = passkey.passkey_keys((300,), (0.0, 1.0), 2, 3)
    assert [d["key"] for d in docs] == [keys[(300, d, t)] for d in (0.0, 1.0) for t in range(2)]
    for d in docs:
        ids = passkey.build_prompt(tok, 300, d["depth"], d["key"])
        assert tok(d["prompt"])["input_ids"] == ids  # the text lm-eval encodes is passkey.py's prompt, BOS again
    assert T.task_config("hfa_passkey_400", tok)["metadata"]["length"] == 400
    with pytest.raises(OptionError, match="tokenizer"):
        T.task_config("hfa_passkey")


def test_passkey_task_runs_generation_offline():
    model, tok = tiny_llama(), _tokenizer()
    res = T.run_tasks(model, tok, ["hfa_passkey_260"], limit=2, log_samples=True)
    assert res.samples == {"hfa_passkey_260": 2}
    for s in res.lm_eval["samples"]["hfa_passkey_260"]:
        found = re.search(r"\d+", s["resps"][0][0])
        assert s["filtered_resps"][0] == (found.group() if found else "[invalid]")
        assert s["exact_match"] == float(s["filtered_resps"][0] == s["target"])
    assert 0.0 <= res.scores["hfa_passkey_260"]["exact_match"] <= 1.0


def test_task_scores_flattens_filters_and_missing_stderr():
    out = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5,
                                 "exact_match_stderr,strict-match": 0.1, "acc,none": 0.25, "acc_stderr,none": "N/A"}}}
    assert T.task_scores(out) == {"gsm8k": {"exact_match/strict-match": 0.5, "exact_match/strict-match_stderr": 0.1,
                                            "acc": 0.25, "acc_stderr": None}}


def test_errors_name_the_fix(monkeypatch):
    from lm_eval.tasks import TaskManager

    model, tok = tiny_llama(), _tokenizer()
    with pytest.raises(OptionError, match=r"hfa_lastword.*Hugging Face Hub"):
        T.run_tasks(model, tok, "hfa_lastwrd", task_manager=TaskManager(include_defaults=False))
    with pytest.raises(OptionError, match="EOS"):
        T.run_tasks(model, byte_tokenizer(bos=True), "hfa_passkey")
    with pytest.raises(OptionError, match="LM head"):
        T.run_tasks(model.model, tok, "hfa_lastword")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(OptionError, match=re.escape('pip install "hf_efficient_attn[tasks]"')):
        T.run_tasks(model, tok, "hfa_lastword")


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_bundled_tasks():
    """SmolLM2-135M predicts held-out last words far above chance and reads back 256-token passkeys."""
    from hf_efficient_attn.eval import load_model

    model, tok = load_model("smollm2-135m")
    res = T.run_tasks(model, tok, "hfa_lastword,hfa_passkey_256", limit=20)
    lastword, key = res.scores["hfa_lastword"], res.scores["hfa_passkey_256"]
    assert res.samples == {"hfa_lastword": 20, "hfa_passkey_256": 10}
    assert lastword["acc"] >= 0.15 and lastword["perplexity"] < 200  # 200 docs: acc 0.325, perplexity 34
    assert key["exact_match"] >= 0.8


def test_task_scores_join_the_report_table():
    """`evaluate_models(..., tasks=...)` (what `hfa eval --tasks` runs) puts lm-eval's numbers in each row and the
    table, beside perplexity."""
    from hf_efficient_attn.eval import evaluate_models, format_table

    tok = _tokenizer()
    model = tiny_llama()
    (rep,) = evaluate_models([("tiny", model, tok)], "some text to score. " * 40, context_length=32,
                             speed_contexts=(), tasks=("hfa_lastword",), task_limit=4, progress=False)
    direct = T.run_tasks(model, tok, "hfa_lastword", limit=4).scores
    assert rep.tasks == direct and 0 <= rep.tasks["hfa_lastword"]["acc"] <= 1
    header, row = format_table([rep]).splitlines()[0], format_table([rep]).splitlines()[2]
    assert "hfa_lastword acc" in header and "hfa_lastword perplexity" in header
    assert f"{direct['hfa_lastword']['perplexity']:.4f}" in row
