"""The patch's contract with layers that do unusual things (hand-built, not only the families that do them):
a window that is not passed, an unknown score-changing kwarg, a layer that rewrites the mask, per-query sinks
and a position bias. Each must match eager exactly, or refuse naming why — never differ silently."""

import logging

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention import registry
from tests.attention.custom_layers import (
    BiasedAttention,
    MaskEditingAttention,
    SinkBiasAttention,
    WindowlessAttention,
    tiny_mistral_with,
)

S = 19  # longer than the window (6)


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 97, (2, S), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)


def _assert_exact(model, backend="auto"):
    ids, mask = _batch()
    ref, ref_gen = _logits(model, ids, mask), _greedy(model, ids[:1])
    hfa.patch(model, backend=backend)
    got, gen = _logits(model, ids, mask), _greedy(model, ids[:1])
    keep = mask.bool()
    assert (got - ref).abs()[keep].max().item() <= 1e-4
    assert torch.equal(gen, ref_gen)
    return ref


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_window_mask_without_window_kwarg_keeps_the_window(backend):
    model = tiny_mistral_with(WindowlessAttention)
    ref = _assert_exact(model, backend)
    # the window really cuts here: without it the same weights give other logits (so this test can fail)
    hfa.unpatch(model)
    model.config.sliding_window = None
    ids, mask = _batch()
    assert (_logits(model, ids, mask) - ref).abs()[mask.bool()].max().item() > 1e-3


def test_unknown_score_changing_kwarg_runs_the_layers_eager_function(caplog):
    registry._logged_once.clear()
    model = tiny_mistral_with(BiasedAttention)
    with caplog.at_level(logging.WARNING, logger="hf_efficient_attn"):
        _assert_exact(model, "auto")
    msgs = [r.message for r in caplog.records if "score_offset" in r.message]
    assert len(msgs) == 1 and "BiasedAttention" in msgs[0] and "eager" in msgs[0]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_unknown_kwarg_is_an_error_on_a_fixed_backend(backend):
    model = tiny_mistral_with(BiasedAttention)
    ids, mask = _batch()
    with hfa.patched(model, backend=backend):
        with pytest.raises(ValueError, match="BiasedAttention: unknown attention kwarg.*score_offset"):
            _logits(model, ids, mask)


def test_harmless_and_none_kwargs_are_not_unknown():
    assert registry.unknown_kwargs({"position_ids": torch.zeros(1), "score_offset": None, "flag": False,
                                    "sliding_window": 4}) == []
    assert registry.unknown_kwargs({"indices": torch.zeros(1), "b": 1}) == ["b", "indices"]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_layer_that_rewrites_the_mask_gets_eagers_mask_and_its_edit_is_applied(backend):
    model = tiny_mistral_with(MaskEditingAttention)
    _assert_exact(model, backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_per_query_sinks_and_position_bias_run_natively(backend, caplog):
    registry._logged_once.clear()
    model = tiny_mistral_with(SinkBiasAttention)
    with caplog.at_level(logging.WARNING, logger="hf_efficient_attn"):
        _assert_exact(model, backend)
    assert not [r for r in caplog.records if "eager" in r.message]  # no fallback: our kernels computed it


def test_per_query_sinks_and_position_bias_gradients_match_eager():
    model = tiny_mistral_with(SinkBiasAttention).train()
    ids, mask = _batch()

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask).logits[mask.bool()].pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    hfa.patch(model)
    got = grads()
    assert ref.keys() == got.keys() and ref
    for n in ref:
        assert (got[n] - ref[n]).abs().max().item() <= 1e-4 * max(1.0, ref[n].abs().max().item()), n
