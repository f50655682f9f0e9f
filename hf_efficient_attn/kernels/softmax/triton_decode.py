"""Split-KV (flash-decoding) softmax attention in Triton for 1-16 new query tokens against a long KV cache.

Same definition and conventions as :mod:`.reference`. Forward only (inference).

How it works:

* the query rows of one KV head's GQA group — ``G`` heads x ``q_len`` tokens — are packed into the
  M dimension of one tile (row ``r`` is head ``r // q_len``, token ``r % q_len``), so each K/V block
  is loaded once for the whole group and the dot products are real matrix products even at q_len = 1;
* the keys the tile may see are cut into ``num_splits`` contiguous ranges, one program each
  (grid: split x batch * KV head x M tile), so a long cache keeps every SM streaming; each program
  writes its normalised partial output and its partial log-sum-exp (base 2) in fp32;
* a merge kernel combines the splits per row with a log-sum-exp weighting and adds the sinks.

The score pipeline (softcap, masks, online softmax) is the forward kernel's own (``_fwd_inner``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import check_attention_inputs
from .triton_flash import (
    MAX_HEAD_DIM,
    _configs,
    _dot_flags,
    _fwd_inner,
    _tile_pruner,
    _kpm_arg,
    _last_dim_contiguous,
    _pad_dim,
    _score_consts,
    _seq_args,
)

__all__ = ["decode_attention", "MAX_DECODE_Q_LEN"]

MAX_DECODE_Q_LEN = 16
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost (the q load, the partial write) dominates


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
@triton.autotune(configs=_configs(_SPLIT_SPACE, dict(BLOCK_N=64)), key=["D_PAD", "DV_PAD", "BLOCK_M", "PRECISION"],
                 prune_configs_by={"early_config_prune": _tile_pruner(_split_default)})
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
    if IS_VARLEN:
        i_b = 0
        bos_q = tl.load(CU_Q + i_n).to(tl.int64)
        L_q = (tl.load(CU_Q + i_n + 1) - bos_q).to(tl.int32)
        bos_k = tl.load(CU_K + i_n).to(tl.int64)
        L_k = (tl.load(CU_K + i_n + 1) - bos_k).to(tl.int32)
    else:
        i_b = i_n
        bos_q = 0
        L_q = S_Q
        bos_k = 0
        L_k = S_K
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
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, pos_q, start, end, L_k, W, s_ks, s_vs,
                               qk_scale, sc_in, sc_out, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                               D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)

    # -- partial result: normalised output and base-2 log-sum-exp (-inf where the split saw nothing)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    row = i_b * s_pb + r_h * s_ph + (bos_q + r_i) * s_ps + i_s * DV
    tl.store(O_PART + row[:, None] + offs_dv[None, :], b_o, mask=m_r[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE_PART + i_b * s_lpb + r_h * s_lph + (bos_q + r_i) * s_lps + i_s, b_lse2, mask=m_r)


@triton.jit
def _decode_merge_kernel(O_PART, LSE_PART, SINKS, O, LSE,
                         s_pb, s_ph, s_ps, s_lpb, s_lph, s_lps, s_ob, s_oh, s_os, s_lb, s_lh,
                         H, N_SPLITS,
                         DV: tl.constexpr, DV_PAD: tl.constexpr, NS_PAD: tl.constexpr, HAS_SINKS: tl.constexpr):
    # One program per (query token, batch * query head): out = sum_s exp(lse_s - lse) * out_s
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs_s = tl.arange(0, NS_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_s = offs_s < N_SPLITS
    b_lse2 = tl.load(LSE_PART + i_b * s_lpb + i_h * s_lph + i_t * s_lps + offs_s, mask=m_s, other=float("-inf"))
    b_o = tl.load(O_PART + i_b * s_pb + i_h * s_ph + i_t * s_ps + offs_s[:, None] * DV + offs_dv[None, :],
                  mask=m_s[:, None] & (offs_dv[None, :] < DV), other=0.0)
    # -- log-sum-exp over the splits (and the sink); a row no split saw keeps m = -inf and shifts by 0
    m = tl.max(b_lse2, 0)
    if HAS_SINKS:
        b_sink2 = tl.load(SINKS + i_h).to(tl.float32) * 1.44269504  # 1/ln 2
        m = tl.maximum(m, b_sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    b_w = tl.exp2(b_lse2 - m_safe)
    l = tl.sum(b_w, 0)
    if HAS_SINKS:
        l += tl.exp2(b_sink2 - m_safe)
    l_safe = tl.where(l == 0.0, 1.0, l)
    b_out = tl.sum(b_w[:, None] * b_o, 0) / l_safe
    b_lse = tl.where(l == 0.0, float("-inf"), (m_safe + tl.log2(l_safe)) * 0.6931471805599453)  # ln 2
    tl.store(O + i_b * s_ob + i_h * s_oh + i_t * s_os + offs_dv, b_out.to(O.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + i_b * s_lb + i_h * s_lh + i_t, b_lse)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so tests exercise the merge


def _auto_num_splits(n_programs: int, max_seqlen_k: int, device) -> int:
    """Enough splits for about two programs per SM, each with at least MIN_KEYS_PER_SPLIT keys."""
    by_len = max(1, triton.cdiv(max_seqlen_k, MIN_KEYS_PER_SPLIT))
    by_sms = max(1, triton.cdiv(2 * _num_sms(device), n_programs))
    return min(by_len, by_sms, 128)


def _decode_fwd(q, k, v, *, scale, causal, window, softcap, key_padding_mask, sinks, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, num_splits):
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    out = torch.empty(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(-math.inf)
    cu_q, cu_k = _seq_args(cu_seqlens_q, cu_seqlens_k)
    kpm, s_mb = _kpm_arg(key_padding_mask)
    n_seq = B if cu_q is None else cu_q.numel() - 1
    rows = G * max_seqlen_q
    BLOCK_M = min(64, _pad_dim(rows))
    m_tiles = triton.cdiv(rows, BLOCK_M)
    if num_splits is None:
        num_splits = _auto_num_splits(n_seq * Hkv * m_tiles, max_seqlen_k, q.device)
    o_part = torch.empty(B, Hq, Sq, num_splits, Dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, Hq, Sq, num_splits, dtype=torch.float32, device=q.device)
    upcast, precision = _dot_flags(q.dtype)
    qk_scale, sc_in, sc_out = _score_consts(scale, softcap)
    # -- one program per (split, batch * KV head, M tile)
    _decode_split_kernel[(num_splits, n_seq * Hkv, m_tiles)](
        q, k, v, kpm, cu_q, cu_k, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), s_mb,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        Hkv, G, Sq, Skv, max_seqlen_q, num_splits, int(window or 0), qk_scale, sc_in, sc_out,
        D=D, DV=Dv, D_PAD=_pad_dim(D), DV_PAD=_pad_dim(Dv),
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast, PRECISION=precision, BLOCK_M=BLOCK_M,
    )
    # -- merge the splits, one program per (token, batch * query head)
    _decode_merge_kernel[(Sq, B * Hq)](
        o_part, lse_part, sinks, out, lse,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        Hq, num_splits, DV=Dv, DV_PAD=triton.next_power_of_2(Dv), NS_PAD=triton.next_power_of_2(num_splits),
        HAS_SINKS=sinks is not None,
    )
    return out, lse


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
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
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
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    if max_seqlen_q > MAX_DECODE_Q_LEN:
        raise ValueError(f"decode_attention serves up to {MAX_DECODE_Q_LEN} query tokens per sequence, got "
                         f"{max_seqlen_q}: use flash_attention")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _decode_fwd(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                       causal=bool(causal), window=None if window is None else int(window),
                       softcap=None if softcap is None else float(softcap), key_padding_mask=key_padding_mask,
                       sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max(max_seqlen_k, 1)),
                       num_splits=num_splits)
