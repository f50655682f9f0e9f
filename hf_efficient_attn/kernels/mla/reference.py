"""MLA attention over a latent cache, in plain PyTorch: the definition the kernels are tested against.

Notation: B batch, H query heads, Hkv key/value head groups (query head h uses group h // (H // Hkv)),
Sq new tokens, Sk cached tokens (the new ones included, last), r latent rank, d_r RoPE-key dim,
Dn no-RoPE query/key dim, Dv value dim.

The cache holds, per token, one latent ``c: (r,)`` and one RoPE key ``k_rope: (d_r,)`` (already rotated),
shared by every head. Head h's key and value are up-projections of the latent,
``k_nope_h = W_uk[g] @ c`` and ``v_h = W_uv[g] @ c`` (``W_uk: (Hkv, Dn, r)``, ``W_uv: (Hkv, Dv, r)``), so

    score_h(t) = scale * (q_nope_h . W_uk[g] c_t  +  q_rope_h . k_rope_t)
               = scale * ((W_uk[g]^T q_nope_h) . c_t  +  q_rope_h . k_rope_t)     # "absorbed"
    out_h      = sum_t p_h(t) W_uv[g] c_t = W_uv[g] (sum_t p_h(t) c_t)

The absorbed form reads only ``c`` and ``k_rope``: attention over a single shared "head" of dim
``r + d_r`` with value dim ``r``, then one small matrix per head. ``mla_attention_expanded`` is the
other form (up-project every cached token, then ordinary attention); the two are equal.

Masks: ``causal`` is bottom-right aligned (new token i sees cached tokens <= Sk - Sq + i);
``attn_mask`` is a bool ``(B or 1, H or 1, Sq, Sk)`` tensor, True = attend; ``key_padding_mask`` is a bool
``(B, Sk)``, True = a real token. A row that may attend to nothing returns zeros and lse = -inf.
"""

from __future__ import annotations

import math

import torch

__all__ = ["absorb_query", "check_latent_inputs", "expand_latent_output", "latent_attention_reference",
           "mla_attention_expanded", "mla_attention_reference"]


