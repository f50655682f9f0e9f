"""LSH attention (Reformer, Kitaev et al., 2020), at block granularity: blocks whose queries and keys hash alike.

Reformer hashes every token by random rotations (angular LSH: ``h(x) = argmax([xR, -xR])`` for a random
``R: [D, buckets / 2]``, ``rounds`` independent R) and attends within shared buckets. Here the hashed vectors are
**block summaries**: the normalised mean of each query block's queries (per query head) and of each key block's
keys. Query block ``a`` reads key block ``c`` when their hashes agree in any round for any query head of the GQA
group, plus its diagonal block and the first key block (so no query is left with nothing); causal and padding are
token rules.

Why blocks, not tokens: with 64 x 64 token pairs per block and a handful of buckets, almost every block holds some
same-bucket pair (the chance that none does is negligible), so a token-level bucket mask realised as the blocks
containing same-bucket pairs is dense, and the kernels take no explicit token mask to cut within a block.
Reformer's own route (sort tokens by bucket, attend in chunks) scrambles positions, so causality would need an
explicit mask too. Hashing summaries keeps the idea (attend where directions agree) at the granularity the kernels
skip. The rotations come from ``seed`` (the same for every layer and call: deterministic). Decode steps stay dense.
"""

from __future__ import annotations

import torch

from ...kernels.sparse import BlockLayout
from .base import SparsePattern, SparsePlan, allowed_blocks, block_means, check_int, diagonal_blocks, group_heads

__all__ = ["LSH", "lsh"]


class LSH(SparsePattern):
    dynamic = True

    def __init__(self, buckets: int, rounds: int, block: int, seed: int):
        self.buckets = check_int("buckets", buckets, minimum=2)
        if self.buckets % 2:
            raise ValueError(f"buckets must be even (angular LSH hashes to +-rotations), got {buckets}")
        self.rounds = check_int("rounds", rounds)
        self.seed = check_int("seed", seed, minimum=0)
        super().__init__(f"lsh_n{self.buckets}_r{self.rounds}_b{block}", block)
        self._rotations: dict = {}

    def rotations(self, dim: int, device) -> torch.Tensor:
        """[rounds, dim, buckets / 2] fp32, from the seed (cached per head dim and device)."""
        key = (dim, str(device))
        if key not in self._rotations:
            g = torch.Generator().manual_seed(self.seed)
            self._rotations[key] = torch.randn(self.rounds, dim, self.buckets // 2, generator=g).to(device)
        return self._rotations[key]

    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, D] -> buckets int64 [..., rounds, n]."""
        r = self.rotations(x.shape[-1], x.device)
        xr = torch.einsum("...nd,rdh->...rnh", torch.nn.functional.normalize(x, dim=-1), r)
        return torch.cat([xr, -xr], -1).argmax(-1)

    @torch.no_grad()
    def plan(self, q, k, *, causal, key_padding_mask=None, scale=None):
        Sq, Skv, b = q.shape[2], k.shape[2], self.block
        Hkv = k.shape[1]
        qm, _ = block_means(q, b)
        km, counts = block_means(k, b, key_padding_mask)
        hq = group_heads(self.hash(qm), Hkv)  # (B, Hkv, G, rounds, nq)
        hk = self.hash(km)                    # (B, Hkv, rounds, nk)
        same = (hq[..., :, None] == hk[:, :, None, :, None, :]).any(3).any(2)  # (B, Hkv, nq, nk)
        mask = (same & (counts > 0)[:, :, None, :]) | diagonal_blocks(Sq, Skv, b, b, q.device)
        mask[..., 0] = True
        mask = mask & allowed_blocks(Sq, Skv, b, b, causal, q.device)
        return SparsePlan(BlockLayout.from_block_mask(mask, b, b, Sq, Skv))


def lsh(buckets: int = 8, rounds: int = 2, *, block: int = 64, seed: int = 0) -> LSH:
    """Reformer-style LSH over block summaries: ``buckets`` buckets, ``rounds`` hash rounds (``lsh_n8_r2_b64``)."""
    return LSH(buckets, rounds, block, seed)


def main():  # pragma: no cover - a look at the pattern
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16)
    for n in (2, 8, 32):
        plan = lsh(n, 2, block=16).plan(q, k, causal=True)
        print(f"buckets={n}: density {plan.layout.density():.3f}")


if __name__ == "__main__":  # pragma: no cover
    main()
