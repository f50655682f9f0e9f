"""Plain-PyTorch causal linear attention: the specification every linear-attention kernel is tested against.

Three computations live here, each in the forms the kernels are checked against:

* **linear** (optionally **gated**): with feature maps already applied (``q = phi_q(x)``, ``k = phi_k(x)``),
      S_t = a_t * S_{t-1} + k_t v_t^T          z_t = a_t * z_{t-1} + k_t          (state and normaliser)
      o_t = q_t S_t / (q_t . z_t + eps)        (normalize=True; o_t = q_t S_t without the normaliser)
  ``a_t = exp(log_decay_t)`` is a per-KV-head, data-dependent decay in (0, 1] (the Mamba-2 / GLA form, our
  "gated" variant); without ``log_decay`` every ``a_t = 1`` (plain linear attention, LoLCATs/Hedgehog).
  Forms: :func:`linear_attention_reference` (quadratic: the masked T x T matrix, the spec),
  :func:`linear_attention_recurrent` (token by token: what decoding does) and
  :func:`linear_attention_chunked` (chunks of C tokens: exact within a chunk, the state carried between
  chunks; O(T C) memory — the form the Triton kernel implements, and the long-context CPU path).

* **hybrid** (LoLCATs' sliding window + linear): query at position p attends the last ``window`` keys
  (``p - w < s <= p``) with exact softmax and every older key (``s <= p - w``) linearly, under ONE shared
  normaliser:
      A_sm(s) = g_h * exp(scale * q.k_s - m_p)   (window keys; m_p = the largest window score of the row)
      A_ln(s) = phi_q(q) . phi_k(k_s)           (older keys)
      o_p     = sum_s (A_sm(s) + A_ln(s)) v_s / (sum_s (A_sm(s) + A_ln(s)) + eps)
  ``g_h = window_factor`` (per query head, in (0, 1], trained as a sigmoid) mixes the two. Forms:
  :func:`hybrid_attention_reference` (quadratic) and :func:`hybrid_attention_chunked` (O(T (C + w))).

Conventions (shared with the Triton kernels in this folder):

* ``q: [B, H, Sq, F]``, ``k: [B, Hkv, T, F]``, ``v: [B, Hkv, T, D]``; ``H % Hkv == 0``: query head h reads KV
  head ``h // (H // Hkv)``, and the state ``S: [B, Hkv, F, D]``, ``z: [B, Hkv, F]`` is per KV head (the
  group shares it: GQA costs no extra state). ``log_decay: [B, Hkv, T]``, <= 0.
* Linear forms: ``Sq == T`` (query t reads keys <= t). Hybrid forms: ``Sq <= T``, queries aligned to the END
  of the keys (query i sits at key position ``T - Sq + i``): the first keys are context (a decode cache's
  window), everything before them is in ``initial_state``.
* ``initial_state=(S0, z0)``: the state of every earlier token (for the hybrid: tokens older than the
  window of every query). ``return_state=True`` also returns the state after the last token — for the
  hybrid, the state of every key older than the window of the NEXT token (all but the last ``window - 1``
  keys), which together with those keys is all a decoder keeps.
* ``cu_seqlens: [N + 1]`` int with ``B == 1``: packed sequences, each on its own (no initial state; the
  returned state is ``[N, Hkv, ...]``, one per sequence).
* ``key_padding_mask: [B, T]`` bool (hybrid), True = a real token: padded keys contribute nothing.
* States and sums are float32 (float64 for float64 inputs) whatever the input dtype (fp16 overflows);
  outputs come back in ``v.dtype``.

Returns ``out [B, H, Sq, D]``, or ``(out, (S, z))`` with ``return_state=True``.
"""

from __future__ import annotations

import torch

__all__ = ["check_linear_inputs", "fold_into_state", "hybrid_attention_chunked", "hybrid_attention_reference",
           "hybrid_decode_step", "linear_attention_chunked", "linear_attention_recurrent", "linear_attention_reference"]


# -- checks ---------------------------------------------------------------------------------------------

