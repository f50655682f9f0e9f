"""Ring attention across the processes of a torch.distributed group: exact, differentiable, GQA-native.

Each of the ``W`` ranks holds ``S / W`` tokens of one sequence (:mod:`.layout`: zigzag by default) and their
queries, keys and values. Two ways to meet every K/V block:

* ``mode="ring"``: W steps; at step ``s`` a rank computes its queries against the block of rank ``r - s`` while
  it passes that block on to rank ``r + 1`` and receives the next from ``r - 1`` (non-blocking P2P, overlapped
  with the compute). From W = 3 the block travels as two pieces (its two zigzag chunks), each sent while the
  other is computed on, so besides its own K/V a rank holds 1.5 blocks, not 2. Backward: the K/V blocks
  travel the same way again and each block's dK/dV accumulator (fp32) travels WITH it, collecting every rank's
  contribution, and arrives back at its owner after the last step (the ring-flash-attention scheme).
* ``mode="allgather"``: one all-gather of K/V, the same per-block compute, and in backward a re-gather and one
  reduce-scatter of dK/dV. The same bytes on the wire, but one collective instead of W - 1 dependent rounds; it
  holds all of K/V (``W`` blocks) during the call.
* ``mode="auto"``: all-gather when the gathered K/V are no bigger than the local queries (``W * Hkv <= Hq``:
  few KV heads, so holding them all costs less than the queries do and the latency of W - 1 rounds is saved),
  else the ring.

Only KV heads travel (GQA/MQA are never repeated). Partial results merge by log-sum-exp in fp32 whatever the
input dtype (bf16 merges drift with the ring size). Causal and window rules skip whole pairs of segments that
cannot see each other (:func:`.reference.pair_kind`); a pair that fully sees each other runs without a position
mask. Key padding (``key_padding_mask [B, L]``, this rank's keys) travels with its keys.

The piece of work per pair runs on ``local="torch"`` (:mod:`.reference`, any device) or ``local="triton"`` (our
FlashAttention forward/backward kernels for pairs they express: unmasked, or the aligned causal diagonal; the
rest on torch). Choosing is the caller's (the attention layer's backend rule).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import LAYOUTS, check_length, segments
from .reference import block_attention_backward, block_attention_forward, merge_partials, pair_kind

__all__ = ["MODES", "CommCounter", "choose_mode", "count_comm", "group_info", "ring_attention",
           "ring_decode_attention"]

MODES = ("auto", "ring", "allgather")
LOCAL = ("torch", "triton")

# -------------------------------------------------------------------------------------------------
# the group and the byte counter
# -------------------------------------------------------------------------------------------------


def group_info(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group`` (default: the whole world); a RuntimeError naming torchrun outside one."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ring attention runs across processes, but no torch.distributed process group exists. Launch the "
            "script with `torchrun --nproc-per-node N script.py` (or `accelerate launch`) and call "
            "torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPUs) before the first call.")
    return dist.get_world_size(group), dist.get_rank(group)


def _peer(group, rank_in_group):
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


class CommCounter:
    """Bytes this rank put on the wire inside a :func:`count_comm` block (P2P sends, and for collectives the
    analytic per-rank share of a bandwidth-optimal algorithm: (W - 1) / W of the gathered or reduced tensor)."""

    def __init__(self):
        self.sent_bytes = 0
        self.messages = 0


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_comm():
    """Count the bytes ring attention sends from this rank inside the block: ``with count_comm() as c: ...``."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _count(nbytes: int, messages: int = 1) -> None:
    for c in _COUNTERS:
        c.sent_bytes += int(nbytes)
        c.messages += messages


def _send_recv(tensors, cfg, tag):
    """Post sends of ``tensors`` to the next rank and receives of like tensors from the previous one."""
    nxt, prv = _peer(cfg.group, (cfg.rank + 1) % cfg.world), _peer(cfg.group, (cfg.rank - 1) % cfg.world)
    bufs = [torch.empty_like(t) for t in tensors]
    # receives first: a message that arrives before its receive is posted is staged in a transport buffer
    ops = [dist.P2POp(dist.irecv, b, prv, cfg.group, tag) for b in bufs]
    ops += [dist.P2POp(dist.isend, t, nxt, cfg.group, tag) for t in tensors]
    _count(sum(t.numel() * t.element_size() for t in tensors), len(tensors))
    return bufs, dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs:
        r.wait()


