"""Learned sparsity (adaptive span, duo, longformer): each conversion at its lossless setting IS the original
(forward and gradients, padded batches, three families); a hard reach equals the original with the equivalent
explicit mask; frozen spans equal the soft model where the ramp is saturated; the cache keeps only the reach and
decodes exactly; the sparsity stage trains the spans/gates and the penalty shrinks them; save/load is bit-exact;
bad input is refused."""

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.attention.span import SpanAttention, SpanCacheLayer, span_layers
from hf_efficient_attn.conversions import default_trainable
from hf_efficient_attn.conversions.span import freeze, kv_fraction, reach_summary
from hf_efficient_attn.errors import HFAError
from hf_efficient_attn.eval import kv_cache_bytes
from hf_efficient_attn.eval.cost import kv_cache_bytes_at_length
from tests.conversions.conftest import TEXTS
from tests.tiny_models import make_model
from tests.tolerances import assert_close_rms

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
LOSSLESS = {"adaptive_span": dict(max_span=64, ramp=4), "duo": dict(sinks=2, window=8),
            "longformer": dict(window=64, global_tokens=2)}


def batch(seed=0, length=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, length), generator=g)
    am = torch.ones_like(ids)
    am[1, :7] = 0                                    # a left-padded row
    return ids, am


def reach_bias(am, sinks, window):
    """The additive 4-D mask of a hard reach (positions from each row's first real token)."""
    T = am.shape[1]
    pos = am.long().cumsum(-1) - 1
    d = pos[:, :, None] - pos[:, None, :]
    ok = (d >= 0) & am.bool()[:, None, :] & ((d < window) | (pos[:, None, :] < sinks))
    ok = ok | torch.eye(T, dtype=torch.bool)[None]   # pad rows read themselves (their outputs are not compared)
    return torch.zeros(ok.shape).masked_fill(~ok, torch.finfo(torch.float32).min)[:, None]


def grads(model, ids, am):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=am).logits
    (out[am.bool()].float().pow(2).mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None and "self_attn" in n}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conversion", list(LOSSLESS))
def test_the_lossless_setting_is_the_original_forward_and_gradients(family, conversion):
    base = make_model(family)
    new = hfa.convert(base, conversion, **LOSSLESS[conversion])
    assert span_layers(new), "no layer was converted"
    ids, am = batch()
    want, gw = grads(base, ids, am)
    got, gg = grads(new, ids, am)
    real = am.bool()
    assert_close_rms(got[real], want[real], tol=1e-4, name="logits")
    shared = [n for n in gw if n in gg]
    assert shared and len(shared) == len(gw)
    for n in shared:
        assert_close_rms(gg[n], gw[n], tol=1e-4, name=n)
    if family == "gemma3":                           # its sliding layers are kept as they were
        assert sorted(span_layers(new)) == [1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])   # (an explicit mask would also replace a sliding window)
def test_longformer_equals_the_original_with_the_explicit_mask(family):
    base = make_model(family)
    new = hfa.convert(base, "longformer", window=8, global_tokens=3)
    ids, am = batch()
    pos = (am.long().cumsum(-1) - 1).clamp_min(0)
    want = base(input_ids=ids, attention_mask=reach_bias(am, 3, 8), position_ids=pos).logits
    got = new(input_ids=ids, attention_mask=am, position_ids=pos).logits
    real = am.bool()
    assert_close_rms(got[real], want[real], tol=1e-4, name="logits")
    dense = base(input_ids=ids, attention_mask=am).logits
    assert (got[real] - dense[real]).abs().max() > 1e-2, "the window cut nothing: the test proves nothing"


def _set(model, name, values):
    with torch.no_grad():
        for m in span_layers(model).values():
            getattr(m, name).copy_(torch.as_tensor(values, dtype=torch.float32))