def check_linear_inputs(q, k, v, *, log_decay=None, initial_state=None, cu_seqlens=None, same_length=True,
                        key_padding_mask=None):
    """Validate shapes; raise ValueError naming the problem and the fix. Returns (B, H, Hkv, Sq, T, F, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, seq, dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Sq, F = q.shape
    Bk, Hkv, T, Fk = k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and length with each "
                         f"other and batch {B} with q")
    if Fk != F:
        raise ValueError(f"q and k must have the same feature dim, got {F} and {Fk}")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    if same_length and Sq != T:
        raise ValueError(f"linear attention reads one key per query: q has {Sq} tokens, k has {T}")
    if Sq > T:
        raise ValueError(f"more queries ({Sq}) than keys ({T}): queries are aligned to the end of the keys")
    D = v.shape[-1]
    if log_decay is not None and tuple(log_decay.shape) != (B, Hkv, T):
        raise ValueError(f"log_decay must be [B, Hkv, T] = {(B, Hkv, T)}, got {tuple(log_decay.shape)}")
    if initial_state is not None:
        if cu_seqlens is not None:
            raise ValueError("initial_state with cu_seqlens is not supported: pass one sequence per call instead")
        s0, z0 = initial_state
        if tuple(s0.shape) != (B, Hkv, F, D) or tuple(z0.shape) != (B, Hkv, F):
            raise ValueError(f"initial_state must be (S [B, Hkv, F, D] = {(B, Hkv, F, D)}, z [B, Hkv, F]); got "
                             f"{tuple(s0.shape)}, {tuple(z0.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along one row: batch must be 1, got {B}")
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != T or (cu_seqlens[1:] < cu_seqlens[:-1]).any():
            raise ValueError(f"cu_seqlens must rise from 0 to the token count {T}, got {cu_seqlens.tolist()}")
        if Sq != T:
            raise ValueError("cu_seqlens needs as many queries as keys")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, T):
        raise ValueError(f"key_padding_mask must be [B, T] = {(B, T)}, got {tuple(key_padding_mask.shape)}")
    return B, H, Hkv, Sq, T, F, D


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads(x, groups):
    """(B, Hkv, ...) -> (B, Hkv * groups, ...): each KV head repeated for the query heads that read it."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _segments(cu_seqlens, T, device):
    """Segment id of each of T tokens (all 0 without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.zeros(T, dtype=torch.long, device=device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def _zero_state(B, Hkv, F, D, dtype, device):
    return (torch.zeros(B, Hkv, F, D, dtype=dtype, device=device), torch.zeros(B, Hkv, F, dtype=dtype, device=device))


# -- linear (and gated linear) --------------------------------------------------------------------------

def linear_attention_reference(q, k, v, *, log_decay=None, normalize=True, eps=1e-6, initial_state=None,
                               return_state=False, cu_seqlens=None):
    """Causal (gated) linear attention, quadratic form: the spec. See the module docstring."""
    B, H, Hkv, T, _, F, D = check_linear_inputs(q, k, v, log_decay=log_decay, initial_state=initial_state,
                                                cu_seqlens=cu_seqlens)
    acc, g = _acc_dtype(v), H // Hkv
    qf, kf, vf = q.to(acc), _heads(k.to(acc), g), _heads(v.to(acc), g)
    t = torch.arange(T, device=q.device)
    seg = _segments(cu_seqlens, T, q.device)
    allowed = (t[:, None] >= t[None, :]) & (seg[:, None] == seg[None, :])                # (T, T)
    scores = qf @ kf.transpose(-1, -2)                                                   # (B, H, T, T)
    if log_decay is None:
        weights = scores.masked_fill(~allowed, 0)
        carry = None
    else:
        cum = _segment_cumsum(log_decay.to(acc), seg, cu_seqlens)                                     # (B, Hkv, T)
        diff = cum[..., :, None] - cum[..., None, :]                                      # (B, Hkv, T, T)
        decay = torch.exp(diff.masked_fill(~allowed, float("-inf")))
        weights = scores * _heads(decay, g)
        carry = torch.exp(cum)                                                            # decay since the start
    out = weights @ vf
    den = weights.sum(-1)
    if initial_state is not None:
        s0, z0 = (_heads(x.to(acc), g) for x in initial_state)
        q0 = qf if carry is None else qf * _heads(carry, g)[..., None]
        out = out + q0 @ s0
        den = den + (q0 * z0[:, :, None, :]).sum(-1)
    if normalize:
        out = out / (den[..., None] + eps)
    out = out.to(v.dtype)
    if not return_state:
        return out
    return out, _final_linear_state(k, v, log_decay, initial_state, cu_seqlens, seg)


def _segment_cumsum(x, seg, cu_seqlens):
    """Cumulative sum along the last dim, restarting at every segment boundary."""
    cum = x.cumsum(-1)
    if cu_seqlens is None:
        return cum
    start = cu_seqlens.to(x.device)[seg]                                                 # first token of its segment
    return cum - (cum[..., start] - x[..., start])                                       # minus cum before the start


def _final_linear_state(k, v, log_decay, initial_state, cu_seqlens, seg):
    """(S, z) after the last token of each sequence."""
    acc = _acc_dtype(v)
    kf, vf = k.to(acc), v.to(acc)
    if log_decay is not None and k.shape[2]:        # weight of key s in the final state: prod_{i > s} a_i
        cum = _segment_cumsum(log_decay.to(acc), seg, cu_seqlens)
        ends = cum[..., _segment_ends(cu_seqlens, k.shape[2], k.device)][..., seg]        # cum at each segment end
        kf = kf * torch.exp(ends - cum)[..., None]
    if cu_seqlens is None:
        s = kf.transpose(-1, -2) @ vf                                                     # (B, Hkv, F, D)
        z = kf.sum(2)
        if initial_state is not None:
            s0, z0 = (x.to(acc) for x in initial_state)
            if log_decay is not None:
                total = torch.exp(log_decay.to(acc).sum(-1))                              # (B, Hkv)
                s0, z0 = s0 * total[..., None, None], z0 * total[..., None]
            s, z = s + s0, z + z0
        return s, z
    bounds = cu_seqlens.tolist()
    states = [(kf[:, :, a:b].transpose(-1, -2) @ vf[:, :, a:b], kf[:, :, a:b].sum(2)) for a, b in
              zip(bounds[:-1], bounds[1:])]
    return torch.cat([s for s, _ in states]), torch.cat([z for _, z in states])


def _segment_ends(cu_seqlens, T, device):
    if cu_seqlens is None:
        return torch.tensor([T - 1], device=device)
    return (cu_seqlens[1:] - 1).clamp_min(0).to(device)


def linear_attention_recurrent(q, k, v, *, log_decay=None, normalize=True, eps=1e-6, initial_state=None,
                               return_state=False, cu_seqlens=None):
    """The same as `linear_attention_reference`, one token at a time: what a decoder does at every step."""
    B, H, Hkv, T, _, F, D = check_linear_inputs(q, k, v, log_decay=log_decay, initial_state=initial_state,
                                                cu_seqlens=cu_seqlens)
    acc, g = _acc_dtype(v), H // Hkv
    if cu_seqlens is not None:                      # each sequence on its own, then concatenated
        bounds = cu_seqlens.tolist()
        parts = [linear_attention_recurrent(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                            log_decay=None if log_decay is None else log_decay[..., a:b],
                                            normalize=normalize, eps=eps, return_state=True)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        out = torch.cat([o for o, _ in parts], dim=2)
        if not return_state:
            return out
        return out, (torch.cat([s for _, (s, _) in parts]), torch.cat([z for _, (_, z) in parts]))
    s, z = (x.to(acc).clone() for x in initial_state) if initial_state is not None else \
        _zero_state(B, Hkv, F, D, acc, q.device)
    outs = []
    for t in range(T):
        kt, vt = k[:, :, t].to(acc), v[:, :, t].to(acc)                                    # (B, Hkv, F), (B, Hkv, D)
        if log_decay is not None:
            a = torch.exp(log_decay[:, :, t].to(acc))
            s, z = s * a[..., None, None], z * a[..., None]
        s = s + kt[..., :, None] * vt[..., None, :]
        z = z + kt
        qt = q[:, :, t].to(acc).view(B, Hkv, g, F)
        o = torch.einsum("bngf,bnfd->bngd", qt, s)
        if normalize:
            o = o / (torch.einsum("bngf,bnf->bng", qt, z)[..., None] + eps)
        outs.append(o.reshape(B, H, D))
    out = torch.stack(outs, dim=2).to(v.dtype) if outs else v.new_zeros(B, H, 0, D)
    return (out, (s, z)) if return_state else out


def linear_attention_chunked(q, k, v, *, log_decay=None, normalize=True, eps=1e-6, initial_state=None,
                             return_state=False, chunk_size=64):
    """The same as `linear_attention_reference` in chunks of `chunk_size` tokens (no cu_seqlens): exact
    attention inside a chunk, the (decayed) state carried between chunks. Memory O(T * chunk_size)."""
    B, H, Hkv, T, _, F, D = check_linear_inputs(q, k, v, log_decay=log_decay, initial_state=initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    acc, g = _acc_dtype(v), H // Hkv
    s, z = (x.to(acc) for x in initial_state) if initial_state is not None else \
        _zero_state(B, Hkv, F, D, acc, q.device)
    outs = []
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        qc = q[:, :, a:b].to(acc).reshape(B, Hkv, g * (b - a), F)    # a group's queries side by side (no repeat)
        kc, vc = k[:, :, a:b].to(acc), v[:, :, a:b].to(acc)
        c = b - a
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        scores = (qc @ kc.transpose(-1, -2)).view(B, Hkv, g, c, c)
        if log_decay is None:
            w = scores.masked_fill(~causal, 0)
            q_in = qc
        else:
            cum = log_decay[..., a:b].to(acc).cumsum(-1)                                   # (B, Hkv, c)
            diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
            w = scores * torch.exp(diff)[:, :, None]
            q_in = (qc.view(B, Hkv, g, c, F) * torch.exp(cum)[:, :, None, :, None]).view(B, Hkv, g * c, F)
        o = (w @ vc[:, :, None]).view(B, Hkv, g * c, D) + q_in @ s
        if normalize:
            den = w.sum(-1).view(B, Hkv, g * c) + (q_in * z[:, :, None, :]).sum(-1)
            o = o / (den[..., None] + eps)
        outs.append(o.view(B, H, c, D))
        if log_decay is None:
            s = s + kc.transpose(-1, -2) @ vc
            z = z + kc.sum(2)
        else:
            total = cum[..., -1]
            kd = kc * torch.exp(total[..., None] - cum)[..., None]                          # decay to the chunk end
            s = s * torch.exp(total)[..., None, None] + kd.transpose(-1, -2) @ vc
            z = z * torch.exp(total)[..., None] + kd.sum(2)
    out = torch.cat(outs, dim=2).to(v.dtype) if outs else v.new_zeros(B, H, 0, D)
    return (out, (s, z)) if return_state else out


# -- hybrid: sliding-window softmax + linear, one normaliser --------------------------------------------

def _window_factor(window_factor, H, acc, device):
    g = torch.as_tensor(window_factor, dtype=acc, device=device)
    if g.dim() == 0:
        g = g.expand(H)
    if tuple(g.shape) != (H,):
        raise ValueError(f"window_factor must be a number or one value per query head ({H}), got shape "
                         f"{tuple(g.shape)}")
    return g


def _check_hybrid(q, k, fq, fk, window):
    if q.shape[:3] != fq.shape[:3] or k.shape[:3] != fk.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)} / fq {tuple(fq.shape)} and k {tuple(k.shape)} / fk {tuple(fk.shape)} "
                         "must agree in batch, heads and length")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (tokens of exact softmax, counting the query's own), "
                         f"got {window!r}")


def hybrid_attention_reference(q, k, v, fq, fk, *, window, window_factor=1.0, scale=None, eps=1e-6,
                               initial_state=None, return_state=False, key_padding_mask=None, cu_seqlens=None):
    """Sliding-window softmax + linear attention under one normaliser, quadratic form: the spec.

    q: [B, H, Sq, Dk] and k: [B, Hkv, T, Dk] (after RoPE) for the softmax part; fq: [B, H, Sq, F] and
    fk: [B, Hkv, T, F] (their feature maps) for the linear part; v: [B, Hkv, T, D]. scale: default Dk^-0.5.
    See the module docstring for the formula, alignment and the state."""
    _check_hybrid(q, k, fq, fk, window)
    B, H, Hkv, Sq, T, F, D = check_linear_inputs(fq, fk, v, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                                 same_length=False, key_padding_mask=key_padding_mask)
    acc, g = _acc_dtype(v), H // Hkv
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gate = _window_factor(window_factor, H, acc, q.device)[None, :, None, None]
    pos_q = torch.arange(T - Sq, T, device=q.device)
    pos_k = torch.arange(T, device=q.device)
    delta = pos_q[:, None] - pos_k[None, :]                                                # (Sq, T)
    seg = _segments(cu_seqlens, T, q.device)
    same = seg[T - Sq:, None] == seg[None, :]
    in_window = (delta >= 0) & (delta < window) & same
    older = (delta >= window) & same
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, None, :]
        in_window, older = in_window & real, older & real                                  # (B, 1, Sq, T)
    vf = _heads(v.to(acc), g)
    scores = scale * (q.to(acc) @ _heads(k.to(acc), g).transpose(-1, -2))                  # (B, H, Sq, T)
    scores = scores.masked_fill(~in_window, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))                             # a row with no key
    a_sm = gate * torch.exp(scores - m)
    a_ln = (fq.to(acc) @ _heads(fk.to(acc), g).transpose(-1, -2)).masked_fill(~older, 0)
    weights = a_sm + a_ln
    out, den = weights @ vf, weights.sum(-1)
    if initial_state is not None:
        s0, z0 = (_heads(x.to(acc), g) for x in initial_state)
        out = out + fq.to(acc) @ s0
        den = den + (fq.to(acc) * z0[:, :, None, :]).sum(-1)
    out = (out / (den[..., None] + eps)).to(v.dtype)
    if not return_state:
        return out
    return out, _hybrid_state(fk, v, window, initial_state, key_padding_mask, cu_seqlens)


def _hybrid_state(fk, v, window, initial_state, key_padding_mask, cu_seqlens):
    """State of every key older than the next token's window: all but the last `window - 1` keys of each sequence."""
    acc = _acc_dtype(v)
    kf, vf = fk.to(acc), v.to(acc)
    if key_padding_mask is not None:
        kf = kf * key_padding_mask[:, None, :, None].to(acc)
    bounds = [0, fk.shape[2]] if cu_seqlens is None else cu_seqlens.tolist()
    states = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        e = max(a, b - (window - 1))
        states.append((kf[:, :, a:e].transpose(-1, -2) @ vf[:, :, a:e], kf[:, :, a:e].sum(2)))
    s, z = torch.cat([s for s, _ in states]), torch.cat([z for _, z in states])
    if initial_state is not None:
        s, z = s + initial_state[0].to(acc), z + initial_state[1].to(acc)
    return s, z


