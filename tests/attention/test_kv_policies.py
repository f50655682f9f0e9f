"""hfa.patch(model, kv=policy): exactness at lossless budgets (tiny Llama/Qwen3/Gemma 3, left-padded batches,
generate), StreamingLLM's rule checked against its definition, bounded memory, SnapKV's and Quest's choices
against independent computations, beam search, refusals, unpatch."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.kv.base import PolicyCacheLayer
from hf_efficient_attn.attention.model_io import cache_kwarg
from hf_efficient_attn.eval import kv_cache_bytes
from tests.tiny_models import _cfg, make_model

PAD = [0, 3, 7]
TOL = 1e-4


def _batch(b=3, s=20, seed=1):
    ids = torch.randint(3, 97, (b, s), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for r, n in enumerate(PAD[:b]):
        ids[r, :n], mask[r, :n] = 0, 0
    return ids, mask


def _one_layer(seed=0):
    cfg = _cfg("LlamaConfig", num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


LOSSLESS = {"streaming": lambda: hfa.kv.streaming(4, 100), "snapkv": lambda: hfa.kv.snapkv(100, 8),
            "quest": lambda: hfa.kv.quest(16, 128)}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("policy", list(LOSSLESS))
def test_budget_beyond_the_sequence_equals_the_full_cache(family, policy):
    model = make_model(family)
    ids, mask = _batch()
    real = mask.bool()
    ref = model(input_ids=ids, attention_mask=mask).logits
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    hfa.patch(model, kv=LOSSLESS[policy]())
    for use_cache in (True, False):
        out = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
        assert (out - ref)[real].abs().max() < TOL
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), greedy)
    cache = model(input_ids=ids, attention_mask=mask).past_key_values
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "PolicyCacheLayer" in kinds
    if family == "gemma3":  # sliding layers keep the model's own bounded cache
        assert "DynamicSlidingWindowLayer" in kinds
    hfa.unpatch(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), greedy)
    assert not any(type(la).__name__ == "PolicyCacheLayer"
                   for la in model(input_ids=ids, attention_mask=mask).past_key_values.layers)


def _streaming_mask(mask, sinks, window):
    """Eager's 4-D additive mask for 'query i sees key j' = causal, real, j < sinks or i - j < window, with i, j
    counted from each row's first real token (what the definition says, written independently of the code)."""
    B, S = mask.shape
    pos = mask.cumsum(1) - 1
    i, j = pos[:, :, None], pos[:, None, :]
    ok = (j <= i) & mask.bool()[:, None, :] & ((j < sinks) | (i - j < window))
    ok |= torch.eye(S, dtype=torch.bool)[None] & ~mask.bool()[:, :, None]  # pad queries see themselves (no NaN)
    return torch.where(ok, 0.0, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_streaming_prefill_is_dense_attention_with_the_streaming_mask(family):
    model = make_model(family)
    ids, mask = _batch()
    s, W = 2, 5
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    ref = model(input_ids=ids, attention_mask=_streaming_mask(mask, s, W), position_ids=pos).logits
    real = mask.bool()
    hfa.patch(model, kv=hfa.kv.streaming(s, W, positions="original"))  # text positions: the mask is the rule
    out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - ref)[real].abs().max() < TOL
    hfa.patch(model, kv=hfa.kv.streaming(s, W))  # cache positions: equal while nothing has moved
    out = model(input_ids=ids, attention_mask=mask).logits
    inside = real & (pos < s + W)
    assert (out - ref)[inside].abs().max() < TOL
    assert (out - ref)[real & (pos >= s + W)].abs().max() > 1e-3  # later tokens really see shifted sinks


def test_streaming_equals_streamingllm_by_its_definition():
    """One layer: keys depend only on token and position, so the streaming model's logits at t must equal a fresh
    forward over [sink tokens, last W tokens] at positions 0..s+W-1 (keys placed by their cache slot)."""
    model = _one_layer()
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    s, W = 2, 5
    want = []
    for t in range(ids.shape[1]):
        ctx = ids[:, :t + 1] if t < s + W else torch.cat([ids[:, :s], ids[:, t - W + 1:t + 1]], 1)
        want.append(model(input_ids=ctx, position_ids=torch.arange(ctx.shape[1])[None]).logits[:, -1])
    want = torch.stack(want, 1)
    hfa.patch(model, kv=hfa.kv.streaming(s, W))
    prefill = model(input_ids=ids).logits
    assert (prefill - want).abs().max() < TOL
    cache, steps = None, []
    for t in range(0, ids.shape[1], 3):  # chunks of 3 through the cache: the same rule per query
        o = model(input_ids=ids[:, t:t + 3], use_cache=True, **{cache_kwarg(model): cache})
        cache = o.past_key_values
        steps.append(o.logits)
    assert (torch.cat(steps, 1) - want).abs().max() < TOL
    assert cache.layers[0].keys.shape[2] == s + W - 1


