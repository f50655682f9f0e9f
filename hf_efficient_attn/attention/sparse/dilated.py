"""Dilated sliding window (Longformer's dilation, Sparse Transformer's strided pattern), dilated by whole blocks.

Within the window (``p - j < window``, counting the query; both sides in an encoder) a query reads every
``dilation``-th key block, counted from the block its query block ends in::

    allowed(i, j) = causal(i, j) and p - j < window and (d0(i) - block(j)) % dilation == 0

with ``d0(i)`` the key block holding the last position of query ``i``'s query block (for a prefill whose blocks
line up, ``block(p)``). Keys count blocks of ``block`` tokens, so the pattern depends on ``block``.

Why blocks, not single keys (Longformer dilates by tokens: p, p - d, p - 2d, ...): token dilation leaves every
block partly used, so a block-sparse kernel would read every block in the window and skip nothing. Dilating by
whole blocks keeps the skipped keys in the blocks the kernels never load; the window is a token rule. Exact; decode
steps stay dense (a few queries straddling two key blocks have no single d0).
"""

from __future__ import annotations

import torch

from .base import SparsePlan, StaticPattern, block_spans, check_int, window_blocks

__all__ = ["Dilated", "dilated"]


class Dilated(StaticPattern):
    def __init__(self, window: int, dilation: int, block: int):
        self.window = check_int("window", window)
        self.dilation = check_int("dilation", dilation)
        super().__init__(f"dilated_w{self.window}_d{self.dilation}_b{block}", block)

    def block_mask(self, q_len, kv_len, causal, device):
        b = self.block
        _, last, _, _ = block_spans(q_len, kv_len, b, b, device)
        d0 = last.clamp_min(0) // b  # the key block each query block ends in
        dist = d0[:, None] - torch.arange(-(-kv_len // b), device=device)[None, :]
        return window_blocks(q_len, kv_len, b, b, self.window, causal, device) & (dist % self.dilation == 0)

    def plan(self, q, k, *, causal, key_padding_mask=None, scale=None):
        return SparsePlan(self.layout(q.shape[2], k.shape[2], causal, q.device), window=self.window)


def dilated(window: int = 2048, dilation: int = 2, *, block: int = 64) -> Dilated:
    """Every ``dilation``-th block within a window, e.g. ``dilated(2048, 2).name == "dilated_w2048_d2_b64"``.

    window: keys with ``p - j < window`` (tokens); dilation: read one key block in every ``dilation`` (1 = the plain
    window); block: the block size (tokens), which the dilation counts in."""
    return Dilated(window, dilation, block)


def main():  # pragma: no cover - a look at the pattern
    q = torch.zeros(1, 1, 16, 8)
    p = dilated(12, 2, block=2)
    plan = p.plan(q, q, causal=True)
    print(p.name, "density", round(plan.layout.density(), 3))
    print(plan.layout.dense_mask(causal=True, window=plan.window)[0, 0].int())


if __name__ == "__main__":  # pragma: no cover
    main()
