"""The linear-attention spec: quadratic, recurrent and chunked forms agree (values and gradients), on
awkward shapes; the hybrid's parallel form equals a per-query loop, splits into prefix state + window
context exactly (what decoding relies on), reduces to softmax attention when the window covers
everything, and ignores padded keys."""


import pytest
import torch
import torch.nn.functional as F

from hf_efficient_attn.kernels.linear.reference import (
    hybrid_attention_chunked,
    hybrid_attention_reference,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
)
from tests.tolerances import assert_close_rms

f64 = torch.float64


def features(*shape, gen):
    return torch.rand(*shape, generator=gen, dtype=f64) + 0.05       # positive, like softmax / elu+1 maps


def inputs(B=2, H=6, Hkv=2, T=37, F=12, D=10, seed=0, decay=False):
    g = torch.Generator().manual_seed(seed)
    q, k = features(B, H, T, F, gen=g), features(B, Hkv, T, F, gen=g)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=f64)
    log_decay = -torch.rand(B, Hkv, T, generator=g, dtype=f64) * 0.3 if decay else None
    state = (torch.rand(B, Hkv, F, D, generator=g, dtype=f64), torch.rand(B, Hkv, F, generator=g, dtype=f64))
    return q, k, v, log_decay, state


def naive_linear(q, k, v, log_decay=None, normalize=True, eps=1e-6, state=None):
    """Independent twin: an explicit double loop over (query, key), state folded in by its decay."""
    B, H, T, _ = q.shape
    g = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=f64)
    for h in range(H):
        n = h // g
        for t in range(T):
            num, den = torch.zeros(B, v.shape[-1], dtype=f64), torch.zeros(B, dtype=f64)
            for s in range(t + 1):
                w = (q[:, h, t] * k[:, n, s]).sum(-1)
                if log_decay is not None:
                    w = w * torch.exp(log_decay[:, n, s + 1:t + 1].sum(-1))
                num, den = num + w[:, None] * v[:, n, s], den + w
            if state is not None:
                a = 1.0 if log_decay is None else torch.exp(log_decay[:, n, :t + 1].sum(-1))
                a = torch.as_tensor(a, dtype=f64).reshape(-1, 1)
                num = num + a * (q[:, h, t, :, None] * state[0][:, n]).sum(1)
                den = den + a[:, 0] * (q[:, h, t] * state[1][:, n]).sum(-1)
            out[:, h, t] = num / (den[:, None] + eps) if normalize else num
    return out


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_forms_agree_with_a_double_loop(decay, normalize):
    q, k, v, ld, state = inputs(B=1, H=4, Hkv=2, T=9, F=5, D=3, decay=decay)
    want = naive_linear(q, k, v, ld, normalize, state=state)
    for fn in (linear_attention_reference, linear_attention_recurrent, linear_attention_chunked):
        got = fn(q, k, v, log_decay=ld, normalize=normalize, initial_state=state)
        assert_close_rms(got, want, name=fn.__name__)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
def test_chunked_and_recurrent_match_quadratic_with_state(decay, chunk):
    q, k, v, ld, state = inputs(T=37, decay=decay)
    out, (s, z) = linear_attention_reference(q, k, v, log_decay=ld, initial_state=state, return_state=True)
    for got, (gs, gz) in (linear_attention_chunked(q, k, v, log_decay=ld, initial_state=state, return_state=True,
                                                   chunk_size=chunk),
                          linear_attention_recurrent(q, k, v, log_decay=ld, initial_state=state, return_state=True)):
        assert_close_rms(got, out)
        assert_close_rms(gs, s, name="state")
        assert_close_rms(gz, z, name="normaliser")


@pytest.mark.parametrize("decay", [False, True])
def test_state_splits_a_sequence_exactly(decay):
    """prefix with return_state, then the suffix from that state == the whole sequence at once."""
    q, k, v, ld, _ = inputs(T=30, decay=decay)
    whole = linear_attention_reference(q, k, v, log_decay=ld)
    cut = 13
    part = lambda x, a, b: None if x is None else x[..., a:b]
    first, state = linear_attention_reference(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut],
                                              log_decay=part(ld, 0, cut), return_state=True)
    second = linear_attention_recurrent(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], log_decay=part(ld, cut, 30),
                                        initial_state=state)
    assert_close_rms(torch.cat([first, second], 2), whole)


@pytest.mark.parametrize("decay", [False, True])
def test_varlen_equals_each_sequence_alone(decay):
    lengths = [5, 0, 11, 1, 7]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, ld, _ = inputs(B=1, T=sum(lengths), decay=decay)
    for fn in (linear_attention_reference, linear_attention_recurrent):
        out, (s, z) = fn(q, k, v, log_decay=ld, cu_seqlens=cu, return_state=True)
        assert s.shape[0] == len(lengths)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone, (sa, za) = linear_attention_reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                         log_decay=None if ld is None else ld[..., a:b],
                                                         return_state=True)
            if b > a:
                assert_close_rms(out[:, :, a:b], alone, name=f"{fn.__name__} sequence {i}")
            torch.testing.assert_close(s[i:i + 1], sa)          # an empty sequence: a zero state
            torch.testing.assert_close(z[i:i + 1], za)