def test_streaming_memory_is_constant_and_generation_runs_past_the_position_table():
    model = make_model("llama")  # max_position_embeddings=128
    hfa.patch(model, kv=hfa.kv.streaming(4, 16))
    assert kv_cache_bytes(model, tokens=256) == kv_cache_bytes(model, tokens=2048)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=200, do_sample=False,
                         min_new_tokens=200)
    assert out.shape[1] == 240
    cache = model(input_ids=out, use_cache=True).past_key_values
    assert all(la.keys.shape[2] == 4 + 16 - 1 for la in cache.layers)
    assert cache.get_seq_length() == 240


def test_streaming_needs_a_rope_or_original_positions():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match="positions='original'"):
        hfa.patch(model, kv=hfa.kv.streaming(2, 8))


def test_snapkv_keeps_what_the_last_queries_attend():
    """The kept slots after a prefill equal SnapKV's rule computed from eager's own attention weights."""
    model = make_model("llama")
    ids = torch.randint(3, 97, (2, 60), generator=torch.Generator().manual_seed(2))
    budget, window, pool = 20, 6, 3
    eager = model(input_ids=ids, output_attentions=True)
    hfa.patch(model, kv=hfa.kv.snapkv(budget, window, pool))
    out = model(input_ids=ids)
    assert (out.logits - eager.logits).abs().max() < TOL  # the prefill itself is exact
    H = model.config.num_key_value_heads
    for i, layer in enumerate(out.past_key_values.layers):
        att = eager.attentions[i]                                        # [B, Hq, S, S]
        score = att[:, :, -window:].sum(2).view(2, H, -1, 60).sum(2)      # per KV head
        score = F.max_pool1d(score, pool, stride=1, padding=pool // 2)
        score[..., -window:] = math.inf
        want = score.topk(budget, dim=-1).indices.sort(-1).values
        assert torch.equal(layer.pos, want)
        assert layer.keys.shape[2] == budget
    # decoding appends, and cuts back to the budget at budget + window
    cache = out.past_key_values
    for step in range(window):
        o = model(input_ids=ids[:, :1], use_cache=True, **{cache_kwarg(model): cache})
        cache = o.past_key_values
        n = cache.layers[0].keys.shape[2]
        assert n == (budget + step + 1 if step < window - 1 else budget)


def test_quest_reads_the_pages_with_the_best_bound():
    torch.manual_seed(0)
    policy = hfa.kv.quest(16, 48)
    layer = PolicyCacheLayer(policy, 0)
    k = torch.randn(2, 2, 100, 8)
    layer.update(k, torch.randn(2, 2, 100, 8))
    layer.settle_positions(None)
    q = torch.randn(2, 4, 1, 8)
    chosen = policy.select(layer, q)[:, :, 0]                            # [B, Hkv, P]
    for b in range(2):
        for h in range(2):
            bounds, true_max = [], []
            for p in range(7):
                kp = k[b, h, 16 * p:16 * (p + 1)]
                qs = q[b, 2 * h:2 * h + 2, 0]                                # the group's query heads
                bound = torch.maximum(qs[:, None] * kp.min(0).values, qs[:, None] * kp.max(0).values).sum(-1)
                bounds.append(float(bound.max()))
                true_max.append(float((qs @ kp.T).max()))
            assert all(bd >= tm - 1e-5 for bd, tm in zip(bounds, true_max))  # Quest's bound is an upper bound
            bounds[-1] = math.inf                                            # the newest page is always read
            want = sorted(sorted(range(7), key=lambda p: -bounds[p])[:3])
            assert chosen[b, h].nonzero().flatten().tolist() == want


def test_quest_decode_reads_a_fraction_and_stays_close():
    model = make_model("llama")
    ids = torch.randint(3, 97, (1, 100), generator=torch.Generator().manual_seed(4))
    full = model(input_ids=ids).logits[:, -1]
    hfa.patch(model, kv=hfa.kv.quest(16, 32))
    out = model(input_ids=ids[:, :99], use_cache=True)
    step = model(input_ids=ids[:, 99:], use_cache=True, **{cache_kwarg(model): out.past_key_values}).logits[:, -1]
    assert hfa.kv.read_fraction(model) == pytest.approx(32 / 100)
    assert not torch.allclose(step, full, atol=1e-6)          # really approximate
    assert (step - full).abs().max() < 0.5                    # random weights: near-uniform attention
    assert out.past_key_values.layers[0].keys.shape[2] == 100  # memory is not bounded: everything kept


def test_beam_search_and_left_padded_generation_run_under_eviction():
    model = make_model("qwen3")
    ids, mask = _batch(s=30)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    hfa.patch(model, kv=hfa.kv.snapkv(100, 8))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False),
                       full)
    for policy in (hfa.kv.snapkv(12, 4), hfa.kv.streaming(2, 8), hfa.kv.quest(16, 16)):
        hfa.patch(model, kv=policy)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
        assert out.shape == (3, 36)


def test_crop_refuses_after_eviction():
    model = make_model("llama")
    hfa.patch(model, kv=hfa.kv.streaming(2, 4))
    cache = model(input_ids=torch.randint(3, 97, (1, 20))).past_key_values
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(10)
    hfa.patch(model, kv=hfa.kv.streaming(2, 100))
    cache = model(input_ids=torch.randint(3, 97, (1, 20))).past_key_values
    cache.crop(12)
    assert cache.get_seq_length() == 12 and cache.layers[0].keys.shape[2] == 12


