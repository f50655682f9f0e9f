"""The registry contract: mask compression, names, from_pretrained, errors, one-time fallback logs."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import hf_efficient_attn as hfa
from hf_efficient_attn.attention import registry
from hf_efficient_attn.attention.registry import HFAMask, hfa_mask, softmax_attention
from tests.tiny_models import make_model, outputs


def _both(**kw):
    return hfa_mask(**kw), sdpa_mask(**{**kw, "allow_is_causal_skip": False})


def _as_bool(mask):
    """Our eager-format mask as bool (True = attend), through the dense tensor a layer would see."""
    return mask > torch.finfo(mask.dtype).min / 2


def test_mask_without_padding_is_structured_causal():
    got, full = _both(batch_size=2, q_length=8, kv_length=8, mask_function=causal_mask_function,
                      attention_mask=torch.ones(2, 8, dtype=torch.bool))
    assert isinstance(got, HFAMask) and got.structured
    assert got.causal and got.window is None and got.padding is None and got._dense is None  # nothing built
    assert tuple(got.shape) == (2, 1, 8, 8) and got.dtype == torch.float32
    assert torch.equal(_as_bool(got), full)


def test_padded_causal_mask_carries_its_padding():
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, :3] = False
    got, full = _both(batch_size=2, q_length=8, kv_length=8, mask_function=causal_mask_function, attention_mask=pad)
    assert got.structured and got.causal and torch.equal(got.padding, pad)
    assert torch.equal(_as_bool(got), full)


def test_sliding_window_with_cache_offset_is_recognised():
    # decoding 3 tokens after 10 cached: queries sit at the end of 13 keys; window 4
    got, full = _both(batch_size=1, q_length=3, kv_length=13, q_offset=10, kv_offset=0,
                      mask_function=sliding_window_causal_mask_function(4), local_size=4,
                      attention_mask=torch.ones(1, 13, dtype=torch.bool))
    assert got.structured and got.causal and got.window == 4 and got.padding is None
    assert torch.equal(_as_bool(got), full)


def test_window_travels_with_the_mask_without_local_size():
    # a layer/model that builds a window mask but passes no local_size (nor sliding_window= to attention):
    # the structure is verified row block by row block, and the window is kept
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0, :2] = False
    fn = and_masks(causal_mask_function, lambda b, h, q, kv: kv > q - 5)  # not transformers' own function
    got, full = _both(batch_size=2, q_length=12, kv_length=12, mask_function=fn, attention_mask=pad)
    assert got.structured and got.causal and got.window == 5 and torch.equal(got.padding, pad)
    assert torch.equal(_as_bool(got), full)


def test_unusual_pattern_is_explicit_and_exact():
    # an extra and-mask (e.g. a custom overlay) is not expressible as causal + padding
    def even_keys(b, h, q, kv):
        return kv % 2 == 0

    fn = and_masks(causal_mask_function, even_keys)
    got, full = _both(batch_size=1, q_length=6, kv_length=6, mask_function=fn)
    assert isinstance(got, HFAMask) and not got.structured
    assert torch.equal(got.allowed(), full) and torch.equal(_as_bool(got), full)


def test_mask_behaves_as_the_eager_mask_under_any_op():
    from transformers.masking_utils import eager_mask
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :2] = False
    kw = dict(batch_size=2, q_length=7, kv_length=7, mask_function=causal_mask_function, attention_mask=pad,
              dtype=torch.float32)
    got, ref = hfa_mask(**kw), eager_mask(**kw)
    assert torch.equal(got[:, :, :, :7].dense(), ref)           # a no-op slice keeps the structure
    assert isinstance(got[:, :, :, :7], HFAMask)
    sliced = got[:, 0, :, :5]                                    # a real slice: the dense values
    assert not isinstance(sliced, HFAMask) and torch.equal(sliced, ref[:, 0, :, :5])
    scores = torch.randn(2, 3, 7, 7)
    assert torch.equal(scores + got, scores + ref)               # layers that add the mask themselves
    assert torch.equal(torch.where(got == 0, 1, 2), torch.where(ref == 0, 1, 2))
    assert "causal=True" in repr(got)


def test_registered_names_and_from_pretrained(tmp_path):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    for name in ("hfa", "hfa_reference", "hfa_triton"):
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (1, 11))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hfa_reference")
    assert loaded.config._attn_implementation == "hfa_reference"
    with torch.no_grad():
        assert (outputs(loaded, input_ids=ids) - outputs(model, input_ids=ids)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="no\\s+previous"):
        hfa.unpatch(loaded)


def test_unknown_backend_is_an_error():
    model = make_model("llama")
    with pytest.raises(ValueError, match="unknown backend 'fast'.*auto, triton, reference"):
        hfa.patch(model, backend="fast")
    assert model.config._attn_implementation == "eager"


def test_model_without_registry_dispatch_is_an_error():
    from tests.attention.legacy_model import LegacyModel
    from transformers import LlamaConfig
    model = LegacyModel(LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1))
    with pytest.raises(ValueError, match="LegacyModel cannot be patched.*AttentionInterface"):
        hfa.patch(model)


def test_patch_rejects_non_models():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hfa.patch(torch.nn.Linear(2, 2))


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors, no interpreter: Triton cannot run
    model = make_model("llama")
    with pytest.raises(ValueError, match="backend='triton' cannot run here.*CUDA GPU.*TRITON_INTERPRET"):
        hfa.patch(model, backend="triton")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend='triton' cannot run this attention call"):
        softmax_attention(q, q, q, backend="triton", causal=True)


def test_unknown_backend_in_direct_call():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="unknown backend"):
        softmax_attention(q, q, q, backend="cuda-magic")


def test_fallback_is_logged_once(caplog):
    registry._logged_once.clear()
    q = torch.randn(1, 2, 5, 8)
    with caplog.at_level(logging.WARNING, logger="hf_efficient_attn"):
        for _ in range(3):
            softmax_attention(q, q, q, backend="auto", causal=True, softcap=3.0, scale=None, window=None,
                              key_padding_mask=None, attn_mask=None, sinks=None, cu_seqlens_q=None,
                              cu_seqlens_k=None, dropout_p=0.0)
    msgs = [r.message for r in caplog.records if "softcap" in r.message]
    assert len(msgs) == 1


@pytest.mark.parametrize("opts", [
    dict(causal=True),
    dict(causal=True, window=3),
    dict(causal=False, key_padding_mask=torch.tensor([[True] * 7 + [False] * 2])),
    dict(causal=True, cu_seqlens_q=torch.tensor([0, 4, 9]), cu_seqlens_k=torch.tensor([0, 4, 9])),
    dict(causal=True, attn_mask=torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(3)) > 0.3),
    dict(causal=False, window=2, attn_mask=torch.randn(1, 4, 9, 9, generator=torch.Generator().manual_seed(4))),
])
def test_auto_sdpa_path_equals_reference(opts):
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    base = dict(scale=None, window=None, softcap=None, key_padding_mask=None, attn_mask=None, sinks=None,
                cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0)
    base.update(opts)
    a = softmax_attention(q, k, v, backend="auto", **base)
    r = softmax_attention(q, k, v, backend="reference", **base)
    assert (a - r).abs().max() <= 1e-5


def test_dropout_is_applied_in_training_and_reproducible():
    q = torch.randn(1, 2, 16, 8)
    base = dict(causal=True, scale=None, window=None, softcap=None, key_padding_mask=None, attn_mask=None,
                sinks=None, cu_seqlens_q=None, cu_seqlens_k=None)
    plain = softmax_attention(q, q, q, backend="reference", dropout_p=0.0, **base)
    torch.manual_seed(1)
    d1 = softmax_attention(q, q, q, backend="reference", dropout_p=0.5, **base)
    torch.manual_seed(1)
    d2 = softmax_attention(q, q, q, backend="reference", dropout_p=0.5, **base)
    assert torch.equal(d1, d2) and not torch.allclose(d1, plain)
    # dropout is unbiased: averaged over many masks it approaches the plain output
    acc = sum(softmax_attention(q, q, q, backend="reference", dropout_p=0.5, **base) for _ in range(400)) / 400
    assert (acc - plain).abs().mean() < 0.05 * plain.abs().mean() + 0.02
