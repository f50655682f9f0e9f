"""LoLCATs hybrid attention in Triton: sliding-window softmax + linear attention under one normaliser,
forward and backward.

Same definition and conventions as :func:`.reference.hybrid_attention_reference` (read the module
docstring of :mod:`.reference`): query at position p reads keys ``p - w < s <= p`` with
``g_h * exp(scale q.k_s - m_p)`` (``m_p`` = the largest window score of the row, part of the definition:
the linear terms are NOT rescaled by it) and every older key with ``fq.fk_s``; ``out = sum w v / (sum w + eps)``.
``q: [B, H, Sq, Dk]``, ``k: [B, Hkv, T, Dk]``, ``fq: [B, H, Sq, F]``, ``fk: [B, Hkv, T, F]``, ``v: [B, Hkv, T, D]``,
queries aligned to the end of the keys, GQA without repeating K/V, ``initial_state`` (S0, z0) in fp32,
``key_padding_mask``, ``cu_seqlens`` (B == 1).

How it works (C = BLOCK_N keys per chunk, BLOCK_M query rows per block):

* state (``_state_fwd_kernel``): one program per (key chunk, F tile, D tile, sequence and KV head) computes
  the chunk's ``fk^T v`` and ``sum fk``; an fp32 prefix sum over the chunks (torch, S0/z0 first) gives
  ``HS[c]`` = the state of keys ``< c * C``. Keys of the last ``window - 1`` positions never enter it (no query
  reads them linearly), so the last entry is exactly what ``return_state`` returns.
* forward (``_fwd_kernel``): one program per (query block, query head). Its rows sit at positions
  ``p0 .. p0 + BLOCK_M - 1``; every key ``< p0 - w + 1`` is older than every row's window, so the block
  reads the state ``HS[j]``, ``j = (p0 - w + 1) // C``, and loops over the key chunks
  ``[j * C, p0 + BLOCK_M)`` only (about ``(BLOCK_M + w) / C + 1`` of them, whatever T is). Each key of
  these chunks is classified per row: window (softmax), older (linear) or future (nothing). Because
  ``m_p`` is a max over the window keys only, the loop runs twice: pass 1 finds ``m_p`` (and its key,
  ``amax_p``), pass 2 sums ``w = g e + a`` and ``w v`` in one accumulator (no rescaling, exact ``m_p``).
  Saved per row: ``m_p`` (base 2), ``amax_p``, ``Z_p = den_p + eps``.
* backward: with ``dw_ps = (dO_p.v_s - delta_p) / Z_p`` (``delta_p = dO_p.out_p``):
  ``_bwd_dq_kernel`` (per query block, like the forward) gives dq, dfq (the state part:
  ``HS[j] dO/Z - zS[j] delta/Z``), ``delta`` and ``R_p = sum_window e_ps dw_ps`` (computed as
  ``(P_e (l_ln + eps) - P_ln l_e) / Z^2`` from the window/linear sums of ``e``, ``a``, ``e dO.v``, ``a dO.v``:
  the same value without the cancellation that makes it ~eps-sized when the window dominates);
  ``_state_bwd_kernel`` (per query block, F/D tile and KV head, summing the group's query heads) plus a
  suffix sum in torch give ``dHS[c] = sum_{rows >= c * BLOCK_M} fq^T dO/Z`` (and ``-fq delta/Z``): the gradient
  every key gets from the rows it is older than for all of them; ``_bwd_dkdv_kernel`` (per key block and
  KV head, looping over the group's query heads, no atomics) gives dk, dv, dfk from the rows near the
  key block exactly plus ``dHS[c]`` for the rest. ``m_p`` is differentiable in the spec (``amax``): its
  gradient ``-g R_p`` goes to the one key ``amax_p`` (the first of equal maxima; torch splits ties evenly,
  which only matters for exactly equal scores). ``d window_factor = sum R``, ``d S0 = dHS[0]``; the
  gradient of a returned state reaches S0 and the keys it holds.
* dims ``Dk, F, D <= 256`` of any size (tiles padded to a power of two and masked); fp16/bf16 inputs use
  tensor cores with fp32 accumulators and fp32 states, fp32 inputs exact fp32 dots
  (``input_precision="ieee"``). Under ``TRITON_INTERPRET=1`` (CPU, tests) low-precision tiles go through
  fp32 before ``tl.dot``.
* ``torch.compile``: the forward and backward launchers are the custom ops ``torch.ops.hfa.hybrid_attention_fwd``
  / ``_bwd`` (the backward registered as the forward's autograd): one graph node per call.
* not yet measured on a GPU: the default tiles (64 x 64 for fp16/bf16, 32 x 32 for fp32; 8 warps when a dim
  exceeds 64) are untuned; the forward, dq and dk/dv programs load a whole fp32 state tile ``[F, D]``, heavy in
  registers for F, D >= 128; a key chunk computes both ``exp`` and ``fq.fk`` for all its keys, even where every
  row reads it only one way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import (
    LOG2E,
    dot_flags,
    inputs_unsupported_reason,
    interpreting,
    kernel_op,
    last_dim_contiguous,
    pad_dim,
    record_build,
)
from ..triton_utils.jit import dot, seq_bounds
from .reference import _check_hybrid, _window_factor, check_linear_inputs

__all__ = ["MAX_DIM", "hybrid_attention_triton", "hybrid_unsupported_reason"]

MAX_DIM = 256  # Dk, F and D each


INTERPRETED = record_build(__name__)


def hybrid_unsupported_reason(q, k, v, fq, fk, *, window=None, initial_state=None, key_padding_mask=None,
                              cu_seqlens=None, **_ignored) -> str | None:
    """None when :func:`hybrid_attention_triton` computes this call; else a short reason (fall back to
    ``hybrid_attention_reference`` / ``hybrid_attention_chunked``). Shapes are not validated here."""
    why = inputs_unsupported_reason(dict(q=q, k=k, v=v, fq=fq, fk=fk),
                                    extra=(key_padding_mask, cu_seqlens, *(initial_state or ())))
    if why is not None:
        return why
    for name, d in (("head_dim", q.shape[-1]), ("feature_dim", fq.shape[-1]), ("value_dim", v.shape[-1])):
        if d > MAX_DIM:
            return f"{name} {d} > {MAX_DIM}"
    return None


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _seq(CU, i_n, S_Q, S_K, IS_VARLEN: tl.constexpr):
    # (batch row, first query row, first key row, query count, key count) of sequence i_n
    # (packed: queries and keys are the same tokens)
    i_b, bos_k, L_k = seq_bounds(i_n, CU, S_K, IS_VARLEN)
    _, bos_q, L_q = seq_bounds(i_n, CU, S_Q, IS_VARLEN)
    return i_b, bos_q, bos_k, L_q, L_k


@triton.jit
def _real_keys(KPM, i_b, s_mb, bos_k, o_n, L_k, HAS_KPM: tl.constexpr):
    # keys that exist and are not padding
    m = o_n < L_k
    if HAS_KPM:
        m = m & (tl.load(KPM + i_b * s_mb + bos_k + o_n, mask=m, other=0) != 0)
    return m


# ----------------------------------------------------------------------------------------------
# State: the fp32 linear state before every key chunk
# ----------------------------------------------------------------------------------------------

@triton.jit
def _state_fwd_kernel(FK, V, HS, ZS, KPM, CU,
                      s_fkb, s_fkh, s_fks, s_vb, s_vh, s_vs, s_mb,
                      H_KV, S_K, W, NC1,
                      F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, N_DT: tl.constexpr,
                      HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    # HS[c + 1] = fk^T v and ZS[c + 1] = sum fk over the keys of chunk c (a prefix sum follows, in torch). Keys
    # of the last window - 1 positions never enter a state (no query reads them linearly): chunks past them give 0.
    i_c = tl.program_id(0)
    i_t = tl.program_id(1)
    i_f, i_d = i_t // N_DT, i_t % N_DT
    i_bh = tl.program_id(2).to(tl.int64)
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, _, bos_k, _, L_k = _seq(CU, i_n, S_K, S_K, IS_VARLEN)
    E = tl.maximum(L_k - W + 1, 0)  # keys [0, E) are older than the window of some query (or the next token)
    o_f = i_f * BF + tl.arange(0, BF)
    o_d = i_d * BD + tl.arange(0, BD)
    m_f = o_f < F
    o_n = i_c * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = _real_keys(KPM, i_b, s_mb, bos_k, o_n, E, HAS_KPM)
    keys = (bos_k + o_n).to(tl.int64)
    b_fk = tl.load(FK + i_b * s_fkb + i_hk * s_fkh + keys[:, None] * s_fks + o_f[None, :],
                   mask=m_n[:, None] & m_f[None, :], other=0.0)
    b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + keys[:, None] * s_vs + o_d[None, :],
                  mask=m_n[:, None] & (o_d[None, :] < D), other=0.0)
    b_h = dot(tl.trans(b_fk), b_v, None, UPCAST, PRECISION)
    base = (i_n * H_KV + i_hk) * NC1 + i_c + 1
    tl.store(HS + base * F * D + o_f[:, None] * D + o_d[None, :], b_h, mask=m_f[:, None] & (o_d[None, :] < D))
    tl.store(ZS + base * F + o_f, tl.sum(b_fk.to(tl.float32), 0), mask=m_f & ((o_f * 0 + i_d) == 0))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _classify(pos_q, o_n, m_row, m_key, W):
    # (window, older) masks of [rows, keys]: window p - w < s <= p, older s <= p - w
    d = pos_q[:, None] - o_n[None, :]
    ok = m_row[:, None] & m_key[None, :]
    return ok & (d >= 0) & (d < W), ok & (d >= W)


@triton.jit
def _fwd_kernel(Q, K, V, FQ, FK, GATE, HS, ZS, O, M2, AMAX, ZD, KPM, CU,
                s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs,
                s_fqb, s_fqh, s_fqs, s_fkb, s_fkh, s_fks, s_ob, s_oh, s_os, s_mb,
                H, G, S_Q, S_K, W, NC1, qk_scale, eps,
                DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
                DK_PAD: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr,
                HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_n, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    i_b, bos_q, bos_k, L_q, L_k = _seq(CU, i_n, S_Q, S_K, IS_VARLEN)
    m0 = i_m * BLOCK_M
    if m0 >= L_q:
        return
    off = L_k - L_q  # query i sits at key position i + off
    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    o_dk = tl.arange(0, DK_PAD)
    o_f = tl.arange(0, F_PAD)
    o_d = tl.arange(0, D_PAD)
    m_m = m0 + offs_r < L_q
    pos_q = m0 + offs_r + off
    rows = (bos_q + m0 + offs_r).to(tl.int64)
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qs + o_dk[None, :],
                  mask=m_m[:, None] & (o_dk[None, :] < DK), other=0.0)
    b_fq = tl.load(FQ + i_b * s_fqb + i_h * s_fqh + rows[:, None] * s_fqs + o_f[None, :],
                   mask=m_m[:, None] & (o_f[None, :] < F), other=0.0)
    b_g = tl.load(GATE + i_h)
    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_fk = FK + i_b * s_fkb + i_hk * s_fkh + bos_k * s_fks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    # keys < p0 - w + 1 are older than every row's window: they are in the state HS[j]
    p0 = m0 + off
    j = tl.maximum(p0 - W + 1, 0) // BLOCK_N
    lo = j * BLOCK_N
    hi = tl.minimum(p0 + BLOCK_M, L_k)

    # -- pass 1: m_p = the largest window score (base 2), and the first key that reaches it
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_am = tl.full([BLOCK_M], -1, tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + offs_n
        m_n = _real_keys(KPM, i_b, s_mb, bos_k, o_n, L_k, HAS_KPM)
        b_k = tl.load(p_k + o_n[:, None].to(tl.int64) * s_ks + o_dk[None, :],
                      mask=m_n[:, None] & (o_dk[None, :] < DK), other=0.0)
        b_s = dot(b_q, tl.trans(b_k), None, UPCAST, PRECISION) * qk_scale
        win, _ = _classify(pos_q, o_n, m_m, m_n, W)
        b_s = tl.where(win, b_s, float("-inf"))
        b_bm = tl.max(b_s, 1)
        b_arg = tl.min(tl.where(b_s == b_bm[:, None], o_n[None, :], 2147483647), 1)
        upd = b_bm > b_m
        b_am = tl.where(upd, b_arg, b_am)
        b_m = tl.where(upd, b_bm, b_m)
    m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)  # a row with no window key

    # -- pass 2: w = g exp(s - m) (window) + fq.fk (older); acc = sum w v, den = sum w
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    b_den = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + offs_n
        m_n = _real_keys(KPM, i_b, s_mb, bos_k, o_n, L_k, HAS_KPM)
        b_k = tl.load(p_k + o_n[:, None].to(tl.int64) * s_ks + o_dk[None, :],
                      mask=m_n[:, None] & (o_dk[None, :] < DK), other=0.0)
        b_fk = tl.load(p_fk + o_n[:, None].to(tl.int64) * s_fks + o_f[None, :],
                       mask=m_n[:, None] & (o_f[None, :] < F), other=0.0)
        b_v = tl.load(p_v + o_n[:, None].to(tl.int64) * s_vs + o_d[None, :],
                      mask=m_n[:, None] & (o_d[None, :] < D), other=0.0)
        win, old = _classify(pos_q, o_n, m_m, m_n, W)
        b_s = dot(b_q, tl.trans(b_k), None, UPCAST, PRECISION) * qk_scale
        b_e = tl.where(win, tl.exp2(b_s - m_safe[:, None]), 0.0)
        b_a = tl.where(old, dot(b_fq, tl.trans(b_fk), None, UPCAST, PRECISION), 0.0)
        b_w = b_g * b_e + b_a
        b_den += tl.sum(b_w, 1)
        acc = dot(b_w.to(b_v.dtype), b_v, acc, UPCAST, PRECISION)

    # -- the state of every older key: acc += fq S_j, den += fq . z_j
    base = (i_n * (H // G) + i_hk) * NC1 + j
    m_fd = (o_f[:, None] < F) & (o_d[None, :] < D)
    b_hs = tl.load(HS + base * F * D + o_f[:, None] * D + o_d[None, :], mask=m_fd, other=0.0)
    b_zs = tl.load(ZS + base * F + o_f, mask=o_f < F, other=0.0)
    b_fq32 = b_fq.to(tl.float32)
    acc = dot(b_fq32, b_hs, acc, False, PRECISION)
    b_den += tl.sum(b_fq32 * b_zs[None, :], 1)

    # -- one normaliser
    b_z = b_den + eps
    b_o = acc / b_z[:, None]
    tl.store(O + i_b * s_ob + i_h * s_oh + rows[:, None] * s_os + o_d[None, :], b_o.to(O.dtype.element_ty),
             mask=m_m[:, None] & (o_d[None, :] < D))
    p_row = (i_b * H + i_h) * S_Q + bos_q + m0 + offs_r
    tl.store(M2 + p_row, b_m, mask=m_m)
    tl.store(AMAX + p_row, b_am, mask=m_m)
    tl.store(ZD + p_row, b_z, mask=m_m)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_dq_kernel(Q, K, V, FQ, FK, GATE, HS, ZS, O, DO, M2, AMAX, ZD, DELTA, R, DQ, DFQ, KPM, CU,
                   s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs,
                   s_fqb, s_fqh, s_fqs, s_fkb, s_fkh, s_fks, s_ob, s_oh, s_os, s_dob, s_doh, s_dos,
                   s_dqb, s_dqh, s_dqs, s_dfb, s_dfh, s_dfs, s_mb,
                   H, G, S_Q, S_K, W, NC1, qk_scale, scale, eps,
                   DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
                   DK_PAD: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr,
                   HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_n, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    i_b, bos_q, bos_k, L_q, L_k = _seq(CU, i_n, S_Q, S_K, IS_VARLEN)
    m0 = i_m * BLOCK_M
    if m0 >= L_q:
        return
    off = L_k - L_q
    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    o_dk = tl.arange(0, DK_PAD)
    o_f = tl.arange(0, F_PAD)
    o_d = tl.arange(0, D_PAD)
    m_m = m0 + offs_r < L_q
    pos_q = m0 + offs_r + off
    rows = (bos_q + m0 + offs_r).to(tl.int64)
    m_qd = m_m[:, None] & (o_dk[None, :] < DK)
    m_qf = m_m[:, None] & (o_f[None, :] < F)
    m_od = m_m[:, None] & (o_d[None, :] < D)
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qs + o_dk[None, :], mask=m_qd, other=0.0)
    b_fq = tl.load(FQ + i_b * s_fqb + i_h * s_fqh + rows[:, None] * s_fqs + o_f[None, :], mask=m_qf, other=0.0)
    b_do = tl.load(DO + i_b * s_dob + i_h * s_doh + rows[:, None] * s_dos + o_d[None, :], mask=m_od, other=0.0)
    b_o = tl.load(O + i_b * s_ob + i_h * s_oh + rows[:, None] * s_os + o_d[None, :], mask=m_od, other=0.0)
    p_row = (i_b * H + i_h) * S_Q + bos_q + m0 + offs_r
    b_m = tl.load(M2 + p_row, mask=m_m, other=float("-inf"))
    m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_am = tl.load(AMAX + p_row, mask=m_m, other=-1)
    b_rz = 1.0 / tl.load(ZD + p_row, mask=m_m, other=1.0)
    # -- delta = dO . out; dw_ps = (dO_p . v_s - delta_p) / Z_p
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)
    b_g = tl.load(GATE + i_h)
    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_fk = FK + i_b * s_fkb + i_hk * s_fkh + bos_k * s_fks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    p0 = m0 + off
    j = tl.maximum(p0 - W + 1, 0) // BLOCK_N
    lo = j * BLOCK_N
    hi = tl.minimum(p0 + BLOCK_M, L_k)

    acc_dq = tl.zeros([BLOCK_M, DK_PAD], tl.float32)
    acc_dfq = tl.zeros([BLOCK_M, F_PAD], tl.float32)
    # window / linear sums of e, a and of e dO.v, a dO.v (for R below)
    b_le = tl.zeros([BLOCK_M], tl.float32)
    b_ll = tl.zeros([BLOCK_M], tl.float32)
    b_pe = tl.zeros([BLOCK_M], tl.float32)
    b_pl = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + offs_n
        m_n = _real_keys(KPM, i_b, s_mb, bos_k, o_n, L_k, HAS_KPM)
        b_k = tl.load(p_k + o_n[:, None].to(tl.int64) * s_ks + o_dk[None, :],
                      mask=m_n[:, None] & (o_dk[None, :] < DK), other=0.0)
        b_fk = tl.load(p_fk + o_n[:, None].to(tl.int64) * s_fks + o_f[None, :],
                       mask=m_n[:, None] & (o_f[None, :] < F), other=0.0)
        b_v = tl.load(p_v + o_n[:, None].to(tl.int64) * s_vs + o_d[None, :],
                      mask=m_n[:, None] & (o_d[None, :] < D), other=0.0)
        win, old = _classify(pos_q, o_n, m_m, m_n, W)
        b_s = dot(b_q, tl.trans(b_k), None, UPCAST, PRECISION) * qk_scale
        b_e = tl.where(win, tl.exp2(b_s - m_safe[:, None]), 0.0)
        b_a = tl.where(old, dot(b_fq, tl.trans(b_fk), None, UPCAST, PRECISION), 0.0)
        b_dp = dot(b_do, tl.trans(b_v), None, UPCAST, PRECISION)
        b_dw = (b_dp - b_delta[:, None]) * b_rz[:, None]
        b_le += tl.sum(b_e, 1)
        b_ll += tl.sum(b_a, 1)
        b_pe += tl.sum(b_e * b_dp, 1)
        b_pl += tl.sum(b_a * b_dp, 1)
        acc_dq = dot((b_g * b_e * b_dw).to(b_k.dtype), b_k, acc_dq, UPCAST, PRECISION)
        acc_dfq = dot(tl.where(old, b_dw, 0.0).to(b_fk.dtype), b_fk, acc_dfq, UPCAST, PRECISION)
    # -- the state of older keys: dfq += S_j dO/Z - z_j delta/Z
    base = (i_n * (H // G) + i_hk) * NC1 + j
    m_fd = (o_f[:, None] < F) & (o_d[None, :] < D)
    b_hs = tl.load(HS + base * F * D + o_f[:, None] * D + o_d[None, :], mask=m_fd, other=0.0)
    b_zs = tl.load(ZS + base * F + o_f, mask=o_f < F, other=0.0)
    b_fq32 = b_fq.to(tl.float32)
    b_t = dot(b_do.to(tl.float32), tl.trans(b_hs), None, False, PRECISION)  # S_j dO, [rows, F]
    acc_dfq += (b_t - b_delta[:, None] * b_zs[None, :]) * b_rz[:, None]
    b_ll += tl.sum(b_fq32 * b_zs[None, :], 1) + eps
    b_pl += tl.sum(b_fq32 * b_t, 1)
    # -- R = sum_window e dw = (P_e (l_ln + eps) - P_ln l_e) / Z^2, the same as sum e (dO.v - delta) / Z without
    #    its cancellation (R is ~eps when the window dominates; it is the gradient of g and of m_p)
    b_zz = b_g * b_le + b_ll
    b_r = tl.where(m_m, (b_pe * b_ll - b_pl * b_le) / (b_zz * b_zz), 0.0)
    # -- m_p = score of key amax_p: d s_{p, amax_p} -= g R_p
    m_am = m_m & (b_am >= 0)
    b_kam = tl.load(p_k + b_am[:, None].to(tl.int64) * s_ks + o_dk[None, :], mask=m_am[:, None] & (o_dk[None, :] < DK),
                    other=0.0)
    acc_dq -= (b_g * b_r)[:, None] * b_kam.to(tl.float32)
    tl.store(DQ + i_b * s_dqb + i_h * s_dqh + rows[:, None] * s_dqs + o_dk[None, :],
             (acc_dq * scale).to(DQ.dtype.element_ty), mask=m_qd)
    tl.store(DFQ + i_b * s_dfb + i_h * s_dfh + rows[:, None] * s_dfs + o_f[None, :],
             acc_dfq.to(DFQ.dtype.element_ty), mask=m_qf)
    tl.store(DELTA + p_row, b_delta, mask=m_m)
    tl.store(R + p_row, b_r, mask=m_m)


@triton.jit
def _state_bwd_kernel(FQ, DO, ZD, DELTA, DHS, DZS, CU,
                      s_fqb, s_fqh, s_fqs, s_dob, s_doh, s_dos,
                      H, G, S_Q, NQ1,
                      F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, N_DT: tl.constexpr,
                      IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    # DHS[c] = fq^T dO / Z and DZS[c] = -fq^T delta / Z over query block c of every head of the group (a suffix
    # sum follows, in torch): what every key older than all of these rows' windows receives from them.
    i_c = tl.program_id(0)
    i_t = tl.program_id(1)
    i_f, i_d = i_t // N_DT, i_t % N_DT
    i_bh = tl.program_id(2).to(tl.int64)
    H_KV = H // G
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, bos_q, _, L_q, _ = _seq(CU, i_n, S_Q, S_Q, IS_VARLEN)
    o_f = i_f * BF + tl.arange(0, BF)
    o_d = i_d * BD + tl.arange(0, BD)
    m_f = o_f < F
    o_m = i_c * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < L_q
    rows = (bos_q + o_m).to(tl.int64)
    b_dh = tl.zeros([BF, BD], tl.float32)
    b_dz = tl.zeros([BF], tl.float32)
    for hh in range(0, G):
        i_h = i_hk * G + hh
        b_fq = tl.load(FQ + i_b * s_fqb + i_h * s_fqh + rows[:, None] * s_fqs + o_f[None, :],
                       mask=m_m[:, None] & m_f[None, :], other=0.0).to(tl.float32)
        b_do = tl.load(DO + i_b * s_dob + i_h * s_doh + rows[:, None] * s_dos + o_d[None, :],
                       mask=m_m[:, None] & (o_d[None, :] < D), other=0.0).to(tl.float32)
        p_row = (i_b * H + i_h) * S_Q + bos_q + o_m
        b_rz = 1.0 / tl.load(ZD + p_row, mask=m_m, other=1.0)
        b_delta = tl.load(DELTA + p_row, mask=m_m, other=0.0)
        b_dh = dot(tl.trans(b_fq), b_do * b_rz[:, None], b_dh, False, PRECISION)
        b_dz -= tl.sum(b_fq * (b_delta * b_rz)[:, None], 0)
    base = (i_n * H_KV + i_hk) * NQ1 + i_c
    tl.store(DHS + base * F * D + o_f[:, None] * D + o_d[None, :], b_dh, mask=m_f[:, None] & (o_d[None, :] < D))
    tl.store(DZS + base * F + o_f, b_dz, mask=m_f & ((o_f * 0 + i_d) == 0))


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, FQ, FK, GATE, DHS, DZS, DSF, DZF, DO, M2, AMAX, ZD, DELTA, R,
                     DK_OUT, DV_OUT, DFK, KPM, CU,
                     s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs,
                     s_fqb, s_fqh, s_fqs, s_fkb, s_fkh, s_fks, s_dob, s_doh, s_dos,
                     s_dkb, s_dkh, s_dks, s_dvb, s_dvh, s_dvs, s_dfb, s_dfh, s_dfs, s_mb,
                     H, G, S_Q, S_K, W, NQ1, qk_scale, scale,
                     DK: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
                     DK_PAD: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr,
                     HAS_DSTATE: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Everything is computed transposed ([keys, queries]) so the accumulators need no transpose.
    i_nb = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    H_KV = H // G
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, bos_q, bos_k, L_q, L_k = _seq(CU, i_n, S_Q, S_K, IS_VARLEN)
    n0 = i_nb * BLOCK_N
    if n0 >= L_k:
        return
    off = L_k - L_q
    o_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    o_dk = tl.arange(0, DK_PAD)
    o_f = tl.arange(0, F_PAD)
    o_d = tl.arange(0, D_PAD)
    m_n = _real_keys(KPM, i_b, s_mb, bos_k, o_n, L_k, HAS_KPM)
    keys = (bos_k + o_n).to(tl.int64)
    m_kd = m_n[:, None] & (o_dk[None, :] < DK)
    m_kf = m_n[:, None] & (o_f[None, :] < F)
    m_vd = m_n[:, None] & (o_d[None, :] < D)
    b_k = tl.load(K + i_b * s_kb + i_hk * s_kh + keys[:, None] * s_ks + o_dk[None, :], mask=m_kd, other=0.0)
    b_fk = tl.load(FK + i_b * s_fkb + i_hk * s_fkh + keys[:, None] * s_fks + o_f[None, :], mask=m_kf, other=0.0)
    b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + keys[:, None] * s_vs + o_d[None, :], mask=m_vd, other=0.0)
    acc_dk = tl.zeros([BLOCK_N, DK_PAD], tl.float32)
    acc_dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    acc_dfk = tl.zeros([BLOCK_N, F_PAD], tl.float32)
    # rows that see a key of the block, in the window or as an older key, but not all of them as older keys;
    # rows from c * BLOCK_M on see the whole block as older keys: they come through the suffix state dHS[c]
    i_lo = tl.maximum(n0 - off, 0) // BLOCK_M * BLOCK_M
    c = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 + W - off, 0), BLOCK_M), tl.cdiv(L_q, BLOCK_M))
    i_hi = tl.minimum(c * BLOCK_M, L_q)
    for hh in range(0, G):
        i_h = i_hk * G + hh
        b_g = tl.load(GATE + i_h)
        for m0 in range(i_lo, i_hi, BLOCK_M):
            o_m = m0 + offs_r
            m_m = o_m < L_q
            rows = (bos_q + o_m).to(tl.int64)
            b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qs + o_dk[None, :],
                          mask=m_m[:, None] & (o_dk[None, :] < DK), other=0.0)
            b_fq = tl.load(FQ + i_b * s_fqb + i_h * s_fqh + rows[:, None] * s_fqs + o_f[None, :],
                           mask=m_m[:, None] & (o_f[None, :] < F), other=0.0)
            b_do = tl.load(DO + i_b * s_dob + i_h * s_doh + rows[:, None] * s_dos + o_d[None, :],
                           mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)
            p_row = (i_b * H + i_h) * S_Q + bos_q + o_m
            b_m = tl.load(M2 + p_row, mask=m_m, other=float("-inf"))
            m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
            b_am = tl.load(AMAX + p_row, mask=m_m, other=-1)
            b_rz = 1.0 / tl.load(ZD + p_row, mask=m_m, other=1.0)
            b_delta = tl.load(DELTA + p_row, mask=m_m, other=0.0)
            b_r = tl.load(R + p_row, mask=m_m, other=0.0)
            d = (o_m + off)[None, :] - o_n[:, None]  # query position - key position, [keys, rows]
            ok = m_n[:, None] & m_m[None, :]
            winT = ok & (d >= 0) & (d < W)
            oldT = ok & (d >= W)
            # -- e^T = exp2(s^T - m), a^T = fk fq^T, w^T = g e^T + a^T
            b_sT = dot(b_k, tl.trans(b_q), None, UPCAST, PRECISION) * qk_scale
            b_eT = tl.where(winT, tl.exp2(b_sT - m_safe[None, :]), 0.0)
            b_aT = tl.where(oldT, dot(b_fk, tl.trans(b_fq), None, UPCAST, PRECISION), 0.0)
            b_wT = b_g * b_eT + b_aT
            # -- dv += w^T dO / Z ; dw^T = (v dO^T - delta) / Z
            acc_dv = dot((b_wT * b_rz[None, :]).to(b_do.dtype), b_do, acc_dv, UPCAST, PRECISION)
            b_dwT = (dot(b_v, tl.trans(b_do), None, UPCAST, PRECISION) - b_delta[None, :]) * b_rz[None, :]
            # -- ds^T = g e^T dw^T, minus g R at each row's max key (m_p is differentiable)
            b_dsT = b_g * (b_eT * b_dwT - tl.where(b_am[None, :] == o_n[:, None], b_r[None, :], 0.0))
            acc_dk = dot(b_dsT.to(b_q.dtype), b_q, acc_dk, UPCAST, PRECISION)
            acc_dfk = dot(tl.where(oldT, b_dwT, 0.0).to(b_fq.dtype), b_fq, acc_dfk, UPCAST, PRECISION)
    # -- rows that see the whole block as older keys: dfk += v dHS^T + dzs, dv += fk dHS
    m_fd = (o_f[:, None] < F) & (o_d[None, :] < D)
    base = (i_n * H_KV + i_hk) * NQ1 + c
    b_dhs = tl.load(DHS + base * F * D + o_f[:, None] * D + o_d[None, :], mask=m_fd, other=0.0)
    b_dzs = tl.load(DZS + base * F + o_f, mask=o_f < F, other=0.0)
    b_v32 = b_v.to(tl.float32)
    b_fk32 = b_fk.to(tl.float32)
    acc_dfk = dot(b_v32, tl.trans(b_dhs), acc_dfk, False, PRECISION) + b_dzs[None, :]
    acc_dv = dot(b_fk32, b_dhs, acc_dv, False, PRECISION)
    if HAS_DSTATE:
        # -- the returned state holds keys < L - w + 1: their share of its gradient
        m_e = o_n < L_k - W + 1
        b_dsf = tl.load(DSF + (i_n * H_KV + i_hk) * F * D + o_f[:, None] * D + o_d[None, :], mask=m_fd, other=0.0)
        b_dzf = tl.load(DZF + (i_n * H_KV + i_hk) * F + o_f, mask=o_f < F, other=0.0)
        acc_dfk += tl.where(m_e[:, None], dot(b_v32, tl.trans(b_dsf), None, False, PRECISION) + b_dzf[None, :], 0.0)
        acc_dv += tl.where(m_e[:, None], dot(b_fk32, b_dsf, None, False, PRECISION), 0.0)
    # padded keys take no part: their gradients are 0
    acc_dfk = tl.where(m_n[:, None], acc_dfk, 0.0)
    acc_dv = tl.where(m_n[:, None], acc_dv, 0.0)
    m_st = (o_n < L_k)[:, None]
    tl.store(DK_OUT + i_b * s_dkb + i_hk * s_dkh + keys[:, None] * s_dks + o_dk[None, :],
             (acc_dk * scale).to(DK_OUT.dtype.element_ty), mask=m_st & (o_dk[None, :] < DK))
    tl.store(DV_OUT + i_b * s_dvb + i_hk * s_dvh + keys[:, None] * s_dvs + o_d[None, :],
             acc_dv.to(DV_OUT.dtype.element_ty), mask=m_st & (o_d[None, :] < D))
    tl.store(DFK + i_b * s_dfb + i_hk * s_dfh + keys[:, None] * s_dfs + o_f[None, :],
             acc_dfk.to(DFK.dtype.element_ty), mask=m_st & (o_f[None, :] < F))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _blocks(block_m, block_n, num_warps, dims, dtype):
    """BLOCK_M, BLOCK_N, num_warps: the caller's, else 32 x 32 in the interpreter and for fp32 (exact fp32 dots,
    no tensor cores), 64 x 64 for fp16/bf16 on a GPU."""
    default = 32 if interpreting() or dtype == torch.float32 else 64
    bm, bn = block_m or default, block_n or default
    for name, b in (("block_m", bm), ("block_n", bn)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    return bm, bn, num_warps or (8 if max(dims) > 64 else 4)  # untuned: see the GPU notes in the docstring


def _state_tile(d_pad):
    return min(d_pad, 64)


class _Call:
    """Everything the kernels need about one call, computed once: sizes, sequence bounds, flags."""

    def __init__(self, q, k, v, fq, fk, *, window, scale, eps, key_padding_mask, cu_seqlens, max_seqlen,
                 block_m, block_n, num_warps):
        self.B, self.H, self.Sq, self.Dk = q.shape
        self.Hkv, self.T = k.shape[1], k.shape[2]
        self.F, self.D = fq.shape[-1], v.shape[-1]
        self.G = self.H // self.Hkv
        self.W, self.scale, self.eps = int(window), float(scale), float(eps)
        self.kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
        self.s_mb = 0 if self.kpm is None else self.kpm.stride(0)
        self.cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        self.n_seq = self.B if self.cu is None else self.cu.numel() - 1
        if self.cu is None:
            self.max_q, self.max_k = self.Sq, self.T
        else:
            self.max_q = self.max_k = int(max_seqlen) if max_seqlen is not None else \
                int((self.cu[1:] - self.cu[:-1]).max()) if self.n_seq else 0
        self.bm, self.bn, self.num_warps = _blocks(block_m, block_n, num_warps, (self.Dk, self.F, self.D), q.dtype)
        self.nc1 = triton.cdiv(self.max_k, self.bn) + 1      # states before each key chunk, and after the last
        self.nq1 = triton.cdiv(self.max_q, self.bm) + 1      # suffix gradients from each query block on, and 0
        self.upcast, self.precision = dot_flags(q.dtype)
        self.dims = dict(DK=self.Dk, F=self.F, D=self.D, DK_PAD=pad_dim(self.Dk), F_PAD=pad_dim(self.F),
                         D_PAD=pad_dim(self.D))
        self.bf, self.bd = _state_tile(pad_dim(self.F)), _state_tile(pad_dim(self.D))
        self.n_ft, self.n_dt = pad_dim(self.F) // self.bf, pad_dim(self.D) // self.bd
        self.flags = dict(HAS_KPM=self.kpm is not None, IS_VARLEN=self.cu is not None, UPCAST=self.upcast,
                          PRECISION=self.precision)


def _strides(*ts):
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


def _states(c, fk, v, s0, z0):
    """(HS, ZS): fp32 states before every key chunk (HS[:, :, i] = S0 + keys < i * BLOCK_N that some query reads
    linearly); the last, HS[:, :, -1], is the state of every such key: the returned state."""
    dev = fk.device
    hs = torch.empty(c.n_seq, c.Hkv, c.nc1, c.F, c.D, dtype=torch.float32, device=dev)
    zs = torch.empty(c.n_seq, c.Hkv, c.nc1, c.F, dtype=torch.float32, device=dev)
    hs[:, :, 0] = 0 if s0 is None else s0
    zs[:, :, 0] = 0 if z0 is None else z0
    if c.nc1 > 1 and c.n_seq * c.Hkv:
        _state_fwd_kernel[(c.nc1 - 1, c.n_ft * c.n_dt, c.n_seq * c.Hkv)](
            fk, v, hs, zs, c.kpm, c.cu, *_strides(fk, v), c.s_mb,
            c.Hkv, c.T, c.W, c.nc1, F=c.F, D=c.D, BF=c.bf, BD=c.bd, N_DT=c.n_dt,
            HAS_KPM=c.flags["HAS_KPM"], IS_VARLEN=c.flags["IS_VARLEN"], UPCAST=c.upcast, PRECISION=c.precision,
            BLOCK_N=c.bn, num_warps=4)
    return hs.cumsum_(2), zs.cumsum_(2)  # fp32 prefix sums over the chunks


def _hybrid_fwd(c, q, k, v, fq, fk, gate, s0, z0):
    """(out, m2, amax, Z, S_final, z_final); m2/amax/Z are [B, H, Sq] row statistics for the backward."""
    hs, zs = _states(c, fk, v, s0, z0)
    sf, zf = hs[:, :, -1].clone(), zs[:, :, -1].clone()  # not views: the chunk states are freed
    out = torch.empty(c.B, c.H, c.Sq, c.D, dtype=v.dtype, device=v.device)
    m2 = torch.empty(c.B, c.H, c.Sq, dtype=torch.float32, device=q.device)
    amax = torch.empty(c.B, c.H, c.Sq, dtype=torch.int32, device=q.device)
    zden = torch.empty(c.B, c.H, c.Sq, dtype=torch.float32, device=q.device)
    if c.max_q == 0 or c.n_seq * c.H == 0:
        return out, m2, amax, zden, sf, zf
    _fwd_kernel[(triton.cdiv(c.max_q, c.bm), c.n_seq * c.H)](
        q, k, v, fq, fk, gate, hs, zs, out, m2, amax, zden, c.kpm, c.cu,
        *_strides(q, k, v, fq, fk, out), c.s_mb,
        c.H, c.G, c.Sq, c.T, c.W, c.nc1, c.scale * LOG2E, c.eps, **c.dims, **c.flags,
        BLOCK_M=c.bm, BLOCK_N=c.bn, num_warps=c.num_warps)
    return out, m2, amax, zden, sf, zf


def _hybrid_bwd(c, do, dsf, dzf, q, k, v, fq, fk, gate, s0, z0, out, m2, amax, zden):
    """Gradients (dq, dk, dv, dfq, dfk, dgate, dS0, dz0) of the forward's (out, S_final, z_final); dS0, dz0 [n_seq,
    Hkv, F(, D)] fp32 even without an initial state."""
    dev = q.device
    do = last_dim_contiguous(do.to(out.dtype))
    hs, zs = _states(c, fk, v, s0, z0)  # recomputed: cheaper to keep than T/C full states per layer
    dq, dfq = torch.empty_like(q), torch.empty_like(fq)
    dk, dv, dfk = torch.empty_like(k), torch.empty_like(v), torch.empty_like(fk)
    delta = torch.empty(c.B, c.H, c.Sq, dtype=torch.float32, device=dev)
    r = torch.empty(c.B, c.H, c.Sq, dtype=torch.float32, device=dev)
    if c.max_q and c.n_seq * c.H:
        _bwd_dq_kernel[(triton.cdiv(c.max_q, c.bm), c.n_seq * c.H)](
            q, k, v, fq, fk, gate, hs, zs, out, do, m2, amax, zden, delta, r, dq, dfq, c.kpm, c.cu,
            *_strides(q, k, v, fq, fk, out, do, dq, dfq), c.s_mb,
            c.H, c.G, c.Sq, c.T, c.W, c.nc1, c.scale * LOG2E, c.scale, c.eps, **c.dims, **c.flags,
            BLOCK_M=c.bm, BLOCK_N=c.bn, num_warps=c.num_warps)
    dhs = torch.empty(c.n_seq, c.Hkv, c.nq1, c.F, c.D, dtype=torch.float32, device=dev)
    dzs = torch.empty(c.n_seq, c.Hkv, c.nq1, c.F, dtype=torch.float32, device=dev)
    dhs[:, :, -1] = 0
    dzs[:, :, -1] = 0
    if c.nq1 > 1 and c.n_seq * c.Hkv:
        _state_bwd_kernel[(c.nq1 - 1, c.n_ft * c.n_dt, c.n_seq * c.Hkv)](
            fq, do, zden, delta, dhs, dzs, c.cu, *_strides(fq, do), c.H, c.G, c.Sq, c.nq1,
            F=c.F, D=c.D, BF=c.bf, BD=c.bd, N_DT=c.n_dt, IS_VARLEN=c.flags["IS_VARLEN"], PRECISION=c.precision,
            BLOCK_M=c.bm, num_warps=4)
    # suffix sums: dHS[i] = the rows from query block i on (blocks past a sequence's end gave 0)
    dhs, dzs = (x.flip(2).cumsum(2).flip(2) for x in (dhs, dzs))
    has_dstate = dsf is not None or dzf is not None
    if has_dstate:
        dsf = torch.zeros_like(dhs[:, :, 0]) if dsf is None else dsf.float().contiguous()
        dzf = torch.zeros_like(dzs[:, :, 0]) if dzf is None else dzf.float().contiguous()
    if c.max_k and c.n_seq * c.Hkv:
        _bwd_dkdv_kernel[(triton.cdiv(c.max_k, c.bn), c.n_seq * c.Hkv)](
            q, k, v, fq, fk, gate, dhs, dzs, dsf, dzf, do, m2, amax, zden, delta, r, dk, dv, dfk, c.kpm, c.cu,
            *_strides(q, k, v, fq, fk, do, dk, dv, dfk), c.s_mb,
            c.H, c.G, c.Sq, c.T, c.W, c.nq1, c.scale * LOG2E, c.scale, **c.dims, HAS_DSTATE=has_dstate,
            **c.flags, BLOCK_M=c.bm, BLOCK_N=c.bn, num_warps=c.num_warps)
    dgate = r.sum(dim=(0, 2)) if c.max_q else torch.zeros(c.H, dtype=torch.float32, device=dev)
    ds0, dz0 = dhs[:, :, 0].clone(), dzs[:, :, 0].clone()  # what an initial state S0, z0 would get
    if has_dstate:
        ds0, dz0 = ds0 + dsf, dz0 + dzf
    return dq, dk, dv, dfq, dfk, dgate, ds0, dz0


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
# torch.ops.hfa.hybrid_attention_fwd / _bwd: the launchers as custom ops (one torch.compile graph node each), the
# forward differentiable through the backward op. The row statistics (m2, amax, Z) are outputs for the backward,
# not differentiable.

_OPTIONS = ("Tensor? key_padding_mask, Tensor? cu_seqlens, int window, float scale, float eps, int? max_seqlen, "
            "int block_m, int block_n, int num_warps")
_OPTION_NAMES = ("key_padding_mask", "cu_seqlens", "window", "scale", "eps", "max_seqlen", "block_m", "block_n",
                 "num_warps")


def _call(q, k, v, fq, fk, options):
    return _Call(q, k, v, fq, fk, **dict(zip(_OPTION_NAMES, options)))


def _fake_states(q, k, v, fq, cu_seqlens):
    n_seq = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    Hkv, F, D = k.shape[1], fq.shape[-1], v.shape[-1]
    return q.new_empty(n_seq, Hkv, F, D, dtype=torch.float32), q.new_empty(n_seq, Hkv, F, dtype=torch.float32)


@kernel_op("hybrid_attention_fwd", "(Tensor q, Tensor k, Tensor v, Tensor fq, Tensor fk, Tensor gate, Tensor? s0, "
           f"Tensor? z0, {_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def hybrid_attention_fwd(q, k, v, fq, fk, gate, s0, z0, *options):
    """(out, m2, amax, Z, S_final, z_final) of :func:`hybrid_attention_triton` (its checks already done; options in
    ``_OPTION_NAMES`` order, block sizes resolved)."""
    q, k, v, fq, fk = (last_dim_contiguous(t) for t in (q, k, v, fq, fk))
    return _hybrid_fwd(_call(q, k, v, fq, fk, options), q, k, v, fq, fk, gate, s0, z0)


@hybrid_attention_fwd.register_fake
def _(q, k, v, fq, fk, gate, s0, z0, key_padding_mask, cu_seqlens, *options):
    B, H, Sq, _ = q.shape
    stats = [q.new_empty(B, H, Sq, dtype=dtype) for dtype in (torch.float32, torch.int32, torch.float32)]
    return (v.new_empty(B, H, Sq, v.shape[-1]), *stats, *_fake_states(q, k, v, fq, cu_seqlens))


@kernel_op("hybrid_attention_bwd", "(Tensor do, Tensor? dsf, Tensor? dzf, Tensor q, Tensor k, Tensor v, Tensor fq, "
           "Tensor fk, Tensor gate, Tensor? s0, Tensor? z0, Tensor out, Tensor m2, Tensor amax, Tensor zden, "
           f"{_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def hybrid_attention_bwd(do, dsf, dzf, q, k, v, fq, fk, gate, s0, z0, out, m2, amax, zden, *options):
    """(dq, dk, dv, dfq, dfk, dgate [H] fp32, dS0, dz0) for the gradients do of out and dsf, dzf (or None) of the
    final state."""
    q, k, v, fq, fk = (last_dim_contiguous(t) for t in (q, k, v, fq, fk))
    return _hybrid_bwd(_call(q, k, v, fq, fk, options), do, dsf, dzf, q, k, v, fq, fk, gate, s0, z0, out, m2, amax,
                       zden)


@hybrid_attention_bwd.register_fake
def _(do, dsf, dzf, q, k, v, fq, fk, gate, s0, z0, out, m2, amax, zden, key_padding_mask, cu_seqlens, *options):
    grads = [torch.empty_like(t) for t in (q, k, v, fq, fk)]
    return (*grads, q.new_empty(q.shape[1], dtype=torch.float32), *_fake_states(q, k, v, fq, cu_seqlens))


def _setup_hybrid_context(ctx, inputs, output):
    q, k, v, fq, fk, gate, s0, z0, key_padding_mask, cu_seqlens, *options = inputs
    out, m2, amax, zden, _, _ = output
    ctx.mark_non_differentiable(m2, amax, zden)
    ctx.save_for_backward(q, k, v, fq, fk, gate, s0, z0, out, m2, amax, zden, key_padding_mask, cu_seqlens)
    ctx.options = options


def _hybrid_backward(ctx, do, dm2, damax, dzden, dsf, dzf):
    q, k, v, fq, fk, gate, s0, z0, out, m2, amax, zden, kpm, cu = ctx.saved_tensors
    *grads, ds0, dz0 = torch.ops.hfa.hybrid_attention_bwd(do, dsf, dzf, q, k, v, fq, fk, gate, s0, z0, out, m2, amax,
                                                          zden, kpm, cu, *ctx.options)
    ds0, dz0 = (None, None) if s0 is None else (ds0, dz0)
    return (*grads, ds0, dz0) + (None,) * len(_OPTION_NAMES)


hybrid_attention_fwd.register_autograd(_hybrid_backward, setup_context=_setup_hybrid_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def hybrid_attention_triton(q, k, v, fq, fk, *, window, window_factor=1.0, scale=None, eps=1e-6,
                            initial_state=None, return_state=False, key_padding_mask=None, cu_seqlens=None,
                            max_seqlen=None, block_m=None, block_n=None, num_warps=None):
    """Sliding-window softmax + linear attention under one normaliser (LoLCATs), on Triton kernels.

    The same call and result as :func:`.reference.hybrid_attention_reference`:
    q: [B, H, Sq, Dk], k: [B, Hkv, T, Dk] (softmax part, after RoPE); fq: [B, H, Sq, F], fk: [B, Hkv, T, F]
    (feature maps, linear part); v: [B, Hkv, T, D]; one dtype among float16/bfloat16/float32, on CUDA (or on
    CPU with TRITON_INTERPRET=1); H % Hkv == 0, Sq <= T (queries aligned to the end of the keys);
    Dk, F, D <= 256. window: int >= 1; window_factor: a number or [H] (differentiable); scale: default Dk^-0.5.
    initial_state: (S0 [B, Hkv, F, D], z0 [B, Hkv, F]), fp32 (differentiable); key_padding_mask: [B, T] bool,
    True = real token; cu_seqlens: [N + 1] int with B == 1 (max_seqlen, an int, avoids a device sync).
    block_m / block_n: query rows per program and keys per chunk (powers of two >= 16).

    Returns out [B, H, Sq, D] in v.dtype, or (out, (S [B or N, Hkv, F, D], z [B or N, Hkv, F])) fp32 with
    return_state=True. Gradients flow to q, k, v, fq, fk, window_factor, initial_state, through out and the
    returned state.
    """
    _check_hybrid(q, k, fq, fk, window)
    B, H, Hkv, Sq, T, F, D = check_linear_inputs(fq, fk, v, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                                 same_length=False, key_padding_mask=key_padding_mask)
    reason = hybrid_unsupported_reason(q, k, v, fq, fk, window=window, initial_state=initial_state,
                                       key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    if reason is not None:
        raise ValueError(f"the Triton hybrid kernels cannot serve this call: {reason}; use "
                         f"hybrid_attention_reference or hybrid_attention_chunked instead")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gate = _window_factor(window_factor, H, torch.float32, q.device).contiguous()
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (x.float().contiguous() for x in initial_state)
    q, k, v, fq, fk = (last_dim_contiguous(t) for t in (q, k, v, fq, fk))
    block_m, block_n, num_warps = _blocks(block_m, block_n, num_warps, (q.shape[-1], F, D), q.dtype)
    out, _, _, _, sf, zf = hybrid_attention_fwd(
        q, k, v, fq, fk, gate, s0, z0, key_padding_mask, cu_seqlens, int(window), float(scale), float(eps),
        None if max_seqlen is None else int(max_seqlen), block_m, block_n, num_warps)
    return (out, (sf, zf)) if return_state else out
