"""Block-sparse softmax attention in plain PyTorch: the specification the Triton kernels are tested against.

What is computed: softmax attention in which a query may attend a key only when

* the **block layout** selects the key's block for the query's block (:class:`BlockLayout`: for each batch row
  (or packed sequence), KV head and query block, the sorted list of KV blocks it reads), or the key is one of
  the first ``sink_tokens`` keys (always-visible sink / global tokens, read whatever the layout says);
* and the token rules the layout cannot express hold: ``causal`` (bottom-right aligned), ``window`` (which
  limits the layout's keys, never the sink tokens) and ``key_padding_mask`` (which limits every key).

As a formula, for query ``i`` at position ``p = i + Skv - Sq`` and key ``j``::

    allowed(i, j) = real(j) and (not causal or j <= p)
                    and ((block(j // block_n) in layout[i // block_m] and in_window(p, j)) or j < sink_tokens)

Query blocks count query indices (``i // block_m``), key blocks count key indices, both from the start of the
row (of each packed sequence with ``cu_seqlens``). Every other convention is the dense reference's
(:mod:`hf_efficient_attn.kernels.softmax.reference`): ``q: [B, Hq, Sq, D]``, ``k: [B, Hkv, Skv, D]``,
``v: [B, Hkv, Skv, Dv]``, GQA with ``Hq % Hkv == 0`` (a layout is per KV head: the query heads of one group
share it), ``key_padding_mask: [B, Skv]`` True = real token, ``scale`` default ``1/sqrt(D)``; returns
``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32, natural log)``; a row that may attend nothing gets
out 0 and lse -inf.

Two implementations of the definition:

* :func:`block_sparse_attention_naive` builds the dense boolean mask (:meth:`BlockLayout.dense_mask`) and runs
  the dense naive reference with it: the spec of the spec, small shapes only;
* :func:`block_sparse_attention_reference` gathers, per query block, only the KV blocks it reads
  (``index_select`` on a ``[B * Hkv * n_kv_blocks, block_n, D]`` view), then one batched matmul and a stable
  softmax over the gathered keys: work and memory grow with the number of selected blocks, not with
  ``Sq * Skv``. It is differentiable (query-block chunks are recomputed in backward, like the dense
  reference) and it is the CPU fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ..softmax.reference import check_attention_inputs, softmax_attention_naive

__all__ = ["BlockLayout", "block_sparse_attention_naive", "block_sparse_attention_reference",
           "check_block_sparse_inputs"]


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _sorted_lists(codes: torch.Tensor):
    """Row-wise lists of the columns where ``codes`` is nonzero, ascending.

    codes: int8 [..., R, C] -> (columns int32 [..., R, max(1, most per row)] padded with C, counts int32 [..., R])."""
    C = codes.shape[-1]
    visited = codes != 0
    counts = visited.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max())) if counts.numel() else 1
    cols = torch.arange(C, device=codes.device, dtype=torch.int32).expand_as(codes)
    cols = torch.where(visited, cols, C).sort(dim=-1).values[..., :width]
    if cols.shape[-1] < width:  # C == 0
        cols = torch.full((*codes.shape[:-1], width), C, dtype=torch.int32, device=codes.device)
    return cols.to(torch.int32).contiguous(), counts


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which KV blocks each query block reads, per batch row (or packed sequence) and KV head.

    block_m, block_n: query / key tokens per block (any positive ints here; the Triton kernels want block_n a
    power of two in 16..128). kv_blocks: int32 ``[B|1, Hkv|1, n_q_blocks, max_k]``, each row's KV block
    indices ascending and distinct, padded with -1 past ``counts``; counts: int32 ``[B|1, Hkv|1, n_q_blocks]``.
    q_len, kv_len: the query and key lengths the layout is for (the longest sequence when packed);
    ``n_q_blocks = ceil(q_len / block_m)``, ``n_kv_blocks = ceil(kv_len / block_n)``. A size-1 batch or head
    dim broadcasts. Treat a layout as immutable (the kernels' visit lists are cached on it).
    """

    block_m: int
    block_n: int
    kv_blocks: torch.Tensor
    counts: torch.Tensor
    q_len: int
    kv_len: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.block_m < 1 or self.block_n < 1:
            raise ValueError(f"block sizes must be >= 1, got block_m={self.block_m}, block_n={self.block_n}")
        if self.kv_blocks.dim() != 4 or self.counts.dim() != 3 or self.kv_blocks.shape[:3] != self.counts.shape:
            raise ValueError(f"kv_blocks must be [B|1, Hkv|1, n_q_blocks, max_k] and counts [B|1, Hkv|1, n_q_blocks]; "
                             f"got {tuple(self.kv_blocks.shape)} and {tuple(self.counts.shape)}")
        if self.kv_blocks.shape[2] != self.n_q_blocks:
            raise ValueError(f"kv_blocks has {self.kv_blocks.shape[2]} query blocks; q_len={self.q_len} with "
                             f"block_m={self.block_m} needs {self.n_q_blocks}")
        object.__setattr__(self, "kv_blocks", self.kv_blocks.to(torch.int32))
        object.__setattr__(self, "counts", self.counts.to(torch.int32))
        kb, c, nk = self.kv_blocks, self.counts, self.n_kv_blocks
        used = torch.arange(kb.shape[-1], device=kb.device) < c.unsqueeze(-1)
        ok = bool(((c >= 0) & (c <= kb.shape[-1])).all()) and bool(((kb >= 0) & (kb < nk))[used].all())
        ok = ok and bool((kb[..., 1:] > kb[..., :-1])[used[..., 1:]].all())
        if not ok:
            raise ValueError(f"each kv_blocks row must list distinct KV blocks in [0, {nk}) ascending, counts[...] "
                             f"of them; build layouts with BlockLayout.from_block_mask")

    # -- shape
    @property
    def n_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_m)

    @property
    def n_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.block_n)

    @property
    def device(self) -> torch.device:
        return self.kv_blocks.device

    def to(self, device) -> "BlockLayout":
        if torch.device(device) == self.device:
            return self
        return BlockLayout(self.block_m, self.block_n, self.kv_blocks.to(device), self.counts.to(device),
                           self.q_len, self.kv_len)

    # -- constructors
    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block_m: int, block_n: int, q_len: int | None = None,
                        kv_len: int | None = None) -> "BlockLayout":
        """The layout of a bool block mask ``[B|1, Hkv|1, n_q_blocks, n_kv_blocks]`` (True = computed).

        q_len / kv_len default to whole blocks (``n_q_blocks * block_m``, ``n_kv_blocks * block_n``)."""
        if mask.dim() != 4:
            raise ValueError(f"block mask must be [B|1, Hkv|1, n_q_blocks, n_kv_blocks], got {tuple(mask.shape)}")
        nq, nk = mask.shape[-2:]
        q_len = nq * block_m if q_len is None else int(q_len)
        kv_len = nk * block_n if kv_len is None else int(kv_len)
        if _cdiv(q_len, block_m) != nq or _cdiv(kv_len, block_n) != nk:
            raise ValueError(f"a block mask of {nq} x {nk} blocks does not fit q_len={q_len}, kv_len={kv_len} with "
                             f"blocks of {block_m} x {block_n}")
        cols, counts = _sorted_lists(mask.to(torch.int8))
        cols = torch.where(cols == nk, -1, cols)
        return cls(block_m, block_n, cols, counts, q_len, kv_len)

    @classmethod
    def full(cls, q_len: int, kv_len: int, block_m: int, block_n: int, *, causal: bool = False,
             device="cpu") -> "BlockLayout":
        """Every block (``causal``: every block holding a causally allowed pair, bottom-right aligned)."""
        nq, nk = _cdiv(q_len, block_m), _cdiv(kv_len, block_n)
        mask = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
        if causal:
            mask = _causal_blocks(q_len, kv_len, block_m, block_n, device)[None, None]
        return cls.from_block_mask(mask, block_m, block_n, q_len, kv_len)

    @classmethod
    def random(cls, batch: int, heads: int, q_len: int, kv_len: int, block_m: int, block_n: int, density: float, *,
               causal: bool = True, seed: int = 0, device="cpu") -> "BlockLayout":
        """A test / benchmark layout: per row, the last block it may see (the causal diagonal), the first block,
        and random others, about ``density`` of the row's causal (or all) blocks."""
        nq, nk = _cdiv(q_len, block_m), _cdiv(kv_len, block_n)
        allowed = _causal_blocks(q_len, kv_len, block_m, block_n, "cpu") if causal else \
            torch.ones(nq, nk, dtype=torch.bool)
        g = torch.Generator().manual_seed(seed)
        score = torch.rand(batch, heads, nq, nk, generator=g).masked_fill(~allowed, 2.0)
        n_allowed = allowed.sum(-1)
        keep = (n_allowed.float() * density).round().long().clamp(min=1)
        rank = score.argsort(-1).argsort(-1)
        mask = (rank < keep[:, None]) & allowed
        last = (allowed.long() * torch.arange(1, nk + 1)).argmax(-1)  # the last allowed block of each row
        has = n_allowed > 0
        mask[..., torch.arange(nq)[has], last[has]] = True
        mask[..., 0] |= allowed[:, 0]
        return cls.from_block_mask(mask.to(device), block_m, block_n, q_len, kv_len)

    # -- views
    def to_block_mask(self) -> torch.Tensor:
        """bool ``[B|1, Hkv|1, n_q_blocks, n_kv_blocks]``: True where the layout computes the block."""
        kb = self.kv_blocks.long()
        used = torch.arange(kb.shape[-1], device=kb.device) < self.counts.unsqueeze(-1)
        mask = torch.zeros(*kb.shape[:3], self.n_kv_blocks + 1, dtype=torch.bool, device=kb.device)
        mask.scatter_(-1, torch.where(used, kb, self.n_kv_blocks), True)
        return mask[..., :-1]

    def dense_mask(self, *, causal: bool = False, window: int | None = None, key_padding_mask=None,
                   sink_tokens: int = 0) -> torch.Tensor:
        """bool ``[B|1, Hkv|1, q_len, kv_len]``: the token pairs the layout and the token rules allow."""
        Sq, Sk = self.q_len, self.kv_len
        dev = self.device
        blocks = self.to_block_mask()
        blocks = blocks.repeat_interleave(self.block_m, dim=2)[..., :Sq, :]
        blocks = blocks.repeat_interleave(self.block_n, dim=3)[..., :Sk]
        p = torch.arange(Sq, device=dev)[:, None] + (Sk - Sq)
        j = torch.arange(Sk, device=dev)[None, :]
        in_window = torch.ones(Sq, Sk, dtype=torch.bool, device=dev)
        if window is not None:
            in_window = (p - j < window) & (causal | (j - p < window))
        allowed = (blocks & in_window) | (j < sink_tokens)
        if causal:
            allowed = allowed & (j <= p)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask.to(dev).bool()[:, None, None, :]
        return allowed

    def density(self, *, causal: bool = True, sink_tokens: int = 0, per_head: bool = False):
        """The fraction of blocks computed: of the causal blocks (bottom-right aligned; those holding at least one
        pair ``j <= p``) or of all blocks. Sink blocks count as computed. A float (the mean over batch rows
        and heads), or with ``per_head`` a tensor ``[B|1, Hkv|1]``."""
        blocks = self.to_block_mask()
        blocks = blocks | (torch.arange(self.n_kv_blocks, device=self.device) < _cdiv(sink_tokens, self.block_n))
        if causal:
            region = _causal_blocks(self.q_len, self.kv_len, self.block_m, self.block_n, self.device)
        else:
            region = torch.ones(self.n_q_blocks, self.n_kv_blocks, dtype=torch.bool, device=self.device)
        frac = (blocks & region).sum((-1, -2)).double() / max(1, int(region.sum()))
        return frac.float() if per_head else float(frac.mean())

    def visits(self, sink_tokens: int = 0, *, transpose: bool = False):
        """What the kernels loop over: per query block, the KV blocks it visits (the layout's and the sink
        blocks); with ``transpose``, per KV block, the query blocks that visit it (the dK/dV loop).

        Returns (entries int32 ``[B|1, Hkv|1, rows, width]``, counts int32 ``[B|1, Hkv|1, rows]``), ascending.
        An entry ``e >= 0`` is a block the layout selects; ``e < 0`` is block ``-1 - e``, visited only for its
        sink tokens. Entries past counts are undefined. Cached per (sink_tokens, transpose)."""
        key = (int(sink_tokens), bool(transpose))
        if key not in self._cache:
            if self.n_kv_blocks == 0:
                rows = self.n_kv_blocks if transpose else self.n_q_blocks
                shape = (*self.kv_blocks.shape[:2], rows)
                return torch.zeros(*shape, 1, dtype=torch.int32, device=self.device), \
                    torch.zeros(shape, dtype=torch.int32, device=self.device)
            sel = self.to_block_mask()
            n_sink = min(_cdiv(int(sink_tokens), self.block_n), self.n_kv_blocks)
            sink = torch.arange(self.n_kv_blocks, device=self.device) < n_sink
            codes = torch.where(sel, 1, torch.where(sink, 2, 0)).to(torch.int8)  # 1 selected, 2 sink only
            if transpose:
                codes = codes.transpose(-1, -2)
            cols, counts = _sorted_lists(codes)
            code = codes.gather(-1, cols.long().clamp_max(codes.shape[-1] - 1))
            entries = torch.where(code == 2, -1 - cols, cols).to(torch.int32).contiguous()
            self._cache[key] = (entries, counts)
        return self._cache[key]


