"""A tiny model patched with backend="triton", end to end in the Triton interpreter (or on a GPU)."""

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.registry import softmax_attention
from tests.tiny_models import make_model, outputs

pytestmark = pytest.mark.triton_interpret


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # GQA + causal; softcap + sliding window
def test_triton_patch_logits_and_generate_match_eager(family):
    model = make_model(family).to(_device())
    ids = torch.randint(3, 97, (2, 11), device=_device())
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the 2-D padding mask path
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = outputs(model, input_ids=ids, attention_mask=mask)
        ref_gen = model.generate(ids[:1], **kw)
        hfa.patch(model, backend="triton")
        out = outputs(model, input_ids=ids, attention_mask=mask)
        gen = model.generate(ids[:1], **kw)  # prefill kernel, then the split-KV decode kernel
    valid = mask.bool()
    assert (out - ref)[valid].abs().max().item() <= 1e-4
    assert torch.equal(gen, ref_gen)


def test_triton_patch_gradients_match_eager():
    model = make_model("llama").to(_device()).train()
    ids = torch.randint(3, 97, (1, 9), device=_device())

    def grads():
        model.zero_grad()
        outputs(model, input_ids=ids).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    hfa.patch(model, backend="triton")
    got = grads()
    for n in ref:
        assert (got[n] - ref[n]).abs().max().item() <= 1e-4 * max(1.0, ref[n].abs().max().item()), n


def test_explicit_triton_with_unsupported_option_is_an_error():
    q = torch.randn(1, 2, 5, 16, device=_device())
    base = dict(causal=True, scale=None, window=None, softcap=None, key_padding_mask=None, sinks=None,
                cu_seqlens_q=None, cu_seqlens_k=None)
    with pytest.raises(ValueError, match="backend='triton' cannot run this attention call: dropout"):
        softmax_attention(q, q, q, backend="triton", attn_mask=None, dropout_p=0.1, **base)
    custom = torch.ones(1, 1, 5, 5, dtype=torch.bool, device=_device())
    with pytest.raises(ValueError, match="arbitrary 4-D attn_mask.*backend='auto'"):
        softmax_attention(q, q, q, backend="triton", attn_mask=custom, dropout_p=0.0, **base)
    # ... while "auto" serves the same calls exactly through a fallback
    out = softmax_attention(q, q, q, backend="auto", attn_mask=custom, dropout_p=0.0, **base)
    ref = softmax_attention(q, q, q, backend="reference", attn_mask=custom, dropout_p=0.0, **base)
    assert (out - ref).abs().max() <= 1e-5
