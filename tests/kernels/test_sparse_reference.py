"""The block-sparse reference: BlockLayout, and the block-gather path against the dense mask (fp64, exact)."""

import math

import pytest
import torch

from hf_efficient_attn.kernels.softmax import softmax_attention_naive, softmax_attention_reference
from hf_efficient_attn.kernels.sparse import (
    BlockLayout,
    block_sparse_attention_naive,
    block_sparse_attention_reference,
)
from tests.tolerances import assert_close_rms


def _qkv(B, Hq, Hkv, Sq, Sk, D=16, Dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Sq, D, generator=g).to(dtype), torch.randn(B, Hkv, Sk, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Sk, Dv or D, generator=g).to(dtype))


def _check_exact(q, k, v, layout, **opts):
    """Forward (out, lse) and gradients (through out and lse) of the gather path vs the dense-mask spec."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = block_sparse_attention_reference(*leaves, layout, **opts)
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention_naive(*ref_leaves, layout,
                                                    **{n: x for n, x in opts.items() if n != "max_chunk_scores"})
    assert out.dtype == q.dtype and lse.dtype == ref_lse.dtype
    assert_close_rms(out, ref_out, name="out")
    assert_close_rms(lse, ref_lse, name="lse")
    finite = torch.isfinite(ref_lse)
    d_out, d_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    loss = (out * d_out).sum() + torch.where(finite, lse * d_lse, 0).sum()
    ref_loss = (ref_out * d_out).sum() + torch.where(finite, ref_lse * d_lse, 0).sum()
    for name, g, rg in zip(("dq", "dk", "dv"), torch.autograd.grad(loss, leaves),
                           torch.autograd.grad(ref_loss, ref_leaves)):
        assert_close_rms(g, rg, name=name)
    return out, lse


# -- BlockLayout ---------------------------------------------------------------------------------

def test_layout_round_trip_and_lists():
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.6
    mask[0, 0, 1] = False  # an empty row
    lay = BlockLayout.from_block_mask(mask, 16, 32, q_len=70, kv_len=200)
    assert (lay.n_q_blocks, lay.n_kv_blocks) == (5, 7)
    assert torch.equal(lay.to_block_mask(), mask)
    assert torch.equal(lay.counts, mask.sum(-1).int())
    assert lay.kv_blocks.dtype == torch.int32 and (lay.kv_blocks[0, 0, 1] == -1).all()
    row = lay.kv_blocks[1, 2, 3, : lay.counts[1, 2, 3]]
    assert torch.equal(row.long(), mask[1, 2, 3].nonzero().flatten())


def test_layout_rejects_bad_lists():
    kb = torch.tensor([[[[2, 1]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="ascending"):
        BlockLayout(16, 16, kb, torch.tensor([[[2]]]), 16, 48)
    with pytest.raises(ValueError, match="ascending"):
        BlockLayout(16, 16, torch.tensor([[[[0, 5]]]]), torch.tensor([[[2]]]), 16, 48)
    with pytest.raises(ValueError, match="does not fit"):
        BlockLayout.from_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, 16, q_len=50, kv_len=48)


def test_density():
    full = BlockLayout.full(100, 100, 16, 16, causal=True)
    assert full.density(causal=True) == 1.0
    assert 0.5 < full.density(causal=False) < 0.65
    assert BlockLayout.full(100, 100, 16, 16).density(causal=False) == 1.0
    empty = BlockLayout.from_block_mask(torch.zeros(1, 2, 7, 7, dtype=torch.bool), 16, 16, 100, 100)
    assert empty.density() == 0.0
    # one sink block on each of the 7 query rows: 7 of the 28 causal blocks
    assert empty.density(sink_tokens=4) == pytest.approx(7 / 28)
    assert empty.density(per_head=True).shape == (1, 2)
    lay = BlockLayout.random(1, 3, 4096, 4096, 64, 64, 0.1)
    assert 0.08 < lay.density() < 0.2


def test_dense_mask_rules():
    """Sink tokens bypass the layout and the window, never causality or padding."""
    lay = BlockLayout.from_block_mask(torch.tensor([[[[False, False], [False, True]]]]), 4, 4, q_len=8, kv_len=8)
    kpm = torch.ones(1, 8, dtype=torch.bool)
    kpm[0, 1] = False
    m = lay.dense_mask(causal=True, window=2, key_padding_mask=kpm, sink_tokens=2)[0, 0]
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expect = (((i >= 4) & (j >= 4) & (i - j < 2)) | (j < 2)) & (j <= i) & (j != 1)
    assert torch.equal(m, expect)


# -- the gather path vs the dense mask -----------------------------------------------------------

CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, block_m, block_n, density, options)
    "causal-odd-gqa3": (2, 6, 2, 77, 93, 16, 32, 0.4, dict(causal=True)),
    "causal-q-shorter-mha": (1, 2, 2, 33, 70, 16, 16, 0.5, dict(causal=True)),
    "full-window-sinks-padding": (2, 3, 1, 50, 61, 32, 16, 0.5, dict(window=20, sink_tokens=5, pad=True)),
    "causal-window-sinks-padding-gqa": (2, 4, 2, 70, 70, 16, 16, 0.3, dict(causal=True, window=30, sink_tokens=17,
                                                                           pad=True)),
    "causal-q-longer-than-k": (1, 2, 1, 70, 40, 16, 16, 0.6, dict(causal=True, sink_tokens=3)),
    "decode-one-query": (2, 3, 1, 1, 300, 16, 32, 0.3, dict(causal=True, sink_tokens=4)),
    "scale-dv": (1, 2, 1, 40, 40, 8, 8, 0.5, dict(causal=True, scale=0.3, Dv=24)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gather_path_equals_dense_mask(name):
    B, Hq, Hkv, Sq, Sk, bm, bn, density, opts = CASES[name]
    opts = dict(opts)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, Dv=opts.pop("Dv", None))
    if opts.pop("pad", False):
        kpm = torch.rand(B, Sk, generator=torch.Generator().manual_seed(1)) > 0.3
        kpm[-1] = False  # a batch row with no real key
        opts["key_padding_mask"] = kpm
    lay = BlockLayout.random(B, Hkv, Sq, Sk, bm, bn, density, causal=opts.get("causal", False), seed=2)
    out, lse = _check_exact(q, k, v, lay, max_chunk_scores=2000, **opts)  # small chunks: several steps
    again, _ = block_sparse_attention_reference(q, k, v, lay, **opts)  # one step
    torch.testing.assert_close(again, out, rtol=0, atol=1e-12)
    with torch.no_grad():  # the in-place path with reused buffers
        fast, fast_lse = block_sparse_attention_reference(q, k, v, lay, max_chunk_scores=2000, **opts)
    torch.testing.assert_close(fast, out.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_lse, lse.detach(), rtol=0, atol=1e-12)



@pytest.mark.parametrize("name", list(CASES))
def test_fp32_no_grad_path_equals_fp64_spec(name):
    """fp32 without gradients: whole blocks go to torch's fused CPU flash kernel (rows with no real key included)."""
    from hf_efficient_attn.kernels.sparse import reference
    assert reference._CPU_FLASH is not None  # else this test would not test the fused path
    B, Hq, Hkv, Sq, Sk, bm, bn, density, opts = CASES[name]
    opts = dict(opts)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, Dv=opts.pop("Dv", None))
    if opts.pop("pad", False):
        kpm = torch.rand(B, Sk, generator=torch.Generator().manual_seed(1)) > 0.3
        kpm[-1] = False
        opts["key_padding_mask"] = kpm
    lay = BlockLayout.random(B, Hkv, Sq, Sk, bm, bn, density, causal=opts.get("causal", False), seed=2)
    ref, ref_lse = block_sparse_attention_naive(q, k, v, lay, **opts)
    with torch.no_grad():
        out, lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), lay, max_chunk_scores=2000,
                                                    **opts)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=0, atol=2e-5)

