"""The patch's CUDA-only paths on a real GPU (kernels/gpu_check.sh runs this file; skipped without CUDA):
Quest's decode on the Triton block-sparse decode kernel against its PyTorch path, the KV policies at lossless
budgets against the full cache, sparse prefill on the Triton block-sparse kernels against the reference, and a
bf16 model patched with Triton against SDPA. A model with head_dim 64 (the tiny test models' 8-16 are below
what real checkpoints use)."""

import pytest
import torch
import transformers

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.kv import apply as kv_apply
from hf_efficient_attn.attention.model_io import cache_kwarg

pytestmark = pytest.mark.gpu


def _model(dtype=torch.float32, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   pad_token_id=0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.to("cuda", dtype)


def _batch(b=2, s=300, pad=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, s), generator=g)
    mask = torch.ones_like(ids)
    ids[-1, :pad], mask[-1, :pad] = 0, 0
    return ids.cuda(), mask.cuda()


def _decode(model, ids, mask, steps=8):
    """Prefill, then ``steps`` greedy tokens one at a time through the cache; the logits of every step."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@torch.no_grad()
def test_quest_decode_on_the_triton_kernel_equals_its_pytorch_path(monkeypatch):
    from hf_efficient_attn.kernels.sparse import triton_block_sparse as tbs
    model = _model()
    ids, mask = _batch()
    calls = []
    kernel = tbs.block_sparse_decode
    monkeypatch.setattr(tbs, "block_sparse_decode", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    hfa.patch(model, kv=hfa.kv.quest(16, 64))
    tri = _decode(model, ids, mask)
    assert len(calls) == 8 * 2  # every decode step of both layers ran on the kernel
    assert hfa.kv.read_fraction(model) < 0.3
    with monkeypatch.context() as m:
        m.setattr(kv_apply, "_backend", lambda query, backend: "torch")
        ref = _decode(model, ids, mask)
    assert len(calls) == 16
    err = (tri - ref).abs().max().item()
    assert err <= 1e-3 * max(1.0, ref.abs().max().item()), err  # tf32 dots in the kernel
    hfa.unpatch(model)
    full = _decode(model, ids, mask)
    assert (tri - full).abs().max().item() > 1e-4  # really approximate: 64 of ~300 tokens read


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "quest"])
@torch.no_grad()
def test_lossless_budgets_equal_the_full_cache_on_cuda(policy):
    make = {"streaming": lambda: hfa.kv.streaming(4, 400), "snapkv": lambda: hfa.kv.snapkv(400, 8),
            "quest": lambda: hfa.kv.quest(16, 512)}[policy]
    model = _model()
    ids, mask = _batch()
    ref = _decode(model, ids, mask)
    hfa.patch(model, kv=make())
    out = _decode(model, ids, mask)
    assert (out - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item())
    assert out.argmax(-1).equal(ref.argmax(-1))


@torch.no_grad()
def test_sparse_prefill_on_the_triton_kernels_equals_the_reference():
    model = _model()
    ids, mask = _batch(s=512)
    real = mask.bool()
    for pattern in (hfa.sparse.streaming(4, 128, block=64), hfa.sparse.top_p(0.9, block=64)):
        hfa.patch(model, backend="reference", sparse=pattern)
        ref = model(input_ids=ids, attention_mask=mask).logits
        hfa.patch(model, backend="triton", sparse=pattern)
        out = model(input_ids=ids, attention_mask=mask).logits
        err = (out - ref)[real].abs().max().item()
        assert err <= 1e-3 * max(1.0, ref.abs().max().item()), (pattern, err)


def test_bf16_model_patched_with_triton_matches_sdpa_forward_backward_and_decode():
    model = _model(torch.bfloat16)
    ids, mask = _batch(s=384)
    real = mask.bool()

    def run():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            steps = _decode(model, ids, mask).float()  # prefill kernel, then the split-KV decode kernel
        return logits.detach().float(), grads, steps

    ref, ref_g, ref_steps = run()
    hfa.patch(model, backend="triton")
    out, got_g, steps = run()
    rel = ((out - ref)[real].norm() / ref[real].norm()).item()
    assert rel <= 2e-2, rel
    for n in ref_g:
        rel = ((got_g[n] - ref_g[n]).norm() / ref_g[n].norm().clamp_min(1e-12)).item()
        assert rel <= 5e-2, (n, rel)
    rel = ((steps - ref_steps).norm() / ref_steps.norm()).item()
    assert rel <= 2e-2, rel
