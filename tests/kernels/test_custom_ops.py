"""The Triton kernels as torch.library custom ops: ``torch.library.opcheck`` (schema, fake tensors, autograd
registration, AOT dispatch with dynamic shapes) on each op, in the interpreter. Tiny shapes: opcheck runs every
op several times, and its AOT test runs the backward too."""

import pytest
import torch

pytestmark = pytest.mark.triton_interpret


def _qkv(B=1, Hq=4, Hkv=2, Sq=5, Skv=7, D=16, Dv=16, grad=True):
    q, k, v = torch.randn(B, Hq, Sq, D), torch.randn(B, Hkv, Skv, D), torch.randn(B, Hkv, Skv, Dv)
    return [t.requires_grad_(grad) for t in (q, k, v)]


# (sinks, key padding, causal, window, softcap): every optional input and flag at least once
CASES = {
    "plain": (False, False, False, None, None),
    "causal_sinks_padding": (True, True, True, None, None),
    "window_softcap": (False, False, True, 3, 4.0),
}


def _options(Sq, Skv, padding, causal, window, softcap):
    kpm = None
    if padding:
        kpm = torch.ones(1, Skv, dtype=torch.bool)
        kpm[0, :2] = False
    return (kpm, None, None, 0.25, causal, window, softcap, Sq, Skv)


@pytest.mark.parametrize("case", list(CASES))
def test_flash_attention_ops(case):
    from hf_efficient_attn.kernels.softmax.triton_flash import flash_attention_bwd, flash_attention_fwd
    sinks, padding, causal, window, softcap = CASES[case]
    q, k, v = _qkv()
    s = torch.randn(4, requires_grad=True) if sinks else None
    options = _options(5, 7, padding, causal, window, softcap)
    torch.library.opcheck(flash_attention_fwd, (q, k, v, s, *options))
    with torch.no_grad():
        out, lse = flash_attention_fwd(q, k, v, s, *options)
    do, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(flash_attention_bwd, (do, dlse, q.detach(), k.detach(), v.detach(), out, lse, *options))


@pytest.mark.parametrize("case", list(CASES))
def test_decode_attention_op(case):
    from hf_efficient_attn.kernels.softmax.triton_decode import decode_attention_fwd
    sinks, padding, causal, window, softcap = CASES[case]
    q, k, v = _qkv(Sq=2, Skv=9)
    s = torch.randn(4, requires_grad=True) if sinks else None
    # num_splits=2: the split-KV merge runs; its backward is the flash backward (same (out, lse))
    torch.library.opcheck(decode_attention_fwd, (q, k, v, s, *_options(2, 9, padding, causal, window, softcap), 2))


def test_ops_match_the_public_functions():
    """The public functions go through the ops and still equal the reference, gradients included."""
    from hf_efficient_attn.kernels.softmax import softmax_attention_reference
    from hf_efficient_attn.kernels.softmax.triton_decode import decode_attention
    from hf_efficient_attn.kernels.softmax.triton_flash import flash_attention
    from tests.tolerances import assert_close_rms
    q, k, v = _qkv()
    s = torch.randn(4, requires_grad=True)
    kpm = torch.ones(1, 7, dtype=torch.bool)
    kpm[0, 1] = False
    out, lse = flash_attention(q, k, v, causal=True, sinks=s, key_padding_mask=kpm)
    ref, ref_lse = softmax_attention_reference(q, k, v, causal=True, sinks=s, key_padding_mask=kpm)
    assert_close_rms(out, ref)
    assert_close_rms(lse, ref_lse)
    grads = torch.autograd.grad((out * ref.detach()).sum() + lse.sum(), (q, k, v, s))
    want = torch.autograd.grad((ref * ref.detach()).sum() + ref_lse.sum(), (q, k, v, s))
    for g, w, name in zip(grads, want, "qkvs"):
        assert_close_rms(g, w, name=f"d{name}")
    with torch.no_grad():
        dec, _ = decode_attention(q[:, :, -2:], k, v, causal=True, sinks=s, key_padding_mask=kpm, num_splits=2)
        assert_close_rms(dec, softmax_attention_reference(q[:, :, -2:], k, v, causal=True, sinks=s,
                                                          key_padding_mask=kpm)[0])


