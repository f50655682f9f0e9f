"""Chunked causal (gated) linear attention in Triton: forward, backward, autograd, public function, decode step.

Same definition and conventions as :mod:`.reference` (read its module docstring): ``q: [B, H, T, F]``,
``k: [B, Hkv, T, F]``, ``v: [B, Hkv, T, D]``, optional per-KV-head ``log_decay: [B, Hkv, T]`` (gated form),
state ``(S [B, Hkv, F, D], z [B, Hkv, F])`` in fp32 whatever the input dtype, packed sequences via
``cu_seqlens`` with ``B == 1``, output in ``v.dtype``.

How it works (chunks of ``BT = chunk_size`` tokens; ``g`` = cumulative log-decay inside a chunk, ``gl`` its
last value; everything below is 0 without ``log_decay``):

* forward, two kernels:
  1. ``_fwd_state_kernel``: one program per (F block, D block, sequence * KV head) walks the chunks in order
     and writes the state ENTERING each chunk (``S_c, z_c``, fp32, [chunks, Hkv, F, D]) and the final state:
     ``S_{c+1} = exp(gl) S_c + (k * exp(gl - g))^T v``, ``z`` alike with v a column of ones.
  2. ``_fwd_out_kernel``: one program per (D block, chunk, query head), all chunks in parallel:
     ``num = exp(g) q S_c + (q k^T * exp(g_i - g_j), j <= i) v`` and the normaliser
     ``den = exp(g) q.z_c + rowsum(the same masked matrix)`` — the ones column of an augmented v, never
     materialised; ``o = num / (den + eps)``.
* backward (the chunk states are recomputed by kernel 1, not stored by the forward): with the normaliser,
  the gradient w.r.t. the augmented output ``[num, den]`` is ``[dO, -(dO . o)] / (den + eps)``
  (``_bwd_prep_kernel`` computes the second part), after which it is plain linear attention:
  3. ``_bwd_dstate_kernel``: the state gradient carried BACKWARDS over the chunks (one program per F block,
     D block, sequence * KV head, summing the GQA group's queries): ``dS_c = exp(gl) dS_{c+1} + (q exp(g))^T dO'``;
     what is left at the start is the gradient of the initial state;
  4. ``_bwd_dv_kernel`` (per D block, chunk, KV head) and ``_bwd_dqk_kernel`` (per F block, chunk, KV head):
     intra-chunk terms from the masked (decayed) matrices plus inter-chunk terms from ``S_c`` / ``dS_{c+1}``.
     Each KV head's program loops over its group's query heads, so dK/dV need no atomics and K/V are never
     repeated.
  5. the decay: everything depends on ``q_t exp(G_t)`` and ``k_t exp(-G_t)`` (``G`` = cumulative log-decay
     over the sequence) and the final state on ``exp(G_T)``, so
     ``dL/dG_t = sum_group q_t . dq_t - k_t . dk_t (+ <dS_T, S_T> + <dz_T, z_T> at the last token)``, written
     per F block by kernel 4 and turned into ``d log_decay`` by a reverse cumulative sum in torch.
* dots of two input tiles (``q k^T``, ``k^T v`` ...) run in the input dtype (tensor cores for fp16/bf16);
  every dot with an fp32 operand (the state, its gradient, dO / (den + eps)) runs in fp32 (TF32 for 16-bit
  inputs, exact ``ieee`` for fp32 inputs), so the state never leaves fp32 (fp16 would overflow).
* ``TRITON_INTERPRET=1`` runs everything on CPU (slow, for tests); there 16-bit tiles are cast to fp32 before
  ``tl.dot`` (the interpreter's low-precision dot is wrong).

The decode step (:func:`linear_attention_step_triton`) is one kernel: one program per (D block, batch * KV
head) updates its slice of the state and reads it with all query heads of the GQA group at once.

``torch.compile``: the forward and backward launchers are the custom ops ``torch.ops.hfa.linear_attention_fwd`` /
``_bwd`` (the backward registered as the forward's autograd) and the decode step is
``torch.ops.hfa.linear_attention_step``, so a compiled model records each call as one graph node.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import (
    dot_flags,
    inputs_unsupported_reason,
    f32_precision,
    kernel_op,
    last_dim_contiguous,
    pad_dim,
    record_build,
)
from ..triton_utils.jit import dot, seq_bounds
from .reference import check_linear_inputs

__all__ = ["MAX_DIM", "linear_attention_step_triton", "linear_attention_triton", "linear_triton_unsupported_reason"]

MAX_DIM = 256  # largest feature dim F and value dim D
_BLOCK_F = 64  # F and D are cut into blocks of at most this many columns: register use stays bounded
_BLOCK_D = 64


INTERPRETED = record_build(__name__)


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _seq_bounds(i_n, CU, CHUNK_OFFS, T, NT, IS_VARLEN: tl.constexpr):
    # (batch row, first token, length, index of its first chunk in the chunk-state buffer) of sequence i_n
    i_b, bos, L = seq_bounds(i_n, CU, T, IS_VARLEN)
    if IS_VARLEN:
        boh = tl.load(CHUNK_OFFS + i_n).to(tl.int64)
    else:
        boh = i_n * NT
    return i_b, bos, L, boh


@triton.jit
def _chunk_bounds(i_t, i_b, CU, CHUNKS, T, NT, IS_VARLEN: tl.constexpr):
    # For chunk program i_t: (batch row, first token of its sequence, sequence length, chunk index within the
    # sequence, global chunk index in the chunk-state buffer)
    if IS_VARLEN:
        i_n = tl.load(CHUNKS + 2 * i_t).to(tl.int64)
        i_c = tl.load(CHUNKS + 2 * i_t + 1)
        i_tg = i_t.to(tl.int64)
    else:
        i_n = i_b
        i_c = i_t
        i_tg = i_b * NT + i_t
    i_bb, bos, L = seq_bounds(i_n, CU, T, IS_VARLEN)
    return i_bb, bos, L, i_c, i_tg


@triton.jit
def _chunk_decay(p_ld, o_t, m_t):
    # (cumulative log-decay inside the chunk [BT], its total) from log_decay at positions o_t
    b_a = tl.load(p_ld + o_t, mask=m_t, other=0.0).to(tl.float32)
    return tl.cumsum(b_a, 0), tl.sum(b_a, 0)


@triton.jit
def _intra_mask(b_x, b_g, offs_t, TRANSPOSED: tl.constexpr, HAS_DECAY: tl.constexpr):
    # Keep the causal part (key j <= query i) of a [query, key] tile (or [key, query] when TRANSPOSED),
    # times exp(g_i - g_j) <= 1 with the decay; exp is taken of 0 where masked, so nothing overflows.
    if TRANSPOSED:
        m = offs_t[:, None] <= offs_t[None, :]
    else:
        m = offs_t[:, None] >= offs_t[None, :]
    if HAS_DECAY:
        if TRANSPOSED:
            diff = b_g[None, :] - b_g[:, None]
        else:
            diff = b_g[:, None] - b_g[None, :]
        b_x = b_x * tl.exp(tl.where(m, diff, 0.0))
    return tl.where(m, b_x, 0.0)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_state_kernel(K, V, LD, S0, Z0, HS, HZ, ST, ZT, CU, CHUNK_OFFS,
                      s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_lb, s_lh,
                      H_KV, T, NT,
                      F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, IS_VARLEN: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_nh = tl.program_id(2).to(tl.int64)
    i_n, i_hk = i_nh // H_KV, i_nh % H_KV
    i_b, bos, L, boh = _seq_bounds(i_n, CU, CHUNK_OFFS, T, NT, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_k = offs_k < F
    m_v = offs_v < D
    m_kv = m_k[:, None] & m_v[None, :]
    m_z = m_k & ((offs_k * 0 + i_v) == 0)  # z is written by the first D block only
    o_kv = offs_k[:, None] * D + offs_v[None, :]

    b_h = tl.zeros([BK, BV], tl.float32)
    b_z = tl.zeros([BK], tl.float32)
    if HAS_S0:
        b_h = tl.load(S0 + i_nh * F * D + o_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_z = tl.load(Z0 + i_nh * F + offs_k, mask=m_k, other=0.0).to(tl.float32)
    p_k = K + i_b * s_kb + i_hk * s_kh + bos * s_kt
    p_v = V + i_b * s_vb + i_hk * s_vh + bos * s_vt
    p_ld = LD + i_b * s_lb + i_hk * s_lh + bos
    for i_c in range(0, tl.cdiv(L, BT)):
        # -- the state entering chunk i_c
        i_hc = (boh + i_c) * H_KV + i_hk
        tl.store(HS + i_hc * F * D + o_kv, b_h, mask=m_kv)
        tl.store(HZ + i_hc * F + offs_k, b_z, mask=m_z)
        # -- fold the chunk in: S = exp(gl) S + (k exp(gl - g))^T v
        o_t = i_c * BT + offs_t
        m_t = o_t < L
        b_k = tl.load(p_k + o_t[:, None] * s_kt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(p_v + o_t[:, None] * s_vt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_DECAY:
            b_g, b_gl = _chunk_decay(p_ld, o_t, m_t)
            b_kw = b_k.to(tl.float32) * tl.exp(b_gl - b_g)[:, None]
            b_h = b_h * tl.exp(b_gl)
            b_z = b_z * tl.exp(b_gl) + tl.sum(b_kw, 0)
            b_h = dot(tl.trans(b_kw.to(b_v.dtype)), b_v, b_h, UPCAST, PRECISION)
        else:
            b_z = b_z + tl.sum(b_k.to(tl.float32), 0)
            b_h = dot(tl.trans(b_k), b_v, b_h, UPCAST, PRECISION)
    tl.store(ST + i_nh * F * D + o_kv, b_h, mask=m_kv)
    tl.store(ZT + i_nh * F + offs_k, b_z, mask=m_z)


@triton.jit
def _fwd_out_kernel(Q, K, V, LD, HS, HZ, O, DEN, CU, CHUNKS,
                    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
                    H, H_KV, G, T, NT, eps,
                    F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr, IS_VARLEN: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, F32_PRECISION: tl.constexpr):
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_h = i_bh % H
    i_hk = i_h // G
    i_b, bos, L, i_c, i_tg = _chunk_bounds(i_t, i_bh // H, CU, CHUNKS, T, NT, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_v = offs_v < D
    o_t = i_c * BT + offs_t
    m_t = o_t < L
    row = bos + o_t  # token index in the (packed) tensor
    p_q = Q + i_b * s_qb + i_h * s_qh
    p_k = K + i_b * s_kb + i_hk * s_kh
    i_hc = i_tg * H_KV + i_hk

    b_o = tl.zeros([BT, BV], tl.float32)  # q S_c, then the whole numerator
    b_A = tl.zeros([BT, BT], tl.float32)  # q k^T
    b_qz = tl.zeros([BT], tl.float32)  # q . z_c
    for i_k in range(0, tl.cdiv(F, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        m_k = offs_k < F
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q + row[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(p_k + row[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
        b_h = tl.load(HS + i_hc * F * D + offs_k[:, None] * D + offs_v[None, :], mask=m_k[:, None] & m_v[None, :],
                      other=0.0)
        b_o = dot(b_q.to(tl.float32), b_h, b_o, False, F32_PRECISION)
        b_A = dot(b_q, tl.trans(b_k), b_A, UPCAST, PRECISION)
        if NORMALIZE:
            b_zc = tl.load(HZ + i_hc * F + offs_k, mask=m_k, other=0.0)
            b_qz += tl.sum(b_q.to(tl.float32) * b_zc[None, :], 1)
    b_g = tl.zeros([BT], tl.float32)
    if HAS_DECAY:
        b_g, _ = _chunk_decay(LD + i_b * s_lb + i_hk * s_lh + bos, o_t, m_t)
        b_o = b_o * tl.exp(b_g)[:, None]
        b_qz = b_qz * tl.exp(b_g)
    b_A = _intra_mask(b_A, b_g, offs_t, False, HAS_DECAY)
    b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + row[:, None] * s_vt + offs_v[None, :],
                  mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_o = dot(b_A.to(b_v.dtype), b_v, b_o, UPCAST, PRECISION)
    if NORMALIZE:
        # -- the normaliser: the ones column of the value, q . z_c + rowsum of the masked matrix
        b_den = b_qz + tl.sum(b_A, 1)
        b_o = b_o / (b_den + eps)[:, None]
        tl.store(DEN + (i_b * H + i_h) * T + row, b_den, mask=m_t & ((o_t * 0 + i_v) == 0))
    tl.store(O + i_b * s_ob + i_h * s_oh + row[:, None] * s_ot + offs_v[None, :], b_o.to(O.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_prep_kernel(O, DO, DEN, DDEN, s_ob, s_oh, s_ot, s_db, s_dh, s_dt, H, T, eps,
                     D: tl.constexpr, D_PAD: tl.constexpr, BT: tl.constexpr):
    # dden = -(dO . o) / (den + eps): the gradient of the normaliser (the ones column of the value)
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D_PAD)
    m_t = o_t < T
    m_td = m_t[:, None] & (offs_d[None, :] < D)
    b_o = tl.load(O + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + offs_d[None, :], mask=m_td, other=0.0)
    b_do = tl.load(DO + i_b * s_db + i_h * s_dh + o_t[:, None] * s_dt + offs_d[None, :], mask=m_td, other=0.0)
    b_den = tl.load(DEN + i_bh * T + o_t, mask=m_t, other=1.0)
    b_dden = -tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1) / (b_den + eps)
    tl.store(DDEN + i_bh * T + o_t, b_dden, mask=m_t)


@triton.jit
def _load_do(DEN, p_do, row, offs_v, m_t, m_v, i_den, T, eps, s_dt, NORMALIZE: tl.constexpr):
    # dO' = dO / (den + eps) in fp32 (the gradient of the numerator), rows past the sequence 0
    b_do = tl.load(p_do + row[:, None] * s_dt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :],
                   other=0.0).to(tl.float32)
    if NORMALIZE:
        b_den = tl.load(DEN + i_den * T + row, mask=m_t, other=1.0)
        b_do = b_do / (b_den + eps)[:, None]
    return b_do


@triton.jit
def _bwd_dstate_kernel(Q, DO, LD, DEN, DDEN, DST, DZT, DHS, DHZ, DS0, DZ0, CU, CHUNK_OFFS,
                       s_qb, s_qh, s_qt, s_db, s_dh, s_dt, s_lb, s_lh,
                       H, H_KV, G, T, NT, eps,
                       F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr, HAS_DST: tl.constexpr,
                       IS_VARLEN: tl.constexpr, F32_PRECISION: tl.constexpr):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_nh = tl.program_id(2).to(tl.int64)
    i_n, i_hk = i_nh // H_KV, i_nh % H_KV
    i_b, bos, L, boh = _seq_bounds(i_n, CU, CHUNK_OFFS, T, NT, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_k = offs_k < F
    m_v = offs_v < D
    m_kv = m_k[:, None] & m_v[None, :]
    m_z = m_k & ((offs_k * 0 + i_v) == 0)
    o_kv = offs_k[:, None] * D + offs_v[None, :]

    b_dh = tl.zeros([BK, BV], tl.float32)
    b_dz = tl.zeros([BK], tl.float32)
    if HAS_DST:  # the gradient of the returned final state
        b_dh = tl.load(DST + i_nh * F * D + o_kv, mask=m_kv, other=0.0)
        b_dz = tl.load(DZT + i_nh * F + offs_k, mask=m_k, other=0.0)
    p_ld = LD + i_b * s_lb + i_hk * s_lh + bos
    n_chunks = tl.cdiv(L, BT)
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        # -- the gradient of the state after chunk i_c (entering chunk i_c + 1)
        i_hc = (boh + i_c) * H_KV + i_hk
        tl.store(DHS + i_hc * F * D + o_kv, b_dh, mask=m_kv)
        tl.store(DHZ + i_hc * F + offs_k, b_dz, mask=m_z)
        o_t = i_c * BT + offs_t
        m_t = o_t < L
        row = bos + o_t
        b_g = tl.zeros([BT], tl.float32)
        if HAS_DECAY:
            b_g, b_gl = _chunk_decay(p_ld, o_t, m_t)
            b_dh = b_dh * tl.exp(b_gl)
            b_dz = b_dz * tl.exp(b_gl)
        # -- dS_c = exp(gl) dS_{c+1} + sum over the group of (q exp(g))^T dO'
        for g in range(0, G):
            i_h = i_hk * G + g
            b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + row[:, None] * s_qt + offs_k[None, :],
                          mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            if HAS_DECAY:
                b_q = b_q * tl.exp(b_g)[:, None]
            b_do = _load_do(DEN, DO + i_b * s_db + i_h * s_dh, row, offs_v, m_t, m_v,
                            i_b * H + i_h, T, eps, s_dt, NORMALIZE)
            b_dh = dot(tl.trans(b_q), b_do, b_dh, False, F32_PRECISION)
            if NORMALIZE:
                b_dd = tl.load(DDEN + (i_b * H + i_h) * T + row, mask=m_t, other=0.0)
                b_dz += tl.sum(b_q * b_dd[:, None], 0)
    tl.store(DS0 + i_nh * F * D + o_kv, b_dh, mask=m_kv)
    tl.store(DZ0 + i_nh * F + offs_k, b_dz, mask=m_z)


@triton.jit
def _bwd_dv_kernel(Q, K, DO, LD, DEN, DHS, DV_OUT, CU, CHUNKS,
                   s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_db, s_dh, s_dt, s_vb, s_vh, s_vt, s_lb, s_lh,
                   H, H_KV, G, T, NT, eps,
                   F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr, IS_VARLEN: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, F32_PRECISION: tl.constexpr):
    # dv_j = sum over the group of sum_{i >= j} A_ij dO'_i  +  exp(gl - g_j) k_j dS_{c+1}
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_hk = i_bh % H_KV
    i_b, bos, L, i_c, i_tg = _chunk_bounds(i_t, i_bh // H_KV, CU, CHUNKS, T, NT, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_v = offs_v < D
    o_t = i_c * BT + offs_t
    m_t = o_t < L
    row = bos + o_t
    p_k = K + i_b * s_kb + i_hk * s_kh
    i_hc = i_tg * H_KV + i_hk
    b_g = tl.zeros([BT], tl.float32)
    b_gl = tl.sum(b_g, 0)
    if HAS_DECAY:
        b_g, b_gl = _chunk_decay(LD + i_b * s_lb + i_hk * s_lh + bos, o_t, m_t)

    # -- inter-chunk: k dS_{c+1}, keys weighted by their decay to the chunk end
    b_dv = tl.zeros([BT, BV], tl.float32)
    for i_k in range(0, tl.cdiv(F, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        m_k = offs_k < F
        b_k = tl.load(p_k + row[:, None] * s_kt + offs_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_dh = tl.load(DHS + i_hc * F * D + offs_k[:, None] * D + offs_v[None, :], mask=m_k[:, None] & m_v[None, :],
                       other=0.0)
        b_dv = dot(b_k.to(tl.float32), b_dh, b_dv, False, F32_PRECISION)
    if HAS_DECAY:
        b_dv = b_dv * tl.exp(b_gl - b_g)[:, None]
    # -- intra-chunk: A^T dO' for each query head of the group (A^T[j, i] = k_j . q_i exp(g_i - g_j), j <= i)
    for g in range(0, G):
        i_h = i_hk * G + g
        p_q = Q + i_b * s_qb + i_h * s_qh
        b_At = tl.zeros([BT, BT], tl.float32)
        for i_k in range(0, tl.cdiv(F, BK)):
            offs_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (offs_k[None, :] < F)
            b_k = tl.load(p_k + row[:, None] * s_kt + offs_k[None, :], mask=m_tk, other=0.0)
            b_q = tl.load(p_q + row[:, None] * s_qt + offs_k[None, :], mask=m_tk, other=0.0)
            b_At = dot(b_k, tl.trans(b_q), b_At, UPCAST, PRECISION)
        b_At = _intra_mask(b_At, b_g, offs_t, True, HAS_DECAY)
        b_do = _load_do(DEN, DO + i_b * s_db + i_h * s_dh, row, offs_v, m_t, m_v, i_b * H + i_h, T, eps, s_dt,
                        NORMALIZE)
        b_dv = dot(b_At, b_do, b_dv, False, F32_PRECISION)
    tl.store(DV_OUT + i_b * s_vb + i_hk * s_vh + row[:, None] * s_vt + offs_v[None, :],
             b_dv.to(DV_OUT.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _bwd_dqk_kernel(Q, K, V, DO, LD, DEN, DDEN, HS, HZ, DHS, DHZ, DQ, DK, DG, CU, CHUNKS,
                    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
                    s_dqb, s_dqh, s_dqt, s_dkb, s_dkh, s_dkt, s_lb, s_lh,
                    H, H_KV, G, T, NT, eps,
                    F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr, IS_VARLEN: tl.constexpr,
                    F32_PRECISION: tl.constexpr):
    # dq_i = exp(g_i) dO'_i S_c'^T + sum_{j <= i} dA_ij exp(g_i - g_j) k_j,   dA_ij = dO'_i . v'_j
    # dk_j = exp(gl - g_j) v'_j dS_{c+1}'^T + sum over the group of sum_{i >= j} dA_ij exp(g_i - g_j) q_i
    # (v' = [v, 1], S' = [S, z], dO' = [dO, -(dO . o)] / (den + eps): the normaliser as one more value column)
    i_k = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_hk = i_bh % H_KV
    i_b, bos, L, i_c, i_tg = _chunk_bounds(i_t, i_bh // H_KV, CU, CHUNKS, T, NT, IS_VARLEN)
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    m_k = offs_k < F
    o_t = i_c * BT + offs_t
    m_t = o_t < L
    m_tk = m_t[:, None] & m_k[None, :]
    row = bos + o_t
    p_v = V + i_b * s_vb + i_hk * s_vh
    i_hc = i_tg * H_KV + i_hk
    b_k = tl.load(K + i_b * s_kb + i_hk * s_kh + row[:, None] * s_kt + offs_k[None, :], mask=m_tk,
                  other=0.0).to(tl.float32)
    b_g = tl.zeros([BT], tl.float32)
    b_gl = tl.sum(b_g, 0)
    if HAS_DECAY:
        b_g, b_gl = _chunk_decay(LD + i_b * s_lb + i_hk * s_lh + bos, o_t, m_t)

    # -- inter-chunk dk: v dS_{c+1}^T + dz_{c+1} (the ones column), decayed to the chunk end
    b_dk = tl.zeros([BT, BK], tl.float32)
    for i_v in range(0, tl.cdiv(D, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        m_v = offs_v < D
        b_v = tl.load(p_v + row[:, None] * s_vt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_dh = tl.load(DHS + i_hc * F * D + offs_k[:, None] * D + offs_v[None, :], mask=m_k[:, None] & m_v[None, :],
                       other=0.0)
        b_dk = dot(b_v.to(tl.float32), tl.trans(b_dh), b_dk, False, F32_PRECISION)
    b_dzc = tl.load(DHZ + i_hc * F + offs_k, mask=m_k, other=0.0)
    b_dk = tl.where(m_t[:, None], b_dk + b_dzc[None, :], 0.0)
    if HAS_DECAY:
        b_dk = b_dk * tl.exp(b_gl - b_g)[:, None]

    b_dg = tl.zeros([BT], tl.float32)  # sum over the group of q . dq (this F block)
    for g in range(0, G):
        i_h = i_hk * G + g
        p_do = DO + i_b * s_db + i_h * s_dh
        b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + row[:, None] * s_qt + offs_k[None, :], mask=m_tk,
                      other=0.0).to(tl.float32)
        b_dq = tl.zeros([BT, BK], tl.float32)  # dO' S_c^T
        b_ds = tl.zeros([BT, BT], tl.float32)  # dO' v^T
        for i_v in range(0, tl.cdiv(D, BV)):
            offs_v = i_v * BV + tl.arange(0, BV)
            m_v = offs_v < D
            b_do = _load_do(DEN, p_do, row, offs_v, m_t, m_v, i_b * H + i_h, T, eps, s_dt, NORMALIZE)
            b_v = tl.load(p_v + row[:, None] * s_vt + offs_v[None, :], mask=m_t[:, None] & m_v[None, :],
                          other=0.0).to(tl.float32)
            b_h = tl.load(HS + i_hc * F * D + offs_k[:, None] * D + offs_v[None, :],
                          mask=m_k[:, None] & m_v[None, :], other=0.0)
            b_dq = dot(b_do, tl.trans(b_h), b_dq, False, F32_PRECISION)
            b_ds = dot(b_do, tl.trans(b_v), b_ds, False, F32_PRECISION)
        if NORMALIZE:
            b_dd = tl.load(DDEN + (i_b * H + i_h) * T + row, mask=m_t, other=0.0)
            b_zc = tl.load(HZ + i_hc * F + offs_k, mask=m_k, other=0.0)
            b_dq += b_dd[:, None] * b_zc[None, :]
            b_ds += b_dd[:, None]
        if HAS_DECAY:
            b_dq = b_dq * tl.exp(b_g)[:, None]
        b_ds = _intra_mask(b_ds, b_g, offs_t, False, HAS_DECAY)
        b_dq = dot(b_ds, b_k, b_dq, False, F32_PRECISION)
        b_dk = dot(tl.trans(b_ds), b_q, b_dk, False, F32_PRECISION)
        tl.store(DQ + i_b * s_dqb + i_h * s_dqh + row[:, None] * s_dqt + offs_k[None, :],
                 b_dq.to(DQ.dtype.element_ty), mask=m_tk)
        b_dg += tl.sum(b_q * b_dq, 1)
    tl.store(DK + i_b * s_dkb + i_hk * s_dkh + row[:, None] * s_dkt + offs_k[None, :], b_dk.to(DK.dtype.element_ty),
             mask=m_tk)
    if HAS_DECAY:
        # dL/dG_t over this F block; DG: [F blocks, B, Hkv, T]
        b_dg -= tl.sum(b_k * b_dk, 1)
        tl.store(DG + ((i_k * tl.num_programs(2) + i_bh) * T) + row, b_dg, mask=m_t)


# ----------------------------------------------------------------------------------------------
# Decode step
# ----------------------------------------------------------------------------------------------

@triton.jit
def _step_kernel(Q, K, V, LD, S, Z, O, S_OUT, Z_OUT,
                 s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh, s_sb, s_sh, s_sf, s_zb, s_zh, s_lb, s_lh,
                 H_KV, G, eps,
                 F: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr):
    # One token: S' = a S + k v^T, z' = a z + k, o = q S' / (q . z' + eps) for the G query heads of one KV head
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // H_KV, i_bh % H_KV
    offs_g = tl.arange(0, G_PAD)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_g = offs_g < G
    m_v = offs_v < D
    b_vt = tl.load(V + i_b * s_vb + i_hk * s_vh + offs_v, mask=m_v, other=0.0).to(tl.float32)
    b_a = 1.0
    if HAS_DECAY:
        b_a = tl.exp(tl.load(LD + i_b * s_lb + i_hk * s_lh).to(tl.float32))
    p_q = Q + i_b * s_qb + (i_hk * G + offs_g) * s_qh  # [G_PAD] rows: the group's query heads
    b_o = tl.zeros([G_PAD, BV], tl.float32)
    b_qz = tl.zeros([G_PAD], tl.float32)
    for i_k in range(0, tl.cdiv(F, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        m_k = offs_k < F
        m_kv = m_k[:, None] & m_v[None, :]
        b_kt = tl.load(K + i_b * s_kb + i_hk * s_kh + offs_k, mask=m_k, other=0.0).to(tl.float32)
        o_s = i_b * s_sb + i_hk * s_sh + offs_k[:, None] * s_sf + offs_v[None, :]
        b_s = tl.load(S + o_s, mask=m_kv, other=0.0).to(tl.float32) * b_a + b_kt[:, None] * b_vt[None, :]
        tl.store(S_OUT + i_bh * F * D + offs_k[:, None] * D + offs_v[None, :], b_s, mask=m_kv)
        b_q = tl.load(p_q[:, None] + offs_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_o = tl.dot(b_q, b_s, b_o, input_precision=PRECISION)
        b_z = tl.load(Z + i_b * s_zb + i_hk * s_zh + offs_k, mask=m_k, other=0.0).to(tl.float32) * b_a + b_kt
        tl.store(Z_OUT + i_bh * F + offs_k, b_z, mask=m_k & ((offs_k * 0 + i_v) == 0))
        b_qz += tl.sum(b_q * b_z[None, :], 1)
    if NORMALIZE:
        b_o = b_o / (b_qz + eps)[:, None]
    p_o = O + i_b * s_ob + (i_hk * G + offs_g) * s_oh
    tl.store(p_o[:, None] + offs_v[None, :], b_o.to(O.dtype.element_ty), mask=m_g[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _blocks(F, D):
    """(BK, BV): the F and D block widths (powers of two >= 16, as tl.dot needs)."""
    return min(_BLOCK_F, pad_dim(F)), min(_BLOCK_D, pad_dim(D))


def _chunk_layout(B, T, BT, cu_seqlens):
    """(n_seq, NT, total chunks, cu int32, chunk offsets [N + 1] int32, chunks [total, 2] int32 (seq, chunk))."""
    if cu_seqlens is None:
        NT = triton.cdiv(T, BT)
        return B, NT, B * NT, None, None, None
    cu = cu_seqlens.to(torch.int32).contiguous()
    n_chunks = (cu[1:] - cu[:-1] + BT - 1) // BT
    offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)]).to(torch.int32)
    seq = torch.repeat_interleave(torch.arange(len(n_chunks), device=cu.device), n_chunks)
    within = torch.arange(len(seq), device=cu.device) - offsets[:-1].long()[seq]
    chunks = torch.stack([seq, within], 1).to(torch.int32).contiguous()
    return len(n_chunks), 0, int(offsets[-1]), cu, offsets, chunks


def _chunk_states(k, v, log_decay, s0, z0, layout, BT):
    """States entering every chunk (HS [chunks, Hkv, F, D], HZ [chunks, Hkv, F]) and the final ones, fp32."""
    B, Hkv, T, F = k.shape
    D = v.shape[-1]
    n_seq, NT, total, cu, offsets, _ = layout
    hs = torch.empty(total, Hkv, F, D, dtype=torch.float32, device=k.device)
    hz = torch.empty(total, Hkv, F, dtype=torch.float32, device=k.device)
    st = torch.empty(n_seq, Hkv, F, D, dtype=torch.float32, device=k.device)
    zt = torch.empty(n_seq, Hkv, F, dtype=torch.float32, device=k.device)
    if n_seq * Hkv == 0:
        return hs, hz, st, zt
    BK, BV = _blocks(F, D)
    upcast, precision = dot_flags(k.dtype)
    ld = log_decay if log_decay is not None else k  # an unused pointer
    _fwd_state_kernel[(triton.cdiv(F, BK), triton.cdiv(D, BV), n_seq * Hkv)](
        k, v, ld, s0, z0, hs, hz, st, zt, cu, offsets,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ld.stride(0), ld.stride(1), Hkv, T, NT,
        F=F, D=D, BT=BT, BK=BK, BV=BV, HAS_DECAY=log_decay is not None, HAS_S0=s0 is not None,
        IS_VARLEN=cu is not None, UPCAST=upcast, PRECISION=precision,
    )
    return hs, hz, st, zt


def _linear_fwd(q, k, v, log_decay, s0, z0, *, normalize, eps, cu_seqlens, chunk_size):
    """(out [B, H, T, D] in v.dtype, den [B, H, T] fp32 (None without normalize), S_T, z_T)."""
    B, H, T, F = q.shape
    Hkv, D = k.shape[1], v.shape[-1]
    BT = chunk_size
    layout = _chunk_layout(B, T, BT, cu_seqlens)
    n_seq, NT, total, cu, _, chunks = layout
    hs, hz, st, zt = _chunk_states(k, v, log_decay, s0, z0, layout, BT)
    out = torch.empty(B, H, T, D, dtype=v.dtype, device=v.device)
    den = torch.empty(B, H, T, dtype=torch.float32, device=q.device) if normalize else None
    if total * H == 0 or D == 0:
        return out.zero_(), den, st, zt
    BK, BV = _blocks(F, D)
    upcast, precision = dot_flags(q.dtype)
    ld = log_decay if log_decay is not None else k
    _fwd_out_kernel[(triton.cdiv(D, BV), NT if cu is None else total, B * H)](
        q, k, v, ld, hs, hz, out, den, cu, chunks,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        ld.stride(0), ld.stride(1), H, Hkv, H // Hkv, T, NT, eps,
        F=F, D=D, BT=BT, BK=BK, BV=BV, HAS_DECAY=log_decay is not None, NORMALIZE=normalize,
        IS_VARLEN=cu is not None, UPCAST=upcast, PRECISION=precision, F32_PRECISION=f32_precision(q.dtype),
        num_warps=8 if BT >= 128 else 4,
    )
    return out, den, st, zt


def _reverse_segment_cumsum(x, cu_seqlens):
    """sum_{s >= t} x_s within each sequence (x: [B, Hkv, T])."""
    rc = x.flip(-1).cumsum(-1).flip(-1)
    if cu_seqlens is None:
        return rc
    T = x.shape[-1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    nxt = torch.repeat_interleave(cu_seqlens[1:].long(), lengths)  # first token of the next sequence
    padded = torch.cat([rc, rc.new_zeros(*rc.shape[:-1], 1)], -1)
    return rc - padded[..., nxt] if T else rc


def _linear_bwd(do, dst, dzt, q, k, v, log_decay, s0, z0, out, den, *, normalize, eps, cu_seqlens, chunk_size):
    """(dq, dk, dv, dlog_decay or None, dS0, dz0) for the gradients do of out and dst, dzt (or None) of the state."""
    B, H, T, F = q.shape
    Hkv, D = k.shape[1], v.shape[-1]
    G, BT = H // Hkv, chunk_size
    do = last_dim_contiguous(do)
    layout = _chunk_layout(B, T, BT, cu_seqlens)
    n_seq, NT, total, cu, offsets, chunks = layout
    hs, hz, st, zt = _chunk_states(k, v, log_decay, s0, z0, layout, BT)  # recomputed, not stored by the forward
    BK, BV = _blocks(F, D)
    upcast, precision = dot_flags(q.dtype)
    f32 = f32_precision(q.dtype)
    has_decay = log_decay is not None
    ld = log_decay if has_decay else k
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    ds0 = torch.empty(n_seq, Hkv, F, D, dtype=torch.float32, device=q.device)
    dz0 = torch.empty(n_seq, Hkv, F, dtype=torch.float32, device=q.device)
    dhs = torch.empty_like(hs)
    dhz = torch.empty_like(hz)
    n_fb = triton.cdiv(F, BK)
    dg = torch.empty(n_fb, B, Hkv, T, dtype=torch.float32, device=q.device) if has_decay else None
    # -- dden = -(dO . o) / (den + eps)
    dden = None
    if normalize:
        dden = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        if B * H * T:
            BT_PRE = 32
            _bwd_prep_kernel[(triton.cdiv(T, BT_PRE), B * H)](
                out, do, den, dden, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1),
                do.stride(2), H, T, eps, D=D, D_PAD=pad_dim(D), BT=BT_PRE,
            )
    common = dict(F=F, D=D, BT=BT, BK=BK, BV=BV, HAS_DECAY=has_decay, NORMALIZE=normalize, IS_VARLEN=cu is not None)
    if n_seq * Hkv:
        # -- the state gradient, carried backwards over the chunks
        has_dst = dst is not None or dzt is not None
        if has_dst:
            dst = torch.zeros_like(st) if dst is None else dst.float().contiguous()
            dzt = torch.zeros_like(zt) if dzt is None else dzt.float().contiguous()
        _bwd_dstate_kernel[(n_fb, triton.cdiv(D, BV), n_seq * Hkv)](
            q, do, ld, den, dden, dst, dzt, dhs, dhz, ds0, dz0, cu, offsets,
            q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
            ld.stride(0), ld.stride(1), H, Hkv, G, T, NT, eps,
            HAS_DST=has_dst, F32_PRECISION=f32, **common,
        )
    if total * Hkv:
        n_prog = NT if cu is None else total
        _bwd_dv_kernel[(triton.cdiv(D, BV), n_prog, B * Hkv)](
            q, k, do, ld, den, dhs, dv, cu, chunks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            do.stride(0), do.stride(1), do.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            ld.stride(0), ld.stride(1), H, Hkv, G, T, NT, eps,
            UPCAST=upcast, PRECISION=precision, F32_PRECISION=f32, **common,
        )
        _bwd_dqk_kernel[(n_fb, n_prog, B * Hkv)](
            q, k, v, do, ld, den, dden, hs, hz, dhs, dhz, dq, dk, dg, cu, chunks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            ld.stride(0), ld.stride(1), H, Hkv, G, T, NT, eps,
            F32_PRECISION=f32, num_warps=8 if BT * BK >= 64 * 64 else 4, **common,  # five [BT, BK|BT] fp32 tiles
        )
    else:  # no token: nothing flows to q, k, v
        dq.zero_(), dk.zero_(), dv.zero_()
    dld = None
    if has_decay:
        dg = dg.sum(0)
        if dst is not None and T:  # the final state is exp(G_T) times the rest: <dS_T, S_T> + <dz_T, z_T>
            extra = (dst * st).sum((-1, -2)) + (dzt * zt).sum(-1)  # (n_seq, Hkv)
            if cu is None:
                dg[..., T - 1] += extra
            else:
                lengths = (cu[1:] - cu[:-1]).long()
                keep = lengths > 0
                dg[0].index_add_(1, (cu[1:].long() - 1)[keep], extra[keep].transpose(0, 1))
        dld = _reverse_segment_cumsum(dg, cu).to(log_decay.dtype)
    return dq, dk, dv, dld, ds0, dz0


def _linear_step(q, k, v, s, z, log_decay, normalize, eps):
    """(out [B, H, 1, D] in v.dtype, S', z' fp32): one decode token, out of place."""
    B, H, _, F = q.shape
    Hkv, D = k.shape[1], v.shape[-1]
    out = torch.empty(B, H, 1, D, dtype=v.dtype, device=v.device)
    s_new = torch.empty(B, Hkv, F, D, dtype=torch.float32, device=q.device)
    z_new = torch.empty(B, Hkv, F, dtype=torch.float32, device=q.device)
    if B * Hkv * D == 0:
        return out.zero_(), s_new.copy_(s), z_new.copy_(z)
    BK, BV = min(64, pad_dim(F)), min(32, pad_dim(D))
    G = H // Hkv
    ld = log_decay if log_decay is not None else k
    _step_kernel[(triton.cdiv(D, BV), B * Hkv)](
        q, k, v, ld, s, z, out, s_new, z_new,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        s.stride(0), s.stride(1), s.stride(2), z.stride(0), z.stride(1), ld.stride(0), ld.stride(1),
        Hkv, G, float(eps), F=F, D=D, G_PAD=max(16, triton.next_power_of_2(G)), BK=BK, BV=BV,
        HAS_DECAY=log_decay is not None, NORMALIZE=normalize, PRECISION=f32_precision(torch.float32),
    )
    return out, s_new, z_new


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------------------------
# torch.ops.hfa.linear_attention_fwd / _bwd: the launchers as custom ops (one torch.compile graph node each), the
# forward differentiable through the backward op; torch.ops.hfa.linear_attention_step: the decode step (no
# gradient). A schema returns no None: den without normalize and d log_decay without log_decay are empty [0].

_OPTIONS = "Tensor? cu_seqlens, bool normalize, float eps, int chunk_size"
_OPTION_NAMES = ("cu_seqlens", "normalize", "eps", "chunk_size")


def _kernel_layout(q, k, v, log_decay, s0, z0):
    """What the kernels' pointer arithmetic assumes (no copies when the public function prepared them)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return (q, k, v, *(None if t is None else t.contiguous() for t in (log_decay, s0, z0)))