# torch 2.13 renamed the flat collectives (the old names warn); older torch has only the old ones
_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(t, cfg):
    """``[W, *t.shape]``: every rank's ``t``."""
    out = torch.empty((cfg.world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    _GATHER(out, t.contiguous(), group=cfg.group)
    _count(t.numel() * t.element_size() * (cfg.world - 1))
    return out.view(cfg.world, *t.shape)


def _reduce_scatter(full, cfg):
    """Sum ``full [W, ...]`` over ranks; this rank keeps entry ``rank``."""
    out = torch.empty(full.shape[1:], dtype=full.dtype, device=full.device)
    _REDUCE_SCATTER(out, full.flatten(0, 1).contiguous(), group=cfg.group)
    _count(full[0].numel() * full.element_size() * (cfg.world - 1))
    return out


# -------------------------------------------------------------------------------------------------
# one rank's work against one K/V block
# -------------------------------------------------------------------------------------------------

@dataclass
class _Cfg:
    group: object
    world: int
    rank: int
    layout: str
    seq_len: int
    causal: bool
    window: int | None
    scale: float
    local: str
    mode: str


def choose_mode(mode: str, world: int, q_heads: int, kv_heads: int) -> str:
    """The mode that runs: ``mode`` itself, or for "auto" the module docstring's rule."""
    if mode not in MODES:
        raise ValueError(f"unknown ring mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "allgather" if world * kv_heads <= q_heads else "ring"


def _key_segments(cfg, src):
    """(offset in the block, segment) of every run of rank ``src``'s keys."""
    out, off = [], 0
    for seg in segments(cfg.seq_len, cfg.world, src, cfg.layout):
        out.append((off, seg))
        off += seg[1]
    return out


def _pieces(cfg, src):
    """How rank ``src``'s block travels in the ring forward: (offset, length, its key runs relative to the piece).

    W = 2: whole (one step of traffic; the own block is sent as it is). W >= 3: two pieces (the zigzag chunks, or
    two halves), each sent while the other is computed on, so besides its own K/V a rank holds 1.5 blocks, not 2
    (the own block's pieces are copied once, at the first step: P2P sends whole tensors)."""
    segs = _key_segments(cfg, src)
    L = sum(n for _, (_, n) in segs)
    if cfg.world < 3:
        return [(0, L, segs)]
    if len(segs) == 1:
        (_, (a, n)), = segs
        h = n // 2
        if h == 0:
            return [(0, L, segs)]
        segs = [(0, (a, h)), (h, (a + h, n - h))]
    return [(off, seg[1], [(0, seg)]) for off, seg in segs]


def _pairs(cfg, src, k_segs=None):
    """(q offset, q segment, k offset, k segment, kind) for this rank's queries against rank ``src``'s keys
    (``k_segs``: the (offset, segment) runs of the keys at hand; default: all of ``src``'s)."""
    out = []
    q_off = 0
    for qs in segments(cfg.seq_len, cfg.world, cfg.rank, cfg.layout):
        for k_off, ks in (k_segs if k_segs is not None else _key_segments(cfg, src)):
            kind = pair_kind(qs, ks, cfg.causal, cfg.window)
            if kind != "skip":
                out.append((q_off, qs, k_off, ks, kind))
        q_off += qs[1]
    return out


def _triton_serves(qs, ks, kind, cfg) -> bool:
    """Whether our flash kernels compute this pair: no position mask, or queries aligned on the keys."""
    if cfg.local != "triton":
        return False
    return kind == "full" or (qs == ks and (cfg.causal or cfg.window is not None))


def _flash_options(kind, cfg, kpm, qn, kn):
    full = kind == "full"
    return dict(scale=cfg.scale, causal=cfg.causal and not full, window=None if full else cfg.window, softcap=None,
                key_padding_mask=kpm, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=qn, max_seqlen_k=kn)


def _pos(seg, device):
    return torch.arange(seg[0], seg[0] + seg[1], device=device)


def _block_forward(q, k, v, kpm, src, out, lse, cfg, k_segs=None):
    """Fold this rank's queries against rank ``src``'s block (or the piece ``k_segs`` says) into ``(out, lse)``."""
    for q_off, qs, k_off, ks, kind in _pairs(cfg, src, k_segs):
        qp = q.narrow(2, q_off, qs[1])
        kp, vp = k.narrow(2, k_off, ks[1]), v.narrow(2, k_off, ks[1])
        mp = kpm.narrow(1, k_off, ks[1])
        if _triton_serves(qs, ks, kind, cfg):
            from ..softmax.triton_flash import _flash_fwd
            o_b, l_b = _flash_fwd(qp, kp, vp, sinks=None, **_flash_options(kind, cfg, mp, qs[1], ks[1]))
            merge_partials(out.narrow(2, q_off, qs[1]), lse.narrow(2, q_off, qs[1]), o_b, l_b)
        else:  # folded into the running result tile by tile
            block_attention_forward(qp, kp, vp, _pos(qs, q.device), _pos(ks, q.device), mp, scale=cfg.scale,
                                    causal=cfg.causal, window=cfg.window, masked=kind == "masked",
                                    into=(out.narrow(2, q_off, qs[1]), lse.narrow(2, q_off, qs[1])))


def _block_backward(q, k, v, kpm, src, dout, dlse, out, lse, delta, dq, cfg):
    """This rank's share of dK/dV for rank ``src``'s block (fp32), adding its dQ share into ``dq``."""
    acc = dq.dtype
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for q_off, qs, k_off, ks, kind in _pairs(cfg, src):
        rows = (slice(None), slice(None), slice(q_off, q_off + qs[1]))
        keys = (slice(None), slice(None), slice(k_off, k_off + ks[1]))
        mp = kpm[:, k_off:k_off + ks[1]]
        if _triton_serves(qs, ks, kind, cfg):
            from ..softmax.triton_flash import _flash_bwd
            g = _flash_bwd(dout[rows], None if dlse is None else dlse[rows], q[rows], k[keys], v[keys], out[rows], lse[rows], sinks=None,
                           **_flash_options(kind, cfg, mp, qs[1], ks[1]))[:3]
        else:
            g = block_attention_backward(q[rows], k[keys], v[keys], dout[rows], lse[rows], delta[rows],
                                         _pos(qs, q.device), _pos(ks, q.device), mp, scale=cfg.scale,
                                         causal=cfg.causal, window=cfg.window, masked=kind == "masked")
        dq[rows] += g[0]
        dk[keys] += g[1]
        dv[keys] += g[2]
    return dk, dv


# -------------------------------------------------------------------------------------------------
# forward and backward over the group
# -------------------------------------------------------------------------------------------------

def _forward(q, k, v, kpm, cfg):
    B, Hq, L, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, Hq, L, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, Hq, L), -math.inf, dtype=acc, device=q.device)
    if cfg.mode == "allgather" and cfg.world > 1:
        ks, vs, ms = _all_gather(k, cfg), _all_gather(v, cfg), _all_gather(kpm, cfg)
        for src in range(cfg.world):
            _block_forward(q, ks[src], vs[src], ms[src], src, out, lse, cfg)
        return out, lse
    own = _pieces(cfg, cfg.rank)
    cur = [(k.narrow(2, off, n), v.narrow(2, off, n), kpm.narrow(1, off, n)) for off, n, _ in own]
    for step in range(cfg.world):
        src = (cfg.rank - step) % cfg.world
        last = step == cfg.world - 1
        nxt = []
        for i, (_, _, k_segs) in enumerate(_pieces(cfg, src)):
            piece, cur[i] = cur[i], None
            if not last:
                send = tuple(t if t.is_contiguous() else t.contiguous() for t in piece)
                incoming, reqs = _send_recv(send, cfg, tag=1)
            _block_forward(q, *piece, src, out, lse, cfg, k_segs=k_segs)
            if not last:
                _wait(reqs)
                nxt.append(tuple(incoming))
                del incoming, reqs, send  # the requests hold their tensors
            del piece
        cur = nxt
    return out, lse


def _backward(q, k, v, kpm, out, lse, dout, dlse, cfg):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    if cfg.mode == "allgather" and cfg.world > 1:
        ks, vs, ms = _all_gather(k, cfg), _all_gather(v, cfg), _all_gather(kpm, cfg)
        dks = torch.zeros(ks.shape, dtype=acc, device=k.device)
        dvs = torch.zeros(vs.shape, dtype=acc, device=v.device)
        for src in range(cfg.world):
            dks[src], dvs[src] = _block_backward(q, ks[src], vs[src], ms[src], src, dout, dlse, out, lse,
                                                 delta, dq, cfg)
        return dq, _reduce_scatter(dks, cfg), _reduce_scatter(dvs, cfg)
    blk = (k, v, kpm)
    grads, acc_reqs = None, None
    for step in range(cfg.world):
        src = (cfg.rank - step) % cfg.world
        last = step == cfg.world - 1
        if not last:
            incoming, kv_reqs = _send_recv(blk, cfg, tag=1)
        dk_b, dv_b = _block_backward(q, *blk, src, dout, dlse, out, lse, delta, dq, cfg)
        if acc_reqs is not None:  # the accumulator of this block, with the shares of the ranks it has visited
            _wait(acc_reqs)
            dk_b, dv_b = dk_b.add_(grads[0]), dv_b.add_(grads[1])
            del acc_reqs, grads
        if cfg.world > 1:
            grads, acc_reqs = _send_recv((dk_b, dv_b), cfg, tag=2)  # (the requests keep the send buffers alive)
        if not last:
            _wait(kv_reqs)
            blk = tuple(incoming)
            del incoming, kv_reqs
    if cfg.world == 1:
        return dq, dk_b, dv_b
    _wait(acc_reqs)
    return dq, grads[0], grads[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kpm, cfg):
        out, lse = _forward(q, k, v, kpm, cfg)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, kpm, out, lse)
        ctx.cfg = cfg
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, kpm, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, kpm, out, lse, dout, dlse, ctx.cfg)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _check(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, local_seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, L, D = q.shape
    if k.shape[0] != B or k.shape[2] != L or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"ring attention needs q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} to share "
                         f"batch and local length (and q, k the head dim): each rank holds the same tokens' q/k/v")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, L):
        raise ValueError(f"key_padding_mask must be [batch, local_seq] = {(B, L)}, got "
                         f"{tuple(key_padding_mask.shape)}")


