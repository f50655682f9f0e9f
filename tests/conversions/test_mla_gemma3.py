"""Gemma 3 -> MLA on a tiny Gemma3 (from a config, no downloads): q_norm/k_norm before RoPE, query_pre_attn_scalar
scaling, sliding-window (local theta) and full-attention (global theta) layers, 1 KV head. Sequences are longer
than the window (6), so windows really cut, in the forward pass and in the cache."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from hf_efficient_attn.attention.mla import Gemma3MLAAttention, Gemma3MLAForCausalLM, latent_cache
from hf_efficient_attn.conversions import convert, load, save
from hf_efficient_attn.attention.families import layer_inv_freqs
from hf_efficient_attn.conversions.mla import MLA_TRAINABLE, mla_ranks
from hf_efficient_attn.eval import kv_cache_bytes
from tests.tiny_models import W, make_model
from tests.tolerances import assert_close_rms

from .conftest import random_ids
from .test_mla import _decode_logits, logits


def tiny_gemma3(attn="eager"):
    model = make_model("gemma3", attn=attn)
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert model.config.sliding_window == W and model.config.num_key_value_heads == 1
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["weights", "activations", "attention"])
def test_full_rank_reproduces_the_logits_past_the_window(method, attn):
    model = tiny_gemma3(attn)
    lim = mla_ranks(model)
    assert lim["max_rope_dim"] == 16                 # one KV head: every RoPE plane fits in d_r = D
    new = convert(model, "mla", kv_lora_rank=lim["full_rank"](16), rope_dim=16, method=method,
                  calibration=random_ids(4, 16))
    assert isinstance(new, Gemma3MLAForCausalLM) and new.config.model_type == "hfa_mla_gemma3"
    assert all(isinstance(layer.self_attn, Gemma3MLAAttention) for layer in new.model.layers)
    assert [layer.self_attn.sliding_window for layer in new.model.layers] == [W, None, W]
    ids = random_ids(2, 4 * W)
    diff = (logits(new, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-3, diff
    assert diff <= 1e-5, f"fp32 full-rank MLA should be exact to rounding, got {diff}"


def test_full_rank_with_expected_rotation_is_exact_and_each_layer_uses_its_own_rope():
    model = tiny_gemma3()
    local, full, _ = layer_inv_freqs(model)
    assert not torch.allclose(local, full)           # local theta 1e4 on sliding layers, global 1e6
    assert torch.equal(local, model.model.rotary_emb.sliding_attention_inv_freq)
    assert torch.equal(full, model.model.rotary_emb.full_attention_inv_freq)
    new = convert(model, "mla", kv_lora_rank=16, rope_dim=16, method="weights", dropped_rope="expected")
    ids = random_ids(2, 20)
    assert (logits(new, ids) - logits(model, ids)).abs().max().item() <= 1e-5
    keep, expected = (convert(model, "mla", kv_lora_rank=28, rope_dim=4, method="weights", dropped_rope=d)
                      for d in ("keep", "expected"))
    assert not torch.allclose(logits(keep, ids), logits(expected, ids))


def test_lower_ranks_lose_more_and_the_input_model_is_untouched():
    model = tiny_gemma3()
    before = copy.deepcopy(model.state_dict())
    ids = random_ids(2, 20)
    ref = logits(model, ids)
    errs = [(logits(convert(model, "mla", kv_lora_rank=r, rope_dim=dr, method="attention",
                            calibration=random_ids(16, 24)), ids) - ref).pow(2).mean().item()
            for r, dr in [(28, 4), (16, 8), (4, 4)]]
    assert errs[0] < errs[1] < errs[2], errs
    assert type(model) is transformers.Gemma3ForCausalLM
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="module")
def lossy():
    model = tiny_gemma3()
    return model, convert(model, "mla", kv_lora_rank=12, rope_dim=6, method="attention",
                          calibration=random_ids(16, 24))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_absorbed_decode_equals_expanded_decode_and_no_cache(lossy, attn):
    _, new = lossy
    new = copy.deepcopy(new)
    new.set_attn_implementation(attn)
    ids = random_ids(2, 3 * W)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                  # a left-padded row
    with torch.no_grad():
        absorbed, cache = _decode_logits(new, ids, mask=mask)
        for layer in new.model.layers:
            layer.self_attn.decode_mode = "expanded"
        expanded, _ = _decode_logits(new, ids, mask=mask)
        full = new(input_ids=ids, attention_mask=mask).logits[:, -5:]
    assert_close_rms(absorbed, expanded, torch.float32, name="absorbed vs expanded")
    assert_close_rms(absorbed, full, torch.float32, name="decode vs one forward")
    # sliding layers keep the last window - 1 latents, the full-attention layer all of them
    assert [tuple(latent_cache(cache, i)[0].shape) for i in range(3)] == [(2, W - 1, 12), (2, 3 * W, 12),
                                                                          (2, W - 1, 12)]
    assert tuple(latent_cache(cache, 1)[1].shape) == (2, 3 * W, 6)


def test_greedy_generation_with_the_latent_cache_equals_no_cache(lossy):
    _, new = lossy
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(max_new_tokens=3 * W, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        cached = new.generate(ids, use_cache=True, **kw)
        uncached = new.generate(ids, use_cache=False, **kw)
    assert cached.shape[1] == 7 + 3 * W
    assert torch.equal(cached, uncached)


def test_kv_bytes_per_token_from_the_real_cache(lossy):
    model, new = lossy
    r, dr = new.config.kv_lora_rank, new.config.mla_rope_dim
    # the cache also counts each sliding layer's window-size tensor (one int64): the same in both models
    overhead = kv_cache_bytes(model, tokens=W - 1) - (W - 1) * 2 * 16 * 3 * 4
    assert overhead == 2 * 8
    assert kv_cache_bytes(new, tokens=W - 1) == (W - 1) * (r + dr) * 3 * 4 + overhead   # inside the window
    # past the window the sliding layers hold W - 1 tokens, the full layer all 33
    assert kv_cache_bytes(new, tokens=33) == (33 + 2 * (W - 1)) * (r + dr) * 4 + overhead


def test_save_load_round_trip_and_stock_transformers_refuses(tmp_path, lossy):
    _, new = lossy
    path = save(new, tmp_path / "mla")
    back = load(path)
    ids = random_ids(2, 20)
    assert type(back) is Gemma3MLAForCausalLM
    assert torch.equal(logits(back, ids), logits(new, ids))
    assert back.hfa_conversions[-1]["conversion"] == "mla"
    assert back.config.layer_types == new.config.layer_types and back.config.sliding_window == W
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(path)!r})
        except (ValueError, KeyError) as e:
            print("refused:", str(e)[:200])
        else:
            print("LOADED")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "refused:" in out.stdout and "hfa_mla_gemma3" in out.stdout, (out.stdout, out.stderr[-2000:])


def test_tied_embeddings_stay_tied():
    cfg = make_model("gemma3").config
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    new = convert(model, "mla", kv_lora_rank=16, rope_dim=16, method="weights")
    assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()
    ids = random_ids(2, 12)
    assert (logits(new, ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_trainable_selector_covers_the_layers_that_feed_the_latent(lossy):
    _, new = lossy
    names = {n.split("self_attn.")[1].split(".")[0] for n, p in new.named_parameters()
             if "self_attn." in n and MLA_TRAINABLE(n, p)}
    assert names == {"q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "kv_a_proj", "kv_b_proj", "k_rope_proj",
                     "q_rope_coef", "o_proj"}
    assert not any(MLA_TRAINABLE(n, p) for n, p in new.named_parameters() if "self_attn." not in n)


@pytest.mark.triton_interpret
def test_triton_decode_path_in_the_module(lossy):
    _, new = lossy
    new = copy.deepcopy(new)
    ids = random_ids(2, W + 4)
    with torch.no_grad():
        ref, _ = _decode_logits(new, ids, steps=2)
        for layer in new.model.layers:
            layer.self_attn.decode_backend = "triton"
        got, _ = _decode_logits(new, ids, steps=2)
    assert_close_rms(got, ref, torch.float32, tol=1e-5, name="triton decode")


def test_errors():
    model = tiny_gemma3()
    with pytest.raises(ValueError, match="even number from 2 to 16"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=18)
    with pytest.raises(ValueError, match="from 1 to 28"):
        convert(model, "mla", kv_lora_rank=29, rope_dim=4)
    capped = copy.deepcopy(model)
    capped.config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        convert(capped, "mla", kv_lora_rank=8, rope_dim=4)
    bidirectional = copy.deepcopy(model)
    bidirectional.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="causal attention"):
        convert(bidirectional, "mla", kv_lora_rank=8, rope_dim=4)
    with pytest.raises(ValueError, match="method='attention'.*calibration"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=4)
