"""Block-sparse softmax attention in Triton: forward, backward, split-KV decode, autograd, public functions.

Same definition and conventions as :mod:`.reference` (read its module docstring): a :class:`BlockLayout`
says which KV blocks each (batch row or packed sequence, KV head, query block) reads; the first
``sink_tokens`` keys are visible whatever the layout; causal (bottom-right), window and key padding are
token rules on top. ``q: [B, Hq, Sq, D]``, ``k: [B, Hkv, Skv, D]``, ``v: [B, Hkv, Skv, Dv]``; returns
``(out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32, natural log)``; a row that sees nothing gets 0 and -inf.

How it works:

* the kernels loop over visit lists (:meth:`BlockLayout.visits`): per query block, the KV blocks it reads
  (the layout's, plus the blocks holding sink tokens, flagged so that only their sink tokens count); blocks
  that are not listed are never loaded. Per-token rules are a mask on every visited block;
* GQA: the rows of one program's tile are (query head of the group, query token) pairs, ``G x block_m`` per
  query block (row ``r`` is head ``r // block_m``, token ``r % block_m``), so each K/V block is loaded once for
  the whole group when ``G x block_m`` fits one tile (up to 256 rows at head dim <= 64), and in a few tiles
  otherwise. One layout row serves the group, which is why layouts are per KV head;
* forward: one program per (query block, sequence * KV head, row tile); online softmax in base 2, fp32
  accumulators. Decode (at most 16 query tokens, one query block, no gradient): the visited blocks of the
  tile are cut into ``num_splits`` ranges, one program each, merged by ``triton_utils.jit.merge_splits``;
* backward: ``delta = rowsum(dO * O) - dlse`` (torch); dK/dV: one program per (KV block, sequence * KV head)
  looping over the query blocks that visit it (the transposed visit lists) and their row tiles, so every
  dK/dV element is written by one program, no atomics; dQ: one program per query row tile, like the forward;
* varlen (``cu_seqlens_q/k``, B == 1): the layout has one row per packed sequence (or one for all), block
  indices counted from each sequence's start;
* fp16/bf16 use tensor cores, fp32 exact fp32 dots; under ``TRITON_INTERPRET=1`` 16-bit tiles go through fp32
  (``triton_utils.dot_flags``). Tiles are fixed per head dim (no autotuning yet: untimed until a GPU run).
* ``torch.compile``: the launchers are the custom ops ``torch.ops.hfa.block_sparse_attention_fwd`` / ``_bwd`` (the
  backward registered as the forward's autograd) and ``torch.ops.hfa.block_sparse_decode_fwd``; they take the
  layout's visit lists as tensors, so a compiled model records each call as one graph node.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..triton_utils import (
    LOG2E,
    MAX_HEAD_DIM,
    auto_num_splits,
    cu_seqlens_arg,
    dot_flags,
    inputs_unsupported_reason,
    kernel_op,
    key_padding_arg,
    last_dim_contiguous,
    max_seqlen,
    pad_dim,
    record_build,
)
from ..triton_utils.jit import LN2_K, LOG2E_K, dot, merge_splits, seq_bounds
from .reference import BlockLayout, check_block_sparse_inputs

__all__ = ["MAX_DECODE_Q_LEN", "block_sparse_attention", "block_sparse_decode", "block_sparse_unsupported_reason"]

INTERPRETED = record_build(__name__)

MAX_DECODE_Q_LEN = 16   # the decode kernel packs G x q_len rows in one tile
BLOCK_N_RANGE = (16, 128)  # layout block_n: a power of two in this range (the kernels' K/V tile)


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rows(i_mt, i_hk, q0, G, BQ, L_q, BLOCK_M: tl.constexpr):
    # the tile's rows: (query head, query token) = (i_hk * G + r // BQ, q0 + r % BQ)
    offs_r = i_mt * BLOCK_M + tl.arange(0, BLOCK_M)
    r_g = offs_r // BQ
    r_i = q0 + offs_r % BQ
    m_r = (r_g < G) & (r_i < L_q)
    return i_hk * G + r_g, r_i, m_r


@triton.jit
def _allowed(pos_q, o_n, sel, L_k, W, N_SINK, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # (query position, key) pairs that may attend in a visited block; sel: the layout selects the block
    # (else it is visited for its sink tokens only). pos_q / o_n broadcast against each other.
    m = sel
    if HAS_WINDOW:
        m = m & (pos_q - o_n < W)
        if not CAUSAL:
            m = m & (o_n - pos_q < W)
    m = (m | (o_n < N_SINK)) & (o_n < L_k)
    if CAUSAL:
        m = m & (o_n <= pos_q)
    return m


@triton.jit
def _block_of(p_e, e, BLOCK: tl.constexpr):
    # visit entry e: (first row of the block, whether the layout selects it); e < 0 codes a sink-only block
    code = tl.load(p_e + e)
    sel = code >= 0
    return tl.where(sel, code, -1 - code) * BLOCK, sel


@triton.jit
def _fwd_visit(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, p_e, e_lo, e_hi, pos_q, L_k, W, N_SINK, s_kn, s_vn, qk_scale,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
               D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # online softmax of the tile's rows over visit entries e_lo .. e_hi
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    for e in range(e_lo, e_hi):
        n0, sel = _block_of(p_e, e, BLOCK_N)
        o_n = n0 + offs_n
        m_n = o_n < L_k
        rows = o_n.to(tl.int64)[:, None]
        # -- s = q k^T in base 2, masked by the token rules
        b_k = tl.load(p_k + rows * s_kn + offs_d[None, :], mask=m_n[:, None] & (offs_d[None, :] < D), other=0.0)
        b_s = dot(b_q, tl.trans(b_k), None, UPCAST, PRECISION) * qk_scale
        m_s = _allowed(pos_q[:, None], o_n[None, :], sel, L_k, W, N_SINK, CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            m_s = m_s & (tl.load(p_kpm + o_n, mask=m_n, other=0) != 0)[None, :]
        b_s = tl.where(m_s, b_s, float("-inf"))
        # -- update m_i and l_i; a row that has seen nothing yet keeps m_i = -inf and shifts by 0
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.exp2(b_s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        # -- update the output accumulator
        b_v = tl.load(p_v + rows * s_vn + offs_dv[None, :], mask=m_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, CU_Q, CU_K, ENT, CNT,
                s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_oh, s_os, s_lb, s_lh, s_mb,
                s_eb, s_eh, s_eq, s_cb, s_ch, s_cq,
                H_KV, G, BQ, S_Q, S_K, W, N_SINK, qk_scale,
                D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_qb = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_mt = tl.program_id(2)
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    # -- sequence bounds: a batch row, or one packed sequence of batch 0
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    q0 = i_qb * BQ
    if q0 >= L_q:
        return
    r_h, r_i, m_r = _rows(i_mt, i_hk, q0, G, BQ, L_q, BLOCK_M)
    pos_q = r_i + (L_k - L_q)  # bottom-right alignment
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_q = (bos_q + r_i).to(tl.int64)
    b_q = tl.load(Q + i_b * s_qb + r_h[:, None] * s_qh + row_q[:, None] * s_qs + offs_d[None, :],
                  mask=m_r[:, None] & (offs_d[None, :] < D), other=0.0)
    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    p_kpm = KPM
    if HAS_KPM:
        p_kpm = KPM + i_b * s_mb + bos_k
    p_e = ENT + i_n * s_eb + i_hk * s_eh + i_qb * s_eq
    n_vis = tl.load(CNT + i_n * s_cb + i_hk * s_ch + i_qb * s_cq)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    acc, l_i, m_i = _fwd_visit(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, p_e, 0, n_vis, pos_q, L_k, W, N_SINK, s_ks, s_vs,
                               qk_scale, CAUSAL, HAS_WINDOW, HAS_KPM, D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)
    # -- normalise; a row that saw nothing writes 0 and lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2_K)
    tl.store(O + i_b * s_ob + r_h[:, None] * s_oh + row_q[:, None] * s_os + offs_dv[None, :],
             b_o.to(O.dtype.element_ty), mask=m_r[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + i_b * s_lb + r_h * s_lh + row_q, b_lse, mask=m_r)


@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.jit
def _decode_split_kernel(Q, K, V, KPM, CU_Q, CU_K, ENT, CNT, O_PART, LSE_PART,
                         s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb,
                         s_eb, s_eh, s_cb, s_ch, s_pb, s_ph, s_ps, s_lpb, s_lph, s_lps,
                         H_KV, G, S_Q, S_K, Q_ROWS, N_SPLITS, W, N_SINK, qk_scale,
                         D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                         IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_mt = tl.program_id(2)
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    # -- the tile's rows: (query head, token), Q_ROWS tokens per head, all in query block 0
    r_h, r_i, m_r = _rows(i_mt, i_hk, 0, G, Q_ROWS, L_q, BLOCK_M)
    pos_q = r_i + (L_k - L_q)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_q = (bos_q + r_i).to(tl.int64)
    b_q = tl.load(Q + i_b * s_qb + r_h[:, None] * s_qh + row_q[:, None] * s_qs + offs_d[None, :],
                  mask=m_r[:, None] & (offs_d[None, :] < D), other=0.0)
    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    p_kpm = KPM
    if HAS_KPM:
        p_kpm = KPM + i_b * s_mb + bos_k
    # -- this split's share of the visited blocks
    p_e = ENT + i_n * s_eb + i_hk * s_eh
    n_vis = tl.load(CNT + i_n * s_cb + i_hk * s_ch)
    per_split = tl.cdiv(n_vis, N_SPLITS)
    e_lo = tl.minimum(i_s * per_split, n_vis)
    e_hi = tl.minimum(e_lo + per_split, n_vis)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    acc, l_i, m_i = _fwd_visit(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, p_e, e_lo, e_hi, pos_q, L_k, W, N_SINK,
                               s_ks, s_vs, qk_scale, CAUSAL, HAS_WINDOW, HAS_KPM, D, DV, D_PAD, DV_PAD, BLOCK_N,
                               UPCAST, PRECISION)
    # -- partial result: normalised output and base-2 log-sum-exp (-inf where the split saw nothing)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    row = i_b * s_pb + r_h * s_ph + row_q * s_ps + i_s * DV
    tl.store(O_PART + row[:, None] + offs_dv[None, :], b_o, mask=m_r[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE_PART + i_b * s_lpb + r_h * s_lph + row_q * s_lps + i_s, b_lse2, mask=m_r)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, KPM, CU_Q, CU_K, ENT, CNT,
                     s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                     s_dkb, s_dkh, s_dks, s_dvb, s_dvh, s_dvs, s_lb, s_lh, s_mb,
                     s_eb, s_eh, s_eq, s_cb, s_ch, s_cq,
                     H_KV, G, BQ, S_Q, S_K, W, N_SINK, N_MT, scale, qk_scale,
                     D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                     IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Everything is computed transposed ([keys, query rows]) so the accumulators need no transpose.
    i_kb = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    n0 = i_kb * BLOCK_N
    if n0 >= L_k:
        return
    off = L_k - L_q
    o_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_n = o_n < L_k
    m_kd = m_n[:, None] & (offs_d[None, :] < D)
    m_vd = m_n[:, None] & (offs_dv[None, :] < DV)
    row_k = (bos_k + o_n).to(tl.int64)
    b_k = tl.load(K + i_b * s_kb + i_hk * s_kh + row_k[:, None] * s_ks + offs_d[None, :], mask=m_kd, other=0.0)
    b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + row_k[:, None] * s_vs + offs_dv[None, :], mask=m_vd, other=0.0)
    b_real = m_n
    if HAS_KPM:
        b_real = tl.load(KPM + i_b * s_mb + bos_k + o_n, mask=m_n, other=0) != 0
    p_e = ENT + i_n * s_eb + i_hk * s_eh + i_kb * s_eq
    n_vis = tl.load(CNT + i_n * s_cb + i_hk * s_ch + i_kb * s_cq)

    acc_dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    acc_dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    # -- every query block that visits this KV block, and its row tiles (the GQA group's heads)
    for e in range(0, n_vis):
        q0, sel = _block_of(p_e, e, 1)
        q0 = q0 * BQ
        for i_mt in range(0, N_MT):
            r_h, r_i, m_r = _rows(i_mt, i_hk, q0, G, BQ, L_q, BLOCK_M)
            row_q = (bos_q + r_i).to(tl.int64)
            b_q = tl.load(Q + i_b * s_qb + r_h[:, None] * s_qh + row_q[:, None] * s_qs + offs_d[None, :],
                          mask=m_r[:, None] & (offs_d[None, :] < D), other=0.0)
            b_do = tl.load(DO + i_b * s_dob + r_h[:, None] * s_doh + row_q[:, None] * s_dos + offs_dv[None, :],
                           mask=m_r[:, None] & (offs_dv[None, :] < DV), other=0.0)
            # rows that saw nothing (lse = -inf) and rows past the end get p = 0 through lse = +inf
            b_lse = tl.load(LSE + i_b * s_lb + r_h * s_lh + row_q, mask=m_r, other=float("-inf"))
            b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_K)
            b_delta = tl.load(DELTA + i_b * s_lb + r_h * s_lh + row_q, mask=m_r, other=0.0)
            # -- p^T = exp2(s^T - lse)
            b_sT = dot(b_k, tl.trans(b_q), None, UPCAST, PRECISION) * qk_scale
            m_sT = _allowed(r_i[None, :] + off, o_n[:, None], sel, L_k, W, N_SINK, CAUSAL, HAS_WINDOW)
            b_sT = tl.where(m_sT & b_real[:, None], b_sT, float("-inf"))
            b_pT = tl.exp2(b_sT - b_lse[None, :])
            # -- dV += p^T dO ; dS^T = p^T * (dP^T - delta) ; dK += dS^T q
            acc_dv = dot(b_pT.to(b_do.dtype), b_do, acc_dv, UPCAST, PRECISION)
            b_dpT = dot(b_v, tl.trans(b_do), None, UPCAST, PRECISION)
            b_dsT = b_pT * (b_dpT - b_delta[None, :])
            acc_dk = dot(b_dsT.to(b_q.dtype), b_q, acc_dk, UPCAST, PRECISION)
    tl.store(DK + i_b * s_dkb + i_hk * s_dkh + row_k[:, None] * s_dks + offs_d[None, :],
             (acc_dk * scale).to(DK.dtype.element_ty), mask=m_kd)
    tl.store(DV_OUT + i_b * s_dvb + i_hk * s_dvh + row_k[:, None] * s_dvs + offs_dv[None, :],
             acc_dv.to(DV_OUT.dtype.element_ty), mask=m_vd)


@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, CU_Q, CU_K, ENT, CNT,
                   s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                   s_dqb, s_dqh, s_dqs, s_lb, s_lh, s_mb, s_eb, s_eh, s_eq, s_cb, s_ch, s_cq,
                   H_KV, G, BQ, S_Q, S_K, W, N_SINK, scale, qk_scale,
                   D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                   IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_qb = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_mt = tl.program_id(2)
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    q0 = i_qb * BQ
    if q0 >= L_q:
        return
    r_h, r_i, m_r = _rows(i_mt, i_hk, q0, G, BQ, L_q, BLOCK_M)
    pos_q = r_i + (L_k - L_q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_qd = m_r[:, None] & (offs_d[None, :] < D)
    row_q = (bos_q + r_i).to(tl.int64)
    b_q = tl.load(Q + i_b * s_qb + r_h[:, None] * s_qh + row_q[:, None] * s_qs + offs_d[None, :], mask=m_qd,
                  other=0.0)
    b_do = tl.load(DO + i_b * s_dob + r_h[:, None] * s_doh + row_q[:, None] * s_dos + offs_dv[None, :],
                   mask=m_r[:, None] & (offs_dv[None, :] < DV), other=0.0)
    b_lse = tl.load(LSE + i_b * s_lb + r_h * s_lh + row_q, mask=m_r, other=float("-inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_K)  # empty rows get p = 0
    b_delta = tl.load(DELTA + i_b * s_lb + r_h * s_lh + row_q, mask=m_r, other=0.0)
    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    p_kpm = KPM
    if HAS_KPM:
        p_kpm = KPM + i_b * s_mb + bos_k
    p_e = ENT + i_n * s_eb + i_hk * s_eh + i_qb * s_eq
    n_vis = tl.load(CNT + i_n * s_cb + i_hk * s_ch + i_qb * s_cq)

    acc_dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for e in range(0, n_vis):
        n0, sel = _block_of(p_e, e, BLOCK_N)
        o_n = n0 + offs_n
        m_n = o_n < L_k
        rows = o_n.to(tl.int64)[:, None]
        b_k = tl.load(p_k + rows * s_ks + offs_d[None, :], mask=m_n[:, None] & (offs_d[None, :] < D), other=0.0)
        b_v = tl.load(p_v + rows * s_vs + offs_dv[None, :], mask=m_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
        # -- p = exp2(s - lse)
        b_s = dot(b_q, tl.trans(b_k), None, UPCAST, PRECISION) * qk_scale
        m_s = _allowed(pos_q[:, None], o_n[None, :], sel, L_k, W, N_SINK, CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            m_s = m_s & (tl.load(p_kpm + o_n, mask=m_n, other=0) != 0)[None, :]
        b_p = tl.exp2(tl.where(m_s, b_s, float("-inf")) - b_lse[:, None])
        # -- dS = p * (dO v^T - delta) ; dQ += dS k
        b_dp = dot(b_do, tl.trans(b_v), None, UPCAST, PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        acc_dq = dot(b_ds.to(b_k.dtype), b_k, acc_dq, UPCAST, PRECISION)
    tl.store(DQ + i_b * s_dqb + r_h[:, None] * s_dqh + row_q[:, None] * s_dqs + offs_d[None, :],
             (acc_dq * scale).to(DQ.dtype.element_ty), mask=m_qd)


# ----------------------------------------------------------------------------------------------
# Tiles and launchers
# ----------------------------------------------------------------------------------------------

def _empty(*shape, dtype, device):
    """torch.empty, in one place: every buffer a kernel fills comes from here (tests poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _row_tile(rows, block_n, d_pad, fp32, bwd=False):
    """(BLOCK_M, num_warps, num_stages): query rows per tile for ``rows`` rows of (head, token) per query block.

    Forward / dQ: up to 256 rows at head dim <= 64 (128 at <= 128, 64 above or in fp32), and at most 16k score
    elements per tile; dK/dV (``bwd``) streams row tiles past a resident K/V block: 64 rows, 32 for wide tiles.
    Educated guesses from FlashAttention-2's tiles, untimed until a GPU run."""
    if bwd:
        cap = 32 if (block_n >= 128 or d_pad > 64) else 64
    else:
        cap = 64 if (fp32 or d_pad > 128) else (128 if d_pad > 64 else 256)
        cap = min(cap, max(16, 16384 // block_n))
    block_m = min(pad_dim(rows), cap)
    warps = 8 if block_m * max(block_n, d_pad) >= 128 * 64 else 4
    return block_m, warps, 2


def _strides3(t):
    """Strides of a visit-count tensor [B|1, Hkv|1, n]: 0 along a broadcast (size-1) dim."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def _launch_common(q, v, block_n, key_padding_mask, cu_seqlens_q, window, causal):
    """(key padding arg, its batch stride, number of sequences, the constexprs every kernel shares)."""
    upcast, precision = dot_flags(q.dtype)
    kpm, s_mb = key_padding_arg(key_padding_mask)
    n_seq = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    consts = dict(D=q.shape[3], DV=v.shape[3], D_PAD=pad_dim(q.shape[3]), DV_PAD=pad_dim(v.shape[3]),
                  CAUSAL=bool(causal), HAS_WINDOW=window is not None, UPCAST=upcast, PRECISION=precision,
                  BLOCK_N=block_n)
    return kpm, s_mb, n_seq, consts


def _fwd(q, k, v, ent, cnt, *, block_m, block_n, scale, causal, window, key_padding_mask, sink_tokens, cu_seqlens_q,
         cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(out, lse) over the visit lists (ent, cnt) = ``layout.visits(sink_tokens)``."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    out = _empty(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, Sq, Dv] view
    lse = _empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(-math.inf)
    cu_q, cu_k = cu_seqlens_arg(cu_seqlens_q), cu_seqlens_arg(cu_seqlens_k)
    kpm, s_mb, n_seq, consts = _launch_common(q, v, block_n, key_padding_mask, cu_q, window, causal)
    BQ = block_m
    BLOCK_M, warps, stages = _row_tile(G * BQ, block_n, consts["D_PAD"], q.dtype == torch.float32)
    grid = (ent.shape[2], n_seq * Hkv, triton.cdiv(G * BQ, BLOCK_M))  # one program per query block (and tile)
    _fwd_kernel[grid](
        q, k, v, out, lse, kpm, cu_q, cu_k, ent, cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), s_mb, *_strides3(ent), *_strides3(cnt),
        Hkv, G, BQ, Sq, Skv, int(window or 0), int(sink_tokens), scale * LOG2E,
        BLOCK_M=BLOCK_M, num_warps=warps, num_stages=stages, **consts,
    )
    return out, lse


def _decode(q, k, v, ent, cnt, *, block_m, block_n, scale, causal, window, key_padding_mask, sink_tokens,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_splits):
    """(out, lse) of the split-KV decode over the visit lists (ent, cnt) of one query block."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    out = _empty(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = _empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(-math.inf)
    cu_q, cu_k = cu_seqlens_arg(cu_seqlens_q), cu_seqlens_arg(cu_seqlens_k)
    kpm, s_mb, n_seq, consts = _launch_common(q, v, block_n, key_padding_mask, cu_q, window, causal)
    rows = G * max_seqlen_q
    BLOCK_M, warps, stages = _row_tile(rows, block_n, consts["D_PAD"], q.dtype == torch.float32)
    m_tiles = triton.cdiv(rows, BLOCK_M)
    if num_splits is None:
        num_splits = auto_num_splits(n_seq * Hkv * m_tiles, int(cnt.max()) * block_n, q.device)
    o_part = _empty(B, Hq, Sq, num_splits, Dv, dtype=torch.float32, device=q.device)
    lse_part = _empty(B, Hq, Sq, num_splits, dtype=torch.float32, device=q.device)
    # -- one program per (split, sequence * KV head, row tile), then the log-sum-exp merge
    s_eb, s_eh, _ = _strides3(ent)
    s_cb, s_ch, _ = _strides3(cnt)
    _decode_split_kernel[(num_splits, n_seq * Hkv, m_tiles)](
        q, k, v, kpm, cu_q, cu_k, ent, cnt, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), s_mb, s_eb, s_eh, s_cb, s_ch,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        Hkv, G, Sq, Skv, max_seqlen_q, num_splits, int(window or 0), int(sink_tokens), scale * LOG2E,
        BLOCK_M=BLOCK_M, num_warps=warps, num_stages=stages, **consts,
    )
    merge_splits(o_part, lse_part, out, lse)
    return out, lse


def _bwd(do, dlse, q, k, v, out, lse, ent, cnt, ent_t, cnt_t, *, block_m, block_n, scale, causal, window,
         key_padding_mask, sink_tokens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(dq, dk, dv) over the visit lists (ent, cnt) and their transposes (ent_t, cnt_t, per KV block)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    do = last_dim_contiguous(do)
    dq = _empty(B, Sq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    dk = _empty(B, Skv, Hkv, D, dtype=k.dtype, device=k.device).transpose(1, 2)
    dv = _empty(B, Skv, Hkv, Dv, dtype=v.dtype, device=v.device).transpose(1, 2)
    if Sq == 0 or Skv == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # -- delta = rowsum(dO * O) - dlse, laid out like lse
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    cu_q, cu_k = cu_seqlens_arg(cu_seqlens_q), cu_seqlens_arg(cu_seqlens_k)
    kpm, s_mb, n_seq, consts = _launch_common(q, v, block_n, key_padding_mask, cu_q, window, causal)
    BQ, fp32 = block_m, q.dtype == torch.float32
    strides_qkvdo = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    # -- dK, dV: one program per (KV block, sequence * KV head), over the query blocks that visit it
    BLOCK_M, warps, stages = _row_tile(G * BQ, block_n, consts["D_PAD"], fp32, bwd=True)
    _bwd_dkdv_kernel[(ent_t.shape[2], n_seq * Hkv)](
        q, k, v, do, lse, delta, dk, dv, kpm, cu_q, cu_k, ent_t, cnt_t, *strides_qkvdo,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), s_mb, *_strides3(ent_t), *_strides3(cnt_t),
        Hkv, G, BQ, Sq, Skv, int(window or 0), int(sink_tokens), triton.cdiv(G * BQ, BLOCK_M), scale, scale * LOG2E,
        BLOCK_M=BLOCK_M, num_warps=warps, num_stages=stages, **consts,
    )
    # -- dQ: one program per (query block, sequence * KV head, row tile)
    BLOCK_M, warps, stages = _row_tile(G * BQ, block_n, consts["D_PAD"], fp32)
    _bwd_dq_kernel[(ent.shape[2], n_seq * Hkv, triton.cdiv(G * BQ, BLOCK_M))](
        q, k, v, do, lse, delta, dq, kpm, cu_q, cu_k, ent, cnt, *strides_qkvdo,
        dq.stride(0), dq.stride(1), dq.stride(2), lse.stride(0), lse.stride(1), s_mb,
        *_strides3(ent), *_strides3(cnt),
        Hkv, G, BQ, Sq, Skv, int(window or 0), int(sink_tokens), scale, scale * LOG2E,
        BLOCK_M=BLOCK_M, num_warps=warps, num_stages=stages, **consts,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
# torch.ops.hfa.block_sparse_attention_fwd / _bwd and block_sparse_decode_fwd: the launchers as custom ops (one
# torch.compile graph node each), the forward differentiable through the backward op. A schema takes no
# BlockLayout: the public functions unpack it into its visit lists (entries, counts; the transposed ones for the
# backward, None when no gradient is needed) and its block sizes.

_OPTIONS = ("Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int block_m, int block_n, "
            "float scale, bool causal, int? window, int sink_tokens, int max_seqlen_q, int max_seqlen_k")
_OPTION_NAMES = ("key_padding_mask", "cu_seqlens_q", "cu_seqlens_k", "block_m", "block_n", "scale", "causal",
                 "window", "sink_tokens", "max_seqlen_q", "max_seqlen_k")


def _fake_outputs(q, v):
    B, Hq, Sq, _ = q.shape
    return q.new_empty(B, Sq, Hq, v.shape[3]).transpose(1, 2), q.new_empty(B, Hq, Sq, dtype=torch.float32)


@kernel_op("block_sparse_attention_fwd", "(Tensor q, Tensor k, Tensor v, Tensor entries, Tensor counts, "
           f"Tensor? entries_t, Tensor? counts_t, {_OPTIONS}) -> (Tensor, Tensor)")
def block_sparse_attention_fwd(q, k, v, entries, counts, entries_t, counts_t, *options):
    """(out, lse) of :func:`block_sparse_attention` (its checks already done; options in ``_OPTION_NAMES``
    order). entries_t / counts_t (``layout.visits(sink_tokens, transpose=True)``) are for the backward only."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _fwd(q, k, v, entries, counts, **dict(zip(_OPTION_NAMES, options)))


@block_sparse_attention_fwd.register_fake
def _(q, k, v, entries, counts, entries_t, counts_t, *options):
    return _fake_outputs(q, v)


@kernel_op("block_sparse_attention_bwd", "(Tensor do, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
           "Tensor lse, Tensor entries, Tensor counts, Tensor entries_t, Tensor counts_t, "
           f"{_OPTIONS}) -> (Tensor, Tensor, Tensor)")
def block_sparse_attention_bwd(do, dlse, q, k, v, out, lse, entries, counts, entries_t, counts_t, *options):
    """(dq, dk, dv) of the forward that gave (out, lse)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _bwd(do, dlse, q, k, v, out, lse, entries, counts, entries_t, counts_t,
                **dict(zip(_OPTION_NAMES, options)))


@block_sparse_attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, entries, counts, entries_t, counts_t, *options):
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    return (q.new_empty(B, Sq, Hq, D).transpose(1, 2), k.new_empty(B, Skv, Hkv, D).transpose(1, 2),
            v.new_empty(B, Skv, Hkv, Dv).transpose(1, 2))


def _setup_block_sparse_context(ctx, inputs, output):
    q, k, v, entries, counts, entries_t, counts_t, *options = inputs
    if entries_t is None or counts_t is None:
        raise ValueError("block_sparse_attention_fwd needs entries_t / counts_t (layout.visits(sink_tokens, "
                         "transpose=True)) when a gradient is needed")
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, entries, counts, entries_t, counts_t, *options[:3])
    ctx.options = options[3:]


def _block_sparse_backward(ctx, do, dlse):
    q, k, v, out, lse, *lists_and_tensor_options = ctx.saved_tensors
    dq, dk, dv = torch.ops.hfa.block_sparse_attention_bwd(do, dlse, q, k, v, out, lse, *lists_and_tensor_options,
                                                          *ctx.options)
    return (dq, dk, dv) + (None,) * (4 + len(_OPTION_NAMES))


block_sparse_attention_fwd.register_autograd(_block_sparse_backward, setup_context=_setup_block_sparse_context)


@kernel_op("block_sparse_decode_fwd", "(Tensor q, Tensor k, Tensor v, Tensor entries, Tensor counts, "
           f"{_OPTIONS}, int? num_splits) -> (Tensor, Tensor)")
def block_sparse_decode_fwd(q, k, v, entries, counts, *options):
    """(out, lse) of :func:`block_sparse_decode` (its checks already done; options in ``_OPTION_NAMES`` order,
    then num_splits). No autograd: decode is forward-only (the public functions never call it with gradients)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _decode(q, k, v, entries, counts, **dict(zip((*_OPTION_NAMES, "num_splits"), options)))


@block_sparse_decode_fwd.register_fake
def _(q, k, v, entries, counts, *options):
    return _fake_outputs(q, v)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def block_sparse_unsupported_reason(q, k, v, layout, *, key_padding_mask=None, cu_seqlens_q=None,
                                    cu_seqlens_k=None, **_options) -> str | None:
    """None when the Triton kernels compute this call exactly; else a short reason (use the reference then).

    Shapes are not validated here (the functions raise ValueError on bad input, like the reference)."""
    why = inputs_unsupported_reason(dict(q=q, k=k, v=v), extra=(key_padding_mask, cu_seqlens_q, cu_seqlens_k))
    if why is not None:
        return why
    head_dim = max(q.shape[-1], v.shape[-1])
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    bn = layout.block_n
    if bn & (bn - 1) or not BLOCK_N_RANGE[0] <= bn <= BLOCK_N_RANGE[1]:
        return f"layout block_n {bn} is not a power of two in {BLOCK_N_RANGE[0]}..{BLOCK_N_RANGE[1]}"
    return None


def _prepare(name, q, k, v, layout, scale, causal, window, key_padding_mask, sink_tokens, cu_seqlens_q,
             cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    check_block_sparse_inputs(q, k, v, layout, key_padding_mask=key_padding_mask, window=window,
                              sink_tokens=sink_tokens, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    reason = block_sparse_unsupported_reason(q, k, v, layout, key_padding_mask=key_padding_mask,
                                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if reason is not None:
        raise ValueError(f"{name} cannot serve this call: {reason}; use block_sparse_attention_reference")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if cu_seqlens_q is None:
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    else:
        max_seqlen_q = max_seqlen(cu_seqlens_q) if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = max_seqlen(cu_seqlens_k) if max_seqlen_k is None else max_seqlen_k
    layout = layout.to(q.device)
    options = dict(block_m=layout.block_m, block_n=layout.block_n,
                   scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), causal=bool(causal),
                   window=None if window is None else int(window), key_padding_mask=key_padding_mask,
                   sink_tokens=int(sink_tokens), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k))
    return q, k, v, layout, [options[name] for name in _OPTION_NAMES]


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale=None, causal=False, window=None,
                           key_padding_mask=None, sink_tokens=0, cu_seqlens_q=None, cu_seqlens_k=None,
                           max_seqlen_q=None, max_seqlen_k=None):
    """Block-sparse softmax attention on Triton kernels (forward and backward); the reference's definition.

    q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv], fp16/bf16/fp32 on CUDA (or on CPU with
    TRITON_INTERPRET=1), Hq % Hkv == 0, D and Dv <= 256. layout: a :class:`BlockLayout` for (Sq, Skv) with
    block_n a power of two in 16..128 (one row per packed sequence, or one for all, with cu_seqlens).
    causal (bottom-right), window, key_padding_mask [B, Skv] (True = real token), sink_tokens (the first n keys
    seen by every query the token rules allow), cu_seqlens_q / cu_seqlens_k [N + 1] (packed, B == 1), and
    max_seqlen_q/k (ints, avoid a device sync) mean what they mean in the reference.

    Returns (out [B, Hq, Sq, Dv] in q.dtype, laid out as [B, Sq, Hq, Dv]; lse [B, Hq, Sq] fp32, natural log).
    Without gradients and with at most 16 query tokens in one query block it runs the split-KV decode kernel.
    Gradients flow to q, k, v through out and lse.
    """
    q, k, v, layout, options = _prepare("block_sparse_attention", q, k, v, layout, scale, causal, window,
                                        key_padding_mask, sink_tokens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k)
    sink_tokens = int(sink_tokens)
    entries, counts = layout.visits(sink_tokens)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        entries_t, counts_t = layout.visits(sink_tokens, transpose=True)
        return block_sparse_attention_fwd(q, k, v, entries, counts, entries_t, counts_t, *options)
    if options[_OPTION_NAMES.index("max_seqlen_q")] <= MAX_DECODE_Q_LEN and layout.n_q_blocks == 1:
        return block_sparse_decode_fwd(q, k, v, entries, counts, *options, None)
    return block_sparse_attention_fwd(q, k, v, entries, counts, None, None, *options)


def block_sparse_decode(q, k, v, layout: BlockLayout, *, scale=None, causal=False, window=None,
                        key_padding_mask=None, sink_tokens=0, cu_seqlens_q=None, cu_seqlens_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, num_splits=None):
    """Split-KV decode over the selected KV blocks only: 1-16 query tokens per sequence, forward only.

    The arguments are :func:`block_sparse_attention`'s; the queries must fit one query block
    (``Sq <= layout.block_m``). num_splits: how many ranges of the visited blocks run in parallel (default: from
    the most visited blocks and the SM count). Returns (out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32).
    """
    q, k, v, layout, options = _prepare("block_sparse_decode", q, k, v, layout, scale, causal, window,
                                        key_padding_mask, sink_tokens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("block_sparse_decode is forward-only; use block_sparse_attention when gradients are needed")
    q_len = options[_OPTION_NAMES.index("max_seqlen_q")]
    if q_len > MAX_DECODE_Q_LEN or layout.n_q_blocks != 1:
        raise ValueError(f"block_sparse_decode serves up to {MAX_DECODE_Q_LEN} query tokens in one query block, got "
                         f"{q_len} tokens in {layout.n_q_blocks} blocks: use block_sparse_attention")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    entries, counts = layout.visits(int(sink_tokens))
    return block_sparse_decode_fwd(q, k, v, entries, counts, *options, num_splits)
