"""GQA conversion on tiny models of every supported family: exactness of every lossless step, the pooling
arithmetic, the errors, and that the input model is never touched."""

import copy

import pytest
import torch
import transformers

from hf_efficient_attn.conversions import convert, expand_kv_heads
from hf_efficient_attn.conversions.gqa import (FAMILIES, RotationSpace, _heads, _map_rows, attention_layers,
                                               family_of, key_rotation_space, merge_kv_heads, permute_kv_heads,
                                               plan_layer, rotary_dim, rotate_keys, rotate_values, transform_heads,
                                               value_rotation_space)
from hf_efficient_attn.eval.cost import kv_cache_bytes
from tests.conversions.conftest import TEXTS, char_tokenizer, random_ids
from tests.tiny_models import make_model
from tests.tolerances import assert_close_rms

GQA_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]


def tiny(family, dtype=torch.float32, **overrides):
    """A tiny random model; families not in tests/tiny_models (gemma, phi3 with partial RoPE) built here."""
    if family == "gemma":
        cfg = transformers.GemmaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, pad_token_id=0)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = transformers.GemmaForCausalLM(cfg).to(dtype).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return model
    if family == "phi3_partial":
        cfg = transformers.Phi3Config(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        return transformers.Phi3ForCausalLM(cfg).to(dtype).eval()
    return make_model(family, dtype=dtype)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_rotations(model, layer, kind, seed):
    """One random allowed rotation per KV head: (Hkv, D, D)."""
    _, hkv, d = _heads(model)
    space = key_rotation_space(model, layer) if kind == "keys" else value_rotation_space(d)
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([space.random(gen) for _ in range(hkv)])


def make_norms_plane_isotropic(model):
    """Give q_norm/k_norm equal weights on both dims of every RoPE plane (so key rotations commute with them)."""
    r = rotary_dim(model)
    with torch.no_grad():
        for attn in attention_layers(model):
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight[r // 2: r] = norm.weight[: r // 2]


# -- every lossless step reproduces the logits ---------------------------------------------------------

@pytest.mark.parametrize("method", ["mean", "aligned"])
@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_same_number_of_kv_heads_is_exact(family, method):
    model = tiny(family)
    ids = random_ids()
    _, hkv, _ = _heads(model)
    new = convert(model, "gqa", num_kv_heads=hkv, method=method, calibration=ids)
    assert new is not model
    assert torch.equal(logits(new, ids), logits(model, ids))


@pytest.mark.parametrize("step", ["keys", "values", "permute"])
@pytest.mark.parametrize("family", [*GQA_FAMILIES, "phi3_partial"])
def test_each_alignment_step_alone_is_exact(family, step):
    model = tiny(family)
    if _heads(model)[1] == 1:                            # mistral, gemma3: give the step two heads to act on
        model = expand_kv_heads(model, 2)
    if family_of(model).qk_norm:
        make_norms_plane_isotropic(model)
    ids = random_ids()
    _, hkv, _ = _heads(model)
    if step == "keys":
        assert key_rotation_space(model, 0).planes, "no key rotation to test"
        surgery = lambda i, w: rotate_keys(w, random_rotations(model, i, "keys", seed=i))
    elif step == "values":
        surgery = lambda i, w: rotate_values(w, random_rotations(model, i, "values", seed=i))
    else:
        surgery = lambda i, w: permute_kv_heads(w, list(reversed(range(hkv))))
    new = transform_heads(model, surgery, hkv)
    changed = [n for n, p in new.named_parameters() if not torch.equal(p, model.state_dict()[n])]
    assert changed, "the step changed no weight: nothing was tested"
    assert_close_rms(logits(new, ids), logits(model, ids), dtype=torch.float32, name=f"{family} {step}")


def test_rotations_exact_to_float64_precision():
    model = tiny("qwen2", dtype=torch.float64)          # biases on q/k/v follow the rotations too
    ids = random_ids()
    surgery = lambda i, w: rotate_values(rotate_keys(w, random_rotations(model, i, "keys", i)),
                                         random_rotations(model, i, "values", i + 7))
    new = transform_heads(model, surgery, _heads(model)[1])
    assert_close_rms(logits(new, ids), logits(model, ids), dtype=torch.float64)


def test_phi3_partial_rope_rotates_the_non_rotary_dims_freely():
    model = tiny("phi3_partial")
    space = key_rotation_space(model, 0)
    d = attention_layers(model)[0].head_dim
    assert rotary_dim(model) == d // 2 and len(space.planes) == d // 4 and space.free == tuple(range(d // 2, d))


def test_qk_norm_limits_key_rotations_to_planes_where_the_norm_is_isotropic():
    """Why Qwen3/Gemma3 key rotations are restricted: with a non-isotropic shared k_norm a plane rotation
    does not commute with the norm and changes the logits; the allowed space excludes those planes."""
    model = tiny("qwen3")
    assert key_rotation_space(model, 0).planes == ()            # perturbed norms: no plane is isotropic
    d, r = attention_layers(model)[0].head_dim, rotary_dim(model)
    unrestricted = RotationSpace(d, planes=tuple((f, f + r // 2) for f in range(r // 2)))
    gen = torch.Generator().manual_seed(0)
    rot = torch.stack([unrestricted.random(gen) for _ in range(_heads(model)[1])])
    new = transform_heads(model, lambda i, w: rotate_keys(w, rot), _heads(model)[1])
    ids = random_ids()
    ref = logits(model, ids)
    assert (logits(new, ids) - ref).norm() / ref.norm() > 1e-4
    make_norms_plane_isotropic(model)
    assert len(key_rotation_space(model, 0).planes) == r // 2


def test_best_rotation_is_optimal_in_its_space():
    gen = torch.Generator().manual_seed(0)
    space = RotationSpace(8, planes=((0, 2), (1, 3)), free=(4, 5, 6, 7))
    m = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    best = space.best(m)
    assert torch.allclose(best.T @ best, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert torch.equal(best[:4, 4:], torch.zeros(4, 4, dtype=torch.float64))   # stays inside its space
    gain = lambda r: (r * m).sum().item()
    assert all(gain(best) >= gain(space.random(gen)) - 1e-12 for _ in range(200))
    theta = torch.linspace(-3.14159, 3.14159, 2001, dtype=torch.float64)      # plane (0, 2) by brute force
    c, s = theta.cos(), theta.sin()
    brute = (c * (m[0, 0] + m[2, 2]) + s * (m[2, 0] - m[0, 2])).max()
    assert abs(brute.item() - (best[[0, 2]][:, [0, 2]] * m[[0, 2]][:, [0, 2]]).sum().item()) < 1e-5


# -- pooling ------------------------------------------------------------------------------------------

def test_mean_pooling_matches_a_hand_computation():
    model = tiny("qwen2")                               # 4 query / 2 KV heads, head_dim 12, q/k/v biases
    new = convert(model, "gqa", num_kv_heads=1, method="mean")
    for old, got in zip(attention_layers(model), attention_layers(new)):
        d = old.head_dim
        for proj in ("k_proj", "v_proj"):
            w, b = getattr(old, proj).weight, getattr(old, proj).bias
            assert torch.allclose(getattr(got, proj).weight, (w[:d] + w[d:]) / 2, atol=1e-7)
            assert torch.allclose(getattr(got, proj).bias, (b[:d] + b[d:]) / 2, atol=1e-7)
        assert torch.equal(got.q_proj.weight, old.q_proj.weight) and torch.equal(got.o_proj.weight, old.o_proj.weight)
        assert got.num_key_value_groups == 4
    assert new.config.num_key_value_heads == 1 and model.config.num_key_value_heads == 2


def test_mean_pooling_of_phi3_fused_qkv():
    model = tiny("phi3")
    new = convert(model, "gqa", num_kv_heads=1, method="mean")
    old, got = attention_layers(model)[0], attention_layers(new)[0]
    d, hq = old.head_dim, 4
    q, k0, k1, v0, v1 = old.qkv_proj.weight.split([hq * d, d, d, d, d])
    assert torch.allclose(got.qkv_proj.weight, torch.cat([q, (k0 + k1) / 2, (v0 + v1) / 2]), atol=1e-7)
    assert got.num_key_value_heads == 1


@pytest.mark.parametrize("method", ["mean", "aligned", "pca"])
@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_converted_model_runs_generates_and_its_cache_shrinks_exactly(family, method):
    model = tiny(family)
    hq, hkv, _ = _heads(model)
    before = copy.deepcopy(model.state_dict())
    new = convert(model, "gqa", num_kv_heads=1, method=method, calibration=random_ids(8, 32))
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items()), "the input model was modified"
    assert type(new) is type(model) and new.config.model_type == model.config.model_type
    assert new.config.num_key_value_heads == 1 and model.config.num_key_value_heads == hkv
    ids = random_ids(2, 10)
    assert torch.isfinite(logits(new, ids)).all()
    out = new.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 14)
    # bytes per added token (constant bookkeeping tensors cancel), inside the sliding windows (6)
    per_token = lambda m: kv_cache_bytes(m, tokens=6) - kv_cache_bytes(m, tokens=4)
    assert per_token(new) * hkv == per_token(model) > 0


def test_aligned_reads_text_through_the_tokenizer():
    model = tiny("llama")
    new = convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=TEXTS, tokenizer=char_tokenizer(),
                  seq_len=32)
    rec = new.hfa_conversions[-1]
    assert rec["conversion"] == "gqa" and rec["method"] == "aligned" and rec["calibration_tokens"] > 0
    assert rec["energy_lost"]["keys_aligned"] <= rec["energy_lost"]["keys_mean"] + 1e-9
    assert rec["energy_lost"]["values_aligned"] <= rec["energy_lost"]["values_mean"] + 1e-9


def _complex_scale_maps(model, layer, gen, heads):
    """Per head, a random rotation-and-scale in every RoPE plane (commutes with RoPE; not orthogonal): (H, D, D)."""
    d, r = attention_layers(model)[layer].head_dim, rotary_dim(model)
    maps = torch.zeros(heads, d, d, dtype=torch.float64)
    i, j = torch.arange(r // 2), torch.arange(r // 2, r)
    for m in maps:
        re, im = torch.randn(2, r // 2, generator=gen, dtype=torch.float64)
        m[i, i], m[i, j], m[j, i], m[j, j] = re, im, -im, re
    return maps


@pytest.mark.parametrize("transforms", ["rotations", "general"])
def test_merges_recover_hidden_copies(transforms):
    """An exact MHA model whose 6 KV heads are transformed copies of 2 heads, shuffled. With orthogonal
    transforms (keys: rotations in RoPE planes, values: any) aligned and pca 6 -> 2 both find the copies and
    recover the original logits; with general ones (keys: rotation and scale per plane, values: any
    invertible map; q and o_proj compensate exactly) only pca does. Mean pooling never does."""
    model = tiny("llama", dtype=torch.float64)          # 6 query / 2 KV heads
    mha = expand_kv_heads(model, 6)
    gen = torch.Generator().manual_seed(3)
    d = attention_layers(model)[0].head_dim
    shuffle = [4, 0, 3, 5, 1, 2]

    def scramble(i, w):
        if transforms == "rotations":
            ks, vs = key_rotation_space(mha, i), value_rotation_space(d)
            w = rotate_keys(w, torch.stack([ks.random(gen) for _ in range(6)]))
            w = rotate_values(w, torch.stack([vs.random(gen) for _ in range(6)]))
        else:   # k -> k S, q -> q S^-T; v -> v M, o -> o M^-T: every score and output is unchanged
            s = _complex_scale_maps(mha, i, gen, 6)
            m = torch.randn(6, d, d, generator=gen, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
            k_w, k_b = _map_rows(w.k_w, w.k_b, s)
            q_w, q_b = _map_rows(w.q_w, w.q_b, torch.linalg.inv(s).transpose(1, 2))   # G = 1: one query per KV head
            v_w, v_b = _map_rows(w.v_w, w.v_b, m)
            o_w = torch.einsum("chd,hed->che", w.o_w, torch.linalg.inv(m))
            w = type(w)(q_w=q_w, k_w=k_w, v_w=v_w, o_w=o_w, q_b=q_b, k_b=k_b, v_b=v_b)
        return permute_kv_heads(w, shuffle)

    scrambled = transform_heads(mha, scramble, 6)
    ids = random_ids(3, 20, seed=4)
    ref = logits(model, ids)
    assert_close_rms(logits(scrambled, ids), ref, tol=1e-9)                      # still exact
    calibration = random_ids(16, 32, seed=5)
    err = {m: (logits(convert(scrambled, "gqa", num_kv_heads=2, method=m, calibration=calibration), ids) - ref).norm()
           .item() / ref.norm().item() for m in ("mean", "aligned", "pca")}
    assert err["pca"] < 1e-8 and err["mean"] > 1e-2, err
    assert (err["aligned"] < 1e-8) == (transforms == "rotations"), err
    pca = convert(scrambled, "gqa", num_kv_heads=2, method="pca", calibration=calibration)
    copies = [[h for h in range(6) if shuffle[h] // 3 == j] for j in range(2)]  # new index h holds copy of shuffle[h]
    assert sorted(map(sorted, pca.hfa_conversions[-1]["groups"][0])) == sorted(copies)


def test_plan_prefers_similar_heads_in_a_group():
    d, n = 4, 64
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, 2, d, generator=gen, dtype=torch.float64)
    x = torch.stack([base[:, 0], base[:, 1], base[:, 0] + 1e-3, base[:, 1] - 1e-3], 1).reshape(n, 4 * d)
    moments = x.T @ x
    plan = plan_layer(moments, moments, 2, RotationSpace(d))
    assert plan.order == [0, 2, 1, 3]


def test_expand_kv_heads_is_exact():
    model = tiny("mistral")                              # 4 query / 1 KV head
    mha = expand_kv_heads(model, 4)
    assert mha.config.num_key_value_heads == 4
    ids = random_ids()
    assert_close_rms(logits(mha, ids), logits(model, ids), dtype=torch.float32)
    back = convert(mha, "gqa", num_kv_heads=1, method="mean")    # pooling identical copies undoes it
    assert_close_rms(logits(back, ids), logits(model, ids), dtype=torch.float32)


# -- errors -------------------------------------------------------------------------------------------

def test_bad_num_kv_heads_errors_name_the_fix():
    model = tiny("llama")                                 # 2 KV heads
    with pytest.raises(ValueError, match="expand_kv_heads"):
        convert(model, "gqa", num_kv_heads=3, method="mean")
    with pytest.raises(ValueError, match=r"must divide the model's 6 KV heads; choose one of \[1, 2, 3, 6\]"):
        convert(expand_kv_heads(model, 6), "gqa", num_kv_heads=4, method="mean")
    with pytest.raises(ValueError, match="must divide"):
        convert(model, "gqa", num_kv_heads=0, method="mean")
    with pytest.raises(TypeError, match="integer"):
        convert(model, "gqa", num_kv_heads=1.0, method="mean")
    with pytest.raises(ValueError, match="unknown GQA method 'median'"):
        convert(model, "gqa", num_kv_heads=1, method="median")
    with pytest.raises(ValueError, match="calibration=<text>"):
        convert(model, "gqa", num_kv_heads=1, method="aligned")


def test_unsupported_layouts_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="GPT-NeoX .* no num_key_value_heads"):
        convert(make_model("gpt_neox"), "gqa", num_kv_heads=1, method="mean")
    with pytest.raises(ValueError, match="does not support model_type 'bert'.*supported: llama"):
        convert(make_model("bert"), "gqa", num_kv_heads=1, method="mean")
    assert set(FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


def test_convert_dispatch_errors_name_the_accepted_choices():
    model = tiny("llama")
    with pytest.raises(ValueError, match="unknown conversion 'gqq'; the conversions are: gqa"):
        convert(model, "gqq", num_kv_heads=1)
    with pytest.raises(TypeError, match="unknown option\\(s\\) 'num_heads'.*accepts: num_kv_heads, method"):
        convert(model, "gqa", num_heads=1)
    with pytest.raises(TypeError, match="needs option\\(s\\) 'num_kv_heads'"):
        convert(model, "gqa", method="mean")


def test_mean_pooling_is_the_merge_with_fixed_maps():
    model = tiny("qwen2")
    _, hkv, d = _heads(model)
    eye = torch.eye(d, dtype=torch.float64).expand(hkv, d, d)
    merged = transform_heads(model, lambda i, w: merge_kv_heads(w, 1, eye / hkv, eye / hkv, eye, eye), 1)
    pooled = convert(model, "gqa", num_kv_heads=1, method="mean")
    ids = random_ids()
    assert_close_rms(logits(merged, ids), logits(pooled, ids), dtype=torch.float32)


def test_pca_merges_normed_keys_as_aligned_does():
    model = tiny("qwen3")
    make_norms_plane_isotropic(model)                   # rotations allowed; scales never are under an RMSNorm
    calibration = random_ids(8, 32)
    pca = convert(model, "gqa", num_kv_heads=1, method="pca", calibration=calibration)
    aligned = convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=calibration)
    lost = pca.hfa_conversions[-1]["energy_lost"]
    assert lost["keys_pca"] == lost["keys_aligned"] and lost["values_pca"] <= lost["values_aligned"] + 1e-9
    for a, b in zip(attention_layers(pca), attention_layers(aligned)):
        assert torch.allclose(a.k_proj.weight, b.k_proj.weight, atol=1e-6)


def test_demo_conversions_build_mqa_models():
    """Every entry of `hfa demo`'s list (eval.report.DEMO_CONVERSIONS) builds an MQA model, at smaller budgets."""
    from dataclasses import replace

    from hf_efficient_attn.eval.data import TextData
    from hf_efficient_attn.eval.report import DEMO_CONVERSIONS, _run_conversion

    model = tiny("llama")
    for step in [s for s in DEMO_CONVERSIONS if s.method == "gqa"]:  # (the sparse row: tests/eval/test_report.py)
        step = replace(step, options={**step.options, "calibration_tokens": 1024},
                       heal=step.heal and {**step.heal, "max_tokens": 1024})
        texts = TextData("texts", tuple(TEXTS))
        new = _run_conversion(step, model, char_tokenizer(), texts, texts, 0)   # calibration, train
        assert new.config.num_key_value_heads == 1 and not new.training, step.label
    assert model.config.num_key_value_heads == 2
