"""Split-KV decode for MLA in Triton: one new token per sequence against a latent cache.

Same definition as :func:`.reference.latent_attention_reference` with ``Sq == 1``: every head attends over
one shared cache of latents ``c: (Sk, r)`` and RoPE keys ``k_rope: (Sk, d_r)``, with value = the latent.

How it works:

* all H query heads of a sequence are packed into the M dimension of one tile, so each block of the
  latent cache is loaded ONCE per sequence for all heads (the point of MLA: one shared "KV head" of
  dim r + d_r), and the scores ``q_lat @ c^T + q_rope @ k_rope^T`` are real matrix products;
* the cache is cut into ``num_splits`` contiguous ranges, one program each (grid: split x batch), and
  each writes its normalised partial latent output and its partial log-sum-exp (base 2) in fp32;
* the shared merge (``triton_utils.jit.merge_splits``) combines the splits per (batch, head) with a
  log-sum-exp weighting;
* ``torch.compile``: the launchers are the custom op ``torch.ops.hfa.mla_decode_fwd`` (one graph node, no autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import (
    KERNEL_DTYPES,
    LOG2E,
    auto_num_splits,
    dot_flags,
    kernel_op,
    key_padding_arg,
    last_dim_contiguous,
    pad_dim,
    record_build,
)
from ..triton_utils.jit import merge_splits
from .reference import check_latent_inputs

__all__ = ["MAX_LATENT_DIM", "mla_decode"]

MAX_LATENT_DIM = 1024       # r and d_r: one tile row holds the whole latent

INTERPRETED = record_build(__name__)


@triton.heuristics({"HAS_KPM": lambda a: a["KPM"] is not None})
@triton.jit
def _mla_split_kernel(QL, QR, C, KR, KPM, O_PART, LSE_PART,
                      s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_cs, s_krb, s_krs, s_mb,
                      s_pb, s_ph, s_ps, s_lpb, s_lph,
                      H, S_K, N_SPLITS, qk_scale,
                      R: tl.constexpr, DR: tl.constexpr, R_PAD: tl.constexpr, DR_PAD: tl.constexpr,
                      HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    i_s = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, R_PAD)
    offs_dr = tl.arange(0, DR_PAD)
    m_h = offs_h < H

    # -- the queries of all heads: (BLOCK_H, R_PAD) latent part, (BLOCK_H, DR_PAD) RoPE part
    b_ql = tl.load(QL + i_b * s_qlb + offs_h[:, None] * s_qlh + offs_r[None, :],
                   mask=m_h[:, None] & (offs_r[None, :] < R), other=0.0)
    b_qr = tl.load(QR + i_b * s_qrb + offs_h[:, None] * s_qrh + offs_dr[None, :],
                   mask=m_h[:, None] & (offs_dr[None, :] < DR), other=0.0)
    if UPCAST:
        b_ql = b_ql.to(tl.float32)
        b_qr = b_qr.to(tl.float32)

    # -- this split's keys: [start, end)
    n_blocks = tl.cdiv(S_K, BLOCK_N)
    per_split = tl.cdiv(n_blocks, N_SPLITS)
    start = i_s * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, S_K)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R_PAD], tl.float32)
    for lo in range(start, end, BLOCK_N):
        offs_n = lo + tl.arange(0, BLOCK_N)
        m_n = offs_n < end
        # -- load one block of the latent cache and the RoPE keys, shared by all heads
        b_c = tl.load(C + i_b * s_cb + offs_n[:, None] * s_cs + offs_r[None, :],
                      mask=m_n[:, None] & (offs_r[None, :] < R), other=0.0)
        b_kr = tl.load(KR + i_b * s_krb + offs_n[:, None] * s_krs + offs_dr[None, :],
                       mask=m_n[:, None] & (offs_dr[None, :] < DR), other=0.0)
        if UPCAST:
            b_c = b_c.to(tl.float32)
            b_kr = b_kr.to(tl.float32)
        # -- scores in base 2: (q_lat c^T + q_rope k_rope^T) * scale / ln 2
        b_s = tl.dot(b_ql, tl.trans(b_c), input_precision=PRECISION)
        b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
        b_s = b_s * qk_scale
        m_k = m_n
        if HAS_KPM:
            m_k = m_k & (tl.load(KPM + i_b * s_mb + offs_n, mask=m_n, other=0) != 0)
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        # -- update m_i and l_i
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        b_p = tl.exp2(b_s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        # -- the value is the latent itself
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_c.dtype), b_c, input_precision=PRECISION)
        m_i = m_new

    # -- partial result: normalised latent output and base-2 log-sum-exp (-inf where the split saw nothing)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    p_o = O_PART + i_b * s_pb + offs_h[:, None] * s_ph + i_s * s_ps + offs_r[None, :]
    tl.store(p_o, b_o, mask=m_h[:, None] & (offs_r[None, :] < R))
    tl.store(LSE_PART + i_b * s_lpb + offs_h * s_lph + i_s, b_lse2, mask=m_h)


def _mla_decode(q_lat, q_rope, latent, k_rope, key_padding_mask, scale, num_splits, block_n):
    """(out_lat (B, H, 1, r), lse (B, H, 1) fp32): the launchers of :func:`mla_decode`, its checks done."""
    B, H, _, R = q_lat.shape
    Sk, DR = latent.shape[1], k_rope.shape[-1]
    out = torch.empty(B, H, 1, R, dtype=q_lat.dtype, device=q_lat.device)
    lse = torch.empty(B, H, 1, dtype=torch.float32, device=q_lat.device)
    if B == 0 or H == 0:
        return out, lse
    num_splits = num_splits or auto_num_splits(B, Sk, q_lat.device)
    o_part = torch.empty(B, H, num_splits, R, dtype=torch.float32, device=q_lat.device)
    lse_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_lat.device)
    kpm, s_mb = key_padding_arg(key_padding_mask)
    upcast, precision = dot_flags(q_lat.dtype)
    R_PAD, DR_PAD = pad_dim(R), pad_dim(DR)
    block_n = block_n or (32 if R_PAD >= 512 else 64)
    # -- one program per (split, batch): all heads share each loaded block of the cache
    _mla_split_kernel[(num_splits, B)](
        q_lat, q_rope, latent, k_rope, kpm, o_part, lse_part,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
        s_mb,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        H, Sk, num_splits, float(scale) * LOG2E,
        R=R, DR=DR, R_PAD=R_PAD, DR_PAD=DR_PAD, UPCAST=upcast, PRECISION=precision,
        BLOCK_H=pad_dim(H), BLOCK_N=block_n,
    )
    # -- merge the splits, one program per (batch * head): the partial results as one token of [B, H, 1, splits, r]
    merge_splits(o_part[:, :, None], lse_part[:, :, None], out, lse)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------------------------
# torch.ops.hfa.mla_decode_fwd: the launchers as a custom op (one torch.compile graph node). No autograd: decode
# is inference, and mla_decode detaches its inputs (its result never required grad).

@kernel_op("mla_decode_fwd", "(Tensor q_lat, Tensor q_rope, Tensor latent, Tensor k_rope, Tensor? key_padding_mask, "
           "float scale, int? num_splits, int? block_n) -> (Tensor, Tensor)")
def mla_decode_fwd(q_lat, q_rope, latent, k_rope, key_padding_mask, scale, num_splits, block_n):
    """(out_lat, lse) of :func:`mla_decode` (its checks already done)."""
    q_lat, q_rope, latent, k_rope = (last_dim_contiguous(t) for t in (q_lat, q_rope, latent, k_rope))
    return _mla_decode(q_lat, q_rope, latent, k_rope, key_padding_mask, scale, num_splits, block_n)


@mla_decode_fwd.register_fake
def _(q_lat, q_rope, latent, k_rope, key_padding_mask, scale, num_splits, block_n):
    B, H, _, R = q_lat.shape
    return q_lat.new_empty(B, H, 1, R), q_lat.new_empty(B, H, 1, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def mla_decode(q_lat, q_rope, latent, k_rope, *, scale: float, key_padding_mask=None, num_splits=None,
               block_n: int | None = None):
    """MLA decode over a latent cache with split-KV and a log-sum-exp merge. Forward only.

    q_lat: (B, H, 1, r) (no-RoPE queries already mapped into the latent space, see ``absorb_query``),
    q_rope: (B, H, 1, d_r), latent: (B, Sk, r), k_rope: (B, Sk, d_r) (rotated); one dtype among
    fp16/bf16/fp32, on CUDA (or on CPU with TRITON_INTERPRET=1); r, d_r <= 1024, H <= 128.
    key_padding_mask: optional bool (B, Sk), True = a real token. `scale` multiplies the scores.
    num_splits: how many cache ranges run in parallel (default: from the length and the SM count).

    Returns (out_lat (B, H, 1, r) in q_lat.dtype, lse (B, H, 1) fp32, natural log).
    """
    check_latent_inputs(q_lat, q_rope, latent, k_rope, key_padding_mask=key_padding_mask)
    B, H, Sq, R = q_lat.shape
    DR = k_rope.shape[-1]
    if Sq != 1:
        raise ValueError(f"mla_decode serves one new token per sequence, got Sq={Sq}: use the reference "
                         "(latent_attention_reference) for prefill or chunks")
    dtypes = {t.dtype for t in (q_lat, q_rope, latent, k_rope)}
    if len(dtypes) != 1 or q_lat.dtype not in KERNEL_DTYPES:
        raise ValueError(f"mla_decode needs all inputs in one dtype among float16/bfloat16/float32, got {dtypes}")
    if max(R, DR) > MAX_LATENT_DIM or H > 128:
        raise ValueError(f"r={R}, d_r={DR}, H={H}: mla_decode supports r, d_r <= {MAX_LATENT_DIM} and H <= 128")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    q_lat, q_rope, latent, k_rope = (t.detach() for t in (q_lat, q_rope, latent, k_rope))
    return mla_decode_fwd(q_lat, q_rope, latent, k_rope, key_padding_mask, float(scale), num_splits, block_n)