def _causal_blocks(q_len, kv_len, block_m, block_n, device):
    """bool [n_q_blocks, n_kv_blocks]: blocks with at least one pair key <= query position (bottom-right)."""
    nq, nk = _cdiv(q_len, block_m), _cdiv(kv_len, block_n)
    last_pos = (torch.arange(nq, device=device) * block_m + block_m - 1).clamp_max(q_len - 1) + (kv_len - q_len)
    return (torch.arange(nk, device=device) * block_n)[None, :] <= last_pos[:, None]


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def check_block_sparse_inputs(q, k, v, layout, *, key_padding_mask=None, window=None, sink_tokens=0,
                              cu_seqlens_q=None, cu_seqlens_k=None):
    """Validate shapes, options and the layout against q/k; raise ValueError naming the problem and the fix."""
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, window=window)
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if int(sink_tokens) < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    B, Hkv = q.shape[0], k.shape[1]
    if cu_seqlens_q is None:
        n_seq, Sq, Sk = B, q.shape[2], k.shape[2]
    else:
        n_seq = len(cu_seqlens_q) - 1
        Sq, Sk = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()), int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    if (layout.q_len, layout.kv_len) != (Sq, Sk):
        what = "the longest packed sequence" if cu_seqlens_q is not None else "q and k"
        raise ValueError(f"the layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but {what} has "
                         f"q_len={Sq}, kv_len={Sk}: build the layout for these lengths")
    lb, lh = layout.kv_blocks.shape[:2]
    if lb not in (1, n_seq) or lh not in (1, Hkv):
        rows = "packed sequences" if cu_seqlens_q is not None else "batch rows"
        raise ValueError(f"layout batch/head dims ({lb}, {lh}) must be 1 or the {n_seq} {rows} / {Hkv} KV heads")


