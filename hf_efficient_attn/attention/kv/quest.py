"""``hfa.kv.quest(page_size=16, budget=...)``: Quest — keep every token, read only the pages that can matter.

The cache keeps all keys and values (memory is not bounded: bandwidth is) plus, per page of ``page_size``
consecutive cached tokens and per KV head, the elementwise min and max of its keys. At a decode step (at most
``DECODE_MAX_Q_LEN`` new queries) each page gets Quest's upper bound of q·k, ``sum_d max(q_d min_d, q_d max_d)``,
maximised over the query heads of the KV head's GQA group (one choice per KV head: K/V are read once per group)
and over the step's queries; the ``ceil(budget / page_size)`` best pages are read, the newest page always among
them, through the block-sparse decode kernel (Triton on CUDA, the block-gather reference elsewhere). Prefill is
exact (dense); a step whose cache holds no more than ``budget`` tokens reads everything (exact).
"""

from __future__ import annotations

import math

import torch

from ...kernels.sparse import BlockLayout, block_sparse_attention_reference
from ..sparse.base import DECODE_MAX_Q_LEN
from .base import KVPolicy, check_int

__all__ = ["Quest", "quest"]


class Quest(KVPolicy):
    def __init__(self, page_size: int, budget: int):
        self.page_size, self.budget = check_int("page_size", page_size), check_int("budget", budget)
        if page_size & (page_size - 1) or not 16 <= page_size <= 128:
            raise ValueError(f"quest page_size must be a power of two in 16..128 (a block of the block-sparse "
                             f"kernels), got {page_size}")
        if budget < page_size:
            raise ValueError(f"quest budget ({budget}) must hold at least one page ({page_size} tokens)")
        super().__init__(f"quest_p{page_size}_b{budget}")

    def pages(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) [B, Hkv, P, D] of every page, recomputed from the first page the last calls changed."""
        ps, T = self.page_size, layer.slots()
        P = math.ceil(T / ps)
        done = layer.extra.get("paged", 0)            # slots whose pages are final (whole pages)
        first = done // ps
        k = layer.keys[:, :, first * ps:].float()
        ok = layer.valid[:, :, first * ps:, None]
        n = P - first
        pad = n * ps - k.shape[2]
        if pad:
            k = torch.cat([k, k.new_zeros(*k.shape[:2], pad, k.shape[-1])], dim=2)
            ok = torch.cat([ok, ok.new_zeros(*ok.shape[:2], pad, 1)], dim=2)
        k = k.view(*k.shape[:2], n, ps, -1)
        ok = ok.view(*ok.shape[:2], n, ps, 1)
        mn = k.masked_fill(~ok, float("inf")).amin(dim=3)
        mx = k.masked_fill(~ok, float("-inf")).amax(dim=3)
        if first:
            mn = torch.cat([layer.extra["min"][:, :, :first], mn], dim=2)
            mx = torch.cat([layer.extra["max"][:, :, :first], mx], dim=2)
        layer.extra.update(min=mn, max=mx, paged=(T // ps) * ps)
        return mn, mx

    def select(self, layer, q) -> torch.Tensor:
        """bool [B, Hkv, 1, P]: the pages this step reads."""
        mn, mx = self.pages(layer)
        B, Hq, S, D = q.shape
        H = mn.shape[1]
        qg = q.float().view(B, H, Hq // H, S, 1, D)
        bound = torch.maximum(qg * mn[:, :, None, None], qg * mx[:, :, None, None]).sum(-1)   # [B, H, G, S, P]
        bound = bound.amax(dim=(2, 3))
        empty = torch.isinf(mn).all(-1)                                             # pages with no real token
        bound = bound.masked_fill(empty, float("-inf"))
        bound[..., -1] = float("inf")                                               # the newest page
        P = bound.shape[-1]
        top = bound.topk(min(P, math.ceil(self.budget / self.page_size)), dim=-1).indices
        return torch.zeros(B, H, P, dtype=torch.bool, device=q.device).scatter_(2, top, True)[:, :, None]

    def attention(self, layer, q, q_pos, scale, *, shift, exact_ok, device_backend):
        S, T = q.shape[2], layer.slots()
        if S > DECODE_MAX_Q_LEN or T <= self.budget or T <= S:
            return None  # prefill, or a cache within budget: exact
        mask = self.select(layer, q)
        layout = BlockLayout.from_block_mask(mask, DECODE_MAX_Q_LEN, self.page_size, q_len=S, kv_len=T)
        kpm = layer.valid[:, 0]
        kpm = None if bool(kpm.all()) else kpm
        if device_backend == "triton":
            from ...kernels.sparse.triton_block_sparse import block_sparse_decode
            out = block_sparse_decode(q, layer.keys, layer.values, layout, scale=scale, causal=True,
                                      key_padding_mask=kpm)[0]
        else:
            out = block_sparse_attention_reference(q, layer.keys, layer.values, layout, scale=scale, causal=True,
                                                   key_padding_mask=kpm)[0]
        read = int(mask.sum(-1).float().mean() * self.page_size)
        return out, min(read, T)


def quest(page_size: int = 16, budget: int = 1024) -> Quest:
    """Quest reading ``budget`` tokens' worth of pages per decode step (see the module docstring)."""
    return Quest(page_size, budget)
