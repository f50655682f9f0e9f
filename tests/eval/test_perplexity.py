"""Perplexity: against independent plain-PyTorch computations, under both protocols, and every error."""

import importlib
import math

import pytest
import torch

from hf_efficient_attn.eval.data import load_text
from hf_efficient_attn.eval.perplexity import perplexity, tokenize_stream, tokenizer_adds_bos, windows

from .tiny import BOS_ID, TEXT, byte_tokenizer, tiny_bert, tiny_llama

# the module, not the function of the same name that hf_efficient_attn.eval exports
ppl_mod = importlib.import_module("hf_efficient_attn.eval.perplexity")
REL = 1e-4


def guide_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The transformers perplexity guide's sliding-window loop: labels masked with -100, the model's
    own loss (HF's shift-and-cross-entropy), weighted by the number of targets it averaged over."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        # the tokens the model's loss averages over: labels after the internal shift by one. (The guide
        # subtracts one per row from the unmasked count instead, which undercounts by one per window
        # whenever the first label is already masked, i.e. in every window after the first.)
        num_valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


def bos_nll(model, stream: list[int], bos: int, context: int, stride: int | None) -> tuple[float, int]:
    """Plain loops for the BOS-per-window protocol: window = [BOS] + stream[b:b+context-1]; each
    stream token is scored once, by the first window (in order) that contains it."""
    w = context - 1
    starts = range(0, len(stream), w if stride is None else stride)
    scored, total = set(), 0.0
    for b in starts:
        seg = stream[b:b + w]
        ids = torch.tensor([[bos] + seg])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        for j, tok in enumerate(seg):
            pos = b + j
            if pos not in scored:
                scored.add(pos)
                total -= logp[j, tok].item()  # position j (BOS at 0) predicts stream[b + j]
        if b + w >= len(stream):
            break
    assert scored == set(range(len(stream)))
    return total / len(scored), len(scored)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("context,stride", [(64, None), (64, 16), (64, 64), (50, 7), (400, None)])
def test_matches_transformers_guide_without_bos(model, context, stride):
    tok = byte_tokenizer()
    ids = torch.tensor([tok(TEXT, add_special_tokens=False).input_ids])
    ref, n = guide_nll(model, ids, context, context if stride is None else stride)
    res = perplexity(model, tok, TEXT, context_length=context, stride=stride, batch_size=3, progress=False)
    assert res.tokens == n
    assert abs(res.nll - ref) <= REL * ref
    assert res.ppl == pytest.approx(math.exp(ref), rel=REL)


@pytest.mark.parametrize("context,stride", [(64, None), (64, 16), (33, 32), (400, None)])
def test_matches_plain_loops_with_bos_per_window(model, context, stride):
    tok = byte_tokenizer(bos=True)
    stream = tok(TEXT, add_special_tokens=False).input_ids
    ref, n = bos_nll(model, stream, BOS_ID, context, stride)
    res = perplexity(model, tok, TEXT, context_length=context, stride=stride, batch_size=2, progress=False)
    assert res.protocol["bos_per_window"] is True
    assert res.tokens == n == len(stream)
    assert abs(res.nll - ref) <= REL * ref


def test_tokens_scored_once_and_counts(model):
    tok = byte_tokenizer()
    n = len(tok(TEXT).input_ids)
    strided = perplexity(model, tok, TEXT, context_length=64, stride=10, progress=False)
    disjoint = perplexity(model, tok, TEXT, context_length=64, progress=False)
    assert strided.tokens == n - 1                       # all but the very first token
    assert disjoint.tokens == n - math.ceil(n / 64)      # the first token of each window has no context
    assert strided.protocol["windows"] > disjoint.protocol["windows"]
    # more context per token helps a model whose logits depend on context... or not; they must differ
    assert strided.nll != disjoint.nll


def test_stride_equal_to_context_is_disjoint(model):
    tok = byte_tokenizer()
    a = perplexity(model, tok, TEXT, context_length=48, stride=48, progress=False)
    b = perplexity(model, tok, TEXT, context_length=48, progress=False)
    assert a.tokens == b.tokens and a.nll == pytest.approx(b.nll, rel=1e-12)


def test_batch_size_does_not_change_result(model):
    tok = byte_tokenizer()
    runs = [perplexity(model, tok, TEXT, context_length=40, stride=None, batch_size=bs, progress=False)
            for bs in (1, 4, None)]
    for r in runs[1:]:
        assert r.tokens == runs[0].tokens
        assert r.nll == pytest.approx(runs[0].nll, rel=1e-6)


def test_deterministic(model):
    tok = byte_tokenizer()
    a = perplexity(model, tok, TEXT, context_length=40, stride=13, progress=False)
    b = perplexity(model, tok, TEXT, context_length=40, stride=13, progress=False)
    assert a.nll == b.nll and a.protocol == b.protocol


def test_model_without_logits_to_keep(model):
    """A model whose forward has no `logits_to_keep` (custom or older code) is scored on full logits."""

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    tok = byte_tokenizer()
    assert ppl_mod.accepts_logits_to_keep(model) and not ppl_mod.accepts_logits_to_keep(Plain(model))
    a = perplexity(model, tok, TEXT, context_length=64, stride=16, progress=False)
    b = perplexity(Plain(model), tok, TEXT, context_length=64, stride=16, progress=False)
    assert b.nll == pytest.approx(a.nll, rel=1e-6)


def test_protocol_record(model):
    tok = byte_tokenizer()
    res = perplexity(model, tok, [TEXT, TEXT[::-1]], context_length=64, stride=32, max_tokens=300, progress=False)
    p = res.protocol
    text = load_text([TEXT, TEXT[::-1]])
    assert p["data"] == "list[2]" and p["data_sha256"] == text.sha256
    assert p["model"] == "tiny-llama-0" and "byte" in p["tokenizer"]
    assert (p["context_length"], p["stride"], p["max_tokens"], p["stream_tokens"]) == (64, 32, 300, 300)
    assert p["tokens"] == res.tokens == 299 and p["dtype"] == "float32"
    assert len(p["token_stream_sha256"]) == 64 and p["bos_per_window"] is False
    assert res.to_dict()["protocol"] == p and "ppl" in str(res)


def test_dtype_recorded_and_training_mode_restored():
    m = tiny_llama(dtype=torch.bfloat16)
    m.train()
    res = perplexity(m, byte_tokenizer(), TEXT, context_length=64, progress=False)
    assert res.protocol["dtype"] == "bfloat16" and m.training


def test_max_tokens_limits_tokenization():
    """A small budget on a large corpus tokenizes only what it needs (no 100 MB tokenizer call)."""
    tok = byte_tokenizer()
    calls = []

    class Counting:
        bos_token_id = None

        def __call__(self, text, **kw):
            calls.append(len(text))
            return tok(text, **kw)

    big = ["word " * 20000] * 200  # 20 MB in 200 documents
    stream = tokenize_stream(Counting(), load_text(big), max_tokens=1000)
    assert stream.numel() == 1000
    assert sum(calls) <= 2 * ppl_mod._PIECE_CHARS and max(calls) <= ppl_mod._PIECE_CHARS


def test_tokenize_stream_pieces_equal_whole_text(monkeypatch):
    """Cutting documents into pieces never changes the tokens (byte-level BPE pre-tokenizer)."""
    tok = byte_tokenizer()
    docs = [TEXT * 5, "  indented\n\n\nlines  \n", "x" * 3000, TEXT]
    monkeypatch.setattr(ppl_mod, "_PIECE_CHARS", 97)
    pieces = list(ppl_mod._pieces(docs, 97))
    assert len(pieces) > 20 and all(len(p) <= 97 for p, _ in pieces)
    assert "".join(p for p, _ in pieces) == "\n\n".join(docs)
    assert tokenize_stream(tok, load_text(docs)).tolist() == tok("\n\n".join(docs)).input_ids


def test_windows_cover_every_token_once():
    for n, w, s, bos in [(100, 10, None, False), (100, 10, 3, False), (101, 10, 10, True), (7, 10, 4, True),
                         (2, 2, 1, False), (100, 10, 10, False), (95, 10, 9, False)]:
        wins = windows(n, w, s, bos)
        scored = []
        for start, end, k in wins:
            assert 0 <= start < end <= n and end - start <= w and 0 < k <= end - start
            scored += list(range(end - k, end))
        first = 0 if bos else 1
        if (s is None or s == w) and not bos:
            expected = [i for i in range(n) if i % w != 0]
        else:
            expected = list(range(first, n))
        assert scored == expected, (n, w, s, bos)


def test_tokenizer_without_bos_or_eos(model):
    tok = byte_tokenizer()
    assert tok.bos_token_id is None and tok.eos_token_id is None and tok.pad_token_id is None
    assert not tokenizer_adds_bos(tok) and tokenizer_adds_bos(byte_tokenizer(bos=True))
    assert math.isfinite(perplexity(model, tok, "ab", context_length=8, progress=False).ppl)


# -- errors ------------------------------------------------------------------------------------------

def test_stride_larger_than_context_is_an_error(model):
    with pytest.raises(ValueError, match="stride 65 is larger than the 64 text tokens"):
        perplexity(model, byte_tokenizer(), TEXT, context_length=64, stride=65, progress=False)
    with pytest.raises(ValueError, match="BOS token takes one place"):
        perplexity(model, byte_tokenizer(bos=True), TEXT, context_length=64, stride=64, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"stride": 0}, "stride must be a positive integer"),
    ({"context_length": 1}, "context_length must be an integer >= 2"),
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(model, byte_tokenizer(), TEXT, **{"context_length": 64, **kwargs}, progress=False)


def test_empty_and_too_short_text(model):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, "", progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, "   \n\n ", progress=False)
    with pytest.raises(ValueError, match="gives 1 token.*at least 2"):
        perplexity(model, tok, "a", progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tok, TEXT, max_tokens=1, progress=False)
    # with a BOS one text token is enough: it is predicted from BOS
    assert perplexity(model, byte_tokenizer(bos=True), "a", progress=False).tokens == 1