# ----------------------------------------------------------------------------------------------
# Linear attention: chunked forward / backward, decode step, hybrid window + linear
# ----------------------------------------------------------------------------------------------

def _linear_inputs(H=4, Hkv=2, T=21, F=16, D=16, decay=True, state=True):
    """Positive feature maps (the normaliser stays away from 0), log-decays <= 0, an fp32 initial state."""
    q, k, v = torch.rand(1, H, T, F), torch.rand(1, Hkv, T, F), torch.randn(1, Hkv, T, D)
    ld = -torch.rand(1, Hkv, T) * 0.5 if decay else None
    s0, z0 = (torch.randn(1, Hkv, F, D), torch.rand(1, Hkv, F)) if state else (None, None)
    return [None if t is None else t.requires_grad_() for t in (q, k, v, ld, s0, z0)]


# (H, Hkv, T, log_decay, initial state, cu_seqlens, normalize): GQA, odd lengths, packed sequences
LINEAR_CASES = {
    "gqa_decay_state": (4, 2, 21, True, True, None, True),
    "varlen_unnormalized": (2, 2, 19, False, False, [0, 7, 19], False),
    "varlen_decay": (2, 1, 19, True, False, [0, 12, 19], True),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_attention_ops(case):
    from hf_efficient_attn.kernels.linear.triton_chunked import linear_attention_bwd, linear_attention_fwd
    H, Hkv, T, decay, state, cu, normalize = LINEAR_CASES[case]
    q, k, v, ld, s0, z0 = _linear_inputs(H, Hkv, T, decay=decay, state=state)
    options = (None if cu is None else torch.tensor(cu, dtype=torch.int32), normalize, 1e-6, 16)  # 2 chunks of 16
    torch.library.opcheck(linear_attention_fwd, (q, k, v, ld, s0, z0, *options))
    with torch.no_grad():
        out, den, st, zt = linear_attention_fwd(q, k, v, ld, s0, z0, *options)
    detached = [None if t is None else t.detach() for t in (q, k, v, ld, s0, z0)]
    torch.library.opcheck(linear_attention_bwd, (torch.randn_like(out), torch.randn_like(st), torch.randn_like(zt),
                                                 *detached, out, den, *options))


def test_linear_attention_step_op():
    from hf_efficient_attn.kernels.linear.triton_chunked import linear_attention_step
    q, k, v, ld, s0, z0 = (t.detach() for t in _linear_inputs(T=1, D=20))
    for log_decay, normalize in ((ld, True), (None, False)):
        torch.library.opcheck(linear_attention_step, (q, k, v, s0, z0, log_decay, normalize, 1e-6))


# (H, Hkv, Sq, T, initial state, key padding, cu_seqlens): window 3, chunks of 16 keys
HYBRID_CASES = {
    "gqa_state": (4, 2, 19, 19, True, False, None),
    "short_queries_padding": (2, 1, 5, 19, False, True, None),
    "varlen": (2, 2, 19, 19, False, False, [0, 8, 19]),
}


@pytest.mark.parametrize("case", list(HYBRID_CASES))
def test_hybrid_attention_ops(case):
    from hf_efficient_attn.kernels.linear.triton_hybrid import hybrid_attention_bwd, hybrid_attention_fwd
    H, Hkv, Sq, T, state, padding, cu = HYBRID_CASES[case]
    q, k, v = torch.randn(1, H, Sq, 16), torch.randn(1, Hkv, T, 16), torch.randn(1, Hkv, T, 16)
    fq, fk = torch.rand(1, H, Sq, 16), torch.rand(1, Hkv, T, 16)
    gate = torch.rand(H)
    s0, z0 = (torch.randn(1, Hkv, 16, 16), torch.rand(1, Hkv, 16)) if state else (None, None)
    inputs = [None if t is None else t.requires_grad_() for t in (q, k, v, fq, fk, gate, s0, z0)]
    kpm = None
    if padding:
        kpm = torch.ones(1, T, dtype=torch.bool)
        kpm[0, 3:6] = False
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    options = (kpm, cu, 3, 0.25, 1e-6, None, 16, 16, 4)
    torch.library.opcheck(hybrid_attention_fwd, (*inputs, *options))
    with torch.no_grad():
        out, m2, amax, zden, sf, zf = hybrid_attention_fwd(*inputs, *options)
    detached = [None if t is None else t.detach() for t in inputs]
    torch.library.opcheck(hybrid_attention_bwd, (torch.randn_like(out), torch.randn_like(sf), torch.randn_like(zf),
                                                 *detached, out, m2, amax, zden, *options))


# ----------------------------------------------------------------------------------------------
# MLA decode, block-sparse forward / backward / decode
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [False, True])
def test_mla_decode_op(padding):
    from hf_efficient_attn.kernels.mla.triton_decode import mla_decode_fwd
    B, H, Sk, r, dr = 2, 3, 21, 20, 8
    kpm = None
    if padding:
        kpm = torch.ones(B, Sk, dtype=torch.bool)
        kpm[0, :4] = False
    args = (torch.randn(B, H, 1, r), torch.randn(B, H, 1, dr), torch.randn(B, Sk, r), torch.randn(B, Sk, dr))
    torch.library.opcheck(mla_decode_fwd, (*args, kpm, 0.2, 2, 16))  # 2 splits: the merge runs