def check_latent_inputs(q_lat, q_rope, latent, k_rope, attn_mask=None, key_padding_mask=None) -> None:
    """Shapes: q_lat (B, H, Sq, r), q_rope (B, H, Sq, d_r), latent (B, Sk, r), k_rope (B, Sk, d_r)."""
    if q_lat.dim() != 4 or q_rope.dim() != 4 or latent.dim() != 3 or k_rope.dim() != 3:
        raise ValueError(f"expected q_lat (B, H, Sq, r), q_rope (B, H, Sq, d_r), latent (B, Sk, r), k_rope (B, Sk, "
                         f"d_r); got {tuple(q_lat.shape)}, {tuple(q_rope.shape)}, {tuple(latent.shape)}, "
                         f"{tuple(k_rope.shape)}")
    B, H, Sq, r = q_lat.shape
    Sk = latent.shape[1]
    if q_rope.shape[:3] != (B, H, Sq):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} does not match q_lat {tuple(q_lat.shape)} in (B, H, Sq)")
    if latent.shape != (B, Sk, r):
        raise ValueError(f"latent {tuple(latent.shape)} must be (B={B}, Sk, r={r})")
    if k_rope.shape != (B, Sk, q_rope.shape[-1]):
        raise ValueError(f"k_rope {tuple(k_rope.shape)} must be (B={B}, Sk={Sk}, d_r={q_rope.shape[-1]})")
    if attn_mask is not None and (attn_mask.dtype != torch.bool or attn_mask.dim() != 4
                                  or attn_mask.shape[-2:] != (Sq, Sk)):
        raise ValueError(f"attn_mask must be bool (B or 1, H or 1, {Sq}, {Sk}), got {attn_mask.dtype} "
                         f"{tuple(attn_mask.shape)}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (B, Sk)):
        raise ValueError(f"key_padding_mask must be bool ({B}, {Sk}), got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")


def _group(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(Hkv, a, b) per group -> (H, a, b) per query head."""
    hkv = w.shape[0]
    if num_heads % hkv:
        raise ValueError(f"{num_heads} query heads cannot share {hkv} head groups evenly")
    return w.repeat_interleave(num_heads // hkv, 0)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """Map no-RoPE queries into the latent space: q_lat_h = W_uk[g]^T q_nope_h.

    q_nope: (B, H, Sq, Dn); w_uk: (Hkv, Dn, r). Returns (B, H, Sq, r)."""
    assert q_nope.dim() == 4 and w_uk.dim() == 3 and q_nope.shape[-1] == w_uk.shape[1], \
        f"q_nope {tuple(q_nope.shape)} vs w_uk {tuple(w_uk.shape)}"
    return torch.einsum("bhsd,hdr->bhsr", q_nope, _group(w_uk, q_nope.shape[1]))


def expand_latent_output(out_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Head outputs from latent outputs: out_h = W_uv[g] out_lat_h. out_lat: (B, H, Sq, r); w_uv: (Hkv, Dv, r).
    Returns (B, H, Sq, Dv)."""
    assert out_lat.dim() == 4 and w_uv.dim() == 3 and out_lat.shape[-1] == w_uv.shape[2], \
        f"out_lat {tuple(out_lat.shape)} vs w_uv {tuple(w_uv.shape)}"
    return torch.einsum("bhsr,hvr->bhsv", out_lat, _group(w_uv, out_lat.shape[1]))


def _allowed(B, H, Sq, Sk, causal, attn_mask, key_padding_mask, device) -> torch.Tensor | None:
    """Bool (B or 1, H or 1, Sq, Sk), True = attend; None = everything."""
    allowed = None
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        t = torch.arange(Sk, device=device)[None, :]
        allowed = (t <= Sk - Sq + i)[None, None]
    if attn_mask is not None:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        allowed = kpm if allowed is None else allowed & kpm
    return allowed


def latent_attention_reference(q_lat, q_rope, latent, k_rope, *, scale: float, causal: bool = False,
                               attn_mask=None, key_padding_mask=None):
    """Softmax attention of every head over the shared latent cache (the absorbed form's core).

    q_lat: (B, H, Sq, r), q_rope: (B, H, Sq, d_r), latent: (B, Sk, r), k_rope: (B, Sk, d_r); `scale`
    multiplies the scores (it is the ORIGINAL model's 1/sqrt(head_dim), not 1/sqrt(r + d_r)).
    Returns (out_lat (B, H, Sq, r) in q_lat.dtype, lse (B, H, Sq) fp32, or fp64 for fp64 inputs).
    Computed in fp32 (fp64 for fp64 inputs).
    """
    check_latent_inputs(q_lat, q_rope, latent, k_rope, attn_mask, key_padding_mask)
    B, H, Sq, _ = q_lat.shape
    Sk = latent.shape[1]
    acc = torch.float64 if q_lat.dtype == torch.float64 else torch.float32
    scores = (torch.einsum("bhsr,btr->bhst", q_lat.to(acc), latent.to(acc))
              + torch.einsum("bhsd,btd->bhst", q_rope.to(acc), k_rope.to(acc))) * scale      # (B, H, Sq, Sk)
    allowed = _allowed(B, H, Sq, Sk, causal, attn_mask, key_padding_mask, q_lat.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                                                    # (B, H, Sq)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out_lat = torch.einsum("bhst,btr->bhsr", p, latent.to(acc))
    return out_lat.to(q_lat.dtype), lse


def mla_attention_reference(q_nope, q_rope, latent, k_rope, w_uk, w_uv, *, scale: float, causal: bool = False,
                            attn_mask=None, key_padding_mask=None):
    """MLA in the absorbed form: ``expand(attention(absorb(q_nope), q_rope; latent, k_rope), W_uv)``.

    q_nope: (B, H, Sq, Dn), q_rope: (B, H, Sq, d_r), latent: (B, Sk, r), k_rope: (B, Sk, d_r),
    w_uk: (Hkv, Dn, r), w_uv: (Hkv, Dv, r). Returns (out (B, H, Sq, Dv), lse (B, H, Sq))."""
    q_lat = absorb_query(q_nope, w_uk)
    out_lat, lse = latent_attention_reference(q_lat, q_rope, latent, k_rope, scale=scale, causal=causal,
                                              attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    return expand_latent_output(out_lat, w_uv), lse


def mla_attention_expanded(q_nope, q_rope, latent, k_rope, w_uk, w_uv, *, scale: float, causal: bool = False,
                           attn_mask=None, key_padding_mask=None):
    """The same attention computed the other way: up-project every cached latent to per-group keys
    ``[W_uk c ; k_rope]`` and values ``W_uv c``, then plain softmax attention. Shapes as in
    `mla_attention_reference`. Returns (out (B, H, Sq, Dv), lse (B, H, Sq))."""
    B, H, Sq, _ = q_nope.shape
    Sk = latent.shape[1]
    w_k, w_v = _group(w_uk, H), _group(w_uv, H)                                    # (H, Dn, r), (H, Dv, r)
    acc = torch.float64 if q_nope.dtype == torch.float64 else torch.float32
    k_nope = torch.einsum("hdr,btr->bhtd", w_k.to(acc), latent.to(acc))            # (B, H, Sk, Dn)
    v = torch.einsum("hvr,btr->bhtv", w_v.to(acc), latent.to(acc))                 # (B, H, Sk, Dv)
    k = torch.cat([k_nope, k_rope.to(acc)[:, None].expand(B, H, Sk, k_rope.shape[-1])], dim=-1)
    q = torch.cat([q_nope.to(acc), q_rope.to(acc)], dim=-1)
    scores = torch.einsum("bhsd,bhtd->bhst", q, k) * scale
    allowed = _allowed(B, H, Sq, Sk, causal, attn_mask, key_padding_mask, q_nope.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhst,bhtv->bhsv", p, v).to(q_nope.dtype), lse