def test_refusals():
    model = make_model("llama")
    with pytest.raises(TypeError, match="hfa.kv"):
        hfa.patch(model, kv="streaming")
    with pytest.raises(ValueError, match="do not combine"):
        hfa.patch(model, kv=hfa.kv.streaming(), sparse=hfa.sparse.streaming(4, 64))
    with pytest.raises(ValueError, match="decoder"):
        hfa.patch(make_model("bert"), kv=hfa.kv.snapkv(64))
    with pytest.raises(ValueError, match="exceed its observation window"):
        hfa.kv.snapkv(16, 32)
    with pytest.raises(ValueError, match="power of two"):
        hfa.kv.quest(12, 64)
    with pytest.raises(ValueError, match="unknown KV policy"):
        hfa.kv.from_spec("h2o:budget=3")
    with pytest.raises(ValueError, match="takes the options"):
        hfa.kv.from_spec("streaming:size=3")
    assert hfa.kv.from_spec("streaming:sinks=2,window=64").name == "streaming_s2_w64"
    # a model switched to another attention implementation after patching: refused, not silently full
    hfa.patch(model, kv=hfa.kv.streaming(2, 4))
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match="never attended"):
        model(input_ids=torch.randint(3, 97, (1, 12)))
    hfa.unpatch(model)


def test_patched_context_restores_the_policy():
    model = make_model("llama")
    hfa.patch(model, kv=hfa.kv.streaming(2, 4))
    with hfa.patched(model, kv=hfa.kv.snapkv(64)):
        assert hfa.kv.policy_of(model).name.startswith("snapkv")
    assert hfa.kv.policy_of(model).name == "streaming_s2_w4"
    hfa.unpatch(model)
    assert hfa.kv.policy_of(model) is None


@pytest.mark.parametrize("S", [1, 3])
def test_quest_cpu_gather_path_equals_the_block_sparse_reference(S):
    from hf_efficient_attn.attention.kv.quest import gather_pages_attention
    from hf_efficient_attn.kernels.sparse import BlockLayout, block_sparse_attention_reference
    g = torch.Generator().manual_seed(3)
    B, Hq, H, T, D, ps = 2, 6, 2, 77, 16, 16                       # 5 pages, the last one partial
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, S), (H, T), (H, T)))
    P = -(-T // ps)
    pages = torch.zeros(B, H, P, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            pages[b, h, torch.randperm(P - 1, generator=g)[:2]] = True
            pages[b, h, -1] = True                                   # the newest page, as Quest forces
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :20] = False                                              # a left-padded row: page 0 all padding
    idx = pages.nonzero()[:, 2].view(B, H, 3)                        # ascending, the newest page last
    layout = BlockLayout.from_block_mask(pages[:, :, None], 16, ps, q_len=S, kv_len=T)
    for mask in (kpm, None):                                         # the masked product; SDPA for 1 token
        got = gather_pages_attention(q, k, v, idx, ps, scale=0.3, key_padding_mask=mask)
        want = block_sparse_attention_reference(q, k, v, layout, scale=0.3, causal=True, key_padding_mask=mask)[0]
        assert (got - want).abs().max() < 1e-5


def test_policy_cache_appends_in_place_and_counts_its_spare_slots():
    from hf_efficient_attn.attention.kv.base import GROW_SLOTS
    from hf_efficient_attn.eval.cost import _deduplicated_bytes, cache_tensors
    layer = PolicyCacheLayer(hfa.kv.quest(16, 128), 0)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 3, s, 4, generator=g) for s in (5, 1, 1, 3)]
    ptrs = []
    with torch.no_grad():
        for c in chunks:
            k, v = layer.update(c, -c)
            layer.settle_positions(None)
            ptrs.append(k.data_ptr())
    want = torch.cat(chunks, 2)
    assert torch.equal(layer.keys, want) and torch.equal(layer.values, -want) and len(set(ptrs[1:])) == 1
    assert layer.pos[0, 0].tolist() == list(range(10)) and bool(layer.valid.all())
    spare = 2 * (2 * 3 * GROW_SLOTS * 4 * 4)                        # keys + values, fp32, beyond the 10 slots
    assert _deduplicated_bytes(cache_tensors(layer)) >= 2 * want.numel() * 4 + spare   # the real memory, spare too
    layer.crop(4)                                                    # keep 4 slots, then append: no stale view
    with torch.no_grad():
        layer.update(chunks[-1], -chunks[-1])
        layer.settle_positions(None)
    assert torch.equal(layer.keys, torch.cat([want[:, :, :4], chunks[-1]], 2)) and layer.keys.shape[2] == 7
    x = torch.randn(2, 3, 1, 4, requires_grad=True)                  # under autograd: a plain cat, no buffer
    k, _ = layer.update(x, x)
    assert k.requires_grad and "keys" not in layer._buffers_
