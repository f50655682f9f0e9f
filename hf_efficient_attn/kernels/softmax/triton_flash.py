"""FlashAttention-2 style softmax attention in Triton: forward, backward, custom ops with autograd, public function.

Same definition and conventions as :mod:`.reference` (read its module docstring): ``q: [B, Hq, Sq, D]``,
``k: [B, Hkv, Skv, D]``, ``v: [B, Hkv, Skv, Dv]``, bottom-right causal alignment, windows counted in
keys including the query's own position, ``key_padding_mask`` True = real token, packed sequences via
``cu_seqlens_q/k``, ``softcap``, per-head ``sinks``; a row that may attend nothing gives 0 and
``lse = -inf``.

How it works:

* forward: one program per (query block, batch * query head). Scores are kept in base 2
  (``s * log2(e)``) so the online softmax uses ``exp2``; fp32 accumulators. The key loop runs in
  three stages: blocks cut by the window's lower edge (masked), blocks every query of the block sees
  whole (no position mask), blocks cut by the causal diagonal or the window's upper edge (masked).
  Blocks outside the causal/window range are never visited. GQA: a program reads the KV head of its
  query head (``h // (Hq // Hkv)``), K/V are never repeated.
* backward: ``delta = rowsum(dO * O) - dlse`` (a small kernel); dK/dV: one program per
  (key block, batch * KV head) that loops over the query heads of its GQA group, so every dK/dV
  element is written by exactly one program (no atomics); dQ: one program per query block, like the
  forward. The sinks gradient is a per-head reduction done in torch from ``lse`` and ``delta``.
* head dims up to 256 of any size (tiles are padded to a power of two and masked); fp16/bf16 inputs
  use tensor cores, fp32 inputs use exact fp32 dots (``input_precision="ieee"``).
* ``torch.compile``: the forward and backward launchers are the custom ops ``torch.ops.hfa.flash_attention_fwd``
  / ``_bwd`` (fake functions for the shapes, the backward op registered as the forward's autograd), so a compiled
  model records each call as one graph node; Inductor calls the kernels as they are.
* ``TRITON_INTERPRET=1`` runs everything on CPU (slow, for tests): there low-precision tiles are cast
  to fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong) and autotuning has one config.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..triton_utils import (
    KERNEL_DTYPES,
    LOG2E,
    MAX_HEAD_DIM,
    cu_seqlens_arg,
    dot_flags,
    kernel_op,
    key_padding_arg,
    last_dim_contiguous,
    max_seqlen,
    pad_dim,
    record_build,
)
from ..triton_utils.jit import LN2_K, LOG2E_K, autotune_configs, dot, seq_bounds, tile_pruner
from .reference import check_attention_inputs

__all__ = ["flash_attention", "flash_attention_bwd", "flash_attention_fwd"]

INTERPRETED = record_build(__name__)


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit helpers (the masks and stages also serve triton_decode.py)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf; near 0 (|x| < 1/8) a Taylor series
    # keeps the relative error at fp32 rounding, where the exp form would cancel.
    # 2.88539008 = 2/ln 2
    x2 = x * x
    series = x * (1.0 + x2 * (-0.333333333333 + x2 * (0.133333333333 + x2 * (-0.0539682539683))))
    return tl.where(tl.abs(x) < 0.125, series, 1.0 - 2.0 / (tl.exp2(x * 2.88539008) + 1.0))


@triton.jit
def _allowed(p_q, p_k, L_k, W, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # (query position, key position) pairs that may attend; p_q / p_k broadcast against each other
    m = p_k < L_k
    if CAUSAL:
        m = m & (p_k <= p_q)
    if HAS_WINDOW:
        m = m & (p_q - p_k < W)
        if not CAUSAL:
            m = m & (p_k - p_q < W)
    return m


@triton.jit
def _clamp_stages(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    # Align the raw bounds to BLOCK so that [lo, full_lo) and [full_hi, hi) are the masked stages and
    # [full_lo, full_hi) holds only whole, unmasked blocks; lo <= full_lo <= full_hi <= hi.
    lo = tl.maximum(lo, 0) // BLOCK * BLOCK
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK) * BLOCK, lo), hi)
    full_hi = tl.maximum(tl.maximum(full_hi, 0) // BLOCK * BLOCK, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _kv_stages(m0, off, L_k, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # Key range seen by query rows [m0, m0 + BLOCK_M) (positions m0 + off ...), split into stages.
    p_lo = m0 + off
    p_hi = m0 + BLOCK_M - 1 + off
    lo = p_lo * 0
    full_lo = p_lo * 0
    hi = p_lo * 0 + L_k
    full_hi = p_lo * 0 + L_k
    if CAUSAL:
        hi = tl.minimum(hi, p_hi + 1)
        full_hi = tl.minimum(full_hi, p_lo + 1)
    if HAS_WINDOW:
        lo = p_lo - W + 1
        full_lo = p_hi - W + 1
        if not CAUSAL:
            hi = tl.minimum(hi, p_hi + W)
            full_hi = tl.minimum(full_hi, p_lo + W)
    return _clamp_stages(lo, full_lo, full_hi, hi, BLOCK_N)


@triton.jit
def _q_stages(n0, off, L_q, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # Query rows that see keys [n0, n0 + BLOCK_N), split into stages (the inverse of _kv_stages).
    n_hi = n0 + BLOCK_N - 1
    lo = n0 * 0
    full_lo = n0 * 0
    hi = n0 * 0 + L_q
    full_hi = n0 * 0 + L_q
    if CAUSAL:
        lo = n0 - off
        full_lo = n_hi - off
    if HAS_WINDOW:
        hi = tl.minimum(hi, n_hi + W - off)
        full_hi = tl.minimum(full_hi, n0 + W - off)
        if not CAUSAL:
            lo = n0 - W + 1 - off
            full_lo = n_hi - W + 1 - off
    return _clamp_stages(lo, full_lo, full_hi, hi, BLOCK_M)


# ----------------------------------------------------------------------------------------------
# Tile configurations (candidate grids and defaults; see triton_utils.jit for how they are used)
# ----------------------------------------------------------------------------------------------

_FWD_SPACE = dict(BLOCK_M=(64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
_DKDV_SPACE = dict(BLOCK_M=(16, 32, 64), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
_DQ_SPACE = dict(BLOCK_M=(64, 128), BLOCK_N=(16, 32, 64), num_warps=(4, 8), num_stages=(2, 3, 4))


def _fwd_default(d, fp32):
    if fp32 or d > 128:
        return dict(BLOCK_M=64, BLOCK_N=32), 4, 2
    return dict(BLOCK_M=128, BLOCK_N=64), (4 if d <= 64 else 8), 3


def _dkdv_default(d, fp32):
    # BLOCK_N keys per program (their dK, dV accumulate in registers), BLOCK_M query rows per step
    if fp32 or d > 128:
        return dict(BLOCK_M=16, BLOCK_N=64), 4, 2
    return dict(BLOCK_M=32, BLOCK_N=128), (4 if d <= 64 else 8), 3


def _dq_default(d, fp32):
    if fp32 or d > 128:
        return dict(BLOCK_M=64, BLOCK_N=16), 4, 2
    return dict(BLOCK_M=128, BLOCK_N=32), (4 if d <= 64 else 8), 3


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def fwd_inner(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, pos_q, lo, hi, L_k, W, s_kn, s_vn,
               qk_scale, sc_in, sc_out,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
               D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    # block pointers advance in 64 bits: row * stride can pass 2^31 in long sequences
    p_kn = p_k + lo.to(tl.int64) * s_kn
    p_vn = p_v + lo.to(tl.int64) * s_vn
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + offs_n
        m_n = o_n < L_k
        # -- s = q k^T in base 2
        b_k = tl.load(p_kn + offs_n[:, None] * s_kn + offs_d[None, :], mask=m_n[:, None] & (offs_d[None, :] < D),
                      other=0.0)
        b_s = dot(b_q, tl.trans(b_k), None, UPCAST, PRECISION)
        if HAS_SOFTCAP:
            b_s = sc_out * _tanh(b_s * sc_in)
        else:
            b_s = b_s * qk_scale
        if MASK:
            b_s = tl.where(_allowed(pos_q[:, None], o_n[None, :], L_k, W, CAUSAL, HAS_WINDOW), b_s, float("-inf"))
        if HAS_KPM:
            b_kpm = tl.load(p_kpm + o_n, mask=m_n, other=0) != 0
            b_s = tl.where(b_kpm[None, :], b_s, float("-inf"))
        # -- update m_i and l_i; a row that has seen nothing yet keeps m_i = -inf and shifts by 0
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.exp2(b_s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        # -- update the output accumulator
        b_v = tl.load(p_vn + offs_n[:, None] * s_vn + offs_dv[None, :], mask=m_n[:, None] & (offs_dv[None, :] < DV),
                      other=0.0)
        acc = dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
        p_kn += BLOCK_N * s_kn
        p_vn += BLOCK_N * s_vn
    return acc, l_i, m_i


@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "HAS_SINKS": lambda a: a["SINKS"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.autotune(configs=autotune_configs(_FWD_SPACE, dict(BLOCK_M=64, BLOCK_N=64)),
                 key=["D_PAD", "DV_PAD", "CAUSAL", "HAS_WINDOW", "PRECISION"],
                 prune_configs_by={"early_config_prune": tile_pruner(_fwd_default)})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, SINKS, CU_Q, CU_K,
                s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_oh, s_os, s_lb, s_lh, s_mb,
                H, G, S_Q, S_K, W, qk_scale, sc_in, sc_out,
                D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_KPM: tl.constexpr, HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    if CAUSAL:
        i_m = tl.num_programs(0) - 1 - i_m  # the longest query blocks start first
    i_bh = tl.program_id(1).to(tl.int64)
    i_n, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    # -- sequence bounds: a batch row, or one packed sequence of batch 0
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    m0 = i_m * BLOCK_M
    if m0 >= L_q:
        return
    off = L_k - L_q  # bottom-right alignment: query i sits at position i + off

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_m = offs_m < L_q
    pos_q = offs_m + off
    row0 = (bos_q + m0).to(tl.int64)  # first row of the block in 64 bits
    p_q = Q + i_b * s_qb + i_h * s_qh + row0 * s_qs
    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    p_kpm = KPM
    if HAS_KPM:
        p_kpm = KPM + i_b * s_mb + bos_k
    b_q = tl.load(p_q + offs_r[:, None] * s_qs + offs_d[None, :], mask=m_m[:, None] & (offs_d[None, :] < D),
                  other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    lo, full_lo, full_hi, hi = _kv_stages(m0, off, L_k, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # -- stage 1: blocks cut by the lower edge of the window
    acc, l_i, m_i = fwd_inner(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, pos_q, lo, full_lo, L_k, W, s_ks, s_vs,
                               qk_scale, sc_in, sc_out, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                               D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)
    # -- stage 2: blocks every row sees whole
    acc, l_i, m_i = fwd_inner(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, pos_q, full_lo, full_hi, L_k, W, s_ks, s_vs,
                               qk_scale, sc_in, sc_out, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                               D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)
    # -- stage 3: the causal diagonal, the window's upper edge, the last partial block
    acc, l_i, m_i = fwd_inner(acc, l_i, m_i, b_q, p_k, p_v, p_kpm, pos_q, full_hi, hi, L_k, W, s_ks, s_vs,
                               qk_scale, sc_in, sc_out, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                               D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)
    # -- sinks: one more logit per head in the denominator, with no value
    if HAS_SINKS:
        b_sink = tl.load(SINKS + i_h).to(tl.float32) * LOG2E_K
        m_new = tl.maximum(m_i, b_sink)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.exp2(b_sink - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_new
    # -- normalise; a row that saw nothing writes 0 and lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2_K)
    p_o = O + i_b * s_ob + i_h * s_oh + row0 * s_os
    tl.store(p_o + offs_r[:, None] * s_os + offs_dv[None, :], b_o.to(O.dtype.element_ty),
             mask=m_m[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + i_b * s_lb + i_h * s_lh + bos_q + offs_m, b_lse, mask=m_m)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, s_ob, s_oh, s_os, s_db, s_dh, s_ds, H, S,
                           DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_DLSE: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    # delta = rowsum(dO * O) - dlse: the softmax backward term shared by dK and dQ
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = i_m * BLOCK_M + offs_r
    offs_dv = tl.arange(0, DV_PAD)
    m_m = offs_m < S
    m_t = m_m[:, None] & (offs_dv[None, :] < DV)
    row0 = (i_m * BLOCK_M).to(tl.int64)
    b_o = tl.load(O + i_b * s_ob + i_h * s_oh + row0 * s_os + offs_r[:, None] * s_os + offs_dv[None, :], mask=m_t,
                  other=0.0)
    b_do = tl.load(DO + i_b * s_db + i_h * s_dh + row0 * s_ds + offs_r[:, None] * s_ds + offs_dv[None, :], mask=m_t,
                   other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    if HAS_DLSE:
        b_delta -= tl.load(DLSE + i_bh * S + offs_m, mask=m_m, other=0.0)
    tl.store(DELTA + i_bh * S + offs_m, b_delta, mask=m_m)


@triton.jit
def _bwd_dkdv_inner(acc_dk, acc_dv, b_k, b_v, b_kpm, p_q, p_do, p_lse, p_delta, o_n, lo, hi, L_q, L_k, off, W,
                    s_qs, s_dos, qk_scale, sc_in, sc_out,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Everything is computed transposed ([keys, queries]) so the accumulators need no transpose.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    p_qm = p_q + lo.to(tl.int64) * s_qs
    p_dom = p_do + lo.to(tl.int64) * s_dos
    for m0 in range(lo, hi, BLOCK_M):
        o_m = m0 + offs_m
        m_m = o_m < L_q
        b_q = tl.load(p_qm + offs_m[:, None] * s_qs + offs_d[None, :], mask=m_m[:, None] & (offs_d[None, :] < D),
                      other=0.0)
        b_do = tl.load(p_dom + offs_m[:, None] * s_dos + offs_dv[None, :],
                       mask=m_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
        # rows that saw nothing (lse = -inf) and rows past the end get p = 0 through lse = +inf
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("-inf"))
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_K)
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
        # -- p^T = exp2(s^T - lse)
        b_sT = dot(b_k, tl.trans(b_q), None, UPCAST, PRECISION)
        if HAS_SOFTCAP:
            b_tT = _tanh(b_sT * sc_in)
            b_sT = sc_out * b_tT
        else:
            b_sT = b_sT * qk_scale
        if MASK:
            b_sT = tl.where(_allowed(o_m[None, :] + off, o_n[:, None], L_k, W, CAUSAL, HAS_WINDOW), b_sT,
                            float("-inf"))
        if HAS_KPM:
            b_sT = tl.where(b_kpm[:, None], b_sT, float("-inf"))
        b_pT = tl.exp2(b_sT - b_lse[None, :])
        # -- dV += p^T dO ; dS^T = p^T * (dP^T - delta) ; dK += dS^T q
        acc_dv = dot(b_pT.to(b_do.dtype), b_do, acc_dv, UPCAST, PRECISION)
        b_dpT = dot(b_v, tl.trans(b_do), None, UPCAST, PRECISION)
        b_dsT = b_pT * (b_dpT - b_delta[None, :])
        if HAS_SOFTCAP:
            b_dsT = b_dsT * (1.0 - b_tT * b_tT)
        acc_dk = dot(b_dsT.to(b_q.dtype), b_q, acc_dk, UPCAST, PRECISION)
        p_qm += BLOCK_M * s_qs
        p_dom += BLOCK_M * s_dos
    return acc_dk, acc_dv


@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.autotune(configs=autotune_configs(_DKDV_SPACE, dict(BLOCK_M=64, BLOCK_N=64)),
                 key=["D_PAD", "DV_PAD", "CAUSAL", "HAS_WINDOW", "PRECISION"],
                 prune_configs_by={"early_config_prune": tile_pruner(_dkdv_default, streamed="BLOCK_M")})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, KPM, CU_Q, CU_K,
                     s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                     s_dkb, s_dkh, s_dks, s_dvb, s_dvh, s_dvs, s_lb, s_lh, s_mb,
                     H_KV, G, S_Q, S_K, W, scale, qk_scale, sc_in, sc_out,
                     D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_nb = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_n, i_hk = i_bh // H_KV, i_bh % H_KV
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    n0 = i_nb * BLOCK_N
    if n0 >= L_k:
        return
    off = L_k - L_q

    offs_r = tl.arange(0, BLOCK_N)
    offs_n = n0 + offs_r
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_n = offs_n < L_k
    m_kd = m_n[:, None] & (offs_d[None, :] < D)
    m_vd = m_n[:, None] & (offs_dv[None, :] < DV)
    row0 = (bos_k + n0).to(tl.int64)
    b_k = tl.load(K + i_b * s_kb + i_hk * s_kh + row0 * s_ks + offs_r[:, None] * s_ks + offs_d[None, :], mask=m_kd,
                  other=0.0)
    b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + row0 * s_vs + offs_r[:, None] * s_vs + offs_dv[None, :], mask=m_vd,
                  other=0.0)
    b_kpm = offs_n < L_k
    if HAS_KPM:
        b_kpm = tl.load(KPM + i_b * s_mb + bos_k + offs_n, mask=m_n, other=0) != 0

    acc_dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    acc_dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    lo, full_lo, full_hi, hi = _q_stages(n0, off, L_q, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # -- the query heads of this KV head's group, one after another: no atomics
    for g in range(0, G):
        i_h = i_hk * G + g
        p_q = Q + i_b * s_qb + i_h * s_qh + bos_q * s_qs
        p_do = DO + i_b * s_dob + i_h * s_doh + bos_q * s_dos
        p_lse = LSE + i_b * s_lb + i_h * s_lh + bos_q
        p_delta = DELTA + i_b * s_lb + i_h * s_lh + bos_q
        # -- stage 1: rows cut by the causal diagonal or by the window's upper edge
        acc_dk, acc_dv = _bwd_dkdv_inner(acc_dk, acc_dv, b_k, b_v, b_kpm, p_q, p_do, p_lse, p_delta, offs_n,
                                         lo, full_lo, L_q, L_k, off, W, s_qs, s_dos, qk_scale, sc_in, sc_out,
                                         True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                                         D, DV, D_PAD, DV_PAD, BLOCK_M, UPCAST, PRECISION)
        # -- stage 2: rows that see the whole key block
        acc_dk, acc_dv = _bwd_dkdv_inner(acc_dk, acc_dv, b_k, b_v, b_kpm, p_q, p_do, p_lse, p_delta, offs_n,
                                         full_lo, full_hi, L_q, L_k, off, W, s_qs, s_dos, qk_scale, sc_in, sc_out,
                                         False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                                         D, DV, D_PAD, DV_PAD, BLOCK_M, UPCAST, PRECISION)
        # -- stage 3: rows cut by the window's lower edge, the last partial block
        acc_dk, acc_dv = _bwd_dkdv_inner(acc_dk, acc_dv, b_k, b_v, b_kpm, p_q, p_do, p_lse, p_delta, offs_n,
                                         full_hi, hi, L_q, L_k, off, W, s_qs, s_dos, qk_scale, sc_in, sc_out,
                                         True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                                         D, DV, D_PAD, DV_PAD, BLOCK_M, UPCAST, PRECISION)
    p_dk = DK + i_b * s_dkb + i_hk * s_dkh + row0 * s_dks + offs_r[:, None] * s_dks + offs_d[None, :]
    p_dv = DV_OUT + i_b * s_dvb + i_hk * s_dvh + row0 * s_dvs + offs_r[:, None] * s_dvs + offs_dv[None, :]
    tl.store(p_dk, (acc_dk * scale).to(DK.dtype.element_ty), mask=m_kd)
    tl.store(p_dv, acc_dv.to(DV_OUT.dtype.element_ty), mask=m_vd)


@triton.jit
def _bwd_dq_inner(acc_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, p_kpm, pos_q, lo, hi, L_k, W, s_kn, s_vn,
                  qk_scale, sc_in, sc_out,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                  D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    p_kn = p_k + lo.to(tl.int64) * s_kn
    p_vn = p_v + lo.to(tl.int64) * s_vn
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + offs_n
        m_n = o_n < L_k
        b_k = tl.load(p_kn + offs_n[:, None] * s_kn + offs_d[None, :], mask=m_n[:, None] & (offs_d[None, :] < D),
                      other=0.0)
        b_v = tl.load(p_vn + offs_n[:, None] * s_vn + offs_dv[None, :], mask=m_n[:, None] & (offs_dv[None, :] < DV),
                      other=0.0)
        # -- p = exp2(s - lse)
        b_s = dot(b_q, tl.trans(b_k), None, UPCAST, PRECISION)
        if HAS_SOFTCAP:
            b_t = _tanh(b_s * sc_in)
            b_s = sc_out * b_t
        else:
            b_s = b_s * qk_scale
        if MASK:
            b_s = tl.where(_allowed(pos_q[:, None], o_n[None, :], L_k, W, CAUSAL, HAS_WINDOW), b_s, float("-inf"))
        if HAS_KPM:
            b_kpm = tl.load(p_kpm + o_n, mask=m_n, other=0) != 0
            b_s = tl.where(b_kpm[None, :], b_s, float("-inf"))
        b_p = tl.exp2(b_s - b_lse[:, None])
        # -- dS = p * (dO v^T - delta) ; dQ += dS k
        b_dp = dot(b_do, tl.trans(b_v), None, UPCAST, PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        if HAS_SOFTCAP:
            b_ds = b_ds * (1.0 - b_t * b_t)
        acc_dq = dot(b_ds.to(b_k.dtype), b_k, acc_dq, UPCAST, PRECISION)
        p_kn += BLOCK_N * s_kn
        p_vn += BLOCK_N * s_vn
    return acc_dq


@triton.heuristics({
    "HAS_KPM": lambda a: a["KPM"] is not None,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
})
@triton.autotune(configs=autotune_configs(_DQ_SPACE, dict(BLOCK_M=64, BLOCK_N=64)),
                 key=["D_PAD", "DV_PAD", "CAUSAL", "HAS_WINDOW", "PRECISION"],
                 prune_configs_by={"early_config_prune": tile_pruner(_dq_default)})
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, CU_Q, CU_K,
                   s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                   s_dqb, s_dqh, s_dqs, s_lb, s_lh, s_mb,
                   H, G, S_Q, S_K, W, scale, qk_scale, sc_in, sc_out,
                   D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    if CAUSAL:
        i_m = tl.num_programs(0) - 1 - i_m
    i_bh = tl.program_id(1).to(tl.int64)
    i_n, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    i_b, bos_q, L_q = seq_bounds(i_n, CU_Q, S_Q, IS_VARLEN)
    _, bos_k, L_k = seq_bounds(i_n, CU_K, S_K, IS_VARLEN)
    m0 = i_m * BLOCK_M
    if m0 >= L_q:
        return
    off = L_k - L_q

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_m = offs_m < L_q
    m_qd = m_m[:, None] & (offs_d[None, :] < D)
    row0 = (bos_q + m0).to(tl.int64)
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + row0 * s_qs + offs_r[:, None] * s_qs + offs_d[None, :], mask=m_qd,
                  other=0.0)
    b_do = tl.load(DO + i_b * s_dob + i_h * s_doh + row0 * s_dos + offs_r[:, None] * s_dos + offs_dv[None, :],
                   mask=m_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
    b_lse = tl.load(LSE + i_b * s_lb + i_h * s_lh + bos_q + offs_m, mask=m_m, other=float("-inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E_K)  # empty rows get p = 0
    b_delta = tl.load(DELTA + i_b * s_lb + i_h * s_lh + bos_q + offs_m, mask=m_m, other=0.0)
    p_k = K + i_b * s_kb + i_hk * s_kh + bos_k * s_ks
    p_v = V + i_b * s_vb + i_hk * s_vh + bos_k * s_vs
    p_kpm = KPM
    if HAS_KPM:
        p_kpm = KPM + i_b * s_mb + bos_k
    pos_q = offs_m + off

    acc_dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    lo, full_lo, full_hi, hi = _kv_stages(m0, off, L_k, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    acc_dq = _bwd_dq_inner(acc_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, p_kpm, pos_q, lo, full_lo, L_k, W,
                           s_ks, s_vs, qk_scale, sc_in, sc_out, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                           D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)
    acc_dq = _bwd_dq_inner(acc_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, p_kpm, pos_q, full_lo, full_hi, L_k, W,
                           s_ks, s_vs, qk_scale, sc_in, sc_out, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                           D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)
    acc_dq = _bwd_dq_inner(acc_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, p_kpm, pos_q, full_hi, hi, L_k, W,
                           s_ks, s_vs, qk_scale, sc_in, sc_out, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM,
                           D, DV, D_PAD, DV_PAD, BLOCK_N, UPCAST, PRECISION)
    p_dq = DQ + i_b * s_dqb + i_h * s_dqh + row0 * s_dqs + offs_r[:, None] * s_dqs + offs_d[None, :]
    tl.store(p_dq, (acc_dq * scale).to(DQ.dtype.element_ty), mask=m_qd)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def score_consts(scale, softcap):
    """(qk_scale, sc_in, sc_out): s2 = raw * qk_scale, or with a cap s2 = sc_out * tanh(raw * sc_in)."""
    if softcap is None:
        return scale * LOG2E, 0.0, 0.0
    return scale * LOG2E, scale / softcap, softcap * LOG2E


def _flash_fwd(q, k, v, *, scale, causal, window, softcap, key_padding_mask, sinks, cu_seqlens_q, cu_seqlens_k,
               max_seqlen_q, max_seqlen_k):
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, Sq, Dv] view
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(-math.inf)
    cu_q, cu_k = cu_seqlens_arg(cu_seqlens_q), cu_seqlens_arg(cu_seqlens_k)
    kpm, s_mb = key_padding_arg(key_padding_mask)
    n_seq = B if cu_q is None else cu_q.numel() - 1
    upcast, precision = dot_flags(q.dtype)
    qk_scale, sc_in, sc_out = score_consts(scale, softcap)
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_seq * Hq)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, out, lse, kpm, sinks, cu_q, cu_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), s_mb,
        Hq, Hq // Hkv, Sq, Skv, int(window or 0), qk_scale, sc_in, sc_out,
        D=D, DV=Dv, D_PAD=pad_dim(D), DV_PAD=pad_dim(Dv),
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast, PRECISION=precision,
    )
    return out, lse


def _sinks_grad(sinks, lse, delta):
    """d sink_h = -sum over rows of exp(sink_h - lse) * delta, delta = rowsum(dO * O) - dlse.

    The sink's probability p_s = exp(sink - lse) enters every p_j = exp(s_j - lse) through lse:
    d p_j / d sink = -p_j p_s, so dL/dsink = -p_s sum_j p_j (dO . v_j) + dlse p_s = -p_s (rowsum(dO * O) - dlse).
    """
    if sinks is None:
        return None
    p_sink = torch.exp(sinks.float().view(1, -1, 1) - lse)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


def _flash_bwd(do, dlse, q, k, v, out, lse, *, sinks, **options):
    """(dq, dk, dv, dsinks or None) of the forward that gave (out, lse)."""
    dq, dk, dv, delta = _flash_bwd_kernels(do, dlse, q, k, v, out, lse, **options)
    return dq, dk, dv, _sinks_grad(sinks, lse, delta)


def _flash_bwd_kernels(do, dlse, q, k, v, out, lse, *, scale, causal, window, softcap, key_padding_mask,
                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(dq, dk, dv, delta [B, Hq, Sq] fp32 = rowsum(dO * O) - dlse); the sinks gradient follows from lse and delta."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    do = last_dim_contiguous(do)
    lse = lse.contiguous()  # the kernels index delta (allocated below, contiguous) with lse's strides
    dq = torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    dk = torch.empty(B, Skv, Hkv, D, dtype=k.dtype, device=k.device).transpose(1, 2)
    dv = torch.empty(B, Skv, Hkv, Dv, dtype=v.dtype, device=v.device).transpose(1, 2)
    delta = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    if Sq == 0 or Skv == 0:  # no (query, key) pair: dq, dk, dv are zero (or empty); lse is the sink alone
        delta.copy_((out.float() * do.float()).sum(-1) - (0 if dlse is None else dlse))
        return dq.zero_(), dk.zero_(), dv.zero_(), delta
    # -- delta = rowsum(dO * O) - dlse
    BLOCK_PRE = 64
    _bwd_preprocess_kernel[(triton.cdiv(Sq, BLOCK_PRE), B * Hq)](
        out, do, dlse, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Sq, DV=Dv, DV_PAD=pad_dim(Dv), HAS_DLSE=dlse is not None, BLOCK_M=BLOCK_PRE,
    )
    cu_q, cu_k = cu_seqlens_arg(cu_seqlens_q), cu_seqlens_arg(cu_seqlens_k)
    kpm, s_mb = key_padding_arg(key_padding_mask)
    n_seq = B if cu_q is None else cu_q.numel() - 1
    upcast, precision = dot_flags(q.dtype)
    qk_scale, sc_in, sc_out = score_consts(scale, softcap)
    common = dict(D=D, DV=Dv, D_PAD=pad_dim(D), DV_PAD=pad_dim(Dv), CAUSAL=bool(causal),
                  HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
                  UPCAST=upcast, PRECISION=precision)
    strides_qkvdo = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    # -- dK, dV: one program per (key block, KV head), looping over its query heads
    grid_kv = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), n_seq * Hkv)  # noqa: E731
    _bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, kpm, cu_q, cu_k, *strides_qkvdo,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), s_mb,
        Hkv, Hq // Hkv, Sq, Skv, int(window or 0), scale, qk_scale, sc_in, sc_out, **common,
    )
    # -- dQ: one program per (query block, query head)
    grid_q = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_seq * Hq)  # noqa: E731
    _bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, kpm, cu_q, cu_k, *strides_qkvdo,
        dq.stride(0), dq.stride(1), dq.stride(2), lse.stride(0), lse.stride(1), s_mb,
        Hq, Hq // Hkv, Sq, Skv, int(window or 0), scale, qk_scale, sc_in, sc_out, **common,
    )
    return dq, dk, dv, delta

# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
# torch.ops.hfa.flash_attention_fwd / _bwd: the launchers as custom ops (torch.compile records each as one graph
# node), the forward differentiable through the backward op. Options are flat arguments (a schema has no dicts).

_OPTIONS = ("Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, float scale, bool causal, "
            "int? window, float? softcap, int max_seqlen_q, int max_seqlen_k")
OPTION_NAMES = ("key_padding_mask", "cu_seqlens_q", "cu_seqlens_k", "scale", "causal", "window", "softcap",
                "max_seqlen_q", "max_seqlen_k")


def fake_attention_outputs(q, v):
    """What the forward kernels return, as empty tensors: out [B, Hq, Sq, Dv] laid out as [B, Sq, Hq, Dv], lse."""
    B, Hq, Sq, _ = q.shape
    out = q.new_empty(B, Sq, Hq, v.shape[3]).transpose(1, 2)
    return out, q.new_empty(B, Hq, Sq, dtype=torch.float32)


@kernel_op("flash_attention_fwd", f"(Tensor q, Tensor k, Tensor v, Tensor? sinks, {_OPTIONS}) -> (Tensor, Tensor)")
def flash_attention_fwd(q, k, v, sinks, *options):
    """(out, lse) of :func:`flash_attention` (its checks already done; options in ``OPTION_NAMES`` order)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _flash_fwd(q, k, v, sinks=sinks, **dict(zip(OPTION_NAMES, options)))


