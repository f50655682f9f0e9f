"""How a sequence is split over the ranks of a ring: the zigzag (load-balanced causal) and contiguous layouts.

A sequence of length ``S`` on ``W`` ranks:

* ``"zigzag"`` (the default): cut into ``2W`` equal chunks; rank ``r`` holds chunks ``r`` and ``2W - 1 - r``,
  in that order. Under a causal mask every rank then does the same work (its early chunk sees few keys, its
  late chunk many), which a contiguous split does not (the last rank would do ``2W - 1`` times the first's).
  Needs ``S % (2W) == 0``.
* ``"contiguous"``: rank ``r`` holds tokens ``[r S / W, (r + 1) S / W)``. Balanced for bidirectional attention,
  and the better split for a short sliding window (only neighbouring ranks share keys). Needs ``S % W == 0``.

A rank's tokens are a few **segments** of consecutive positions ``(start, length)``; attention masks are decided
per pair of segments from positions alone (:mod:`.reference`), so any layout works with causal, window and
padding rules. Positions are global token indices (``0 .. S - 1``), not the model's ``position_ids`` (those
may start later under left padding).
"""

from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "check_length", "segments", "shard_positions", "shard_tensor", "unshard_tensor"]

LAYOUTS = ("zigzag", "contiguous")


def _parts(layout: str, world: int) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    return 2 * world if layout == "zigzag" else world


def check_length(seq_len: int, world: int, layout: str = "zigzag") -> int:
    """The per-rank length ``seq_len / W``; a ValueError naming the fix when the layout cannot split it."""
    parts = _parts(layout, world)
    if seq_len % parts:
        pad = -seq_len % parts
        raise ValueError(
            f"a sequence of {seq_len} tokens cannot be split over {world} ranks in the {layout} layout: it needs a "
            f"multiple of {parts} ({'2 x world size' if layout == 'zigzag' else 'the world size'}). Pad it by {pad} "
            f"tokens (hfa.ring.prepare(input_ids, attention_mask=...) left-pads and masks them for you), or crop it.")
    return seq_len // world


def segments(seq_len: int, world: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The ``(start, length)`` runs of consecutive positions that rank ``rank`` holds, in its local order."""
    check_length(seq_len, world, layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if layout == "contiguous":
        n = seq_len // world
        return [(rank * n, n)]
    c = seq_len // (2 * world)
    return [(rank * c, c), ((2 * world - 1 - rank) * c, c)]


def shard_positions(seq_len: int, world: int, rank: int, layout: str = "zigzag", device=None) -> torch.Tensor:
    """The global positions ``[S / W]`` (int64) of rank ``rank``'s tokens, in local order."""
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in segments(seq_len, world, rank, layout)])


def shard_tensor(x: torch.Tensor, dim: int, world: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """Rank ``rank``'s part of ``x`` along ``dim`` (a new contiguous tensor)."""
    S = x.shape[dim]
    return torch.cat([x.narrow(dim, a, n) for a, n in segments(S, world, rank, layout)], dim=dim).contiguous()


def unshard_tensor(parts, dim: int, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor from every rank's part (``parts[r]`` from rank ``r``): the inverse of :func:`shard_tensor`."""
    world = len(parts)
    L = parts[0].shape[dim]
    S = L * world
    pieces = []
    for r, part in enumerate(parts):
        if part.shape[dim] != L:
            raise ValueError(f"rank {r}'s part has {part.shape[dim]} positions along dim {dim}, rank 0's {L}")
        off = 0
        for a, n in segments(S, world, r, layout):
            pieces.append((a, part.narrow(dim, off, n)))
            off += n
    pieces.sort(key=lambda t: t[0])
    return torch.cat([p for _, p in pieces], dim=dim)
