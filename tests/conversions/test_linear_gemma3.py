"""Gemma 3 -> linear attention, through the family table alone (attention.families): q/k norms, the
query_pre_attn_scalar scaling, and one RoPE per layer type (local theta on sliding layers, global on full ones),
which the linear model must keep while its masks stop windowing."""

import copy

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.linear import LinearAttention, LinearAttentionCacheLayer
from hf_efficient_attn.conversions import load, save
from tests.conversions.conftest import random_ids
from tests.tiny_models import W, make_model

from .test_linear import _perturb_linear, logits


def unwindowed(model):
    """The same model with windows no sequence reaches: each layer keeps its own RoPE, every key is seen."""
    model = copy.deepcopy(model)
    model.config.sliding_window = 2 ** 31 - 1
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_window_over_everything_reproduces_the_model_with_each_layers_rope(attn):
    model = make_model("gemma3", attn=attn)
    new = hfa.convert(model, "linear", window=64)
    assert type(new).__name__ == "Gemma3LinearForCausalLM" and new.config.model_type == "hfa_linear_gemma3"
    assert all(isinstance(layer.self_attn, LinearAttention) for layer in new.model.layers)
    assert new.config.layer_types == model.config.layer_types     # the local/global RoPE stays per layer
    ids = random_ids(2, 4 * W)
    diff = (logits(new, ids) - logits(unwindowed(model), ids)).abs().max().item()
    assert diff <= 1e-4, diff
    # and the RoPE really differs per layer: the same model with global RoPE in every layer differs
    global_rope = unwindowed(model)
    global_rope.config.layer_types = ["full_attention"] * len(model.config.layer_types)
    assert (logits(new, ids) - logits(global_rope, ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize("window", [0, 4])
def test_cached_decoding_equals_one_forward_pass(window):
    new = hfa.convert(make_model("gemma3", attn="sdpa"), "linear", window=window)
    _perturb_linear(new)
    ids = random_ids(2, 19)
    full = logits(new, ids)
    out = new(input_ids=ids[:, :11], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    with torch.no_grad():
        for t in range(11, 19, 3):
            out = new(input_ids=ids[:, t:t + 3], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)
    assert all(isinstance(layer, LinearAttentionCacheLayer) for layer in cache.layers)


def test_kept_softmax_layer_and_save_load(tmp_path):
    new = hfa.convert(make_model("gemma3"), "linear", window=3, layers=[1])
    _perturb_linear(new)
    assert not isinstance(new.model.layers[1].self_attn, LinearAttention)
    back = load(save(new, tmp_path / "lin"))
    ids = random_ids(2, 20)
    assert type(back) is type(new) and torch.equal(logits(back, ids), logits(new, ids))
