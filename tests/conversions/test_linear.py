"""Softmax -> linear attention: the lossless setting reproduces the model, the cache decodes exactly and stays
the same size, padding and kept-softmax layers work, save/load is bit-exact, both distillation stages train
what they should, and bad input is refused by name."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.linear import (
    FEATURE_MAPS,
    LinearAttention,
    LinearAttentionCacheLayer,
    key_padding,
    make_feature_map,
)
from hf_efficient_attn.conversions import token_blocks
from hf_efficient_attn.conversions.distill import logits_loss
from hf_efficient_attn.conversions.linear import attention_transfer_loss, linear_layers
from hf_efficient_attn.eval import kv_cache_bytes
from tests.conversions.conftest import TEXTS, random_ids
from tests.tiny_models import make_model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def no_sliding(model):
    """The same weights with the sliding window switched off (the linear model's masks are full)."""
    model = copy.deepcopy(model)
    model.config.sliding_window = None
    model.config.use_sliding_window = False
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    if hasattr(model.model, "has_sliding_layers"):
        model.model.has_sliding_layers = False
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_a_window_over_everything_reproduces_the_model(family):
    model = make_model(family, attn="sdpa")
    ids = random_ids(2, 20)
    new = hfa.convert(model, "linear", window=64)
    assert all(isinstance(layer.self_attn, LinearAttention) for layer in new.model.layers)
    diff = (logits(new, ids) - logits(no_sliding(model), ids)).abs().max().item()
    assert diff <= 1e-4, diff
    assert not any(isinstance(m, LinearAttention) for m in model.modules())      # the original is untouched


@pytest.mark.parametrize("window", [0, 1, 4])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_decoding_equals_one_forward_pass(family, window):
    new = hfa.convert(make_model(family, attn="sdpa"), "linear", window=window, feature_map="hedgehog")
    _perturb_linear(new)
    ids = random_ids(2, 19)
    full = logits(new, ids)
    out = new(input_ids=ids[:, :11], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    with torch.no_grad():
        for t in range(11, 19, 3):                 # chunks of 3 new tokens, then the cache serves them
            out = new(input_ids=ids[:, t:t + 3], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == 19
    assert all(isinstance(layer, LinearAttentionCacheLayer) for layer in cache.layers)


def _perturb_linear(model, seed=0):
    """Feature maps and mix away from their initial values (identity, 0.5), so nothing special hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "feature_map" in name or "window_factor" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("window", [0, 4])
def test_greedy_generate_with_cache_equals_without(window):
    new = hfa.convert(make_model("llama"), "linear", window=window)
    _perturb_linear(new)
    ids = random_ids(2, 7)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = new.generate(ids, use_cache=True, **kw)
        uncached = new.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_the_cache_does_not_grow_with_the_context():
    model = make_model("llama")
    new = hfa.convert(model, "linear", window=4)
    sizes = [kv_cache_bytes(new, tokens=n) for n in (8, 40, 120)]
    assert sizes[0] == sizes[1] == sizes[2] > 0
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    f = 2 * d                                                   # hedgehog: [softmax(xW), softmax(-xW)]
    per_layer = 4 * (hkv * f * d + hkv * f) + 4 * 2 * hkv * 3 * d   # fp32 state + normaliser, 3 window keys + values
    assert sizes[0] == cfg.num_hidden_layers * per_layer
    grows = [kv_cache_bytes(model, tokens=n) for n in (8, 40)]
    assert grows[1] == 5 * grows[0]


def test_left_padded_rows_equal_rows_alone():
    new = hfa.convert(make_model("llama", attn="sdpa"), "linear", window=3)
    _perturb_linear(new)
    a, b = random_ids(1, 14, seed=3), random_ids(1, 9, seed=4)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)     # as generate does: feature maps see absolute positions
    with torch.no_grad():
        both = new(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        gen = new.generate(batch, attention_mask=mask, **kw)
        gen_b = new.generate(b, **kw)
    torch.testing.assert_close(both[0], logits(new, a)[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(both[1, 5:], logits(new, b)[0], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen[1, 5:], gen_b[0])


def test_kept_softmax_layers_stay_softmax_and_decode():
    model = make_model("qwen3", attn="sdpa")
    new = hfa.convert(model, "linear", window=2, layers=[1])
    assert isinstance(new.model.layers[0].self_attn, LinearAttention)
    assert type(new.model.layers[1].self_attn) is type(model.model.layers[1].self_attn)
    ids = random_ids(1, 12)
    full = logits(new, ids)
    out = new(input_ids=ids[:, :8], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(8, 12):
        out = new(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1).detach(), full, atol=2e-5, rtol=1e-4)
    assert cache.layers[1].keys.shape[2] == 12                        # the softmax layer's cache grows


def test_chunked_path_equals_the_quadratic_one(monkeypatch):
    import hf_efficient_attn.attention.linear as lin

    for window in (0, 5):
        new = hfa.convert(make_model("llama"), "linear", window=window)
        _perturb_linear(new)
        ids = random_ids(2, 40)
        ref = logits(new, ids)
        monkeypatch.setattr(lin, "QUADRATIC_LIMIT", 0)             # every call takes the chunked form
        torch.testing.assert_close(logits(new, ids), ref, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()


def test_save_load_round_trip_and_stock_transformers_refuses(tmp_path):
    new = hfa.convert(make_model("qwen3"), "linear", window=3, layers=[0])
    _perturb_linear(new)
    path = hfa.save(new, tmp_path / "linear")
    back = hfa.load(path)
    ids = random_ids(2, 15)
    assert type(back) is type(new) and back.config.hfa_linear == new.config.hfa_linear
    assert torch.equal(logits(back, ids), logits(new, ids))
    assert back.hfa_conversions[-1]["conversion"] == "linear"
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(path)!r})
        except (ValueError, KeyError) as e:
            print("refused:", str(e)[:300])
        else:
            print("LOADED")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "refused:" in out.stdout and "hfa_linear_qwen3" in out.stdout, (out.stdout, out.stderr[-2000:])


# -- distillation ------------------------------------------------------------------------------------------

def test_attention_transfer_trains_only_the_feature_maps_and_lowers_the_error(tok):
    teacher = make_model("llama")
    new = hfa.convert(teacher, "linear", window=2)
    before = {n: p.detach().clone() for n, p in new.named_parameters()}
    ids = torch.tensor(tok(TEXTS[0])["input_ids"][:32])[None]
    start, _ = attention_transfer_loss(new, teacher, ids)
    res = hfa.distill(new, teacher, TEXTS, tokenizer=tok, stage="attention", max_tokens=32 * 2 * 12, seq_len=32,
                      batch_size=2, lr=3e-2, progress=False)
    end, metrics = attention_transfer_loss(new, teacher, ids)
    assert end < 0.7 * start and set(metrics) == {"attention_mse"}
    changed = {n for n, p in new.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("feature_map" in n or "window_factor" in n for n in changed), changed
    assert len(res.losses) == 12 and new.hfa_conversions[-1]["trainable"] == "feature_maps"


def test_logits_stage_with_lora_after_the_transfer(tok):
    teacher = make_model("llama")
    with torch.no_grad():                  # sharp attention, so the elu map leaves a real gap for LoRA to close
        for layer in teacher.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight.mul_(10)
    new = hfa.convert(teacher, "linear", window=2, feature_map="elu")
    hfa.distill(new, teacher, TEXTS, tokenizer=tok, stage="attention", max_tokens=32 * 2 * 2, seq_len=32,
                batch_size=2, progress=False)
    q_before = new.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = token_blocks(tok, TEXTS[0], 32, 10 ** 6)                 # full batch: every step sees these blocks
    kl_before, _ = logits_loss(new, teacher, ids)
    hfa.distill(new, teacher, TEXTS[0], tokenizer=tok, stage="logits", trainable="lora", max_tokens=ids.numel() * 8,
                seq_len=32, batch_size=len(ids), lr=3e-3, progress=False)
    kl_after, _ = logits_loss(new, teacher, ids)
    assert not torch.equal(new.model.layers[0].self_attn.q_proj.weight, q_before)    # LoRA merged in
    assert type(new.model.layers[0].self_attn) is LinearAttention                      # peft unwrapped
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)


def test_attention_stage_refuses_a_softmax_student(tok):
    teacher = make_model("llama")
    student = hfa.convert(teacher, "gqa", num_kv_heads=1, method="mean")
    with pytest.raises(ValueError, match="stage='attention' is layer-by-layer attention transfer.*stage='logits'"):
        hfa.distill(student, teacher, TEXTS, tokenizer=tok, stage="attention", max_tokens=256, seq_len=32,
                    batch_size=2, progress=False)


# -- pieces and errors --------------------------------------------------------------------------------------

def test_feature_maps():
    x = torch.randn(2, 3, 5, 8)
    hh = make_feature_map("hedgehog", 3, 8)
    phi = hh(x)
    assert phi.shape == (2, 3, 5, 16) and (phi > 0).all()
    torch.testing.assert_close(phi.sum(-1), torch.full((2, 3, 5), 2.0))
    torch.testing.assert_close(phi[..., :8], torch.softmax(x, -1))         # identity start
    assert make_feature_map("hedgehog", 3, 8, feature_dim=4)(x).shape[-1] == 8
    assert (make_feature_map("elu", 3, 8)(x) > 0).all() and (make_feature_map("relu", 3, 8)(x) >= 0).all()
    assert set(FEATURE_MAPS) == {"hedgehog", "elu", "relu"}
    with pytest.raises(ValueError, match="unknown feature_map 'cos'"):
        make_feature_map("cos", 3, 8)


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_baseline_feature_maps_convert_and_decode(feature_map):
    new = hfa.convert(make_model("llama"), "linear", window=0, feature_map=feature_map)
    ids = random_ids(1, 10)
    assert torch.isfinite(logits(new, ids)).all()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(new.generate(ids, use_cache=True, **kw), new.generate(ids, use_cache=False, **kw))


def test_key_padding_reads_every_mask_form():
    assert key_padding(None, 4) is None
    pad = torch.tensor([[False, True, True, True]])
    assert torch.equal(key_padding(pad.long(), 4), pad)
    causal = torch.ones(4, 4, dtype=torch.bool).tril() & pad[:, None, :]
    assert torch.equal(key_padding(causal[:, None], 4), pad)
    additive = torch.where(causal, 0.0, torch.finfo(torch.float32).min)[:, None]
    assert key_padding(additive, 3) is None                    # the last 3 keys are all real: no mask needed
    assert torch.equal(key_padding(additive, 4), pad)


def test_cache_layer_cannot_be_cropped_or_updated():
    layer = LinearAttentionCacheLayer(window=4)
    with pytest.raises(ValueError, match="cannot be cropped"):
        layer.crop(-2)
    with pytest.raises(RuntimeError, match="LinearAttention module"):
        layer.update(torch.zeros(1), torch.zeros(1))


def test_bad_options_name_the_problem():
    model = make_model("llama")
    with pytest.raises(ValueError, match="does not support model_type 'gpt_neox'"):
        hfa.convert(make_model("gpt_neox"), "linear")
    with pytest.raises(ValueError, match="unknown feature_map"):
        hfa.convert(model, "linear", feature_map="cosformer")
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        hfa.convert(model, "linear", window=-1)
    with pytest.raises(ValueError, match="must lie in 0 .. 1"):
        hfa.convert(model, "linear", layers=[2])
    with pytest.raises(ValueError, match="layers must be a list"):
        hfa.convert(model, "linear", layers=0)
    with pytest.raises(ValueError, match="nothing to convert"):
        hfa.convert(model, "linear", layers=[0, 1])
    with pytest.raises(TypeError, match="unknown option"):
        hfa.convert(model, "linear", windw=3)
    new = hfa.convert(model, "linear", window=2)
    out = new(input_ids=random_ids(1, 6), use_cache=True)
    with pytest.raises(ValueError, match="cannot be cropped"):
        out.past_key_values.crop(-1)
    assert len(linear_layers(new)) == 2


@pytest.mark.triton_interpret
def test_triton_backend_in_the_module_pure_linear():
    """window=0 layers on the chunked Triton kernels (forward, backward, the fused decode step) equal PyTorch."""
    new = hfa.convert(make_model("llama"), "linear", window=0)
    _perturb_linear(new)
    ids = random_ids(2, 21)
    ref = logits(new, ids)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref_gen = new.generate(ids[:, :9], **kw)
    loss_ref = new(input_ids=ids, labels=ids).loss
    grads_ref = torch.autograd.grad(loss_ref, [new.model.layers[0].self_attn.feature_map_k.weight])
    for layer in linear_layers(new).values():
        layer.backend = "triton"
    torch.testing.assert_close(logits(new, ids), ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(new.generate(ids[:, :9], **kw), ref_gen)
    loss = new(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [new.model.layers[0].self_attn.feature_map_k.weight])
    torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-6, rtol=1e-4)


@pytest.mark.triton_interpret
def test_triton_backend_in_the_module_hybrid():
    """window>0 layers on the Triton hybrid kernel (forward, backward, decoding from the cache) equal PyTorch."""
    new = hfa.convert(make_model("qwen3"), "linear", window=4)
    _perturb_linear(new)
    ids = random_ids(2, 13)
    ref = logits(new, ids)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    ref_gen = new.generate(ids[:, :7], **kw)
    params = [new.model.layers[0].self_attn.feature_map_q.weight, new.model.layers[1].self_attn.window_factor]
    grads_ref = torch.autograd.grad(new(input_ids=ids, labels=ids).loss, params)
    for layer in linear_layers(new).values():
        layer.backend = "triton"
    torch.testing.assert_close(logits(new, ids), ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(new.generate(ids[:, :7], **kw), ref_gen)
    grads = torch.autograd.grad(new(input_ids=ids, labels=ids).loss, params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_triton_exports_load_lazily():
    import hf_efficient_attn.kernels.linear as kl

    assert callable(kl.hybrid_attention_triton) and callable(kl.linear_attention_step_triton)
    with pytest.raises(AttributeError):
        kl.no_such_kernel
