"""The patterns one call at a time: names, option checks, what each plan selects, and the call path (GQA, padding,
packed sequences, dense query rows) against dense attention with the equivalent mask."""

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.sparse.apply import sparse_attention
from hf_efficient_attn.attention.sparse.base import allowed_blocks
from hf_efficient_attn.kernels.softmax import softmax_attention_naive, softmax_attention_reference


def _dense(q, k, v, **opts):
    return softmax_attention_reference(q, k, v, **opts)[0]


def _qkv(b=2, hq=4, hkv=2, sq=37, skv=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64),
            torch.randn(b, hkv, skv, d, generator=g, dtype=torch.float64),
            torch.randn(b, hkv, skv, d, generator=g, dtype=torch.float64))


def _naive(q, k, v, allowed):
    """Dense attention with a bool mask [B|1, 1, Sq, Skv]; rows that see nothing give 0."""
    return softmax_attention_naive(q, k, v, attn_mask=allowed)[0]


def test_names_say_what_the_pattern_is():
    sp = hfa.sparse
    assert sp.streaming(sinks=4, window=1024).name == "streaming_s4_w1024"
    assert sp.longformer(512, 1).name == "longformer_w512_g1"
    assert sp.dilated(2048, 2).name == "dilated_w2048_d2_b64"
    assert sp.vertical_slash(1000, 2000).name == "vertical_slash_v1000_s2000_b64"
    assert sp.top_p(0.9).name == "top_p_g0.9_b64"
    assert sp.lsh(8, 2, block=32).name == "lsh_n8_r2_b32"
    assert sp.full().name == "full_b64"
    assert repr(sp.top_p(0.95)) == "hfa.sparse.top_p_g0.95_b64"
    assert [p().dynamic for p in (sp.streaming, sp.longformer, sp.dilated, sp.vertical_slash, sp.top_p, sp.lsh)] == \
        [False, False, False, True, True, True]


