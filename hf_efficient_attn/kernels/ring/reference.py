"""Plain-PyTorch pieces of ring attention: attention of one rank's queries against one K/V block, and the merge.

Ring attention is exact softmax attention computed in pieces: each rank holds some queries and, in turn, every
K/V block; each piece gives ``(out, lse)`` and pieces combine by log-sum-exp (:func:`merge_partials`, fp32). The
specification of the whole is dense attention on the unsplit sequence
(:func:`hf_efficient_attn.kernels.softmax.softmax_attention_reference`); these functions are the CPU path (and
the spec the Triton pieces are tested against).

Positions, not offsets, decide masks: ``q_pos [n]`` and ``k_pos [m]`` are the global token indices of the
queries and keys, so one function serves the zigzag layout, the contiguous one and a sharded decode cache.
Conventions are the softmax reference's: ``causal`` = key ``j`` visible from query ``p`` iff ``j <= p``;
``window=w``: ``p - j < w`` (``|p - j| < w`` when not causal); ``k_valid [B, m]`` bool, True = a real key. A query
that sees no key in a piece gets ``out = 0, lse = -inf`` there.

Shapes: ``q [B, Hq, n, D]``, ``k [B, Hkv, m, D]``, ``v [B, Hkv, m, Dv]``, ``Hq % Hkv == 0`` (query head ``h``
reads KV head ``h // (Hq // Hkv)``; K/V are never repeated). Work is done in row tiles of at most
``TILE_ELEMENTS`` scores, so memory does not grow with ``n * m``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TILE_ELEMENTS", "block_attention_backward", "block_attention_forward", "merge_partials", "pair_kind"]

TILE_ELEMENTS = 1 << 22  # scores per tile (16 MiB in fp32)


def pair_kind(q_seg, k_seg, causal: bool, window: int | None) -> str:
    """How a run of queries at positions ``[qa, qa + qn)`` relates to keys at ``[ka, ka + kn)``.

    "skip" (no query sees any key), "full" (every query sees every key: no position mask), "masked" (some do)."""
    (qa, qn), (ka, kn) = q_seg, k_seg
    if qn == 0 or kn == 0:
        return "skip"
    dmin, dmax = qa - (ka + kn - 1), qa + qn - 1 - ka  # range of p - j over the pair
    if causal:
        if dmax < 0 or (window is not None and dmin >= window):
            return "skip"
        return "full" if dmin >= 0 and (window is None or dmax < window) else "masked"
    if window is None:
        return "full"
    if dmin >= window or dmax <= -window:
        return "skip"
    return "full" if dmin > -window and dmax < window else "masked"


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _allowed(q_pos, k_pos, causal, window):
    """[n, m] bool from comparisons only (no [n, m] int64 distance matrix)."""
    p, j = q_pos[:, None], k_pos[None, :]
    if causal:
        ok = j <= p
        return ok if window is None else ok & (j > p - window)
    if window is None:
        return torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    return (j > p - window) & (j < p + window)


def _rows_per_tile(B, Hq, n, m, D):
    """Query rows per tile: at most TILE_ELEMENTS scores, and at most half as many as the piece has query
    elements, so the workspace shrinks with the piece (ring attention's memory per rank scales as 1 / W)."""
    limit = min(TILE_ELEMENTS, max(1 << 15, B * Hq * n * D // 2))
    return max(1, limit // max(1, B * Hq * m))


def _tile_mask(q_pos, k_pos, k_valid, r0, r1, masked, causal, window, B):
    """(B, 1, 1, r, m) bool of visible keys for query rows r0:r1, or None when every key is visible."""
    ok = None
    if masked:
        ok = _allowed(q_pos[r0:r1], k_pos, causal, window)[None, None, None]
    if k_valid is not None:
        kv = k_valid.view(B, 1, 1, 1, -1)
        ok = kv if ok is None else ok & kv
    return ok


def block_attention_forward(q, k, v, q_pos, k_pos, k_valid=None, *, scale, causal, window=None, masked=True,
                            into=None):
    """One piece of attention: ``(out [B, Hq, n, Dv], lse [B, Hq, n])``, both fp32 (fp64 for fp64 inputs).

    masked: apply the position rules (False when :func:`pair_kind` said "full"; key padding always applies).
    into: a running ``(out, lse)`` (fp32, these rows) to fold each tile into with :func:`merge_partials` instead
    of returning the piece (no piece-sized temporaries: what ring attention does); returns it."""
    B, Hq, n, D = q.shape
    Hkv, m, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    if into is None:
        out = torch.zeros(B, Hq, n, Dv, dtype=acc, device=q.device)
        lse = torch.full((B, Hq, n), -math.inf, dtype=acc, device=q.device)
    else:
        out, lse = into
    if n == 0 or m == 0:
        return out, lse
    kt = k.to(acc).transpose(-1, -2)  # (B, Hkv, D, m)
    va = v.to(acc)
    qg = q.unflatten(1, (Hkv, G))
    og, lg = out.unflatten(1, (Hkv, G)), lse.unflatten(1, (Hkv, G))
    rows = _rows_per_tile(B, Hq, n, m, D)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        r = r1 - r0
        s = torch.matmul(qg[:, :, :, r0:r1].to(acc).reshape(B, Hkv, G * r, D), kt).mul_(scale)
        s = s.view(B, Hkv, G, r, m)
        ok = _tile_mask(q_pos, k_pos, k_valid, r0, r1, masked, causal, window, B)
        if ok is not None:
            s.masked_fill_(~ok, -math.inf)
        mx = s.amax(-1, keepdim=True)
        mx_safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)  # rows that see nothing stay 0 / -inf
        p = s.sub_(mx_safe).exp_()
        l = p.sum(-1, keepdim=True)  # noqa: E741
        o = torch.matmul(p.view(B, Hkv, G * r, m), va).view(B, Hkv, G, r, Dv)
        seen = l > 0
        o_t = torch.where(seen, o / torch.where(seen, l, torch.ones_like(l)), torch.zeros_like(o))
        l_t = torch.where(seen, mx_safe + torch.log(l), torch.full_like(l, -math.inf)).squeeze(-1)
        if into is None:
            og[:, :, :, r0:r1], lg[:, :, :, r0:r1] = o_t, l_t
        else:
            merge_partials(og[:, :, :, r0:r1], lg[:, :, :, r0:r1], o_t, l_t)
        del s, p, ok  # one tile alive at a time
    return out, lse


def block_attention_backward(q, k, v, dout, lse, delta, q_pos, k_pos, k_valid=None, *, scale, causal, window=None,
                             masked=True):
    """Gradients of one piece given the WHOLE attention's ``lse`` and ``delta = rowsum(dout * out) - dlse``.

    With the global lse, ``p = exp(s - lse)`` is this piece's share of the full softmax, so the pieces' gradients
    add up to the exact gradient of the whole. Returns ``(dq [B, Hq, n, D], dk [B, Hkv, m, D], dv [B, Hkv, m, Dv])``
    in fp32 (fp64 for fp64 inputs)."""
    B, Hq, n, D = q.shape
    Hkv, m, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    dq = torch.zeros(B, Hq, n, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, Hkv, m, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, Hkv, m, Dv, dtype=acc, device=q.device)
    if n == 0 or m == 0:
        return dq, dk, dv
    ka, va = k.to(acc), v.to(acc)
    qg, dog = q.unflatten(1, (Hkv, G)), dout.unflatten(1, (Hkv, G))
    lg, deg = lse.unflatten(1, (Hkv, G)), delta.unflatten(1, (Hkv, G))
    dqg = dq.unflatten(1, (Hkv, G))
    rows = _rows_per_tile(B, Hq, n, m, D)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        r = r1 - r0
        qt = qg[:, :, :, r0:r1].to(acc).reshape(B, Hkv, G * r, D)
        dot = dog[:, :, :, r0:r1].to(acc).reshape(B, Hkv, G * r, Dv)
        lt = lg[:, :, :, r0:r1].to(acc)
        lt = torch.where(torch.isinf(lt), torch.full_like(lt, math.inf), lt)  # rows that saw nothing: p = 0
        s = torch.matmul(qt, ka.transpose(-1, -2)).mul_(scale).view(B, Hkv, G, r, m)
        p = s.sub_(lt.unsqueeze(-1)).exp_()
        ok = _tile_mask(q_pos, k_pos, k_valid, r0, r1, masked, causal, window, B)
        if ok is not None:
            p.masked_fill_(~ok, 0.0)
        p2 = p.view(B, Hkv, G * r, m)
        dv += torch.matmul(p2.transpose(-1, -2), dot)
        dp = torch.matmul(dot, va.transpose(-1, -2)).view(B, Hkv, G, r, m)
        ds = p.mul_(dp.sub_(deg[:, :, :, r0:r1].to(acc).unsqueeze(-1))).view(B, Hkv, G * r, m)
        dqg[:, :, :, r0:r1] = torch.matmul(ds, ka).mul_(scale).view(B, Hkv, G, r, D)
        dk += torch.matmul(ds.transpose(-1, -2), qt).mul_(scale)
        del s, p, p2, dp, ds, ok  # one tile alive at a time
    return dq, dk, dv


def merge_partials(out, lse, out_b, lse_b):
    """Fold the piece ``(out_b, lse_b)`` into the running ``(out, lse)`` IN PLACE, in fp32 (or fp64).

    out / out_b: ``[..., n, Dv]``; lse / lse_b: ``[..., n]``. Rows where both are empty stay 0 / -inf."""
    lb = lse_b.to(lse.dtype)
    new = torch.logaddexp(lse, lb)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    wa, wb = torch.exp(lse - safe).unsqueeze(-1), torch.exp(lb - safe).unsqueeze(-1)
    out.mul_(wa).addcmul_(out_b.to(out.dtype), wb)
    lse.copy_(new)
    return out, lse