def _sparse_options(layout, Sq, Skv, padding, causal, window, sinks):
    kpm = None
    if padding:
        kpm = torch.ones(1, Skv, dtype=torch.bool)
        kpm[0, 5:9] = False
    return (kpm, None, None, layout.block_m, layout.block_n, 0.25, causal, window, sinks, Sq, Skv)


# (Sq, Skv, key padding, causal, window, sink tokens): GQA (4 query heads on 2 KV heads), odd lengths
SPARSE_CASES = {
    "causal_sinks": (37, 37, False, True, None, 3),
    "window_padding": (20, 37, True, False, 9, 0),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_block_sparse_attention_ops(case):
    from hf_efficient_attn.kernels.sparse import BlockLayout
    from hf_efficient_attn.kernels.sparse.triton_block_sparse import (
        block_sparse_attention_bwd,
        block_sparse_attention_fwd,
    )
    Sq, Skv, padding, causal, window, sinks = SPARSE_CASES[case]
    q, k, v = _qkv(Sq=Sq, Skv=Skv)
    layout = BlockLayout.random(1, 2, Sq, Skv, 16, 16, 0.5, causal=causal)
    lists = (*layout.visits(sinks), *layout.visits(sinks, transpose=True))
    options = _sparse_options(layout, Sq, Skv, padding, causal, window, sinks)
    torch.library.opcheck(block_sparse_attention_fwd, (q, k, v, *lists, *options))
    with torch.no_grad():
        out, lse = block_sparse_attention_fwd(q, k, v, *lists, *options)
    do, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(block_sparse_attention_bwd, (do, dlse, q.detach(), k.detach(), v.detach(), out, lse,
                                                       *lists, *options))


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_block_sparse_decode_op(case):
    from hf_efficient_attn.kernels.sparse import BlockLayout
    from hf_efficient_attn.kernels.sparse.triton_block_sparse import block_sparse_decode_fwd
    _, Skv, padding, causal, window, sinks = SPARSE_CASES[case]
    q, k, v = _qkv(Sq=2, Skv=Skv, grad=False)
    layout = BlockLayout.random(1, 2, 2, Skv, 16, 16, 0.5, causal=causal)
    options = _sparse_options(layout, 2, Skv, padding, causal, window, sinks)
    torch.library.opcheck(block_sparse_decode_fwd, (q, k, v, *layout.visits(sinks), *options, 2))
