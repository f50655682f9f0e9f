"""``hfa.kv.quest(page_size=16, budget=...)``: Quest — keep every token, read only the pages that can matter.

The cache keeps all keys and values (memory is not bounded: bandwidth is) plus, per page of ``page_size``
consecutive cached tokens and per KV head, the elementwise min and max of its keys. At a decode step (at most
``DECODE_MAX_Q_LEN`` new queries) each page gets Quest's upper bound of q·k, ``sum_d max(q_d min_d, q_d max_d)``,
maximised over the query heads of the KV head's GQA group (one choice per KV head: K/V are read once per group)
and over the step's queries; the ``ceil(budget / page_size)`` best pages are read, the newest page always among
them, through the block-sparse decode kernel on CUDA (Triton), elsewhere by gathering the chosen pages into one small
dense product (`gather_pages_attention`, equal to the block-sparse reference on the same layout). Prefill is
exact (dense); a step whose cache holds no more than ``budget`` tokens reads everything (exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...kernels.sparse import BlockLayout
from ..sparse.base import DECODE_MAX_Q_LEN
from .base import KVPolicy, check_int

__all__ = ["Quest", "gather_pages_attention", "quest"]


class Quest(KVPolicy):
    def __init__(self, page_size: int, budget: int):
        self.page_size, self.budget = check_int("page_size", page_size), check_int("budget", budget)
        if page_size & (page_size - 1) or not 16 <= page_size <= 128:
            raise ValueError(f"quest page_size must be a power of two in 16..128 (a block of the block-sparse "
                             f"kernels), got {page_size}")
        if budget < page_size:
            raise ValueError(f"quest budget ({budget}) must hold at least one page ({page_size} tokens)")
        super().__init__(f"quest_p{page_size}_b{budget}")

    def pages(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(min, max) [B, Hkv, Pc, D] and empty [B, Hkv, Pc] of every COMPLETE page (min = max = 0 where a page holds
        no real token); a page is computed once, when its last slot arrives. The partial newest page needs none:
        it is always read."""
        ps, T = self.page_size, layer.slots()
        done = layer.extra.get("paged", 0)            # slots whose pages are final (whole pages)
        if T // ps * ps > done:
            k = layer.keys[:, :, done:T // ps * ps].float()
            ok = layer.valid[:, :, done:T // ps * ps, None]
            k = k.view(*k.shape[:2], -1, ps, k.shape[-1])
            ok = ok.view(*ok.shape[:2], -1, ps, 1)
            empty = ~ok.any(dim=3)[..., 0]
            mn = k.masked_fill(~ok, float("inf")).amin(dim=3).masked_fill(empty[..., None], 0.0)
            mx = k.masked_fill(~ok, float("-inf")).amax(dim=3).masked_fill(empty[..., None], 0.0)
            if done:
                mn = torch.cat([layer.extra["min"], mn], dim=2)
                mx = torch.cat([layer.extra["max"], mx], dim=2)
                empty = torch.cat([layer.extra["empty"], empty], dim=2)
            layer.extra.update(min=mn, max=mx, empty=empty, paged=T // ps * ps)
        return layer.extra["min"], layer.extra["max"], layer.extra["empty"]

    def choose(self, layer, q) -> torch.Tensor:
        """int64 [B, Hkv, n] ascending: the pages this step reads, the newest (index P - 1) always last."""
        ps, T = self.page_size, layer.slots()
        P, tail = math.ceil(T / ps), T % ps != 0
        n = min(P, math.ceil(self.budget / ps))
        B, Hq, S, D = q.shape
        H = layer.keys.shape[1]
        pc = T // ps
        if pc:
            mn, mx, empty = self.pages(layer)
            qg = q.float().reshape(B, H, Hq // H * S, D)
            # Quest's bound sum_d max(q_d min_d, q_d max_d) = relu(q) . max + min(q, 0) . min, maxed over the GQA
            # group's heads and the step's queries
            bound = (qg.clamp(min=0) @ mx.transpose(-1, -2) + qg.clamp(max=0) @ mn.transpose(-1, -2)).amax(dim=2)
            bound = bound.masked_fill(empty, float("-inf"))                       # pages with no real token
        if tail:
            top = bound.topk(n - 1, dim=-1).indices if n > 1 else q.new_zeros(B, H, 0, dtype=torch.long)
            top = torch.cat([top, top.new_full((B, H, 1), P - 1)], dim=-1)      # the newest (partial) page
        else:
            bound[..., -1] = float("inf")                                          # the newest page
            top = bound.topk(n, dim=-1).indices
        return top.sort(dim=-1).values

    def select(self, layer, q) -> torch.Tensor:
        """bool [B, Hkv, 1, P]: the pages this step reads (`choose` as a block mask)."""
        top = self.choose(layer, q)
        P = math.ceil(layer.slots() / self.page_size)
        return torch.zeros(*top.shape[:2], P, dtype=torch.bool, device=q.device).scatter_(2, top, True)[:, :, None]

    def attention(self, layer, q, q_pos, scale, *, shift, exact_ok, device_backend):
        S, T = q.shape[2], layer.slots()
        if S > DECODE_MAX_Q_LEN or T <= self.budget or T <= S:
            return None  # prefill, or a cache within budget: exact
        top = self.choose(layer, q)
        kpm = layer.valid[:, 0]
        kpm = None if bool(kpm.all()) else kpm
        if device_backend == "triton":
            from ...kernels.sparse.triton_block_sparse import block_sparse_decode
            P = math.ceil(T / self.page_size)
            mask = torch.zeros(*top.shape[:2], P, dtype=torch.bool, device=q.device).scatter_(2, top, True)
            layout = BlockLayout.from_block_mask(mask[:, :, None], DECODE_MAX_Q_LEN, self.page_size, q_len=S,
                                                 kv_len=T)
            out = block_sparse_decode(q, layer.keys, layer.values, layout, scale=scale, causal=True,
                                      key_padding_mask=kpm)[0]
        else:
            out = gather_pages_attention(q, layer.keys, layer.values, top, self.page_size, scale=scale,
                                         key_padding_mask=kpm)
        return out, min(top.shape[-1] * self.page_size, T)


def gather_pages_attention(q, k, v, pages, page_size: int, *, scale: float, key_padding_mask=None):
    """Decode attention over the chosen pages only, by gathering their keys and values (the CPU path; equal to
    ``block_sparse_attention_reference`` with the same page layout, causal, bottom-right aligned — tested).

    q [B, Hq, S, D] (the S newest tokens), k/v [B, Hkv, T, D]; pages int64 [B, Hkv, n]: page indices, ascending,
    the newest page (``ceil(T / page_size) - 1``) last in every row (Quest's `choose`); key_padding_mask [B, T]
    (True = real) or None. One token, no padding: torch's fused SDPA over the gathered keys; otherwise a masked
    fp32 product. Returns out [B, Hq, S, D] in q.dtype."""
    B, Hq, S, D = q.shape
    H, T = k.shape[1], k.shape[2]
    pc = T // page_size                                       # complete pages; a partial newest one is read whole
    whole = pages[..., :-1] if T % page_size else pages
    b, h = torch.arange(B, device=q.device)[:, None, None], torch.arange(H, device=q.device)[None, :, None]

    def take(x):  # whole pages by advanced indexing on a [B, H, Pc, ps, D] view (rows of ps * D), then the tail
        got = x[:, :, :pc * page_size].view(B, H, pc, page_size, x.shape[-1])[b, h, whole].flatten(2, 3)
        return torch.cat([got, x[:, :, pc * page_size:]], dim=2) if T % page_size else got

    ks, vs = take(k), take(v)
    if S == 1 and key_padding_mask is None:
        return F.scaled_dot_product_attention(q, ks, vs, scale=scale, enable_gqa=H != Hq)
    G = Hq // H
    tok = (pages[..., None] * page_size + torch.arange(page_size, device=q.device)).flatten(2)  # [B, H, n*ps]
    tok = tok[..., :ks.shape[2]]                                                           # the slots of ks
    ok = torch.ones_like(tok, dtype=torch.bool) if key_padding_mask is None else \
        key_padding_mask[:, None].expand(B, H, T).gather(2, tok)
    qi = torch.arange(S, device=q.device) + (T - S)                                          # each query's slot
    ok = ok[:, :, None, None, :] & (tok[:, :, None, None, :] <= qi[:, None])                 # [B, H, 1, S, N]
    scores = torch.einsum("bhgsd,bhtd->bhgst", q.float().view(B, H, G, S, D), ks.float()) * scale
    scores = scores.masked_fill(~ok, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)                                        # a row seeing nothing: 0
    out = torch.einsum("bhgst,bhtd->bhgsd", p, vs.float())
    return out.reshape(B, Hq, S, -1).to(q.dtype)


def quest(page_size: int = 16, budget: int = 1024) -> Quest:
    """Quest reading ``budget`` tokens' worth of pages per decode step (see the module docstring)."""
    return Quest(page_size, budget)