@pytest.mark.parametrize("decay", [False, True])
def test_chunked_gradients_match_quadratic(decay):
    q, k, v, ld, state = inputs(T=21, decay=decay)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *state)] + ([ld.clone().requires_grad_()] if decay else [])
    grads = []
    for fn, extra in ((linear_attention_reference, {}), (linear_attention_chunked, {"chunk_size": 8})):
        qq, kk, vv, s0, z0, *rest = leaves
        out = fn(qq, kk, vv, log_decay=rest[0] if rest else None, initial_state=(s0, z0), **extra)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), leaves))
    for name, a, b in zip(["q", "k", "v", "S0", "z0", "log_decay"], *grads):
        assert_close_rms(a, b, name=f"d{name}")


def test_fp16_inputs_accumulate_in_fp32():
    q, k, v, _, _ = inputs(T=300, F=16)
    big = 300.0                                       # sums of k up to ~1e5 * ... overflow fp16 if kept in it
    out, (s, z) = linear_attention_chunked((q * big).half(), (k * big).half(), v.half(), return_state=True)
    ref = linear_attention_reference((q * big).half().double(), (k * big).half().double(), v.half().double())
    assert out.dtype == torch.float16 and s.dtype == torch.float32 and z.dtype == torch.float32
    assert_close_rms(out, ref, dtype=torch.float16)


def test_bad_inputs_name_the_problem():
    q, k, v, _, state = inputs()
    with pytest.raises(ValueError, match="multiple of KV heads"):
        linear_attention_reference(q[:, :5], k, v)
    with pytest.raises(ValueError, match="feature dim"):
        linear_attention_reference(q[..., :3], k, v)
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention_reference(q, k, v, log_decay=torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention_reference(q, k, v, initial_state=(state[0][..., :3], state[1]))
    with pytest.raises(ValueError, match="batch must be 1"):
        linear_attention_reference(q, k, v, cu_seqlens=torch.tensor([0, 37]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        linear_attention_reference(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 30]))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_chunked(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="window must be"):
        hybrid_attention_reference(q, k, v, q, k, window=0)


# -- hybrid -------------------------------------------------------------------------------------------

def hybrid_inputs(B=2, H=4, Hkv=2, Sq=23, T=23, Dk=8, F=6, D=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, Sq, Dk, generator=g, dtype=f64), torch.randn(B, Hkv, T, Dk, generator=g, dtype=f64)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=f64)
    fq, fk = features(B, H, Sq, F, gen=g), features(B, Hkv, T, F, gen=g)
    gate = torch.rand(H, generator=g, dtype=f64) * 0.8 + 0.1
    return q, k, v, fq, fk, gate


def naive_hybrid(q, k, v, fq, fk, window, gate, scale, eps=1e-6):
    B, H, Sq, _ = q.shape
    T, g = k.shape[2], H // k.shape[1]
    out = torch.zeros(B, H, Sq, v.shape[-1], dtype=f64)
    for h in range(H):
        n = h // g
        for i in range(Sq):
            p = T - Sq + i
            win = list(range(max(0, p - window + 1), p + 1))
            old = list(range(0, max(0, p - window + 1)))
            sc = scale * q[:, h, i] @ k[:, n, win].transpose(-1, -2) if False else \
                scale * torch.einsum("bd,bsd->bs", q[:, h, i], k[:, n, win])
            a_sm = gate[h] * torch.exp(sc - sc.amax(-1, keepdim=True))
            a_ln = torch.einsum("bf,bsf->bs", fq[:, h, i], fk[:, n, old])
            w = torch.cat([a_sm, a_ln], -1)
            vals = torch.cat([v[:, n, win], v[:, n, old]], 1)
            out[:, h, i] = torch.einsum("bs,bsd->bd", w, vals) / (w.sum(-1, keepdim=True) + eps)
    return out


@pytest.mark.parametrize("window", [1, 4, 64])
@pytest.mark.parametrize("Sq", [23, 5])
def test_hybrid_matches_a_per_query_loop(window, Sq):
    q, k, v, fq, fk, gate = hybrid_inputs(Sq=Sq)
    scale = 0.3
    want = naive_hybrid(q, k, v, fq, fk, window, gate, scale)
    got = hybrid_attention_reference(q, k, v, fq, fk, window=window, window_factor=gate, scale=scale)
    assert_close_rms(got, want)
    for chunk in (1, 4, 7, 64):
        assert_close_rms(hybrid_attention_chunked(q, k, v, fq, fk, window=window, window_factor=gate, scale=scale,
                                                  chunk_size=chunk), want, name=f"chunked {chunk}")


