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