def ring_attention(q, k, v, *, group=None, scale=None, causal=True, window=None, key_padding_mask=None,
                   layout="zigzag", mode="auto", local="torch"):
    """Exact softmax attention over a sequence split across the ranks of ``group``.

    q: [B, Hq, L, D], k: [B, Hkv, L, D], v: [B, Hkv, L, Dv]: this rank's ``L = S / W`` tokens in ``layout``'s order
    (:func:`.layout.shard_tensor`); every rank calls with the same shapes. causal / window: the softmax reference's
    conventions on global positions. key_padding_mask: [B, L] bool (True = real token), this rank's tokens.
    mode: "auto" | "ring" | "allgather" (module docstring). local: "torch" | "triton" (the per-pair compute).

    Returns (out [B, Hq, L, Dv] in q.dtype, lse [B, Hq, L] fp32, natural log; fp64 for fp64 inputs), this rank's
    rows. Differentiable in q, k, v (every rank must run backward: it is collective too).
    """
    world, rank = group_info(group)
    _check(q, k, v, key_padding_mask)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if local not in LOCAL:
        raise ValueError(f"unknown local compute {local!r}; choose one of {', '.join(LOCAL)}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    B, Hq, L, D = q.shape
    seq_len = L * world
    check_length(seq_len, world, layout)
    cfg = _Cfg(group=group, world=world, rank=rank, layout=layout, seq_len=seq_len, causal=bool(causal),
               window=None if window is None else int(window),
               scale=1.0 / math.sqrt(D) if scale is None else float(scale), local=local,
               mode=choose_mode(mode, world, Hq, k.shape[1]))
    kpm = (torch.ones(B, L, dtype=torch.bool, device=q.device) if key_padding_mask is None
           else key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous())
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _RingAttention.apply(q, k, v, kpm, cfg)
    out, lse = _forward(q, k, v, kpm, cfg)
    return out.to(q.dtype), lse


def ring_decode_attention(q, k, v, q_pos, k_pos, k_valid=None, *, group=None, scale=None, causal=True,
                          window=None):
    """Attention of a few new tokens over a KV cache sharded across ranks: local piece, then ONE all-gather of
    (out, lse) merged in fp32. Every rank passes the same queries and its own slice of the cache.

    q: [B, Hq, n, D] (the same on every rank); k / v: [B, Hkv, m_r, D|Dv], this rank's cached keys (m_r may
    differ between ranks); q_pos [n], k_pos [m_r]: global positions; k_valid [B, m_r] bool: which cached keys this
    rank counts (its own share, not padding). Returns out [B, Hq, n, Dv] in q.dtype. No gradient (inference)."""
    world, _ = group_info(group)
    B, Hq, n, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    with torch.no_grad():
        out, lse = block_attention_forward(q, k, v, q_pos, k_pos, k_valid, scale=scale, causal=causal,
                                           window=window, masked=True)
        if world == 1:
            return out.to(q.dtype)
        packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).float()
        cfg = _Cfg(group, world, 0, "contiguous", world, causal, window, scale, "torch", "allgather")
        every = _all_gather(packed, cfg)  # [W, B, Hq, n, Dv + 1]
        acc_out, acc_lse = torch.zeros_like(out, dtype=torch.float32), torch.full_like(lse, -math.inf,
                                                                                       dtype=torch.float32)
        for r in range(world):
            merge_partials(acc_out, acc_lse, every[r, ..., :-1], every[r, ..., -1])
    return acc_out.to(q.dtype)