def test_encoder_is_rejected():
    with pytest.raises(TypeError, match="causal language model"):
        perplexity(tiny_bert(), byte_tokenizer(), TEXT, progress=False)


def test_tokenizer_model_mismatch():
    small = tiny_llama(vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer and model do not match"):
        perplexity(small, byte_tokenizer(), TEXT, progress=False)


@pytest.mark.parametrize("bos,stride", [(True, None), (False, None), (False, 9)])
def test_bits_per_byte_counts_the_scored_bytes(model, bos, stride):
    """One token per byte: the scored bytes are the scored tokens, and bits per byte is the NLL in bits. With BOS
    every stream token is scored, so the bytes are the whole text's."""
    tok = byte_tokenizer(bos=bos)
    res = perplexity(model, tok, TEXT, context_length=40, stride=stride, progress=False)
    assert res.bytes == res.tokens
    if bos:
        assert res.bytes == len(TEXT.encode("utf-8"))
    assert res.bits_per_byte == pytest.approx(res.nll / math.log(2), rel=1e-12)
    assert "bits/byte" in str(res)


def test_scored_bytes_decodes_each_window_span():
    tok = byte_tokenizer()
    stream = torch.tensor(tok("héllo wörld", add_special_tokens=False).input_ids)   # 13 bytes
    assert ppl_mod.scored_bytes(tok, stream, [(0, 13, 13)]) == 13
    assert ppl_mod.scored_bytes(tok, stream, [(0, 6, 5), (6, 13, 7)]) == 12
