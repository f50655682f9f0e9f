"""hfa.patch(model, sparse=pattern) on tiny models: static patterns equal eager with the equivalent explicit 4-D mask
(padded batches, forward and gradients), the all-blocks layout equals dense on every family the patch serves,
decode, refusals, density records, unpatch."""

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.sparse.apply import sparse_layer
from hf_efficient_attn.eval.cost import _cache_kwarg
from tests.tiny_models import FAMILIES, W, make_model, outputs

S = 19
B = 4  # blocks of 4 tokens: the 19-token sequences span 5 blocks, so layouts really skip some
PAD = [0, 3, 7]  # leading padding per row of the padded batches
MIN = torch.finfo(torch.float32).min


def _ids(b=3, s=S, seed=1):
    return torch.randint(3, 97, (b, s), generator=torch.Generator().manual_seed(seed))


def _left_padded(b=3, s=S):
    ids, mask = _ids(b, s), torch.ones(b, s, dtype=torch.long)
    for r, n in enumerate(PAD[:b]):
        ids[r, :n], mask[r, :n] = 0, 0
    return ids, mask


# -- the equivalent masks, written from each pattern's definition (not from its code)
def _rule(name, i, j):
    """bool: may query position i see key position j (both counted from the row's first real token), causal."""
    if name == "streaming":  # streaming(sinks=2, window=5)
        return (j < 2) | (i - j < 5)
    if name == "longformer":  # longformer(window=6, global_tokens=1): in a decoder, global keys + window
        return (j < 1) | (i - j < 6)
    if name == "dilated":  # dilated(window=13, dilation=2, block=4)
        return (i - j < 13) & ((i // B - j // B) % 2 == 0)
    raise KeyError(name)


PATTERNS = {"streaming": lambda: hfa.sparse.streaming(2, 5, block=B),
            "longformer": lambda: hfa.sparse.longformer(6, 1, block=B),
            "dilated": lambda: hfa.sparse.dilated(13, 2, block=B)}


def _equivalent_mask(name, pads, s=S):
    """[b, 1, s, s] additive (0 / finfo.min): causal, the rule in each row's own frame, padding."""
    rows = []
    for n in pads:
        i, j = torch.arange(s)[:, None] - n, torch.arange(s)[None, :] - n
        rows.append((j >= 0) & (j <= i) & _rule(name, i, j))
    return torch.where(torch.stack(rows)[:, None], 0.0, MIN)


def _sliding_mask(pads, s=S):
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    real = torch.arange(s)[None, :] >= torch.tensor(pads)[:, None]
    return torch.where(((j <= i) & (i - j < W))[None] & real[:, None, :], 0.0, MIN)[:, None]


def _eager_mask(family, name, pads):
    mask = _equivalent_mask(name, pads)
    if family == "gemma3":  # its sliding layers keep their window: the pattern applies to the full layer
        return {"full_attention": mask, "sliding_attention": _sliding_mask(pads)}
    return mask


def _real(pads, s=S):
    return torch.arange(s)[None, :] >= torch.tensor(pads)[:, None]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_static_pattern_equals_eager_with_its_mask(family, name):
    """Forward and gradients, a left-padded batch (rows 1 and 2 padded) against eager with the explicit mask."""
    model = make_model(family).train()
    ids, attn = _left_padded()
    real = _real(PAD)

    def run(**kw):
        model.zero_grad()
        out = outputs(model, input_ids=ids, **kw)
        out[real].pow(2).mean().backward()  # pad positions are junk in eager (uniform rows): leave them out
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run(attention_mask=_eager_mask(family, name, PAD))
    hfa.patch(model, backend="reference", sparse=PATTERNS[name]())
    out, grads = run(attention_mask=attn)
    assert (out - ref)[real].abs().max().item() <= 1e-4
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for n in ref_grads:
        scale = ref_grads[n].abs().max().item() + 1e-6
        assert (grads[n] - ref_grads[n]).abs().max().item() <= 1e-4 * max(1.0, scale), n
    assert 0 < hfa.sparse.density(model) < 1


SERVED = [f for f in FAMILIES if f not in ("gemma2", "gpt_oss")]  # those two carry softcap / sinks: refused


@pytest.mark.parametrize("family", SERVED)
def test_all_blocks_layout_equals_dense_on_every_family(family):
    model = make_model(family)
    ids, attn = _left_padded() if family != "bert" else (_ids(), torch.ones(3, S, dtype=torch.long))
    if family == "bert":
        attn[1, 12:] = 0  # right padding (absolute positions)
    with torch.no_grad():
        ref = outputs(model, input_ids=ids, attention_mask=attn)
        hfa.patch(model, backend="auto", sparse=hfa.sparse.full(block=B))
        out = outputs(model, input_ids=ids, attention_mask=attn)
    real = attn.bool()
    assert (out - ref)[real].abs().max().item() <= 1e-4
    records = hfa.sparse.density(model, per="layer")
    assert len(records) == model.config.num_hidden_layers
    assert not hfa.sparse.is_sparse(model) and hfa.sparse.pattern_of(model).name == "full_b4"


@pytest.mark.parametrize("pattern", [lambda: hfa.sparse.top_p(1.0, block=B),
                                     lambda: hfa.sparse.vertical_slash(S, S, last_q=4, block=B),
                                     lambda: hfa.sparse.streaming(0, S, block=B)],
                         ids=["top_p_1", "vertical_slash_all", "streaming_all"])
def test_patterns_covering_everything_equal_dense(pattern):
    model = make_model("llama")
    ids, attn = _left_padded()
    with torch.no_grad():
        ref = outputs(model, input_ids=ids, attention_mask=attn)
        hfa.patch(model, backend="reference", sparse=pattern())
        out = outputs(model, input_ids=ids, attention_mask=attn)
    assert (out - ref)[_real(PAD)].abs().max().item() <= 1e-4
    assert hfa.sparse.density(model) == pytest.approx(1.0)


def test_longformer_in_an_encoder_sees_and_is_seen_by_global_tokens():
    """BERT, right padding: global query rows are computed densely and merged; equals eager with the mask."""
    model = make_model("bert")
    ids, attn = _ids(), torch.ones(3, S, dtype=torch.long)
    attn[1, 12:] = 0
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = ((j < 2) | (i < 2) | ((i - j).abs() < 4))[None] & attn.bool()[:, None, :]
    with torch.no_grad():
        ref = outputs(model, input_ids=ids, attention_mask=torch.where(allowed, 0.0, MIN)[:, None])
        hfa.patch(model, backend="reference", sparse=hfa.sparse.longformer(4, 2, block=B))
        out = outputs(model, input_ids=ids, attention_mask=attn)
    assert (out - ref)[attn.bool()].abs().max().item() <= 1e-4
    assert hfa.sparse.density(model) < 1


@pytest.mark.parametrize("pattern", [lambda: hfa.sparse.top_p(0.6, block=B), lambda: hfa.sparse.lsh(4, 1, block=B),
                                     lambda: hfa.sparse.vertical_slash(3, 3, last_q=4, block=B)],
                         ids=["top_p", "lsh", "vertical_slash"])
def test_dynamic_pattern_sees_each_row_from_its_first_real_token(pattern):
    """A left-padded batch gives each row what the row alone gets: estimates and positions are per sequence
    (position ids from the mask, as generate gives them: LSH hashes directions after RoPE, which depend on them)."""
    model = make_model("qwen3")
    hfa.patch(model, sparse=pattern())
    ids, attn = _left_padded()
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = outputs(model, input_ids=ids, attention_mask=attn, position_ids=pos)
        assert hfa.sparse.density(model) < 1
        for r, n in enumerate(PAD):
            alone = outputs(model, input_ids=ids[r:r + 1, n:])
            assert (batch[r, n:] - alone[0]).abs().max().item() <= 1e-4, r
    assert torch.isfinite(batch).all()


def test_decode_steps_follow_the_pattern_or_stay_dense():
    """streaming has a decode rule: cached decode equals the full forward with the pattern. top_p has none: its
    decode steps are dense and recorded as such."""
    model = make_model("llama")
    ids = _ids(1, 22)
    hfa.patch(model, sparse=hfa.sparse.streaming(2, 5, block=B))
    with torch.no_grad():
        full = outputs(model, input_ids=ids)
        out = model(input_ids=ids[:, :S], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(S, 22):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{_cache_kwarg(model): cache})
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert (torch.stack(steps, 1)[:, :-1] - full[:, S - 1:-1]).abs().max().item() <= 1e-4
    rec = model.model.layers[0].self_attn.__dict__["_hfa_sparse_layer"].state.records["model.layers.0.self_attn"]
    assert rec.sparse and (rec.q_len, rec.kv_len) == (1, 22)

    hfa.patch(model, sparse=hfa.sparse.top_p(0.5, block=B))
    with torch.no_grad():
        out = model(input_ids=ids[:, :S], use_cache=True)
        assert hfa.sparse.density(model) < 1
        model(input_ids=ids[:, S:S + 1], use_cache=True, **{_cache_kwarg(model): out.past_key_values})
    assert hfa.sparse.density(model) == 1.0
    gen = model.generate(ids[:, :S], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, S + 3)


def test_density_is_the_fraction_of_causal_blocks_computed():
    model = make_model("llama")
    hfa.patch(model, sparse=hfa.sparse.streaming(1, 4, block=4))
    with torch.no_grad():
        outputs(model, input_ids=_ids(1, 16))
    # 4 x 4 blocks, 10 causal ones; block row q reads q, q - 1 and the sink block 0: 1 + 2 + 3 + 3 = 9
    assert hfa.sparse.density(model) == pytest.approx(0.9)
    heads = hfa.sparse.density(model, per="head")
    assert list(heads) == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert all(h.shape == (2,) for h in heads.values())  # per KV head
    assert hfa.sparse.is_sparse(model) and hfa.sparse.pattern_of(model).name == "streaming_s1_w4"
    with pytest.raises(ValueError, match="per"):
        hfa.sparse.density(model, per="token")


def test_sliding_layers_keep_their_window_and_count_its_blocks():
    model = make_model("gemma3")
    hfa.patch(model, sparse=hfa.sparse.top_p(0.5, block=B))
    with torch.no_grad():
        outputs(model, input_ids=_ids(1))
    state = model.__dict__["_hfa_sparse_state"]
    sparse = {n: r.sparse for n, r in state.records.items()}
    assert sparse == {"model.layers.0.self_attn": False, "model.layers.1.self_attn": True,
                      "model.layers.2.self_attn": False}
    per_layer = hfa.sparse.density(model, per="layer")
    assert per_layer["model.layers.0.self_attn"] < 1  # the window's blocks of the causal ones


@pytest.mark.parametrize("family,match", [("gemma2", "softcap"), ("gpt_oss", "sink")])
def test_calls_the_kernels_cannot_take_are_refused(family, match):
    model = make_model(family)
    hfa.patch(model, sparse=hfa.sparse.streaming(2, 5, block=B))
    with pytest.raises(ValueError, match=match):
        with torch.no_grad():
            outputs(model, input_ids=_ids(1))


def test_explicit_mask_and_non_causal_estimate_are_refused():
    model = make_model("llama")
    hfa.patch(model, sparse=hfa.sparse.top_p(0.9, block=B))
    with pytest.raises(ValueError, match="explicit"):
        with torch.no_grad():
            outputs(model, input_ids=_ids(1), attention_mask=torch.zeros(1, 1, S, S))
    bert = make_model("bert")
    hfa.patch(bert, sparse=hfa.sparse.vertical_slash(4, 4, block=B))
    with pytest.raises(ValueError, match="causal"):
        with torch.no_grad():
            outputs(bert, input_ids=_ids(1))


def test_unknown_kwarg_is_refused_where_the_pattern_applies():
    from hf_efficient_attn.attention.registry import make_attention_function
    model = make_model("llama")
    hfa.patch(model, sparse=hfa.sparse.streaming(2, 5, block=B))
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 6, S, 8), torch.randn(1, 2, S, 8)
    with pytest.raises(ValueError, match="unknown attention kwarg"):
        make_attention_function("auto")(attn, q, k, k, None, score_offset=torch.ones(1))


def test_patch_rejects_what_is_not_a_pattern_and_converted_layers():
    model = make_model("llama")
    with pytest.raises(TypeError, match="hfa.sparse"):
        hfa.patch(model, sparse="top_p")

    class Converted(torch.nn.Module):
        HFA_BACKENDS = ("auto", "reference")
        backend = "auto"

    model.extra = Converted()
    with pytest.raises(ValueError, match="converted"):
        hfa.patch(model, sparse=hfa.sparse.top_p())


def test_unpatch_and_patched_restore_dense_exactly():
    model = make_model("llama", attn="sdpa")
    ids = _ids(1)
    hooks = len(model._forward_pre_hooks)
    with torch.no_grad():
        before = outputs(model, input_ids=ids)
        hfa.patch(model, sparse=hfa.sparse.streaming(2, 5, block=B))
        sparse_out = outputs(model, input_ids=ids)
        hfa.patch(model, sparse=hfa.sparse.streaming(2, 5, block=B))  # twice: harmless
        assert len(model._forward_pre_hooks) == hooks + 1
        hfa.unpatch(model)
        assert torch.equal(outputs(model, input_ids=ids), before)
        assert hfa.sparse.pattern_of(model) is None and len(model._forward_pre_hooks) == hooks
        assert all(sparse_layer(m) is None for m in model.modules())
        with hfa.patched(model, sparse=hfa.sparse.streaming(2, 5, block=B)):
            assert torch.equal(outputs(model, input_ids=ids), sparse_out)
        assert hfa.sparse.pattern_of(model) is None
        hfa.patch(model, sparse=hfa.sparse.top_p())
        hfa.patch(model)  # sparse=None: dense again
        assert hfa.sparse.pattern_of(model) is None
    assert (sparse_out - before).abs().max().item() > 1e-3  # the pattern really changed something
    with pytest.raises(ValueError, match="no sparse pattern"):
        hfa.sparse.density(model)


@pytest.mark.triton_interpret
def test_triton_backend_equals_reference(monkeypatch):
    """The Triton block-sparse kernels serve the patch (interpreter on CPU); one small layer, blocks of 16."""
    from hf_efficient_attn.kernels.sparse import triton_block_sparse as tbs
    calls = []
    kernel = tbs.block_sparse_attention
    monkeypatch.setattr(tbs, "block_sparse_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    model = make_model("llama")
    ids, attn = _left_padded(2, 40)
    pattern = hfa.sparse.streaming(3, 17, block=16)
    with torch.no_grad():
        hfa.patch(model, backend="reference", sparse=pattern)
        ref = outputs(model, input_ids=ids, attention_mask=attn)
        hfa.patch(model, backend="triton", sparse=pattern)
        out = outputs(model, input_ids=ids, attention_mask=attn)
    real = attn.bool()
    assert (out - ref)[real].abs().max().item() <= 1e-4
    assert len(calls) == 2 * 2  # 2 layers x 2 rows (row 1 is left-padded: each row runs on its own)



def test_layer_errors_measure_each_layer_against_dense_on_the_exact_inputs(monkeypatch):
    from hf_efficient_attn.attention.sparse.apply import SparseLayer
    ids = _ids(2, 32)
    model = make_model("llama")
    seen = {}
    attend = SparseLayer.attend

    def spy(self, module, q, k, v, opts, **kw):
        seen[self.name] = (q.clone(), k.clone(), v.clone())
        return attend(self, module, q, k, v, opts, **kw)
    monkeypatch.setattr(SparseLayer, "attend", spy)
    hfa.patch(model, sparse=hfa.sparse.full(block=B))
    assert all(e < 1e-6 for e in hfa.sparse.layer_errors(model, ids).values())
    exact_qkv = dict(seen)  # every layer's q/k/v in the exact model
    with torch.no_grad():
        exact = outputs(model, input_ids=ids)
    pattern = hfa.sparse.streaming(1, 4, block=B)
    hfa.patch(model, sparse=pattern)
    errors = hfa.sparse.layer_errors(model, ids)
    assert list(errors) == [f"model.layers.{i}.self_attn" for i in range(2)]
    for name, err in errors.items():
        q, k, v = seen[name]
        for a, b in zip(seen[name], exact_qkv[name]):  # the pass handed dense on: every layer saw exact inputs
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        g = q.shape[1] // k.shape[1]
        scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
        vv = v.repeat_interleave(g, 1)
        want = torch.softmax(scores.masked_fill(~(causal & ((j < 1) | (i - j < 4))), -torch.inf), -1) @ vv
        dense = torch.softmax(scores.masked_fill(~causal, -torch.inf), -1) @ vv
        assert err == pytest.approx(float((want - dense).norm() / dense.norm()), rel=1e-4) and err > 1e-3
    with torch.no_grad():  # after the pass the model runs its pattern again
        assert not torch.allclose(outputs(model, input_ids=ids), exact, atol=1e-4)
    hfa.unpatch(model)
    with pytest.raises(ValueError, match="no sparse pattern"):
        hfa.sparse.layer_errors(model, ids)
