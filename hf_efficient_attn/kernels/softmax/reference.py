"""Plain-PyTorch softmax attention: the specification every softmax kernel is tested against.

Two implementations of one definition live here:

* :func:`softmax_attention_naive` materialises the full score matrix. It is short enough to read
  top to bottom and is the spec of the spec; use it only on small shapes.
* :func:`softmax_attention_reference` computes exactly the same thing blockwise, with an online
  softmax over KV blocks inside query blocks, so its peak memory is O(block_q * block_k) per head
  instead of O(Sq * Skv). It skips blocks that a causal mask or a sliding window rules out, and
  under autograd it recomputes each query block in backward (activation checkpointing) so training
  through it does not keep an S x S matrix alive either.

Conventions (shared with the Triton kernels):

* ``q: [B, Hq, Sq, D]``, ``k: [B, Hkv, Skv, D]``, ``v: [B, Hkv, Skv, Dv]``; ``Hq % Hkv == 0`` and query
  head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA/MQA without repeating K/V).
* Queries are aligned to the END of the keys (bottom-right): query ``i`` sits at position
  ``i + Skv - Sq``. That is what a KV cache gives: past tokens first, then the current ones.
* ``causal``: query at position ``p`` sees keys ``j <= p``.
* ``window=w``: query at position ``p`` sees keys with ``p - j < w`` (``w`` keys counting itself),
  the convention of transformers' Mistral/Gemma sliding windows; non-causal windows are symmetric
  (``|p - j| < w``).
* ``key_padding_mask: [B, Skv]`` bool, True = a real token.
* ``attn_mask: [B|1, Hq|1, Sq, Skv]``: bool (True = may attend) or float (added to the scores).
  It is combined with every other rule above.
* ``softcap=c``: scores become ``c * tanh(scores / c)`` (Gemma 2), after scaling.
* ``sinks: [Hq]``: one extra logit per head that joins the softmax denominator and has no value
  (GPT-OSS ``s_aux``); or one per query, ``[B|1, Hq, Sq]`` (or ``[B|1, Hq, Sq, 1]``, Inkling2's ``sinks``).
* ``cu_seqlens_q / cu_seqlens_k: [N + 1]`` int: packed sequences with ``B == 1``; tokens attend only
  within their own sequence, each sequence bottom-right aligned on its own.
* A query row that may attend nothing returns 0 and ``lse = -inf`` (never NaN).
* ``dropout_p``: dropout on the normalised probabilities, as in eager attention during training.

Returns ``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] float32 (float64 for float64 inputs))``, with
``lse = log(sum_j exp(score_j) + sum_h exp(sink_h))`` in natural log.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["softmax_attention_naive", "softmax_attention_reference", "check_attention_inputs", "dense_attention_mask"]


def check_attention_inputs(q, k, v, *, key_padding_mask=None, attn_mask=None, sinks=None,
                           cu_seqlens_q=None, cu_seqlens_k=None, window=None, softcap=None):
    """Validate shapes and options; raise ValueError naming the problem and the fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and length "
                         f"with each other and batch {B} with q")
    if Dk != D:
        raise ValueError(f"q head_dim {D} != k head_dim {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"{Hq} query heads are not a multiple of {Hkv} key/value heads: GQA needs "
            f"num_attention_heads % num_key_value_heads == 0"
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Skv):
        raise ValueError(f"key_padding_mask must be [batch, kv_len] = {(B, Skv)}, got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        if attn_mask.dim() != 4 or attn_mask.shape[-2:] != (Sq, Skv) or attn_mask.shape[0] not in (1, B) \
                or attn_mask.shape[1] not in (1, Hq):
            raise ValueError(f"attn_mask must be [batch|1, heads|1, q_len, kv_len] = [{B}|1, {Hq}|1, {Sq}, {Skv}], "
                             f"got {tuple(attn_mask.shape)}")
    if sinks is not None:
        shape = tuple(sinks.shape)
        per_query = len(shape) in (3, 4) and shape[0] in (1, B) and shape[1] == Hq and shape[2] == Sq \
            and shape[3:] in ((), (1,))
        if shape != (Hq,) and not per_query:
            raise ValueError(f"sinks must be one logit per query head, shape ({Hq},), or one per query, "
                             f"[batch|1, heads, q_len(, 1)] = [{B}|1, {Hq}, {Sq}(, 1)]; got {shape}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("give both cu_seqlens_q and cu_seqlens_k (or neither)")
    if cu_seqlens_q is not None:
        if B != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
        if int(cu_seqlens_q[-1]) != Sq or int(cu_seqlens_k[-1]) != Skv or len(cu_seqlens_q) != len(cu_seqlens_k):
            raise ValueError(f"cu_seqlens must end at q_len={Sq} / kv_len={Skv} and have equal length")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be a positive number of keys, got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")


def _sinks_per_query(sinks, Hq):
    """Any accepted sinks shape as [B|1, Hq, Sq|1] (one logit per head broadcasts over queries)."""
    if sinks is None:
        return None
    if sinks.dim() == 1:
        return sinks.view(1, Hq, 1)
    return sinks.reshape(sinks.shape[0], Hq, sinks.shape[2])


def _segments(cu, n, device):
    """Per-token sequence index, sequence start and sequence length for packed layouts."""
    cu = cu.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=n)
    return seg, cu[:-1][seg], lengths[seg]


class _MaskSpec:
    """Everything that decides which (query, key) pairs may attend, evaluated on index blocks."""

    def __init__(self, q, k, *, causal, window, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k):
        self.Sq, self.Skv = q.shape[2], k.shape[2]
        self.offset = self.Skv - self.Sq  # bottom-right alignment
        self.causal, self.window = causal, (None if window is None else int(window))
        self.key_padding_mask = key_padding_mask
        self.attn_mask = attn_mask
        self.packed = cu_seqlens_q is not None
        if self.packed:
            dev = q.device
            self.seg_q, start_q, len_q = _segments(cu_seqlens_q, self.Sq, dev)
            self.seg_k, start_k, len_k = _segments(cu_seqlens_k, self.Skv, dev)
            # position of each query / key inside its own sequence, queries bottom-right aligned
            lk_of_q = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(dev, torch.long)[self.seg_q]
            self.pos_q = torch.arange(self.Sq, device=dev) - start_q + (lk_of_q - len_q)
            self.pos_k = torch.arange(self.Skv, device=dev) - start_k

    def block_may_attend(self, q0, q1, k0, k1):
        """False when no pair in the block can attend (lets the blockwise loop skip it)."""
        if self.packed:
            return bool((self.seg_q[q0:q1].min() <= self.seg_k[k1 - 1]) & (self.seg_q[q1 - 1] >= self.seg_k[k0]))
        p_lo, p_hi = q0 + self.offset, q1 - 1 + self.offset
        if self.causal and k0 > p_hi:
            return False
        if self.window is not None:
            if k1 - 1 <= p_lo - self.window:
                return False
            if not self.causal and k0 >= p_hi + self.window:
                return False
        return True

    def block(self, q0, q1, k0, k1, device):
        """Bool mask [B|1, Hq|1, q1-q0, k1-k0] (True = may attend) and an optional float bias."""
        if self.packed:
            pq, pk = self.pos_q[q0:q1, None], self.pos_k[None, k0:k1]
            allowed = self.seg_q[q0:q1, None] == self.seg_k[None, k0:k1]
        else:
            pq = torch.arange(q0, q1, device=device)[:, None] + self.offset
            pk = torch.arange(k0, k1, device=device)[None, :]
            allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
        if self.causal:
            allowed = allowed & (pk <= pq)
        if self.window is not None:
            allowed = allowed & (pq - pk < self.window)
            if not self.causal:
                allowed = allowed & (pk - pq < self.window)
        allowed = allowed[None, None]
        if self.key_padding_mask is not None:
            allowed = allowed & self.key_padding_mask[:, None, None, k0:k1].bool()
        bias = None
        if self.attn_mask is not None:
            m = self.attn_mask[:, :, q0:q1, k0:k1]
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                bias = m
        return allowed, bias


def dense_attention_mask(q_len, kv_len, *, causal=False, window=None, key_padding_mask=None,
                         cu_seqlens_q=None, cu_seqlens_k=None, device="cpu"):
    """The boolean mask [B|1, 1, q_len, kv_len] (True = may attend) that the conventions above define.

    For backends that take an explicit mask (torch SDPA); the blockwise reference never builds it whole.
    """
    q = torch.empty(1, 1, q_len, 0, device=device)
    k = torch.empty(1, 1, kv_len, 0, device=device)
    spec = _MaskSpec(q, k, causal=causal, window=window, key_padding_mask=key_padding_mask, attn_mask=None,
                     cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return spec.block(0, q_len, 0, kv_len, torch.device(device))[0]


def _scores(qb, kb, scale, softcap):
    # qb: (B, Hkv, G, bq, D), kb: (B, Hkv, bk, D) -> (B, Hkv, G, bq, bk)
    s = torch.matmul(qb, kb.unsqueeze(2).transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return s


def _heads_view(t, Hkv, G):
    """[B|1, Hq|1, ...] -> [B|1, Hkv|1, G|1, ...] so masks broadcast against grouped scores."""
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (Hkv, G))


def _query_block(qb, k, v, sinks, spec, q0, q1, scale, softcap, dropout_p, block_k, acc_dtype):
    """Online softmax of one query block over all KV blocks it may see. qb: (B, Hkv, G, bq, D)."""
    B, Hkv, G, bq, _ = qb.shape
    Skv, Dv = k.shape[2], v.shape[-1]
    dev = qb.device
    m = torch.full((B, Hkv, G, bq), -math.inf, dtype=acc_dtype, device=dev)  # running max
    l = torch.zeros((B, Hkv, G, bq), dtype=acc_dtype, device=dev)  # running denominator
    acc = torch.zeros((B, Hkv, G, bq, Dv), dtype=acc_dtype, device=dev)
    for k0 in range(0, Skv, block_k):
        k1 = min(k0 + block_k, Skv)
        if not spec.block_may_attend(q0, q1, k0, k1):
            continue
        s = _scores(qb, k[:, :, k0:k1].to(acc_dtype), scale, softcap)
        allowed, bias = spec.block(q0, q1, k0, k1, dev)
        if bias is not None:
            s = s + _heads_view(bias, Hkv, G).to(acc_dtype)
        s = s.masked_fill(~_heads_view(allowed, Hkv, G), -math.inf)
        # -- update m and l; rows that have seen nothing yet keep m = -inf, so shift by 0 there
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        if dropout_p > 0.0:
            p = torch.nn.functional.dropout(p, dropout_p, training=True)
        acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, v[:, :, k0:k1].to(acc_dtype).unsqueeze(2))
        m = m_new
    if sinks is not None:  # sinks: [B|1, Hq, Sq|1]
        sink = sinks[:, :, q0:q1] if sinks.shape[-1] > 1 else sinks
        sink = sink.to(acc_dtype).unflatten(1, (Hkv, G))
        m_new = torch.maximum(m, sink)
        alpha = torch.exp(m - m_new)
        l = l * alpha + torch.exp(sink - m_new)
        acc = acc * alpha.unsqueeze(-1)
        m = m_new
    empty = l == 0
    out = acc / torch.where(empty, torch.ones_like(l), l).unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(l))
    return out, lse