def test_frozen_spans_equal_the_soft_model_where_the_ramp_is_saturated():
    base = make_model("llama")
    soft = hfa.convert(base, "adaptive_span", max_span=40, ramp=1, sinks=2)
    _set(soft, "span", [0.2, 0.5])                  # z = 8 and 20 tokens: the ramp of width 1 is 0 or 1 on every key
    ids, am = batch()
    hard = freeze(soft)
    assert [m.windows for m in span_layers(hard).values()] == [[9, 21], [9, 21]]
    assert not any(hasattr(m, "span") for m in span_layers(hard).values())
    real = am.bool()
    a, b = soft(input_ids=ids, attention_mask=am).logits, hard(input_ids=ids, attention_mask=am).logits
    assert_close_rms(b[real], a[real], tol=1e-4, name="frozen vs soft")
    # and the frozen model is the original under the equivalent mask (KV head 0: window 9, head 1: window 21)
    assert (a[real] - base(input_ids=ids, attention_mask=am).logits[real]).abs().max() > 1e-2
    assert hard.config.hfa_conversions[-1]["conversion"] == "freeze"


def test_the_ramp_is_soft_and_passes_gradients_to_the_spans():
    base = make_model("llama")
    soft = hfa.convert(base, "adaptive_span", max_span=40, ramp=8)
    _set(soft, "span", [0.3, 0.6])                  # keys inside the ramp: weights strictly between 0 and 1
    ids, am = batch()
    soft(input_ids=ids, attention_mask=am).logits.pow(2).mean().backward()
    for m in span_layers(soft).values():
        assert m.span.grad is not None and (m.span.grad.abs() > 0).all()
    hard = freeze(soft)                              # the frozen windows drop the ramp's weights: not equal here
    real = am.bool()
    diff = (hard(input_ids=ids, attention_mask=am).logits - soft(input_ids=ids, attention_mask=am).logits)[real]
    assert diff.abs().max() > 1e-4


@pytest.mark.parametrize("method", ["adaptive_span", "duo"])
def test_the_kernel_form_of_the_soft_layers_equals_the_eager_product(monkeypatch, method):
    """Without padding, soft layers run on the kernels (adaptive span: the weight-1 keys block-sparse, the ramp's keys
    gathered, merged by LSE); the eager product is the definition: equal forward and gradients, spans/gates too."""
    base = make_model("llama")
    if method == "adaptive_span":
        soft = hfa.convert(base, "adaptive_span", max_span=100, ramp=8, sinks=3)
        _set(soft, "span", [0.135, 0.405])          # z = 13.5 and 40.5 tokens of 70: the ramp inside the text
    else:
        soft = hfa.convert(base, "duo", sinks=3, window=9)
        _set(soft, "gate", [0.3, 0.8])
    ids = torch.randint(3, 97, (2, 70), generator=torch.Generator().manual_seed(1))

    def run():
        soft.zero_grad()
        out = soft(input_ids=ids).logits
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in soft.named_parameters() if p.grad is not None}

    fast, g_fast = run()
    monkeypatch.setattr(SpanAttention, "_soft", lambda self, q, k, v, kpm: self._soft_eager(q, k, v, kpm))
    eager, g_eager = run()
    assert_close_rms(fast, eager, tol=1e-5, name="logits")
    name = "span" if method == "adaptive_span" else "gate"
    assert any(n.endswith(name) for n in g_eager) and g_fast.keys() == g_eager.keys()
    for n in g_eager:
        assert_close_rms(g_fast[n], g_eager[n], tol=1e-4, name=n)
    assert (base(input_ids=ids).logits - fast).abs().max() > 1e-3


