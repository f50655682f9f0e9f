"""GQA/MHA -> MLA on tiny models: lossless at full rank, absorbed == expanded decode, cached generation, KV
bytes from the real cache, save/load, errors. (The SmolLM2 quality check is test_mla_real.py.)"""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from hf_efficient_attn.attention.mla import LlamaMLAForCausalLM, MLAAttention, latent_cache
from hf_efficient_attn.conversions import convert, load, save
from hf_efficient_attn.conversions.mla import mla_ranks
from hf_efficient_attn.eval import kv_cache_bytes
from hf_efficient_attn.eval.cost import _cache_kwarg
from tests.tiny_models import make_model
from tests.tolerances import assert_close_rms

from .conftest import random_ids


def tiny_llama(num_kv_heads=2, head_dim=8, layers=2):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=6, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                                   max_position_embeddings=128, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("num_kv_heads", [1, 2, 6])     # MQA, GQA, MHA
@pytest.mark.parametrize("method", ["weights", "activations", "attention"])
def test_full_rank_reproduces_the_logits(num_kv_heads, method):
    model = tiny_llama(num_kv_heads)
    lim = mla_ranks(model)
    rope_dim = lim["max_rope_dim"]                  # every RoPE plane kept (MQA: the head dim)
    new = convert(model, "mla", kv_lora_rank=lim["full_rank"](rope_dim), rope_dim=rope_dim, method=method,
                  calibration=random_ids(4, 16))
    assert isinstance(new, LlamaMLAForCausalLM)
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in new.model.layers)
    ids = random_ids(2, 20)
    diff = (logits(new, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-3, diff
    assert diff <= 1e-5, f"fp32 full-rank MLA should be exact to rounding, got {diff}"


def test_latent_factors_are_balanced():
    """Each latent dim's down row and up column have one norm, so a heal's optimizer moves both by similar fractions."""
    new = convert(tiny_llama(2), "mla", kv_lora_rank=12, rope_dim=6, method="attention", calibration=random_ids(8, 24))
    for layer in new.model.layers:
        down, up = layer.self_attn.kv_a_proj.weight, layer.self_attn.kv_b_proj.weight
        torch.testing.assert_close(down.norm(dim=1), up.norm(dim=0), rtol=1e-4, atol=0)


def test_full_rank_at_the_head_dim_is_exact_for_mqa_only_when_all_planes_fit():
    """d_r = D keeps every plane of an MQA model, so it is exact there."""
    model = tiny_llama(1)
    new = convert(model, "mla", kv_lora_rank=8, rope_dim=8, method="weights")
    ids = random_ids(2, 20)
    assert (logits(new, ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_lower_ranks_lose_more_and_the_input_model_is_untouched():
    model = tiny_llama(2)
    before = copy.deepcopy(model.state_dict())
    ids = random_ids(2, 20)
    ref = logits(model, ids)
    errs = [(logits(convert(model, "mla", kv_lora_rank=r, rope_dim=dr, method="activations",
                            calibration=random_ids(8, 24)), ids) - ref).pow(2).mean().item()
            for r, dr in [(16, 16), (12, 8), (4, 4)]]
    assert errs[0] < errs[1] < errs[2], errs
    assert type(model) is transformers.LlamaForCausalLM
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="module")
def lossy():
    model = tiny_llama(2)
    return model, convert(model, "mla", kv_lora_rank=12, rope_dim=6, method="activations",
                          calibration=random_ids(8, 24))


def _decode_logits(model, ids, steps=4, mask=None):
    """Prefill ids[:, :-steps] with a cache, then feed the last `steps` tokens one at a time."""
    out = model(input_ids=ids[:, :-steps], attention_mask=None if mask is None else mask[:, :-steps], use_cache=True)
    cache, got = out.past_key_values, [out.logits[:, -1]]
    for i in range(steps, 0, -1):
        m = None if mask is None else mask[:, : ids.shape[1] - i + 1]
        out = model(input_ids=ids[:, -i:ids.shape[1] - i + 1], attention_mask=m, use_cache=True,
                    **{_cache_kwarg(model): cache})      # `cache` from transformers 5.24, `past_key_values` before
        cache = out.past_key_values
        got.append(out.logits[:, -1])
    return torch.stack(got, 1), cache


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_absorbed_decode_equals_expanded_decode_and_no_cache(lossy, attn):
    _, new = lossy
    new = copy.deepcopy(new)
    new.set_attn_implementation(attn)
    ids = random_ids(2, 18)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                  # a left-padded row
    with torch.no_grad():
        absorbed, cache = _decode_logits(new, ids, mask=mask)
        for layer in new.model.layers:
            layer.self_attn.decode_mode = "expanded"
        expanded, _ = _decode_logits(new, ids, mask=mask)
        full = new(input_ids=ids, attention_mask=mask).logits[:, -5:]
    assert_close_rms(absorbed, expanded, torch.float32, name="absorbed vs expanded")
    assert_close_rms(absorbed[1], full[1], torch.float32, name="decode vs one forward")
    latent, k_rope = latent_cache(cache, 0)
    assert latent.shape == (2, 18, 12) and k_rope.shape == (2, 18, 6)


def test_greedy_generation_with_the_latent_cache_equals_no_cache(lossy):
    _, new = lossy
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        cached = new.generate(ids, use_cache=True, **kw)
        uncached = new.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_from_the_real_cache_match_the_formula(lossy, dtype):
    model, new = lossy
    new = copy.deepcopy(new).to(dtype)
    layers, r, dr = new.config.num_hidden_layers, new.config.kv_lora_rank, new.config.mla_rope_dim
    per_token = (r + dr) * layers * dtype.itemsize
    assert kv_cache_bytes(new, tokens=33) == 33 * per_token
    original = kv_cache_bytes(model, tokens=33) // 33
    assert original == 2 * 2 * 8 * layers * 4 and per_token * 4 / dtype.itemsize < original


def test_save_load_round_trip_and_stock_transformers_refuses(tmp_path, lossy):
    _, new = lossy
    path = save(new, tmp_path / "mla")
    back = load(path)
    ids = random_ids(2, 16)
    assert type(back) is LlamaMLAForCausalLM
    assert torch.equal(logits(back, ids), logits(new, ids))
    assert back.hfa_conversions[-1]["conversion"] == "mla"
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
    assert "refused:" in out.stdout and "hfa_mla_llama" in out.stdout, (out.stdout, out.stderr[-2000:])


@pytest.mark.triton_interpret
def test_triton_decode_path_in_the_module(lossy):
    _, new = lossy
    new = copy.deepcopy(new)
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref, _ = _decode_logits(new, ids, steps=2)
        for layer in new.model.layers:
            layer.self_attn.decode_backend = "triton"
        got, _ = _decode_logits(new, ids, steps=2)
    assert_close_rms(got, ref, torch.float32, tol=1e-5, name="triton decode")


def test_errors(lossy):
    model, _ = lossy                                     # Hkv 2, D 8: rope_dim <= 16, rank <= 32 - rope_dim
    with pytest.raises(ValueError, match="even number from 2 to 16"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=5)
    with pytest.raises(ValueError, match="even number from 2 to 16"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=18)
    with pytest.raises(ValueError, match="from 1 to 28.*28 is lossless"):
        convert(model, "mla", kv_lora_rank=29, rope_dim=4)
    with pytest.raises(ValueError, match="from 1 to 28"):
        convert(model, "mla", kv_lora_rank=0, rope_dim=4)
    with pytest.raises(TypeError, match="kv_lora_rank must be an integer"):
        convert(model, "mla", kv_lora_rank=8.0, rope_dim=4)
    with pytest.raises(ValueError, match="unknown MLA method"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=4, method="svd")
    with pytest.raises(ValueError, match="method='activations'.*calibration"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=4, method="activations")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=4, calibration="some text")
    with pytest.raises(TypeError, match="unknown option.*'rank'"):
        convert(model, "mla", rank=8, rope_dim=4)
    # Qwen3 is supported since the family table (tests/conversions/test_mla_qwen3.py); Mistral is not listed for MLA
    with pytest.raises(ValueError, match="'mistral'.*supported: llama, qwen3, gemma3_text"):
        convert(make_model("mistral"), "mla", kv_lora_rank=8, rope_dim=4)
    with pytest.raises(ValueError, match="does not support model_type 'gpt_neox'"):
        convert(make_model("gpt_neox"), "mla", kv_lora_rank=8, rope_dim=4)


def test_expected_rotation_is_exact_when_every_plane_is_kept_and_changes_dropped_planes_only():
    model = tiny_llama(2)
    ids = random_ids(2, 20)
    lim = mla_ranks(model)
    full = convert(model, "mla", kv_lora_rank=lim["full_rank"](16), rope_dim=16, method="weights",
                   dropped_rope="expected")
    assert (logits(full, ids) - logits(model, ids)).abs().max().item() <= 1e-5
    keep, expected = (convert(model, "mla", kv_lora_rank=28, rope_dim=4, method="weights", dropped_rope=d)
                      for d in ("keep", "expected"))
    assert not torch.allclose(logits(keep, ids), logits(expected, ids))
    with pytest.raises(ValueError, match="dropped_rope='spin'"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=4, dropped_rope="spin")


def test_rotation_ranking_keeps_the_planes_that_turn_most():
    from hf_efficient_attn.conversions.mla import mla_layer, rotation_weight

    w = rotation_weight(torch.tensor([0.0, 1e-6, torch.pi], dtype=torch.float64), 100)
    assert w[0] == 0 and w[1] < 1e-3 and abs(w[2] - 1.0) < 1e-9          # t even: no turn, t odd: chord 2
    # one head, planes of equal energy: the norms tie, so plane_weight alone decides
    eye = torch.eye(8, dtype=torch.float64).reshape(1, 8, 8)
    lay = mla_layer(eye, eye, eye, torch.eye(8, dtype=torch.float64), 8, 8, 4, "weights",
                    plane_weight=torch.tensor([0.1, 0.5, 0.2, 0.9]))
    assert lay["frequencies"].tolist() == [1, 3]
    model = tiny_llama(2)
    ids = random_ids(2, 20)
    full = convert(model, "mla", kv_lora_rank=16, rope_dim=16, method="weights", rope_ranking="rotation")
    assert (logits(full, ids) - logits(model, ids)).abs().max().item() <= 1e-5
    assert full.hfa_conversions[-1]["rope_ranking"] == "rotation"
    with pytest.raises(ValueError, match="rope_ranking='speed'"):
        convert(model, "mla", kv_lora_rank=8, rope_dim=4, rope_ranking="speed")
