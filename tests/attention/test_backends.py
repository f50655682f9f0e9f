"""The one backend rule (attention.backends.use_triton) and hfa.patch carrying it to converted modules."""

import logging

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention import backends
from hf_efficient_attn.attention.linear import LinearAttention
from hf_efficient_attn.attention.mla import MLAAttention
from tests.tiny_models import make_model


def test_reference_never_and_auto_only_on_cuda():
    calls = []

    def why_not():
        calls.append(1)
        return None

    assert backends.use_triton("reference", "cpu", why_not, "x") is False
    assert backends.use_triton("auto", "cpu", why_not, "x") is False
    assert calls == []                       # the reason is not even asked where it cannot matter
    assert backends.use_triton("triton", "cpu", why_not, "x") is True and calls == [1]


def test_triton_raises_naming_the_reason_and_auto_logs_once_on_cuda(caplog):
    with pytest.raises(ValueError, match="backend='triton' cannot run layer 3: no kernel for this.*backend='auto'"):
        backends.use_triton("triton", "cpu", lambda: "no kernel for this", "layer 3")
    backends._logged_once.clear()
    with caplog.at_level(logging.WARNING, logger="hf_efficient_attn"):
        for _ in range(3):
            assert backends.use_triton("auto", torch.device("cuda"), lambda: "odd shape", "layer 0") is False
    assert [r.message for r in caplog.records if "odd shape" in r.message] == [
        "hf_efficient_attn: Triton cannot serve layer 0 (odd shape); using an exact fallback"]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'fast'; choose one of auto, triton, reference, chunked"):
        backends.use_triton("fast", "cpu", lambda: None, "x", choices=(*backends.BACKENDS, "chunked"))


def test_patch_sets_every_converted_modules_backend_and_unpatch_restores_it():
    from tests.conversions.conftest import random_ids
    model = make_model("llama")
    lin = hfa.convert(model, "linear", window=2, layers=[1])
    mla = hfa.convert(model, "mla", kv_lora_rank=8, rope_dim=4, method="weights")
    for new, cls in ((lin, LinearAttention), (mla, MLAAttention)):
        mods = [m for m in new.modules() if isinstance(m, cls)]
        assert mods and all(m.backend == "auto" for m in mods)
        mods[0].backend = "reference"                     # a user's own choice survives patch/unpatch
        hfa.patch(new, backend="reference")
        assert all(m.backend == "reference" for m in mods)
        with hfa.patched(new, backend="auto"):
            assert all(m.backend == "auto" for m in mods)
        assert all(m.backend == "reference" for m in mods)    # patched() restores the patched state
        hfa.unpatch(new)
        assert [m.backend for m in mods] == ["reference"] + ["auto"] * (len(mods) - 1)
    ids = random_ids(1, 9)
    with torch.no_grad(), hfa.patched(mla, backend="reference"):
        out = mla(input_ids=ids).logits
    with torch.no_grad():
        assert (out - mla(input_ids=ids).logits).abs().max() <= 1e-5


def test_mla_decode_backend_is_the_backend():
    mla = hfa.convert(make_model("llama"), "mla", kv_lora_rank=8, rope_dim=4, method="weights")
    attn = mla.model.layers[0].self_attn
    attn.decode_backend = "reference"
    assert attn.backend == "reference"
