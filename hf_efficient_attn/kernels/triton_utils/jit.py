"""The device side of :mod:`hf_efficient_attn.kernels.triton_utils`: what every kernel shares and needs triton for.

* ``@triton.jit`` helpers: :func:`dot` (with the interpreter's fp32 upcast) and :func:`seq_bounds` (a batch row,
  or one packed sequence of batch 0);
* the log-sum-exp merge of split-KV partial results (:func:`merge_splits`, kernel :func:`lse_merge_kernel`);
* autotuning: a grid of candidate tiles, one config under the interpreter, a pruner that keeps the default.

Import it only from kernel modules: importing it builds its kernels (interpreter or GPU, see the package).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from . import LN2, LOG2E, interpreting, record_build

__all__ = ["INTERPRETED", "LN2_K", "LOG2E_K", "autotune_configs", "autotuning", "config_space", "dot",
           "lse_merge_kernel", "merge_splits", "seq_bounds", "tile_pruner"]

INTERPRETED = record_build(__name__)

# LOG2E and LN2 for use inside kernels (a @triton.jit function reads only tl.constexpr globals)
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(LN2)


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # UPCAST: the interpreter's low-precision dot is wrong, so fp16/bf16 tiles go through fp32 there
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def seq_bounds(i_n, CU, S, IS_VARLEN: tl.constexpr):
    # (batch row, first row in 64 bits, length) of sequence i_n: batch row i_n of S rows, or packed
    # sequence i_n of batch 0, rows CU[i_n] .. CU[i_n + 1]
    if IS_VARLEN:
        bos = tl.load(CU + i_n).to(tl.int64)
        return i_n * 0, bos, (tl.load(CU + i_n + 1) - bos).to(tl.int32)
    else:
        return i_n, i_n * 0, S + (i_n * 0).to(tl.int32)


# ----------------------------------------------------------------------------------------------
# Split-KV: the log-sum-exp merge
# ----------------------------------------------------------------------------------------------

@triton.jit
def lse_merge_kernel(O_PART, LSE_PART, SINKS, O, LSE,
                     s_pb, s_ph, s_pt, s_ps, s_lpb, s_lph, s_lpt, s_ob, s_oh, s_ot, s_lb, s_lh,
                     H, N_SPLITS,
                     DV: tl.constexpr, DV_PAD: tl.constexpr, NS_PAD: tl.constexpr, HAS_SINKS: tl.constexpr):
    # One program per (query token, batch * head): out = sum_s exp(lse_s - lse) * out_s
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs_s = tl.arange(0, NS_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_s = offs_s < N_SPLITS
    b_lse2 = tl.load(LSE_PART + i_b * s_lpb + i_h * s_lph + i_t * s_lpt + offs_s, mask=m_s, other=float("-inf"))
    b_o = tl.load(O_PART + i_b * s_pb + i_h * s_ph + i_t * s_pt + offs_s[:, None] * s_ps + offs_dv[None, :],
                  mask=m_s[:, None] & (offs_dv[None, :] < DV), other=0.0)
    # -- log-sum-exp over the splits (and the sink); a row no split saw keeps m = -inf and shifts by 0
    m = tl.max(b_lse2, 0)
    if HAS_SINKS:
        b_sink2 = tl.load(SINKS + i_h).to(tl.float32) * LOG2E_K
        m = tl.maximum(m, b_sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    b_w = tl.exp2(b_lse2 - m_safe)
    l = tl.sum(b_w, 0)  # noqa: E741
    if HAS_SINKS:
        l += tl.exp2(b_sink2 - m_safe)
    l_safe = tl.where(l == 0.0, 1.0, l)
    b_out = tl.sum(b_w[:, None] * b_o, 0) / l_safe
    b_lse = tl.where(l == 0.0, float("-inf"), (m_safe + tl.log2(l_safe)) * LN2_K)
    tl.store(O + i_b * s_ob + i_h * s_oh + i_t * s_ot + offs_dv, b_out.to(O.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + i_b * s_lb + i_h * s_lh + i_t, b_lse)


def merge_splits(o_part, lse_part, out, lse, sinks=None):
    """Combine split-KV partial results per row, writing ``out`` and ``lse``.

    o_part: [B, H, T, N, Dv] fp32, each split's normalised output; lse_part: [B, H, T, N] fp32, each split's
    log-sum-exp in base 2 (-inf where it saw no key), last dim contiguous; sinks: optional [H], one more logit
    per head in the denominator. out: [B, H, T, Dv] (any strides, any float dtype); lse: [B, H, T] fp32, natural
    log, last dim contiguous; a row no split saw (and no sink) gets 0 and -inf.
    """
    B, H, T, N, Dv = o_part.shape
    lse_merge_kernel[(T, B * H)](
        o_part, lse_part, sinks, out, lse,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        H, N, DV=Dv, DV_PAD=triton.next_power_of_2(Dv), NS_PAD=triton.next_power_of_2(N), HAS_SINKS=sinks is not None,
    )


# ----------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------
# A kernel has a grid of candidate tiles and a default per (padded head dim, fp32 or not). The default is what
# runs; HFA_TRITON_AUTOTUNE=1 benchmarks every candidate that fits instead (slow the first time each shape family
# is seen: every candidate compiles). The interpreter has one tile (autotuning more than one config fails there).

def autotuning() -> bool:
    return os.environ.get("HFA_TRITON_AUTOTUNE", "0") == "1"


def config_space(space):
    """Every triton.Config of a {meta-parameter: values} grid (with "num_warps"/"num_stages")."""
    names = [n for n in space if n not in ("num_warps", "num_stages")]
    configs = [dict()]
    for n in names:
        configs = [dict(c, **{n: x}) for c in configs for x in space[n]]
    return [triton.Config(c, num_warps=w, num_stages=st) for c in configs
            for w in space["num_warps"] for st in space["num_stages"]]


def autotune_configs(space, interpret_tile):
    """The configs of ``@triton.autotune``: the grid, or under the interpreter the one tile ``interpret_tile``."""
    if interpreting():
        return [triton.Config(interpret_tile, num_warps=4, num_stages=1)]
    return config_space(space)


def tile_pruner(default, streamed="BLOCK_N"):
    """early_config_prune keeping the default tile for this head dim and dtype, or, when autotuning, every
    tile whose shared memory fits (plus the default). default(d_pad, fp32) -> (meta, num_warps, num_stages);
    streamed: the tile loaded num_stages times per step (K/V blocks, or Q/dO blocks in a dK/dV kernel).
    The kernel names its padded head dims D_PAD and DV_PAD and its dot precision PRECISION."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d, fp32 = max(args["D_PAD"], args["DV_PAD"]), args["PRECISION"] == "ieee"
        meta, warps, stages = default(d, fp32)
        chosen = [c for c in configs if c.kwargs == meta and (c.num_warps, c.num_stages) == (warps, stages)]
        if not autotuning():
            return chosen or configs[:1]
        resident = "BLOCK_M" if streamed == "BLOCK_N" else "BLOCK_N"

        def smem(c):  # the resident tile plus num_stages pairs of streamed tiles, in bytes
            return (4 if fp32 else 2) * d * (c.kwargs.get(resident, 16) + c.num_stages * 2 * c.kwargs[streamed])
        return [c for c in configs if smem(c) <= 200 * 1024 and c not in chosen] + chosen or configs[:1]
    return prune
