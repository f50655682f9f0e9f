"""Split-KV (flash-decoding) softmax attention in Triton for 1-16 new query tokens against a long KV cache.

Same definition and conventions as :mod:`.reference`. Forward only (inference); the launcher is the custom op
``torch.ops.hfa.decode_attention_fwd`` (one node under ``torch.compile``).

How it works:

* the query rows of one KV head's GQA group — ``G`` heads x ``q_len`` tokens — are packed into the
  M dimension of one tile (row ``r`` is head ``r // q_len``, token ``r % q_len``), so each K/V block
  is loaded once for the whole group and the dot products are real matrix products even at q_len = 1;
* the keys the tile may see are cut into ``num_splits`` contiguous ranges, one program each
  (grid: split x batch * KV head x M tile), so a long cache keeps every SM streaming; each program
  writes its normalised partial output and its partial log-sum-exp (base 2) in fp32;
* the shared merge (``triton_utils.jit.merge_splits``) combines the splits per row with a log-sum-exp
  weighting and adds the sinks.

The score pipeline (softcap, masks, online softmax) is the forward kernel's own (``triton_flash.fwd_inner``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..triton_utils import (
    KERNEL_DTYPES,
    MAX_HEAD_DIM,
    auto_num_splits,
    cu_seqlens_arg,
    dot_flags,
    kernel_op,
    key_padding_arg,
    last_dim_contiguous,
    max_seqlen,
    pad_dim,
    record_build,
)
from ..triton_utils.jit import autotune_configs, merge_splits, seq_bounds, tile_pruner
from .reference import check_attention_inputs
from .triton_dispatch import MAX_DECODE_Q_LEN
from .triton_flash import (
    OPTION_NAMES,
    attention_backward,
    fake_attention_outputs,
    fwd_inner,
    score_consts,
    setup_attention_context,
)

__all__ = ["decode_attention", "decode_attention_fwd", "MAX_DECODE_Q_LEN"]

INTERPRETED = record_build(__name__)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

_SPLIT_SPACE = dict(BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))


def _split_default(d, fp32):
    # memory-bound: enough K/V bytes in flight per SM matter more than the tile shape
    if fp32 or d > 128:
        return dict(BLOCK_N=32), 4, 2
    return dict(BLOCK_N=64), 4, 4


@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.autotune(configs=autotune_configs(_SPLIT_SPACE, dict(BLOCK_N=64)), key=["D_PAD", "DV_PAD", "BLOCK_M", "PRECISION"],
                 prune_configs_by={"early_config_prune": tile_pruner(_split_default)})
@triton.jit
def _decode_split_kernel(Q, K, V, KPM, CU_Q, CU_K, O_PART, LSE_PART,
                         s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb,
                         s_pb, s_ph, s_ps, s_lpb, s_lph, s_lps,
                         H_KV, G, S_Q, S_K, Q_ROWS, N_SPLITS, W, qk_scale, sc_in, sc_out,
                         D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_mt = tl.program_id(2)
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    off = L_k - L_q

    # -- the tile's rows: (query head of the group, query token), Q_ROWS tokens per head
    offs_r = i_mt * BLOCK_M + tl.arange(0, BLOCK_M)
    r_g = offs_r // Q_ROWS
    r_i = offs_r % Q_ROWS
    m_r = (r_g < G) & (r_i < L_q)
    r_h = i_hk * G + r_g
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    p_q = Q + i_b * s_qb + r_h[:, None] * s_qh + (bos_q + r_i[:, None]) * s_qs + offs_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (offs_d[None, :] < D), other=0.0)
    pos_q = r_i + off

    # -- this split's share of the keys any row may see: [lo, L_k), the window's lower edge excluded
    lo = off * 0
    if HAS_WINDOW:
        lo = tl.maximum(off - W + 1, 0) // BLOCK_N * BLOCK_N
    n_blocks = tl.cdiv(tl.maximum(L_k - lo, 0), BLOCK_N)
    per_split = tl.cdiv(n_blocks, N_SPLITS)
    start = lo + i_s * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, L_k)

    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    p_kpm = KPM
    if HAS_KPM:
        p_kpm = KPM + i_b * s_mb + bos_k
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    acc, l_i, m_i = fwd_inner(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, pos_q, start, end, L_k, W, s_ks, s_vs,
                               qk_scale, sc_in, sc_out, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                               D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)

    # -- partial result: normalised output and base-2 log-sum-exp (-inf where the split saw nothing)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    row = i_b * s_pb + r_h * s_ph + (bos_q + r_i) * s_ps + i_s * DV
    tl.store(O_PART + row[:, None] + offs_dv[None, :], b_o, mask=m_r[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE_PART + i_b * s_lpb + r_h * s_lph + (bos_q + r_i) * s_lps + i_s, b_lse2, mask=m_r)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def _decode_fwd(q, k, v, *, scale, causal, window, softcap, key_padding_mask, sinks, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, num_splits):
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    out = torch.empty(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(-math.inf)
    cu_q, cu_k = cu_seqlens_arg(cu_seqlens_q), cu_seqlens_arg(cu_seqlens_k)
    kpm, s_mb = key_padding_arg(key_padding_mask)
    n_seq = B if cu_q is None else cu_q.numel() - 1
    rows = G * max_seqlen_q
    BLOCK_M = min(64, pad_dim(rows))
    m_tiles = triton.cdiv(rows, BLOCK_M)
    if num_splits is None:
        num_splits = auto_num_splits(n_seq * Hkv * m_tiles, max_seqlen_k, q.device)
    o_part = torch.empty(B, Hq, Sq, num_splits, Dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, Sq, num_splits, dtype=torch.float32, device=q.device)
    upcast, precision = dot_flags(q.dtype)
    qk_scale, sc_in, sc_out = score_consts(scale, softcap)
    # -- one program per (split, batch * KV head, M tile)
    _decode_split_kernel[(num_splits, n_seq * Hkv, m_tiles)](
        q, k, v, kpm, cu_q, cu_k, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), s_mb,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        Hkv, G, Sq, Skv, max_seqlen_q, num_splits, int(window or 0), qk_scale, sc_in, sc_out,
        D=D, DV=Dv, D_PAD=pad_dim(D), DV_PAD=pad_dim(Dv),
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast, PRECISION=precision, BLOCK_M=BLOCK_M,
    )
    # -- merge the splits (and add the sinks), one program per (token, batch * query head)
    merge_splits(o_part, lse_part, out, lse, sinks)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------------------------
# torch.ops.hfa.decode_attention_fwd: the launcher as a custom op (one torch.compile graph node). Its (out, lse) is
# the flash forward's, so its registered backward is the flash backward: the op is differentiable, though
# decode_attention itself refuses gradients (the FlashAttention forward is the faster way to get them).

@kernel_op("decode_attention_fwd", "(Tensor q, Tensor k, Tensor v, Tensor? sinks, Tensor? key_padding_mask, "
           "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, float scale, bool causal, int? window, float? softcap, "
           "int max_seqlen_q, int max_seqlen_k, int? num_splits) -> (Tensor, Tensor)")
def decode_attention_fwd(q, k, v, sinks, *options):
    """(out, lse) of :func:`decode_attention` (its checks already done; options in ``OPTION_NAMES`` order, then
    num_splits)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _decode_fwd(q, k, v, sinks=sinks, **dict(zip((*OPTION_NAMES, "num_splits"), options)))