def test_hybrid_with_a_window_over_everything_is_softmax_attention():
    q, k, v, fq, fk, gate = hybrid_inputs()
    got = hybrid_attention_reference(q, k, v, fq, fk, window=100, window_factor=gate, eps=0)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert_close_rms(got, want)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_hybrid_decodes_from_state_plus_window(window):
    """A prefix's returned state + its last window-1 keys, then the rest token by token == one parallel call."""
    q, k, v, fq, fk, gate = hybrid_inputs(T=20, Sq=20)
    kw = dict(window=window, window_factor=gate)
    whole = hybrid_attention_reference(q, k, v, fq, fk, **kw)
    cut = 11
    first, state = hybrid_attention_reference(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], fq[:, :, :cut],
                                              fk[:, :, :cut], return_state=True, **kw)
    outs = [first]
    for t in range(cut, 20):
        lo = max(0, t - (window - 1))                          # the cache: the last window-1 keys + the new one
        o, state = hybrid_attention_reference(q[:, :, t:t + 1], k[:, :, lo:t + 1], v[:, :, lo:t + 1],
                                              fq[:, :, t:t + 1], fk[:, :, lo:t + 1], initial_state=state,
                                              return_state=True, **kw)
        outs.append(o)
    assert_close_rms(torch.cat(outs, 2), whole)
    _, chunked_state = hybrid_attention_chunked(q, k, v, fq, fk, return_state=True, chunk_size=6, **kw)
    assert_close_rms(chunked_state[0], state[0], name="chunked state")


def test_hybrid_padded_keys_change_nothing():
    q, k, v, fq, fk, gate = hybrid_inputs(B=1, T=15, Sq=15)
    alone = hybrid_attention_reference(q, k, v, fq, fk, window=4, window_factor=gate)
    pad = 6
    padded = [torch.cat([torch.randn(*x.shape[:2], pad, x.shape[-1], dtype=f64), x], 2) for x in (q, k, v, fq, fk)]
    kpm = torch.ones(1, 15 + pad, dtype=torch.bool)
    kpm[:, :pad] = False
    for fn in (hybrid_attention_reference, hybrid_attention_chunked):
        got = fn(*padded, window=4, window_factor=gate, key_padding_mask=kpm)
        assert_close_rms(got[:, :, pad:], alone, name=fn.__name__)


def test_hybrid_varlen_equals_each_sequence_alone():
    cu = torch.tensor([0, 6, 7, 16])  # lengths 6, 1, 9
    q, k, v, fq, fk, gate = hybrid_inputs(B=1, T=16, Sq=16)
    out, (s, _) = hybrid_attention_reference(q, k, v, fq, fk, window=3, window_factor=gate, cu_seqlens=cu,
                                             return_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, (sa, _) = hybrid_attention_reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], fq[:, :, a:b],
                                                    fk[:, :, a:b], window=3, window_factor=gate, return_state=True)
        assert_close_rms(out[:, :, a:b], alone, name=f"sequence {i}")
        torch.testing.assert_close(s[i:i + 1], sa)


def test_hybrid_chunked_gradients_match_reference():
    q, k, v, fq, fk, gate = hybrid_inputs(T=19, Sq=19)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, fq, fk, gate)]
    grads = []
    for fn, extra in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 5})):
        out = fn(*leaves[:5], window=4, window_factor=leaves[5], **extra)
        grads.append(torch.autograd.grad((out * torch.sin(out)).sum(), leaves))
    for name, a, b in zip(["q", "k", "v", "fq", "fk", "gate"], *grads):
        assert_close_rms(a, b, name=f"d{name}")
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads[0])


@pytest.mark.parametrize("n", [1, 3, 4])
def test_hybrid_decode_step_equals_the_quadratic_form(n):
    from hf_efficient_attn.kernels.linear.reference import fold_into_state, hybrid_decode_step

    q, k, v, fq, fk, gate = hybrid_inputs(Sq=1, T=n)
    _, _, older_v, _, older_fk, _ = hybrid_inputs(T=5, seed=7)
    state = fold_into_state(None, older_fk, older_v)          # five keys older than the window
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, 0] = n == 1                                  # a padded key in row 0 (never the query's own)
    want = hybrid_attention_reference(q, k, v, fq, fk, window=4, window_factor=gate, initial_state=state,
                                      key_padding_mask=kpm)
    got = hybrid_decode_step(q, k, v, fq, state, window_factor=gate, key_padding_mask=kpm)
    assert_close_rms(got, want)
    s, z = fold_into_state(state, fk[:, :, :1], v[:, :, :1])
    torch.testing.assert_close(s, state[0] + fk[:, :, 0, :, None] * v[:, :, 0, None, :])
    torch.testing.assert_close(z, state[1] + fk[:, :, 0])