def test_full_layout_equals_dense_attention():
    q, k, v = _qkv(2, 6, 3, 45, 77, D=24)
    kpm = torch.rand(2, 77, generator=torch.Generator().manual_seed(3)) > 0.2
    for opts in (dict(causal=True), dict(causal=True, window=9), dict(window=13), dict()):
        lay = BlockLayout.full(45, 77, 16, 32, causal=opts.get("causal", False))
        out, lse = block_sparse_attention_reference(q, k, v, lay, key_padding_mask=kpm, **opts)
        ref_out, ref_lse = softmax_attention_reference(q, k, v, key_padding_mask=kpm, **opts)
        assert_close_rms(out, ref_out)
        assert_close_rms(lse, ref_lse)


def test_streaming_sinks_plus_window():
    """StreamingLLM: the first 4 keys and a window of 10, on a full causal layout, equals the explicit mask."""
    q, k, v = _qkv(1, 2, 1, 64, 64)
    lay = BlockLayout.full(64, 64, 16, 16, causal=True)
    out, _ = block_sparse_attention_reference(q, k, v, lay, causal=True, window=10, sink_tokens=4)
    i, j = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    mask = (j <= i) & ((i - j < 10) | (j < 4))
    ref, _ = softmax_attention_naive(q, k, v, attn_mask=mask[None, None])
    assert_close_rms(out, ref)


