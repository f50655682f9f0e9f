"""Qwen3 -> MLA, through the family table alone (attention.families: qk_norm "w", Qwen3RMSNorm): per-head q/k
norms before RoPE whose gain is w (Gemma's is 1 + w), 2 KV heads, and sliding-window layers (use_sliding_window
with max_window_layers=1: layers 1 and 2 slide) on sequences longer than the window."""

import copy

import pytest
import torch
import transformers

from hf_efficient_attn.attention.families import FAMILIES
from hf_efficient_attn.attention.mla import QKNormMLAAttention, Qwen3MLAForCausalLM, latent_cache
from hf_efficient_attn.conversions import convert, load, save
from hf_efficient_attn.conversions.mla import mla_ranks
from tests.tiny_models import COMMON, W
from tests.tolerances import assert_close_rms

from .conftest import random_ids
from .test_mla import _decode_logits, logits


def tiny_qwen3(attn="eager", sliding=True):
    cfg = transformers.Qwen3Config(**{**COMMON, "num_hidden_layers": 3}, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, use_sliding_window=sliding,
                                   sliding_window=W if sliding else None, max_window_layers=1)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():             # norms away from 1 so a wrong gain (1 + w for w) cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["weights", "activations", "attention"])
def test_full_rank_reproduces_the_logits_past_the_window(method, attn):
    model = tiny_qwen3(attn)
    lim = mla_ranks(model)
    assert lim["max_rope_dim"] == 32                  # 2 KV heads x rotary dim 16
    new = convert(model, "mla", kv_lora_rank=lim["full_rank"](32), rope_dim=32, method=method,
                  calibration=random_ids(4, 16))
    assert isinstance(new, Qwen3MLAForCausalLM) and new.config.model_type == "hfa_mla_qwen3"
    attn0 = new.model.layers[0].self_attn
    assert isinstance(attn0, QKNormMLAAttention)
    assert type(attn0.k_norm) is transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm
    assert [layer.self_attn.sliding_window for layer in new.model.layers] == [None, W, W]
    ids = random_ids(2, 4 * W)
    diff = (logits(new, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"fp32 full-rank MLA should be exact to rounding, got {diff}"


def test_the_norm_gain_comes_from_the_table():
    """Qwen3's norm multiplies by w: the no-data moments use that gain (with Gemma's 1 + w the weights method's
    latent would be fitted to the wrong features and a low rank would lose more)."""
    fam = FAMILIES["qwen3"]
    w = torch.tensor([0.5, -1.0])
    assert torch.equal(fam.norm_gain(w), w) and torch.equal(FAMILIES["gemma3_text"].norm_gain(w), 1 + w)


@pytest.fixture(scope="module")
def lossy():
    model = tiny_qwen3()
    return model, convert(model, "mla", kv_lora_rank=20, rope_dim=8, method="attention",
                          calibration=random_ids(16, 24))


def test_lower_ranks_lose_more_and_the_input_model_is_untouched():
    model = tiny_qwen3(sliding=False)
    before = copy.deepcopy(model.state_dict())
    ids = random_ids(2, 20)
    ref = logits(model, ids)
    errs = [(logits(convert(model, "mla", kv_lora_rank=r, rope_dim=dr, method="attention",
                            calibration=random_ids(16, 24)), ids) - ref).pow(2).mean().item()
            for r, dr in [(48, 16), (24, 8), (6, 4)]]
    assert errs[0] < errs[1] < errs[2], errs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_absorbed_decode_equals_expanded_decode_and_no_cache(lossy):
    _, new = lossy
    new = copy.deepcopy(new)
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
    # the full layer keeps every latent, the sliding ones the last window - 1
    assert [tuple(latent_cache(cache, i)[0].shape) for i in range(3)] == [(2, 3 * W, 20), (2, W - 1, 20),
                                                                          (2, W - 1, 20)]


def test_save_load_round_trip(tmp_path, lossy):
    _, new = lossy
    back = load(save(new, tmp_path / "mla"))
    ids = random_ids(2, 20)
    assert type(back) is Qwen3MLAForCausalLM
    assert torch.equal(logits(back, ids), logits(new, ids))