# ----------------------------------------------------------------------------------------------
# The spec of the spec: the dense mask
# ----------------------------------------------------------------------------------------------

def block_sparse_attention_naive(q, k, v, layout, *, scale=None, causal=False, window=None, key_padding_mask=None,
                                 sink_tokens=0):
    """The definition with the dense boolean mask and the dense naive reference. Small shapes only; no varlen."""
    check_block_sparse_inputs(q, k, v, layout, key_padding_mask=key_padding_mask, window=window,
                              sink_tokens=sink_tokens)
    G = q.shape[1] // k.shape[1]
    mask = layout.to(q.device).dense_mask(causal=causal, window=window, key_padding_mask=key_padding_mask,
                                          sink_tokens=sink_tokens)
    return softmax_attention_naive(q, k, v, scale=scale, attn_mask=mask.repeat_interleave(G, dim=1))


# ----------------------------------------------------------------------------------------------
# The block-gather path
# ----------------------------------------------------------------------------------------------

MAX_CHUNK_SCORES = 1 << 22  # score elements per step of the gather path (16 MiB in fp32): cache-sized tiles


def _split_visits(entries, counts, c0, Sq, Sk, bm, bn, causal, window, sink_tokens):
    """The chunk's visits in two lists: the blocks the token-position rules leave whole (every key a real key
    may be seen by every query of the block) and the blocks they cut (the causal diagonal, the window's edges,
    the sink boundary). Only the second list needs a per-token mask. Each: (entries, counts), ascending."""
    dev = entries.device
    E = entries.shape[-1]
    blk = torch.where(entries >= 0, entries, -1 - entries).long()
    valid = torch.arange(E, device=dev) < counts.unsqueeze(-1)
    q_first = (torch.arange(entries.shape[2], device=dev) + c0) * bm + (Sk - Sq)
    q_first, q_last = q_first[:, None], (q_first + bm - 1).clamp_max(Sk - 1)[:, None]
    k_first, k_last = blk * bn, blk * bn + bn - 1
    in_window = torch.ones_like(valid)
    if window is not None:
        in_window = (q_last - k_first < window) & (causal | (k_last - q_first < window))
    whole = ((entries >= 0) & in_window) | (k_last < sink_tokens)
    if causal:
        whole = whole & (k_last <= q_first)
    whole = whole & valid
    lists = []
    for part in (whole, valid & ~whole):
        n = part.sum(-1, dtype=torch.int32)
        width = int(n.max()) if n.numel() else 0
        order = torch.where(part, torch.arange(E, device=dev), E + torch.arange(E, device=dev)).argsort(-1)
        lists.append((entries.gather(-1, order[..., :width]), n))
    return lists