def test_empty_layout_gives_zero_minus_inf_and_zero_grads():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 3, 1, 40, 40))
    lay = BlockLayout.from_block_mask(torch.zeros(1, 1, 3, 3, dtype=torch.bool), 16, 16, 40, 40)
    out, lse = block_sparse_attention_reference(q, k, v, lay, causal=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


def test_varlen_equals_each_sequence_alone():
    cu_q, cu_k = torch.tensor([0, 20, 20, 63]), torch.tensor([0, 30, 41, 90])
    q, k, v = _qkv(1, 4, 2, 63, 90)
    mask = torch.rand(3, 2, 3, 2, generator=torch.Generator().manual_seed(4)) > 0.3
    lay = BlockLayout.from_block_mask(mask, 16, 32, q_len=43, kv_len=49)
    opts = dict(causal=True, sink_tokens=3, window=25)
    out, lse = block_sparse_attention_reference(q, k, v, lay, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
    for n in range(3):
        (q0, q1), (k0, k1) = cu_q[n:n + 2].tolist(), cu_k[n:n + 2].tolist()
        sub = BlockLayout.from_block_mask(mask[n:n + 1, :, :math.ceil((q1 - q0) / 16), :math.ceil((k1 - k0) / 32)],
                                          16, 32, q1 - q0, k1 - k0)
        ref_out, ref_lse = block_sparse_attention_naive(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], sub, **opts)
        if q1 == q0:  # the empty sequence
            continue
        assert_close_rms(out[:, :, q0:q1], ref_out)
        assert_close_rms(lse[:, :, q0:q1], ref_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    q, k, v = _qkv(1, 3, 1, 70, 70, dtype=dtype)
    lay = BlockLayout.random(1, 1, 70, 70, 16, 16, 0.5)
    out, lse = block_sparse_attention_reference(q, k, v, lay, causal=True)
    ref_out, ref_lse = block_sparse_attention_naive(q.double(), k.double(), v.double(), lay, causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_rms(out, ref_out.to(dtype), dtype)
    assert_close_rms(lse, ref_lse.float(), torch.float32)


@pytest.mark.parametrize("bad, message", [
    (dict(q_len=64), "layout is for q_len=64"),
    (dict(heads=3), "head dims"),
    (dict(sink_tokens=-1), "sink_tokens"),
])
def test_bad_inputs_name_the_problem(bad, message):
    q, k, v = _qkv(1, 4, 2, 48, 48)
    lay = BlockLayout.random(1, bad.get("heads", 2), bad.get("q_len", 48), 48, 16, 16, 0.5)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention_reference(q, k, v, lay, sink_tokens=bad.get("sink_tokens", 0))