def softmax_attention_reference(q, k, v, *, scale=None, causal=False, window=None, softcap=None,
                                key_padding_mask=None, attn_mask=None, sinks=None,
                                cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0,
                                block_q=512, block_k=1024):
    """Blockwise exact softmax attention (see the module docstring for every convention).

    q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv] -> (out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32).
    Accumulates in fp32 (fp64 for fp64 inputs). Peak extra memory is a few
    B * Hq * block_q * block_k score tiles, independent of the sequence length.
    """
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, sinks=sinks,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, window=window, softcap=softcap)
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    spec = _MaskSpec(q, k, causal=causal, window=window, key_padding_mask=key_padding_mask,
                     attn_mask=attn_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if Sq == 0:
        return q.new_zeros(B, Hq, 0, v.shape[-1]), torch.zeros(B, Hq, 0, dtype=lse_dtype, device=q.device)
    qg = q.unflatten(1, (Hkv, G))  # (B, Hkv, G, Sq, D): query heads of one KV head side by side
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, sinks, attn_mask))
    sinks = _sinks_per_query(sinks, Hq)
    outs, lses = [], []
    for q0 in range(0, Sq, block_q):
        q1 = min(q0 + block_q, Sq)
        args = (qg[:, :, :, q0:q1].to(acc_dtype), k, v, sinks, spec, q0, q1, scale, softcap, dropout_p,
                block_k, acc_dtype)
        if needs_grad:
            o, lse = checkpoint(_query_block, *args, use_reentrant=False)
        else:
            o, lse = _query_block(*args)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, dim=3).flatten(1, 2).to(q.dtype)
    lse = torch.cat(lses, dim=3).flatten(1, 2).to(lse_dtype)
    return out, lse


def softmax_attention_naive(q, k, v, *, scale=None, causal=False, window=None, softcap=None,
                            key_padding_mask=None, attn_mask=None, sinks=None,
                            cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0):
    """The same definition with the full score matrix materialised, in fp32 or fp64. Small shapes only."""
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, sinks=sinks,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, window=window, softcap=softcap)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kr = k.to(dt).repeat_interleave(G, dim=1)
    vr = v.to(dt).repeat_interleave(G, dim=1)
    s = torch.matmul(q.to(dt), kr.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    spec = _MaskSpec(q, k, causal=causal, window=window, key_padding_mask=key_padding_mask,
                     attn_mask=attn_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    allowed, bias = spec.block(0, Sq, 0, Skv, q.device)
    if bias is not None:
        s = s + bias.to(dt)
    s = s.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        s = torch.cat([s, _sinks_per_query(sinks, Hq).to(dt).unsqueeze(-1).expand(B, Hq, Sq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    if sinks is not None:
        p = p[..., :-1]
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = torch.matmul(p, vr)
    return out.to(q.dtype), lse.to(torch.float64 if dt == torch.float64 else torch.float32)