@pytest.mark.parametrize("make,match", [
    (lambda: hfa.sparse.streaming(4, 0), "window"), (lambda: hfa.sparse.streaming(-1, 8), "sinks"),
    (lambda: hfa.sparse.dilated(64, 0), "dilation"), (lambda: hfa.sparse.top_p(1.5), "gamma"),
    (lambda: hfa.sparse.top_p(0.9, block=0), "block"), (lambda: hfa.sparse.lsh(3), "even"),
    (lambda: hfa.sparse.vertical_slash(10.5), "vertical"), (lambda: hfa.sparse.longformer(8, 1.0), "global_tokens"),
])
def test_bad_options_name_the_option(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,skv", [(37, 37), (10, 37)])
def test_static_patterns_mean_their_formula(causal, sq, skv):
    """The plans' token-level masks are the patterns' definitions, bottom-right aligned (p = i + skv - sq)."""
    p = torch.arange(sq)[:, None] + (skv - sq)
    j = torch.arange(skv)[None, :]
    near = (p - j < 7) & (causal | (j - p < 7))
    # dilated: every 2nd key block, counted from the key block holding the query block's last position
    last = ((torch.arange(sq) // 4) * 4 + 3).clamp_max(sq - 1) + (skv - sq)
    expect = {
        "streaming": near | (j < 3),
        "longformer": near | (j < 3) | (torch.arange(sq)[:, None] < (0 if causal else 3)),
        "dilated": near & ((last[:, None] // 4 - j // 4) % 2 == 0),
    }
    patterns = {"streaming": hfa.sparse.streaming(3, 7, block=4), "longformer": hfa.sparse.longformer(7, 3, block=4),
                "dilated": hfa.sparse.dilated(7, 2, block=4)}
    q = torch.zeros(1, 2, sq, 8)
    k = torch.zeros(1, 2, skv, 8)
    for name, pattern in patterns.items():
        plan = pattern.plan(q, k, causal=causal)
        got = plan.layout.dense_mask(causal=causal, window=plan.window, sink_tokens=plan.sink_tokens)[0, 0]
        got = got | (torch.arange(sq)[:, None] < plan.dense_query_rows)
        want = expect[name] & ((j <= p) if causal else True)
        assert torch.equal(got, want), name
        # the layout reads no block the token rules leave empty (density is what really runs)
        blocks = plan.layout.to_block_mask()[0, 0]
        assert not (blocks & ~allowed_blocks(sq, skv, 4, 4, causal, "cpu")).any()


@pytest.mark.parametrize("causal", [True, False])
def test_longformer_call_merges_dense_global_rows(causal):
    """GQA, right padding: the call equals dense attention with the Longformer mask, global query rows included."""
    q, k, v = _qkv()
    kpm = torch.ones(2, 37, dtype=torch.bool)
    kpm[1, 30:] = False
    out, dens = sparse_attention(q, k, v, hfa.sparse.longformer(5, 2, block=8), causal=causal, key_padding_mask=kpm,
                                 dense=_dense)
    i, j = torch.arange(37)[:, None], torch.arange(37)[None, :]
    allowed = (((i - j).abs() < 5) | (j < 2) | (i < (0 if causal else 2))) & ((j <= i) | (not causal))
    allowed = allowed[None, None] & kpm[:, None, None, :]
    assert (out - _naive(q, k, v, allowed)).abs().max().item() <= 1e-10
    assert dens.shape == (2,) and (dens < 1).all()


def test_left_padding_and_packed_sequences_run_each_sequence_alone():
    q, k, v = _qkv(b=1, sq=30, skv=30)
    pattern = hfa.sparse.top_p(0.7, block=4)
    cu = torch.tensor([0, 9, 30])
    out, _ = sparse_attention(q, k, v, pattern, cu_seqlens_q=cu, cu_seqlens_k=cu, dense=_dense)
    for a, b in ((0, 9), (9, 30)):
        alone, _ = sparse_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pattern, dense=_dense)
        assert torch.allclose(out[:, :, a:b], alone, atol=1e-12)
    # a left-padded row: the same numbers as its real tokens alone, zeros before them
    qq, kk, vv = (torch.cat([t, torch.randn_like(t)], dim=0) for t in (q, k, v))
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, :11] = False
    out, dens = sparse_attention(qq, kk, vv, pattern, key_padding_mask=kpm, dense=_dense)
    alone, _ = sparse_attention(qq[1:, :, 11:], kk[1:, :, 11:], vv[1:, :, 11:], pattern, dense=_dense)
    assert torch.equal(out[1, :, 11:], alone[0]) and not out[1, :, :11].any()
    assert dens.shape == (2,)


@pytest.mark.parametrize("pattern", [lambda: hfa.sparse.top_p(0.5, block=4), lambda: hfa.sparse.lsh(4, 2, block=4),
                                     lambda: hfa.sparse.vertical_slash(4, 4, last_q=8, block=4)],
                         ids=["top_p", "lsh", "vertical_slash"])
def test_dynamic_plans_keep_local_and_first_blocks_and_compute_exactly_what_they_select(pattern):
    q, k, v = _qkv(sq=40, skv=40)
    pattern = pattern()
    plan = pattern.plan(q, k, causal=True)
    blocks = plan.layout.to_block_mask()
    assert blocks.shape == (2, 2, 10, 10)  # per batch row and KV head
    assert blocks[..., 0].all() and torch.diagonal(blocks, dim1=-2, dim2=-1).all()
    assert not (blocks & ~allowed_blocks(40, 40, 4, 4, True, "cpu")).any()
    assert 0 < plan.layout.density() < 1
    out, _ = sparse_attention(q, k, v, pattern, dense=_dense)
    allowed = plan.layout.dense_mask(causal=True).repeat_interleave(2, dim=1)
    assert (out - _naive(q, k, v, allowed)).abs().max().item() <= 1e-10


def test_top_p_keeps_more_for_a_larger_gamma_and_everything_at_one():
    q, k, _ = _qkv(sq=64, skv=64)
    d = [hfa.sparse.top_p(g, block=8).plan(q, k, causal=True).layout.density() for g in (0.3, 0.6, 0.9, 1.0)]
    assert d == sorted(d) and d[-1] == 1.0 and d[0] < d[-1]


def test_top_p_finds_a_block_that_holds_the_mass():
    q, k, _ = _qkv(b=1, hq=1, hkv=1, sq=64, skv=64)
    k[:, :, 40:48] = q[:, :, 60:61] * 4  # key block 5 matches the queries of block 7 strongly
    q[:, :, 56:64] = q[:, :, 60:61]
    blocks = hfa.sparse.top_p(0.5, block=8).plan(q, k, causal=True).layout.to_block_mask()[0, 0]
    assert blocks[7, 5] and blocks[7].sum() <= 3  # the hot block, its diagonal, the first one


def test_vertical_slash_finds_a_strong_column_and_a_diagonal():
    q, k, _ = _qkv(b=1, hq=2, hkv=1, sq=64, skv=64, d=16)
    k[:, :, 21] = q[:, :, -8:].mean((1, 2)) * 6  # a column every late query attends
    plan = hfa.sparse.vertical_slash(1, 1, last_q=8, block=8).plan(q, k, causal=True)
    blocks = plan.layout.to_block_mask()[0, 0]
    assert blocks[3:, 2].all()  # column 21 lives in key block 2: every query block that can see it reads it
    vertical, slash = hfa.sparse.vertical_slash(1, 1, last_q=8, block=8).scores(q, k)
    assert int(vertical[0, 0].argmax()) == 21
    assert slash.shape == (1, 1, 64) and slash.sum().item() == pytest.approx(8.0)  # 8 queries, mass 1 each


def test_lsh_reads_blocks_whose_summaries_point_the_same_way():
    q, k, _ = _qkv(b=1, hq=1, hkv=1, sq=64, skv=64)
    k[:, :, 8:16] = q[:, :, 48:56].mean(2, keepdim=True) * 3  # key block 1 points where query block 6 does
    blocks = hfa.sparse.lsh(16, 1, block=8).plan(q, k, causal=True).layout.to_block_mask()[0, 0]
    assert blocks[6, 1]
    assert blocks.sum() < allowed_blocks(64, 64, 8, 8, True, "cpu").sum()


def test_vertical_slash_refuses_non_causal_calls():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="causal"):
        sparse_attention(q, k, v, hfa.sparse.vertical_slash(), causal=False, dense=_dense)


def test_from_spec_builds_the_named_pattern():
    assert hfa.sparse.from_spec("top_p").name == hfa.sparse.top_p().name == "top_p_g0.95_b64"
    assert hfa.sparse.from_spec(" streaming:sinks=4, window=1024 ").name == "streaming_s4_w1024"
    assert hfa.sparse.from_spec("top_p:gamma=0.9,block=128").name == "top_p_g0.9_b128"
    with pytest.raises(ValueError, match="choose one of streaming, longformer"):
        hfa.sparse.from_spec("bigbird")
    with pytest.raises(ValueError, match=r"window=.*dilation"):
        hfa.sparse.from_spec("dilated:width=3")