class _Workspace:
    """Buffers reused from chunk to chunk when no gradient is needed: on CPU a fresh multi-MiB tensor per chunk
    costs its page faults again every time (the allocator hands large blocks back to the OS)."""

    def __init__(self):
        self.buffers = {}

    def get(self, name, shape, dtype, device):
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self.buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_flash_ok(qc) -> bool:
    """Whether whole blocks can go to torch's fused CPU flash kernel (no gradient, fp32 on CPU, Dv == D)."""
    return _CPU_FLASH is not None and qc.device.type == "cpu" and qc.dtype == torch.float32


def _flash_part(q2, kg, vg, key_ok, shape):
    """The whole blocks of a chunk through torch's fused CPU flash kernel (no score matrix in memory; about 2x the
    bmm-exp-bmm path on CPU): (m, l, acc) in :func:`_gather_part`'s convention, as m = lse, l = 1, acc = out.

    q2: (N, G * bm, D) scaled; kg / vg: (N, E * bn, D|Dv); key_ok: (B, Hkv, c, E * bn) bool."""
    mask = None
    if not bool(key_ok.all()):
        mask = torch.zeros(key_ok.shape, dtype=q2.dtype, device=q2.device).masked_fill_(~key_ok, -math.inf)
        mask = mask.view(q2.shape[0], 1, 1, -1)
    out, lse = _CPU_FLASH(q2.unsqueeze(1), kg.unsqueeze(1), vg.unsqueeze(1), 0.0, False, attn_mask=mask, scale=1.0)
    out, lse = out[:, 0], lse[:, 0].to(q2.dtype)
    # a query block with no visible key here (whole blocks: key_ok alone decides) adds nothing; the kernel's own
    # value for such rows (lse 0) must not be read as a real one
    dead = (~key_ok.any(-1)).view(-1, 1).expand_as(lse)
    if bool(dead.any()):
        lse = lse.masked_fill(dead, -math.inf)
        out = out.masked_fill(dead.unsqueeze(-1), 0.0)
    B, Hkv, c, G, bm = shape
    return lse.view(shape), (~dead).to(q2.dtype).view(shape), out.reshape(B, Hkv, c, G, bm, -1)