def hybrid_attention_chunked(q, k, v, fq, fk, *, window, window_factor=1.0, scale=None, eps=1e-6,
                             initial_state=None, return_state=False, key_padding_mask=None, chunk_size=64):
    """The same as `hybrid_attention_reference` (no cu_seqlens) with O(Sq * (chunk_size + window)) memory:
    each chunk of queries reads the keys of its own span plus the `window - 1` before it exactly, and every
    older key through the carried linear state."""
    _check_hybrid(q, k, fq, fk, window)
    B, H, Hkv, Sq, T, F, D = check_linear_inputs(fq, fk, v, initial_state=initial_state, same_length=False,
                                                 key_padding_mask=key_padding_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    acc = _acc_dtype(v)
    fk_real = fk if key_padding_mask is None else fk * key_padding_mask[:, None, :, None].to(fk.dtype)
    s, z = (x.to(acc) for x in initial_state) if initial_state is not None else \
        _zero_state(B, Hkv, F, D, acc, q.device)
    folded, outs = 0, []                                 # keys [0, folded) are in (s, z)
    for a in range(0, Sq, chunk_size):
        b = min(a + chunk_size, Sq)
        p0 = T - Sq + a                                  # key position of the chunk's first query
        lo = max(0, p0 - window + 1)                     # keys before lo are older than every query's window
        if lo > folded:
            s = s + fk_real[:, :, folded:lo].to(acc).transpose(-1, -2) @ v[:, :, folded:lo].to(acc)
            z = z + fk_real[:, :, folded:lo].to(acc).sum(2)
            folded = lo
        hi = T - Sq + b
        kpm = None if key_padding_mask is None else key_padding_mask[:, folded:hi]
        outs.append(hybrid_attention_reference(
            q[:, :, a:b], k[:, :, folded:hi], v[:, :, folded:hi], fq[:, :, a:b], fk[:, :, folded:hi],
            window=window, window_factor=window_factor, scale=scale, eps=eps, initial_state=(s, z),
            key_padding_mask=kpm).to(acc))
    out = torch.cat(outs, dim=2).to(v.dtype) if outs else v.new_zeros(B, H, 0, D)
    if not return_state:
        return out
    e = max(folded, T - (window - 1))
    s = s + fk_real[:, :, folded:e].to(acc).transpose(-1, -2) @ v[:, :, folded:e].to(acc)
    z = z + fk_real[:, :, folded:e].to(acc).sum(2)
    return out, (s, z)


# -- decoding: one new token per sequence, few and small ops (per-op overhead dominates at this size) -----

def fold_into_state(state, fk, v):
    """(S + fk^T v, z + sum fk): keys fk [B, Hkv, n, F] with values v [B, Hkv, n, D] join the state (fp32);
    state None = zeros."""
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    fk, v = fk.to(acc), v.to(acc)
    s, z = fk.transpose(-1, -2) @ v, fk.sum(2)
    return (s, z) if state is None else (state[0] + s, state[1] + z)


def hybrid_decode_step(q, k, v, fq, state, *, window_factor=1.0, scale=None, eps=1e-6, key_padding_mask=None):
    """`hybrid_attention_reference` for ONE query per sequence whose every key is inside its window.

    q: [B, H, 1, Dk], fq: [B, H, 1, F]; k: [B, Hkv, n, Dk], v: [B, Hkv, n, D] with n <= window (the cached window
    and the new token, which is last); state: (S, z) of every older key, or None. Returns out [B, H, 1, D]; the
    caller folds the key that leaves the window into the state (`fold_into_state`). Equal to the quadratic form
    (tested), with a handful of ops instead of masks over positions."""
    B, H, _, dk = q.shape
    hkv, n, D = k.shape[1], k.shape[2], v.shape[-1]
    g = H // hkv
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    scale = dk ** -0.5 if scale is None else scale
    qg = q.to(acc).reshape(B, hkv, g, dk)
    scores = scale * (qg @ k.to(acc).transpose(-1, -2))                                  # (B, Hkv, g, n)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, -n:], float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    gate = torch.as_tensor(window_factor, dtype=acc, device=q.device).expand(H).reshape(1, hkv, g, 1)
    p = gate * torch.exp(scores - m)
    num, den = p @ v.to(acc), p.sum(-1)                                                # (B, Hkv, g, D), (B, Hkv, g)
    if state is not None:
        fg = fq.to(acc).reshape(B, hkv, g, -1)
        num = num + fg @ state[0].to(acc)
        den = den + (fg @ state[1].to(acc)[..., None])[..., 0]
    return (num / (den[..., None] + eps)).reshape(B, H, 1, D).to(v.dtype)