@decode_attention_fwd.register_fake
def _(q, k, v, sinks, *options):
    return fake_attention_outputs(q, v)


def _setup_decode_context(ctx, inputs, output):
    setup_attention_context(ctx, inputs[:-1], output)  # num_splits does not change the result


def _decode_backward(ctx, do, dlse):
    return attention_backward(ctx, do, dlse) + (None,)


decode_attention_fwd.register_autograd(_decode_backward, setup_context=_setup_decode_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def decode_attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None, key_padding_mask=None,
                     sinks=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                     num_splits=None):
    """Split-KV decode attention: 1-16 query tokens per sequence against a KV cache. Forward only.

    q: [B, Hq, Sq, D] with Sq <= 16 (per sequence when packed), k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv];
    fp16/bf16/fp32 on CUDA (or on CPU with TRITON_INTERPRET=1); D and Dv <= 256. The options mean what
    they mean in :func:`.triton_flash.flash_attention` (causal is bottom-right: the new tokens are the
    last ones of the cache). num_splits: how many KV ranges run in parallel (default: from the cache
    length and the SM count).

    Returns (out [B, Hq, Sq, Dv] in q.dtype, laid out as [B, Sq, Hq, Dv]; lse [B, Hq, Sq] fp32).
    """
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, sinks=sinks, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, window=window, softcap=softcap)
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention needs q, k, v of one dtype among float16/bfloat16/float32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}: use the reference")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks)):
        raise ValueError("decode_attention is forward-only; use flash_attention when gradients are needed")
    if cu_seqlens_q is None:
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    else:
        if max_seqlen_q is None:
            max_seqlen_q = max_seqlen(cu_seqlens_q)
        if max_seqlen_k is None:
            max_seqlen_k = max_seqlen(cu_seqlens_k)
    if max_seqlen_q > MAX_DECODE_Q_LEN:
        raise ValueError(f"decode_attention serves up to {MAX_DECODE_Q_LEN} query tokens per sequence, got "
                         f"{max_seqlen_q}: use flash_attention")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return decode_attention_fwd(q, k, v, sinks, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), bool(causal),
                                None if window is None else int(window), None if softcap is None else float(softcap),
                                int(max_seqlen_q), int(max(max_seqlen_k, 1)), num_splits)