@flash_attention_fwd.register_fake
def _(q, k, v, sinks, *options):
    return fake_attention_outputs(q, v)


@kernel_op("flash_attention_bwd", "(Tensor do, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
           f"{_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor)")
def flash_attention_bwd(do, dlse, q, k, v, out, lse, *options):
    """(dq, dk, dv, delta): the gradients of q, k, v and delta = rowsum(dO * O) - dlse (the sinks gradient is
    :func:`_sinks_grad` of lse and delta)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _flash_bwd_kernels(do, dlse, q, k, v, out, lse, **dict(zip(OPTION_NAMES, options)))


@flash_attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, *options):
    B, Hq, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = q.new_empty(B, Sq, Hq, D).transpose(1, 2)
    dk = k.new_empty(B, Skv, Hkv, D).transpose(1, 2)
    dv = v.new_empty(B, Skv, Hkv, Dv).transpose(1, 2)
    return dq, dk, dv, q.new_empty(B, Hq, Sq, dtype=torch.float32)


def setup_attention_context(ctx, inputs, output):
    """register_autograd's setup_context for every op whose inputs are (q, k, v, sinks, *options) and whose
    output is (out, lse) of this forward (the decode op too: same math, so the same backward)."""
    q, k, v, sinks, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sinks, out, lse, *options[:3])
    ctx.options = options[3:]


def attention_backward(ctx, do, dlse):
    q, k, v, sinks, out, lse, *tensor_options = ctx.saved_tensors
    dq, dk, dv, delta = torch.ops.hfa.flash_attention_bwd(do, dlse, q, k, v, out, lse, *tensor_options, *ctx.options)
    return (dq, dk, dv, _sinks_grad(sinks, lse, delta)) + (None,) * len(OPTION_NAMES)


flash_attention_fwd.register_autograd(attention_backward, setup_context=setup_attention_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def flash_attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None, key_padding_mask=None,
                    sinks=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Exact softmax attention with FlashAttention-2 style Triton kernels (forward and backward).

    q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv], fp16/bf16/fp32 on CUDA (or on CPU
    with TRITON_INTERPRET=1), Hq % Hkv == 0, D and Dv <= 256.
    causal: bottom-right aligned (query i sits at position i + Skv - Sq).
    window: query at position p sees keys j with p - j < window (and j - p < window when not causal).
    softcap: scores become softcap * tanh(scores / softcap).
    key_padding_mask: [B, Skv] bool, True = real token.
    sinks: [Hq] float, one extra logit per head in the softmax denominator.
    cu_seqlens_q / cu_seqlens_k: [N + 1] int, packed sequences (B == 1); max_seqlen_q/k (ints) avoid a
    device sync when given.

    Returns (out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32, natural log). ``out`` is laid out in
    memory as [B, Sq, Hq, Dv], so ``out.transpose(1, 2)`` is contiguous. Gradients flow to q, k, v,
    sinks, through both out and lse.
    """
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, sinks=sinks, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, window=window, softcap=softcap)
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention needs q, k, v of one dtype among float16/bfloat16/float32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}: use the reference")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if cu_seqlens_q is None:
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    else:
        if max_seqlen_q is None:
            max_seqlen_q = max_seqlen(cu_seqlens_q)
        if max_seqlen_k is None:
            max_seqlen_k = max_seqlen(cu_seqlens_k)
    options = dict(scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), causal=bool(causal),
                   window=None if window is None else int(window), softcap=None if softcap is None else float(softcap),
                   key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k))
    return flash_attention_fwd(q, k, v, sinks, *(options[name] for name in OPTION_NAMES))