def _gather_part(qc, kb, vb, kreal, entries, counts, c0, Sq, Sk, bm, bn, causal, window, sink_tokens, cut, ws):
    """Unnormalised softmax of query blocks c0 .. c0 + c over the listed KV blocks: (m, l, acc) per row.

    qc: (B, Hkv, c, G * bm, D), already scaled; kb / vb: (B * Hkv * nk, bn, D|Dv); kreal: (B * Hkv * nk, bn)
    bool (real keys) or None (all are); entries / counts: (B, Hkv, c, E) / (B, Hkv, c); cut: apply the token-position rules
    (else the blocks are whole and only padding and real keys matter); ws: a _Workspace (no gradient: every
    step in place) or None."""
    B, Hkv, c, Gbm, D = qc.shape
    E = entries.shape[-1]
    nk = kb.shape[0] // (B * Hkv)
    dev = qc.device
    inplace = ws is not None
    # -- gather the KV blocks: (B * Hkv * c, E * bn, D)
    blk = torch.where(entries >= 0, entries, -1 - entries).long()
    valid = torch.arange(E, device=dev) < counts.unsqueeze(-1)
    blk = torch.where(valid, blk, 0)
    base = (torch.arange(B, device=dev)[:, None] * Hkv + torch.arange(Hkv, device=dev)[None, :]) * nk
    flat = (base[:, :, None, None] + blk).reshape(-1)
    # (2-D index_select: whole blocks as rows copy at memcpy speed; on a 3-D view it is several times slower)
    if inplace and kb.dtype == qc.dtype:
        kg = torch.index_select(kb.flatten(1), 0, flat, out=ws.get("k", (flat.numel(), bn * D), kb.dtype, dev))
        vg = torch.index_select(vb.flatten(1), 0, flat, out=ws.get("v", (flat.numel(), vb[0].numel()), vb.dtype, dev))
    else:
        kg, vg = kb.flatten(1).index_select(0, flat), vb.flatten(1).index_select(0, flat)
    kg = kg.view(B * Hkv * c, E * bn, D).to(qc.dtype)
    vg = vg.view(B * Hkv * c, E * bn, vb.shape[-1]).to(qc.dtype)
    # -- which keys: real ones of listed blocks (a column bias), and in cut blocks the position rules
    key_ok = valid.repeat_interleave(bn, dim=-1)
    if kreal is not None:
        key_ok = key_ok & kreal.index_select(0, flat).view(B, Hkv, c, E * bn)
    q2 = qc.flatten(0, 2)
    if inplace and not cut and _cpu_flash_ok(qc) and vg.shape[-1] == qc.shape[-1]:  # (the kernel: one head size)
        return _flash_part(q2, kg, vg, key_ok, (B, Hkv, c, Gbm // bm, bm))
    if inplace:
        s = torch.bmm(q2, kg.transpose(1, 2), out=ws.get("s", (B * Hkv * c, Gbm, E * bn), qc.dtype, dev))
        if not bool(key_ok.all()):
            s.view(B, Hkv, c, Gbm, E * bn).masked_fill_(~key_ok.unsqueeze(3), -math.inf)
    elif bool(key_ok.all()):
        s = torch.bmm(q2, kg.transpose(1, 2))
    else:
        bias = torch.zeros(key_ok.shape, dtype=qc.dtype, device=dev).masked_fill_(~key_ok, -math.inf)
        s = torch.baddbmm(bias.view(B * Hkv * c, 1, E * bn), q2, kg.transpose(1, 2))
    G = Gbm // bm
    s = s.view(B, Hkv, c, G, bm, E * bn)
    if cut:
        j = (blk[..., None] * bn + torch.arange(bn, device=dev)).flatten(-2)[:, :, :, None, :]  # key index
        p = ((torch.arange(c, device=dev)[:, None] + c0) * bm + torch.arange(bm, device=dev) + (Sk - Sq))[:, :, None]
        layout_ok = (entries >= 0).repeat_interleave(bn, dim=-1)[:, :, :, None, :]
        if window is not None:
            layout_ok = layout_ok & (p - j < window)
            if not causal:
                layout_ok = layout_ok & (j - p < window)
        allowed = layout_ok | (j < sink_tokens)
        if causal:
            allowed = allowed & (j <= p)
        blocked = ~allowed.unsqueeze(3)
        s = s.masked_fill_(blocked, -math.inf) if inplace else s.masked_fill(blocked, -math.inf)
    # -- the stable softmax's numerators; a row that sees nothing keeps m = -inf and l = 0
    m = s.amax(-1).detach()
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = s.sub_(m_safe.unsqueeze(-1)).exp_() if inplace else torch.exp(s - m_safe.unsqueeze(-1))
    l = e.sum(-1)  # noqa: E741
    acc = torch.bmm(e.view(B * Hkv * c, Gbm, E * bn), vg).view(B, Hkv, c, G, bm, -1)
    return m, l, acc


def _gather_chunk(qc, kb, vb, kreal, entries, counts, c0, Sq, Sk, bm, bn, scale, causal, window, sink_tokens,
                  acc_dtype, ws=None):
    """Attention of query blocks c0 .. c0 + c over the KV blocks each one visits: the blocks the token rules
    leave whole, then the blocks they cut, merged by log-sum-exp.

    qc: (B, Hkv, c, G, bm, D) -> out (B, Hkv, c, G, bm, Dv), lse (B, Hkv, c, G, bm)."""
    B, Hkv, c, G, _, D = qc.shape
    qc = qc.flatten(3, 4).to(acc_dtype) * scale
    m = l = acc = None  # noqa: E741
    for cut, (ent, cnt) in zip((False, True), _split_visits(entries, counts, c0, Sq, Sk, bm, bn, causal, window,
                                                            sink_tokens)):
        if ent.shape[-1] == 0:
            continue
        m2, l2, acc2 = _gather_part(qc, kb, vb, kreal, ent, cnt, c0, Sq, Sk, bm, bn, causal, window, sink_tokens,
                                    cut, ws)
        if m is None:
            m, l, acc = m2, l2, acc2  # noqa: E741
            continue
        # -- merge two partial softmaxes: rescale both to the common max
        m_new = torch.maximum(m, m2)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        a, a2 = torch.exp(torch.where(torch.isinf(m), m, m - m_safe)), torch.exp(torch.where(torch.isinf(m2), m2,
                                                                                           m2 - m_safe))
        l = l * a + l2 * a2  # noqa: E741
        acc = acc * a.unsqueeze(-1) + acc2 * a2.unsqueeze(-1)
        m = m_new
    if m is None:  # the chunk visits nothing
        keep_graph = 0 * (qc.sum() + kb.sum() + vb.sum())  # zero gradients, not missing ones
        return (qc.new_zeros(B, Hkv, c, G, bm, vb.shape[-1]) + keep_graph,
                torch.full((B, Hkv, c, G, bm), -math.inf, dtype=acc_dtype, device=qc.device))
    # m here is each part's own max (or -inf); l and acc are relative to m_safe = m where finite
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    out = acc / l_safe.unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(l, -math.inf), m_safe + torch.log(l_safe))
    return out, lse


def _gather_attention(q, k, v, layout, scale, causal, window, key_padding_mask, sink_tokens, max_chunk_scores):
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    bm, bn = layout.block_m, layout.block_n
    nq, nk = _cdiv(Sq, bm), _cdiv(Sk, bn)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if Sq == 0 or Sk == 0 or nk == 0:
        keep_graph = 0 * (q.sum() + k.sum() + v.sum())  # zero gradients, not missing ones
        return (q.new_zeros(B, Hq, Sq, Dv) + keep_graph,
                torch.full((B, Hq, Sq), -math.inf, dtype=acc_dtype, device=q.device))
    entries, counts = layout.visits(sink_tokens)
    entries, counts = entries.expand(B, Hkv, nq, -1), counts.expand(B, Hkv, nq)
    # -- blocked views: K/V (B * Hkv * nk, bn, D), queries (B, Hkv, nq, G, bm, D), real keys (B * Hkv * nk, bn)
    kb = torch.nn.functional.pad(k, (0, 0, 0, nk * bn - Sk)).reshape(B * Hkv * nk, bn, D)
    vb = torch.nn.functional.pad(v, (0, 0, 0, nk * bn - Sk)).reshape(B * Hkv * nk, bn, Dv)
    qb = torch.nn.functional.pad(q, (0, 0, 0, nq * bm - Sq)).view(B, Hkv, G, nq, bm, D).transpose(2, 3)
    kreal = None  # None: every key is real
    if key_padding_mask is not None or Sk % bn:
        kreal = torch.arange(nk * bn, device=q.device) < Sk
        kreal = kreal[None] if key_padding_mask is None else kreal & torch.nn.functional.pad(
            key_padding_mask.to(q.device).bool(), (0, nk * bn - Sk))
        kreal = kreal.view(-1, 1, nk, bn).expand(B, Hkv, nk, bn).reshape(B * Hkv * nk, bn)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    ws = None if torch.is_grad_enabled() else _Workspace()
    outs, lses = [], []
    c0 = 0
    count_max = counts.amax(dim=(0, 1)).tolist()  # visits per query block, the most over rows and heads
    while c0 < nq:
        # -- as many query blocks as fit MAX_CHUNK_SCORES, each with the chunk's widest visit list
        c1, width = c0, 1
        while c1 < nq:
            w = max(width, count_max[c1])
            if c1 > c0 and B * Hkv * (c1 + 1 - c0) * G * bm * w * bn > max_chunk_scores:
                break
            width, c1 = w, c1 + 1
        args = (qb[:, :, c0:c1], kb, vb, kreal, entries[:, :, c0:c1, :width], counts[:, :, c0:c1], c0, Sq, Sk,
                bm, bn, scale, causal, window, sink_tokens, acc_dtype)
        o, lse = checkpoint(_gather_chunk, *args, use_reentrant=False) if needs_grad else _gather_chunk(*args, ws)
        outs.append(o)
        lses.append(lse)
        c0 = c1
    out = torch.cat(outs, dim=2).transpose(2, 3).reshape(B, Hq, nq * bm, Dv)[:, :, :Sq]
    lse = torch.cat(lses, dim=2).transpose(2, 3).reshape(B, Hq, nq * bm)[:, :, :Sq]
    return out.to(q.dtype), lse


def _sequence_layout(layout, n, L_q, L_k):
    """The layout of packed sequence n, cut to its own lengths."""
    mask = layout.to_block_mask()
    mask = mask[n if mask.shape[0] > 1 else 0][None, :, :_cdiv(L_q, layout.block_m), :_cdiv(L_k, layout.block_n)]
    return BlockLayout.from_block_mask(mask, layout.block_m, layout.block_n, L_q, L_k)


def block_sparse_attention_reference(q, k, v, layout, *, scale=None, causal=False, window=None,
                                     key_padding_mask=None, sink_tokens=0, cu_seqlens_q=None, cu_seqlens_k=None,
                                     max_chunk_scores=MAX_CHUNK_SCORES):
    """Block-sparse softmax attention by block gathering (see the module docstring for the definition).

    q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv]; layout: a :class:`BlockLayout` for
    (Sq, Skv) (packed: for the longest sequence, one layout row per sequence or one for all);
    sink_tokens: the first n keys (of each sequence) are visible to every query the token rules allow.
    cu_seqlens_q / cu_seqlens_k: [N + 1] packed sequences with B == 1, each bottom-right aligned.
    max_chunk_scores: score elements computed per step (peak memory), whatever the sequence length.

    Returns (out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64 inputs), natural log).
    Differentiable in q, k, v; accumulates in fp32 (fp64 for fp64 inputs).
    """
    check_block_sparse_inputs(q, k, v, layout, key_padding_mask=key_padding_mask, window=window,
                              sink_tokens=sink_tokens, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = None if window is None else int(window)
    layout = layout.to(q.device)
    opts = dict(scale=scale, causal=bool(causal), window=window, sink_tokens=int(sink_tokens),
                max_chunk_scores=int(max_chunk_scores))
    if cu_seqlens_q is None:
        return _gather_attention(q, k, v, layout, key_padding_mask=key_padding_mask, **opts)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for n in range(len(cq) - 1):
        (q0, q1), (k0, k1) = (cq[n], cq[n + 1]), (ck[n], ck[n + 1])
        kpm = None if key_padding_mask is None else key_padding_mask[:, k0:k1]
        o, lse = _gather_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                   _sequence_layout(layout, n, q1 - q0, k1 - k0), key_padding_mask=kpm, **opts)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2).to(torch.float64 if q.dtype == torch.float64
                                                              else torch.float32)