def _n_seq(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@kernel_op("linear_attention_fwd", "(Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor? s0, Tensor? z0, "
           f"{_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor)")
def linear_attention_fwd(q, k, v, log_decay, s0, z0, *options):
    """(out [B, H, T, D], den [B, H, T] fp32 (empty without normalize), S_T, z_T) of :func:`linear_attention_triton`
    (its checks already done; options in ``_OPTION_NAMES`` order)."""
    q, k, v, log_decay, s0, z0 = _kernel_layout(q, k, v, log_decay, s0, z0)
    out, den, st, zt = _linear_fwd(q, k, v, log_decay, s0, z0, **dict(zip(_OPTION_NAMES, options)))
    return out, (q.new_empty(0, dtype=torch.float32) if den is None else den), st, zt


@linear_attention_fwd.register_fake
def _(q, k, v, log_decay, s0, z0, cu_seqlens, normalize, eps, chunk_size):
    B, H, T, F = q.shape
    Hkv, D = k.shape[1], v.shape[-1]
    n_seq = _n_seq(q, cu_seqlens)
    den = q.new_empty(B, H, T, dtype=torch.float32) if normalize else q.new_empty(0, dtype=torch.float32)
    return (v.new_empty(B, H, T, D), den, q.new_empty(n_seq, Hkv, F, D, dtype=torch.float32),
            q.new_empty(n_seq, Hkv, F, dtype=torch.float32))


@kernel_op("linear_attention_bwd", "(Tensor do, Tensor? dst, Tensor? dzt, Tensor q, Tensor k, Tensor v, "
           "Tensor? log_decay, Tensor? s0, Tensor? z0, Tensor out, Tensor den, "
           f"{_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def linear_attention_bwd(do, dst, dzt, q, k, v, log_decay, s0, z0, out, den, *options):
    """(dq, dk, dv, d log_decay (empty without log_decay), dS0, dz0 fp32) for the gradients do of out and dst,
    dzt (or None) of the final state."""
    options = dict(zip(_OPTION_NAMES, options))
    den = den if options["normalize"] else None
    q, k, v, log_decay, s0, z0 = _kernel_layout(q, k, v, log_decay, s0, z0)
    dq, dk, dv, dld, ds0, dz0 = _linear_bwd(do, dst, dzt, q, k, v, log_decay, s0, z0, out, den, **options)
    return dq, dk, dv, (q.new_empty(0, dtype=torch.float32) if dld is None else dld), ds0, dz0


@linear_attention_bwd.register_fake
def _(do, dst, dzt, q, k, v, log_decay, s0, z0, out, den, cu_seqlens, normalize, eps, chunk_size):
    Hkv, F, D = k.shape[1], k.shape[-1], v.shape[-1]
    n_seq = _n_seq(q, cu_seqlens)
    dld = q.new_empty(0, dtype=torch.float32) if log_decay is None else log_decay.new_empty(log_decay.shape)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dld,
            q.new_empty(n_seq, Hkv, F, D, dtype=torch.float32), q.new_empty(n_seq, Hkv, F, dtype=torch.float32))


def _setup_linear_context(ctx, inputs, output):
    q, k, v, log_decay, s0, z0, cu_seqlens, *options = inputs
    out, den, _, _ = output
    ctx.mark_non_differentiable(den)
    ctx.save_for_backward(q, k, v, log_decay, s0, z0, out, den, cu_seqlens)
    ctx.options = options


def _linear_backward(ctx, do, dden, dst, dzt):
    q, k, v, log_decay, s0, z0, out, den, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dld, ds0, dz0 = torch.ops.hfa.linear_attention_bwd(do, dst, dzt, q, k, v, log_decay, s0, z0, out,
                                                                   den, cu_seqlens, *ctx.options)
    dld = None if log_decay is None else dld
    ds0 = None if s0 is None else ds0.to(s0.dtype)
    dz0 = None if z0 is None else dz0.to(z0.dtype)
    return (dq, dk, dv, dld, ds0, dz0) + (None,) * len(_OPTION_NAMES)


linear_attention_fwd.register_autograd(_linear_backward, setup_context=_setup_linear_context)


@kernel_op("linear_attention_step", "(Tensor q, Tensor k, Tensor v, Tensor s, Tensor z, Tensor? log_decay, "
           "bool normalize, float eps) -> (Tensor, Tensor, Tensor)")
def linear_attention_step(q, k, v, s, z, log_decay, normalize, eps):
    """(out [B, H, 1, D], S', z') of :func:`linear_attention_step_triton` (its checks already done)."""
    return _linear_step(q, k, v, s, z, log_decay, normalize, eps)


@linear_attention_step.register_fake
def _(q, k, v, s, z, log_decay, normalize, eps):
    B, H, _, F = q.shape
    Hkv, D = k.shape[1], v.shape[-1]
    return (v.new_empty(B, H, 1, D), q.new_empty(B, Hkv, F, D, dtype=torch.float32),
            q.new_empty(B, Hkv, F, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def linear_triton_unsupported_reason(q, k, v, *, log_decay=None, initial_state=None, cu_seqlens=None) -> str | None:
    """None when the Triton kernels compute this call; else a short reason (fall back to
    `linear_attention_chunked` / `linear_attention_recurrent`). Shapes are not validated here."""
    why = inputs_unsupported_reason(dict(q=q, k=k, v=v), extra=(log_decay, cu_seqlens, *(initial_state or ())))
    if why is not None:
        return why
    if log_decay is not None and not log_decay.is_floating_point():
        return f"log_decay of dtype {log_decay.dtype}"
    dim = max(q.shape[-1], v.shape[-1])
    if dim > MAX_DIM:
        return f"feature/value dim {dim} > {MAX_DIM}"
    return None


def _check_supported(q, k, v, log_decay, initial_state, cu_seqlens, name):
    reason = linear_triton_unsupported_reason(q, k, v, log_decay=log_decay, initial_state=initial_state,
                                              cu_seqlens=cu_seqlens)
    if reason is not None:
        raise ValueError(f"{name} cannot serve this call: {reason}; use linear_attention_chunked / "
                         f"linear_attention_recurrent from hf_efficient_attn.kernels.linear instead")


def linear_attention_triton(q, k, v, *, log_decay=None, normalize=True, eps=1e-6, initial_state=None,
                            return_state=False, cu_seqlens=None, chunk_size=64):
    """Causal (gated) linear attention on the chunked Triton kernels; the same as `linear_attention_reference`.

    q: [B, H, T, F], k: [B, Hkv, T, F], v: [B, Hkv, T, D] (fp16/bf16/fp32, one dtype; F, D <= 256; H % Hkv == 0,
    K/V never repeated); log_decay: [B, Hkv, T] (<= 0) for the gated form; initial_state: (S [B, Hkv, F, D],
    z [B, Hkv, F]); cu_seqlens: [N + 1] int with B == 1 (no initial state then); chunk_size: a power of two in
    [16, 128]. On CUDA, or on CPU with TRITON_INTERPRET=1.

    Returns out [B, H, T, D] in v.dtype, or (out, (S, z)) fp32 with return_state=True (S: [B or N, Hkv, F, D]).
    Differentiable in q, k, v, log_decay and initial_state (and through the returned state).
    """
    check_linear_inputs(q, k, v, log_decay=log_decay, initial_state=initial_state, cu_seqlens=cu_seqlens)
    _check_supported(q, k, v, log_decay, initial_state, cu_seqlens, "linear_attention_triton")
    if not (isinstance(chunk_size, int) and 16 <= chunk_size <= 128 and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two in [16, 128] (tl.dot tiles), got {chunk_size!r}")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if log_decay is not None:
        log_decay = log_decay.contiguous()
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (t.contiguous() for t in initial_state)
    out, _, st, zt = linear_attention_fwd(q, k, v, log_decay, s0, z0, cu_seqlens, bool(normalize), float(eps),
                                          chunk_size)
    return (out, (st, zt)) if return_state else out


def linear_attention_step_triton(q, k, v, state, *, log_decay=None, normalize=True, eps=1e-6):
    """One decode token per sequence: (out [B, H, 1, D] in v.dtype, (S', z') fp32), the same as
    `linear_attention_recurrent(q, k, v, initial_state=state, return_state=True)` for one token.

    q: [B, H, 1, F], k: [B, Hkv, 1, F], v: [B, Hkv, 1, D], state: (S [B, Hkv, F, D], z [B, Hkv, F]),
    log_decay: [B, Hkv, 1]. OUT OF PLACE: the new state is written to new fp32 tensors and the given one is
    left unchanged (a caller that keeps one state per layer just rebinds it). One program per (D block,
    batch * KV head) serves every query head of the GQA group. Not differentiable (inference).
    """
    check_linear_inputs(q, k, v, log_decay=log_decay, initial_state=state)
    if q.shape[2] != 1:
        raise ValueError(f"linear_attention_step_triton takes one token per sequence, got {q.shape[2]}; use "
                         "linear_attention_triton with initial_state for several")
    _check_supported(q, k, v, log_decay, state, None, "linear_attention_step_triton")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    s, z = state
    s = s if s.stride(-1) == 1 else s.contiguous()
    z = z if z.stride(-1) == 1 else z.contiguous()
    # detached: the step is not differentiable (its result never required grad)
    out, s_new, z_new = linear_attention_step(*(None if t is None else t.detach() for t in (q, k, v, s, z, log_decay)),
                                              bool(normalize), float(eps))
    return out, (s_new, z_new)