def test_duo_gates_mix_full_and_streaming_and_freeze_keeps_the_largest():
    base = make_model("llama")
    duo = hfa.convert(base, "duo", sinks=2, window=8)
    lf = hfa.convert(base, "longformer", window=8, global_tokens=2)
    ids, am = batch()
    real = am.bool()
    _set(duo, "gate", [0.0, 0.0])
    assert_close_rms(duo(input_ids=ids, attention_mask=am).logits[real],
                     lf(input_ids=ids, attention_mask=am).logits[real], tol=1e-4, name="gates 0 = streaming")
    with torch.no_grad():
        layers = span_layers(duo)
        layers[0].gate.copy_(torch.tensor([0.9, 0.1]))
        layers[1].gate.copy_(torch.tensor([0.3, 0.7]))
    half = freeze(duo, full_heads=0.5)
    assert [m.windows for m in span_layers(half).values()] == [[None, 8], [8, None]]
    assert half.config.hfa_conversions[-1]["full_kv_heads"] == 2
    assert [m.windows for m in span_layers(freeze(duo, full_heads=1.0)).values()] == [[None, None]] * 2
    full = freeze(duo, full_heads=1.0)
    assert_close_rms(full(input_ids=ids, attention_mask=am).logits[real],
                     base(input_ids=ids, attention_mask=am).logits[real], tol=1e-4, name="all heads full")
    # mixed heads in one layer: each KV head reads its own reach (checked against the soft model at gates 0/1)
    with torch.no_grad():
        layers[0].gate.copy_(torch.tensor([1.0, 0.0]))
        layers[1].gate.copy_(torch.tensor([0.0, 1.0]))
    assert_close_rms(half(input_ids=ids, attention_mask=am).logits[real],
                     duo(input_ids=ids, attention_mask=am).logits[real], tol=1e-4, name="per-head reach")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_cache_keeps_only_the_reach_and_decodes_exactly(family):
    base = make_model(family)
    duo = hfa.convert(base, "duo", sinks=2, window=8)
    with torch.no_grad():
        span_layers(duo)[0].gate.copy_(torch.tensor([1.0, 0.0]))
        span_layers(duo)[1].gate.copy_(torch.tensor([0.0, 0.0]))
    model = freeze(duo, full_heads=0.25)             # one KV head of four stays full
    ids, am = batch(length=30)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=False)
        uncached = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=False,
                                  use_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, use_cache=True)
    layers = [layer for layer in out.past_key_values.layers if isinstance(layer, SpanCacheLayer)]
    assert len(layers) == 2
    # a prefill in two chunks (the second over the cache the first left) equals one pass
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=am).logits
        first = model(input_ids=ids[:, :17], attention_mask=am[:, :17], use_cache=True)
        rest = model(input_ids=ids[:, 17:], attention_mask=am, past_key_values=first.past_key_values).logits
    assert_close_rms(rest[am[:, 17:].bool()], whole[:, 17:][am[:, 17:].bool()], tol=1e-5, name="chunked prefill")
    assert layers[0].slots() == [30, 2 + 8 - 1]      # the full head keeps all; the streaming one sinks + window - 1
    assert layers[1].slots() == [2 + 8 - 1]
    # bytes after 64 tokens: 64 + 3 x 9 slots of K and V (fp32, 2 x head_dim x 4 bytes a slot and KV head), plus
    # each slot's position (int64) and validity (bool), against 4 x 64 slots for the full cache
    slot = 2 * span_layers(model)[0].head_dim * 4
    assert kv_cache_bytes(base, 64) == 4 * 64 * slot
    assert kv_cache_bytes_at_length(model, 64) == 91 * slot          # a meta copy: the tensors' shapes only
    assert 91 * (slot + 9) <= kv_cache_bytes(model, 64) <= 91 * (slot + 9) + 3 * 8
    assert abs(kv_fraction(model, 64) - 91 / (4 * 64)) < 1e-9


def test_a_longformer_cache_stays_constant_as_it_generates():
    model = hfa.convert(make_model("llama"), "longformer", window=6, global_tokens=2)
    ids = torch.randint(3, 97, (1, 20))
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert isinstance(layer, SpanCacheLayer) and layer.slots() == [2 + 6 - 1] and layer.get_seq_length() == 49
    again = model.generate(input_ids=ids, max_new_tokens=30, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, again)


def test_the_sparsity_stage_trains_spans_and_the_penalty_shrinks_them(tok):
    base = make_model("llama")
    soft = hfa.convert(base, "adaptive_span", max_span=64, ramp=8)
    assert default_trainable(soft, "sparsity") == "adaptive_span"
    before = {n: p.clone() for n, p in soft.named_parameters()}
    res = hfa.distill(soft, base, TEXTS, tokenizer=tok, stage="sparsity", stage_options={"penalty": 1.0},
                      max_tokens=4 * 64 * 2, seq_len=64, batch_size=2, progress=False, lr=0.05)
    changed = [n for n, p in soft.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.endswith(".span") for n in changed), changed
    spans = [z for layer in reach_summary(soft)["layers"].values() for z in layer["span"]]
    assert max(spans) < 64 and res.steps == 4
    assert soft.hfa_conversions[-1]["penalty"] == 1.0
    duo = hfa.convert(base, "duo", sinks=2, window=8)
    assert default_trainable(duo, "sparsity") == "duo"
    hfa.distill(duo, base, TEXTS, tokenizer=tok, stage="sparsity", max_tokens=2 * 64 * 2, seq_len=64, batch_size=2,
                progress=False)
    assert all(max(v["gate"]) < 1 for v in reach_summary(duo)["layers"].values())


