"""Patched vs eager on tiny models of every supported family: logits, gradients, padding, generate, packing."""

import pytest
import torch

import hf_efficient_attn as hfa
from tests.tiny_models import DECODERS, FAMILIES, make_model, outputs

BACKENDS = ["auto", "reference"]
S = 19  # longer than the sliding window (6): windows really cut


def _ids(family, b=2, s=S, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (b, s), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_eager(family, backend):
    model = make_model(family)
    ids = _ids(family)
    with torch.no_grad():
        ref = outputs(model, input_ids=ids)
        hfa.patch(model, backend=backend)
        out = outputs(model, input_ids=ids)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_match_eager(family, backend):
    model = make_model(family).train()
    for m in model.modules():  # dropout off: eager and ours cannot share dropout masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for attr in ("attention_dropout",):
        if hasattr(model.config, attr):
            setattr(model.config, attr, 0.0)
    ids = _ids(family)

    def grads():
        model.zero_grad()
        outputs(model, input_ids=ids).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    hfa.patch(model, backend=backend)
    got = grads()
    assert ref.keys() == got.keys() and len(ref) > 0
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-6
        assert (got[n] - ref[n]).abs().max().item() <= 1e-4 * max(1.0, scale), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padded_batch_equals_rows_alone(family, backend):
    model = make_model(family)
    hfa.patch(model, backend=backend)
    ids = _ids(family, b=3)
    mask = torch.ones_like(ids)
    pad = [0, 4, 9]
    for r, n in enumerate(pad):
        mask[r, :n] = 0
        ids[r, :n] = 0
    with torch.no_grad():
        batch = outputs(model, input_ids=ids, attention_mask=mask)
        for r, n in enumerate(pad):
            alone = outputs(model, input_ids=ids[r:r + 1, n:])
            if family == "bert":  # absolute positions: left padding shifts them, compare a right-padded row
                continue
            assert (batch[r, n:] - alone[0]).abs().max().item() <= 1e-4, f"row {r}"
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("family", ["bert"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_right_padding_matches_eager(family, backend):
    model = make_model(family)
    ids = _ids(family, b=2)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        ref = outputs(model, input_ids=ids, attention_mask=mask)
        hfa.patch(model, backend=backend)
        out = outputs(model, input_ids=ids, attention_mask=mask)
        alone = outputs(model, input_ids=ids[1:, :12])
    valid = mask.bool()
    assert (out - ref)[valid].abs().max().item() <= 1e-4
    assert (out[1, :12] - alone[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generate_with_cache_matches_eager(family, backend):
    model = make_model(family)
    ids = _ids(family, b=1, s=5)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)  # 5 + 12 > window: the cache slides
    ref = model.generate(ids, **kw)
    hfa.patch(model, backend=backend)
    out = model.generate(ids, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_batched_left_padded_generate_matches_eager(family):
    model = make_model(family)
    ids = _ids(family, b=2, s=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    hfa.patch(model)
    assert torch.equal(model.generate(ids, **kw), ref)


@pytest.mark.parametrize("backend", BACKENDS)
# not gpt_oss: its modeling code builds masks without position_ids, so even eager mixes packed sequences
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "mistral"])
def test_packed_sequences_equal_separate(family, backend):
    model = make_model(family)
    hfa.patch(model, backend=backend)
    lens = [7, 5, 9]
    seqs = [torch.randint(3, 97, (1, n)) for n in lens]
    packed = torch.cat(seqs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        out = outputs(model, input_ids=packed, position_ids=pos, use_cache=False)  # packing is detected without a cache
        start = 0
        for s in seqs:
            alone = outputs(model, input_ids=s)
            assert (out[0, start:start + s.shape[1]] - alone[0]).abs().max().item() <= 1e-4
            start += s.shape[1]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_unpatch_restores_exactly_and_double_patch_is_harmless(family):
    model = make_model(family, attn="sdpa")
    ids = _ids(family)
    with torch.no_grad():
        before = outputs(model, input_ids=ids)
        hfa.patch(model, backend="reference")
        hfa.patch(model, backend="reference")  # twice: harmless
        hfa.patch(model, backend="auto")  # switching backend keeps the original to restore
        assert model.config._attn_implementation == "hfa"
        patched_out = outputs(model, input_ids=ids)
        hfa.unpatch(model)
        assert model.config._attn_implementation == "sdpa"
        after = outputs(model, input_ids=ids)
    assert torch.equal(before, after)
    assert (patched_out - before).abs().max().item() <= 1e-4
    assert hfa.unpatch(model) is model  # unpatching an unpatched model is a no-op


def test_patched_context_restores_on_error():
    model = make_model("llama", attn="eager")
    with pytest.raises(RuntimeError):
        with hfa.patched(model, backend="reference"):
            assert model.config._attn_implementation == "hfa_reference"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
