"""Vertical-slash (MInference, Jiang et al., 2024): the key columns and diagonals the last queries attend most.

Many heads attend a few keys from everywhere (vertical lines: sinks, separators) plus a few fixed offsets
(slash lines: the local window, repeated structure). Per call, the last ``last_q`` queries estimate both:

1. their softmax over the keys they may see (the exact scores of those rows; fp32), averaged over the query heads
   of each GQA group (a layout serves a KV head);
2. vertical score of key ``j``: the summed probability on column ``j``; slash score of offset ``o``: the summed
   probability on pairs with ``p - j = o``;
3. the top ``vertical`` columns and top ``slash`` offsets; every query block then reads the key blocks holding a
   selected column it may see and the key blocks a selected diagonal crosses in its rows, plus its diagonal
   block and the first key block (always: no query is left with nothing, and sinks live there).

Block granularity: MInference gathers single vertical columns; here a selected column brings its whole block, a
superset of MInference's selection (never less accurate, denser). Causal calls only (in an encoder every query
sees every key, so the last queries say nothing special about the others). Decode steps stay dense.
"""

from __future__ import annotations

import torch

from ...kernels.sparse import BlockLayout
from .base import SparsePattern, SparsePlan, allowed_blocks, block_spans, check_int, default_scale, diagonal_blocks, \
    group_heads

__all__ = ["VerticalSlash", "vertical_slash"]


class VerticalSlash(SparsePattern):
    dynamic = True

    def __init__(self, vertical: int, slash: int, last_q: int, block: int):
        self.vertical = check_int("vertical", vertical, minimum=0)
        self.slash = check_int("slash", slash, minimum=0)
        self.last_q = check_int("last_q", last_q)
        super().__init__(f"vertical_slash_v{self.vertical}_s{self.slash}_b{block}", block)

    def unsupported_reason(self, *, causal):
        return None if causal else "vertical_slash estimates from the last queries, which needs causal attention"

    @torch.no_grad()
    def scores(self, q, k, *, key_padding_mask=None, scale=None):
        """(vertical [B, Hkv, Skv], slash [B, Hkv, Skv]) fp32: the last queries' probability mass per key column
        and per offset ``o = p - j`` (index o)."""
        B, Hq, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        n = min(self.last_q, Sq)
        pos = torch.arange(Sq - n, Sq, device=q.device) + (Skv - Sq)  # the last queries' positions
        j = torch.arange(Skv, device=q.device)
        s = torch.einsum("bkgqd,bksd->bkgqs", group_heads(q[:, :, Sq - n:].float(), Hkv), k.float())
        ok = (j[None, :] <= pos[:, None])[None, None, None]
        if key_padding_mask is not None:
            ok = ok & key_padding_mask.to(q.device).bool()[:, None, None, None, :]
        p = torch.softmax((s * default_scale(q, scale)).masked_fill(~ok, -torch.inf), dim=-1)
        p = p.nan_to_num(0.0).mean(2)  # (B, Hkv, n, Skv): the group's mean probabilities
        vertical = p.sum(2)
        offset = (pos[:, None] - j[None, :]).clamp_min(0).expand(B, Hkv, n, Skv)  # p - j; masked pairs carry 0
        slash = torch.zeros(B, Hkv, Skv, device=q.device).scatter_add_(-1, offset.reshape(B, Hkv, -1),
                                                                       p.reshape(B, Hkv, -1))
        return vertical, slash

    @torch.no_grad()
    def plan(self, q, k, *, causal, key_padding_mask=None, scale=None):
        Sq, Skv, b = q.shape[2], k.shape[2], self.block
        dev = q.device
        vertical, slash = self.scores(q, k, key_padding_mask=key_padding_mask, scale=scale)
        B, Hkv = vertical.shape[:2]
        nk = -(-Skv // b)
        # -- the selected columns, by key block
        cols = vertical.topk(min(self.vertical, Skv), dim=-1).indices
        col_blocks = torch.zeros(B, Hkv, nk, dtype=torch.bool, device=dev)
        col_blocks.scatter_(-1, cols // b, True)
        # -- the selected offsets: block (qb, kb) holds a selected diagonal iff one lies in its offset range
        picked = torch.zeros(B, Hkv, Skv, device=dev).scatter_(-1, slash.topk(min(self.slash, Skv), dim=-1).indices,
                                                               1.0)
        below = torch.nn.functional.pad(picked.cumsum(-1), (1, 0))  # below[..., x] = selected offsets < x
        pf, pl, kf, kl = block_spans(Sq, Skv, b, b, dev)
        lo = (pf[:, None] - kl[None, :]).clamp(0, Skv)       # (nq, nk): the offsets a block's pairs span
        hi = (pl[:, None] - kf[None, :] + 1).clamp(0, Skv)
        span = below.gather(-1, hi.flatten().expand(B, Hkv, -1)) - below.gather(-1, lo.flatten().expand(B, Hkv, -1))
        mask = span.view(B, Hkv, *lo.shape) > 0
        mask = mask | col_blocks[:, :, None, :] | diagonal_blocks(Sq, Skv, b, b, dev)
        mask[..., 0] = True
        mask = mask & allowed_blocks(Sq, Skv, b, b, True, dev)
        return SparsePlan(BlockLayout.from_block_mask(mask, b, b, Sq, Skv))


def vertical_slash(vertical: int = 1000, slash: int = 1000, *, last_q: int = 64, block: int = 64) -> VerticalSlash:
    """MInference's vertical-slash pattern, estimated per call from the last ``last_q`` queries: the top ``vertical``
    key columns and top ``slash`` diagonals, realised as the blocks covering them (``vertical_slash_v1000_s1000_b64``).
    """
    return VerticalSlash(vertical, slash, last_q, block)


def main():  # pragma: no cover - a look at the pattern
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16)
    k[:, :, 40] *= 4  # a strong column
    p = vertical_slash(8, 8, last_q=16, block=16)
    plan = p.plan(q, k, causal=True)
    print(p.name, "density", round(plan.layout.density(), 3))
    print(plan.layout.to_block_mask()[0, 0].int())


if __name__ == "__main__":  # pragma: no cover
    main()