def test_a_longformer_heals_its_attention_projections(tok):
    base = make_model("llama")
    lf = hfa.convert(base, "longformer", window=8, global_tokens=2)
    assert default_trainable(lf) == "longformer"
    before = {n: p.clone() for n, p in lf.named_parameters()}
    hfa.distill(lf, base, TEXTS, tokenizer=tok, max_tokens=2 * 64 * 2, seq_len=64, batch_size=2, progress=False)
    changed = {n.split(".")[-2] for n, p in lf.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("conversion", ["adaptive_span", "duo", "longformer", "frozen"])
def test_save_and_load_round_trip_bit_exact(tmp_path, conversion):
    base = make_model("llama")
    if conversion == "frozen":
        model = hfa.convert(base, "duo", sinks=2, window=8)
        _set(model, "gate", [0.2, 0.8])
        model = freeze(model, full_heads=0.5)
    else:
        model = hfa.convert(base, conversion, **LOSSLESS[conversion])
        if conversion != "longformer":
            _set(model, "span" if conversion == "adaptive_span" else "gate", [0.25, 0.75])
    path = hfa.save(model, tmp_path / "m")
    loaded = hfa.load(path)
    assert type(loaded) is type(model)
    ids, am = batch()
    assert torch.equal(loaded(input_ids=ids, attention_mask=am).logits, model(input_ids=ids, attention_mask=am).logits)
    assert reach_summary(loaded) == reach_summary(model)


def test_bad_input_is_refused(tok):
    base = make_model("llama")
    with pytest.raises(ValueError, match="max_span must be an int >= 1"):
        hfa.convert(base, "adaptive_span", max_span=0)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        hfa.convert(base, "longformer", window=0)
    with pytest.raises(ValueError, match="sinks must be an int >= 0"):
        hfa.convert(base, "duo", sinks=-1)
    with pytest.raises(ValueError, match="does not support model_type 'gpt_neox'"):
        hfa.convert(make_model("gpt_neox"), "longformer")
    with pytest.raises(ValueError, match="every layer .* sliding window"):
        hfa.convert(make_model("mistral"), "duo")
    lf = hfa.convert(base, "longformer", window=8)
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze(lf)
    with pytest.raises(ValueError, match="no learned-sparsity layer"):
        freeze(base)
    with pytest.raises(ValueError, match="full_heads applies to duo"):
        freeze(hfa.convert(base, "adaptive_span", max_span=64), full_heads=0.5)
    with pytest.raises(ValueError, match="full_heads must be a fraction"):
        freeze(hfa.convert(base, "duo"), full_heads=2)
    with pytest.raises(ValueError, match="stage='sparsity' trains the spans or gates"):
        hfa.distill(lf, base, TEXTS, tokenizer=tok, stage="sparsity", max_tokens=256, seq_len=64, batch_size=2)
    soft = hfa.convert(base, "adaptive_span", max_span=64)
    with pytest.raises(HFAError, match="takes no option 'lambda'.*it takes: penalty"):
        hfa.distill(soft, base, TEXTS, tokenizer=tok, stage="sparsity", stage_options={"lambda": 1},
                    max_tokens=256, seq_len=64, batch_size=2)
    with pytest.raises(ValueError, match="penalty must be a finite number"):
        hfa.distill(soft, base, TEXTS, tokenizer=tok, stage="sparsity", stage_options={"penalty": -1},
                    max_tokens=256, seq_len=64, batch_size=2, progress=False)
    assert isinstance(span_layers(soft)[0], SpanAttention)
