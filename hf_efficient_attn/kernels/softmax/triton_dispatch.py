"""Which Triton softmax kernel serves an attention call, and whether one can at all.

* :func:`triton_unsupported_reason` says in a few words why Triton cannot serve a call (None when
  it can), so a caller can fall back to an exact path and log why;
* :func:`triton_softmax_attention` runs the call: the split-KV decode kernel for at most 16 query
  tokens when no gradient is needed, otherwise the FlashAttention forward (and its backward through
  autograd).

This module imports triton only when a kernel runs, so it also answers on machines without triton.
"""

from __future__ import annotations

import torch

from ..triton_utils import MAX_HEAD_DIM, inputs_unsupported_reason, max_seqlen
from .reference import check_attention_inputs

__all__ = ["triton_unsupported_reason", "triton_softmax_attention"]

MAX_DECODE_Q_LEN = 16  # the decode kernel packs G x q_len rows in one tile (triton_decode.MAX_DECODE_Q_LEN)


def triton_unsupported_reason(q, k, v, *, scale=None, causal=False, window=None, softcap=None,
                              key_padding_mask=None, attn_mask=None, sinks=None, cu_seqlens_q=None,
                              cu_seqlens_k=None, dropout_p=0.0) -> str | None:
    """None when the Triton kernels compute this call exactly; else a short reason.

    Shapes are not validated here (the kernels raise ValueError on bad input, like the reference).
    """
    why = inputs_unsupported_reason(dict(q=q, k=k, v=v), extra=(sinks, key_padding_mask))
    if why is not None:
        return why
    if attn_mask is not None:
        return "arbitrary 4-D attn_mask"
    if dropout_p:
        return "dropout"
    if sinks is not None and sinks.dim() != 1:
        return "per-query sinks; the kernels take one sink logit per head"
    head_dim = max(q.shape[-1], v.shape[-1])
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    return None


def triton_softmax_attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None,
                             key_padding_mask=None, attn_mask=None, sinks=None, cu_seqlens_q=None,
                             cu_seqlens_k=None, dropout_p=0.0, max_seqlen_q=None, max_seqlen_k=None):
    """Softmax attention on the Triton kernels; the arguments and the result are the reference's.

    q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv] -> (out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32).
    Decode kernel when every sequence has at most 16 query tokens and no gradient is needed; else
    the FlashAttention kernels (differentiable). Raises ValueError when Triton cannot serve the call.
    """
    reason = triton_unsupported_reason(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
                                       key_padding_mask=key_padding_mask, attn_mask=attn_mask, sinks=sinks,
                                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p)
    if reason is not None:
        raise ValueError(f"the Triton kernels cannot serve this attention call: {reason}; use the reference "
                         f"(softmax_attention_reference) for it")
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, sinks=sinks, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, window=window, softcap=softcap)
    if cu_seqlens_q is not None:
        if max_seqlen_q is None:
            max_seqlen_q = max_seqlen(cu_seqlens_q)
        if max_seqlen_k is None:
            max_seqlen_k = max_seqlen(cu_seqlens_k)
    opts = dict(scale=scale, causal=causal, window=window, softcap=softcap, key_padding_mask=key_padding_mask,
                sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    q_len = q.shape[2] if cu_seqlens_q is None else max_seqlen_q
    if not needs_grad and q_len <= MAX_DECODE_Q_LEN:
        from .triton_decode import decode_attention
        return decode_attention(q, k, v, **opts)
    from .triton_flash import flash_attention
    return flash_attention(q, k, v, **opts)
