"""The model-family adapter table (attention.families): every entry resolves to real transformers classes whose
attention has the layout the entry states, and the helpers read windows, RoPE and classes right."""

import pytest
import torch
import transformers
from transformers import AutoConfig

from hf_efficient_attn.attention import families
from hf_efficient_attn.attention.families import FAMILIES, family_of, layer_inv_freqs, layer_window, without_windows
from tests.tiny_models import W, make_model

TINY = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3", "gpt_neox": "gpt_neox"}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_entry_resolves_and_states_the_real_layout(model_type):
    fam = FAMILIES[model_type]
    cfg_cls, lm_cls, attn_cls = fam.config_class(), fam.causal_lm_class(), fam.attention_class()
    assert cfg_cls.model_type == model_type and issubclass(lm_cls, transformers.PreTrainedModel)
    if model_type not in TINY:
        return
    model = make_model(TINY[model_type])
    attn = model.model.layers[0].self_attn if hasattr(model, "model") else model.gpt_neox.layers[0].attention
    assert isinstance(attn, attn_cls)
    fused = hasattr(attn, "qkv_proj") or hasattr(attn, "query_key_value")
    assert (fam.qkv == "fused") == fused
    assert (fam.qk_norm is not None) == hasattr(attn, "k_norm")
    if fam.qk_norm:
        norm = fam.make_norm(8, eps=1e-6)
        assert type(norm) is type(attn.k_norm)
        x = torch.randn(3, 8)
        with torch.no_grad():
            norm.weight.normal_()
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(norm(x), rms * fam.norm_gain(norm.weight.detach()))   # the stated gain form
        seen = []
        attn.k_norm.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        with torch.no_grad():
            model(input_ids=torch.arange(3, 10)[None])       # 7 tokens: no head count is 7
        heads = model.config.num_key_value_heads
        assert seen[0][1 if fam.norm_layout == "bhsd" else 2] == heads and 7 in seen[0]   # the stated layout
    assert fam.kv_heads == hasattr(model.config, "num_key_value_heads")


def test_family_of_names_the_supported_families_and_how_to_add_one():
    assert family_of(make_model("qwen3"), "mla").model_type == "qwen3"
    with pytest.raises(ValueError, match="MLA conversion does not support model_type 'mistral'.*llama, qwen3, "
                                         "gemma3_text.*one entry in FAMILIES"):
        family_of(make_model("mistral"), "mla")
    with pytest.raises(ValueError, match="GPT-NeoX cannot be converted to fewer KV heads"):
        family_of(make_model("gpt_neox"), "gqa")


def test_layer_window_reads_layer_types_or_the_one_window():
    assert [layer_window(make_model("gemma3").config, i) for i in range(3)] == [W, None, W]
    assert [layer_window(make_model("mistral").config, i) for i in range(2)] == [W, W]
    assert layer_window(make_model("llama").config, 0) is None
    qwen2 = make_model("qwen2").config           # use_sliding_window with max_window_layers=1
    assert [layer_window(qwen2, i) for i in range(2)] == [None, W]


def test_without_windows_keeps_per_layer_rope_families_layer_types():
    gemma = make_model("gemma3").config.to_dict()
    out = without_windows(FAMILIES["gemma3_text"], gemma)
    assert out["layer_types"] == gemma["layer_types"] and out["sliding_window"] >= 2 ** 31 - 1
    mistral = without_windows(FAMILIES["mistral"], make_model("mistral").config.to_dict())
    assert mistral["sliding_window"] is None
    qwen2 = without_windows(FAMILIES["qwen2"], make_model("qwen2").config.to_dict())
    assert set(qwen2["layer_types"]) == {"full_attention"} and qwen2["use_sliding_window"] is False


def test_layer_inv_freqs_per_layer_type():
    model = make_model("gemma3")
    local, full, local2 = layer_inv_freqs(model)
    assert torch.equal(local, local2) and not torch.allclose(local, full)
    llama = make_model("llama")
    assert len(layer_inv_freqs(llama)) == 2 and families.rotary_dim(llama) == 8


def test_converted_model_class_is_made_once_and_registered():
    def make_attention(config, i, base):
        return None                                   # keep every layer: the family's own model, renamed

    fam = FAMILIES["mistral"]
    cfg_cls, lm_cls = families.converted_model_class(fam, "testonly", fields={"extra_field": (int, 3)},
                                                     make_attention=make_attention)
    assert families.converted_model_class(fam, "testonly", fields={}, make_attention=make_attention) == (cfg_cls,
                                                                                                          lm_cls)
    assert cfg_cls.__name__ == "MistralTestonlyConfig" and cfg_cls.model_type == "hfa_testonly_mistral"
    cfg = AutoConfig.for_model("hfa_testonly_mistral", hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                               intermediate_size=8, vocab_size=11)
    assert type(cfg) is cfg_cls and cfg.extra_field == 3 and cfg.hfa_family == "mistral"
    assert type(transformers.AutoModelForCausalLM.from_config(cfg)) is lm_cls
