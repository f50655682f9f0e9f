"""``hfa.kv.streaming(sinks, window)``: StreamingLLM's cache — the first ``sinks`` tokens and the last ``window``.

Each query reads the ``sinks`` first tokens of its row plus the ``window`` most recent ones (itself included);
between calls the cache keeps the sinks and the last ``window - 1`` tokens, so its size is constant however long
the generation (``sinks + window - 1`` slots per layer and KV head).

Positions, ``positions="cache"`` (the default, the StreamingLLM rule): a token is placed by its slot in the
cache, not by its place in the text. Window tokens are contiguous and end at the query, so their distances
are the true ones; only the sinks move: to the slots just before the window's oldest token. We do this by an
exactly equivalent re-rotation (:mod:`.rope`): keys stay cached after RoPE at their own positions and, for a
query at position t past ``sinks + window - 1``, the sinks are rotated by ``t - (sinks + window - 1)``, so
every query sees a sink at distance ``sinks + window - 1 - i`` — as if it had been cached before RoPE and
rotated by its slot. Distances therefore never exceed ``sinks + window``: generation runs past the model's
own context window. ``positions="original"`` keeps every key at its text position (no shift; for models
without RoPE, and for comparison).

The rule is per query, so a prefill of any length, a chunked prefill and token-by-token decoding compute the
same thing: one forward pass over a text scores each token with exactly the cache the policy left after the
previous one (the StreamingLLM evaluation). While a row is shorter than ``sinks + window`` nothing is dropped
or moved: the policy equals dense attention there.
"""

from __future__ import annotations

import torch

from .base import KVPolicy, check_int

__all__ = ["Streaming", "streaming"]


class Streaming(KVPolicy):
    bounded = True

    def __init__(self, sinks: int, window: int, positions: str):
        if positions not in ("cache", "original"):
            raise ValueError(f"positions must be 'cache' (StreamingLLM: keys placed by their cache slot) or "
                             f"'original' (text positions), got {positions!r}")
        self.sinks, self.window, self.positions = check_int("sinks", sinks, 0), check_int("window", window), positions
        super().__init__(f"streaming_s{sinks}_w{window}" + ("" if positions == "cache" else "_orig"))
        self.needs_rope = positions == "cache" and sinks > 0

    def max_tokens(self) -> int:
        return self.sinks + self.window - 1

    def attention(self, layer, q, q_pos, scale, *, shift, exact_ok, device_backend):
        from .apply import slot_attention
        s, W = self.sinks, self.window
        keys, values, pos, valid = layer.keys, layer.values, layer.pos, layer.valid
        B, H, T = pos.shape
        qv = q_pos  # [B, S]

        def visible(lo, hi, s0, s1):
            p = pos[:, :, None, lo:hi]
            return (p >= s) & (p > qv[:, None, s0:s1, None] - W)

        extra = None
        if s:
            first = torch.searchsorted(pos.reshape(B * H, T).contiguous(),
                                       torch.zeros(B * H, 1, dtype=pos.dtype, device=pos.device))
            idx = (first.view(B, H, 1) + torch.arange(s, device=pos.device)).clamp_max(T - 1)
            sink_pos = pos.gather(2, idx)
            sink_ok = valid.gather(2, idx) & (sink_pos < s)
            sink_k = keys.gather(2, idx[..., None].expand(B, H, s, keys.shape[-1]))
            sink_v = values.gather(2, idx[..., None].expand(B, H, s, values.shape[-1]))
            delta = (qv - (s + W - 1)).clamp_min(0)                                  # [B, S]
            moved = self.positions == "cache" and bool((delta > 0).any())

            def extra(s0, s1):
                ok = sink_ok[:, :, None, :] & (sink_pos[:, :, None, :] <= qv[:, None, s0:s1, None])
                if moved:
                    k = shift.rotate(sink_k[:, :, None].expand(B, H, s1 - s0, s, sink_k.shape[-1]),
                                     delta[:, None, s0:s1, None])
                else:
                    k = sink_k[:, :, None].expand(B, H, s1 - s0, s, sink_k.shape[-1])
                return k, sink_v, ok

        # per block of queries, only the slots its windows reach (slots are in position order per row and head)
        flat = pos.reshape(B * H, T).contiguous()

        def key_range(s0, s1):
            qb = qv[:, s0:s1]
            first = (qb.min(dim=1).values - W + 1).clamp_min(0).repeat_interleave(H)[:, None]
            newest = qb.max(dim=1).values.repeat_interleave(H)[:, None]
            lo = int(torch.searchsorted(flat, first).min())
            hi = int(torch.searchsorted(flat, newest, right=True).max())
            return min(lo, hi), hi

        rows = max(1, min(q.shape[2], (1 << 23) // max(1, B * q.shape[1] * (W + s + 256)), 256))
        out = slot_attention(q, keys, values, pos, valid, qv, scale, visible=visible, extra=extra,
                             key_range=key_range, rows=rows)
        return out, min(T, W + s)

    def after_attention(self, layer, q, q_pos, q_valid, scale):
        last = (layer.real - 1)[:, None, None]                  # each row's newest position
        layer.keep((layer.pos < self.sinks) | (layer.pos >= last - self.window + 2))


def streaming(sinks: int = 4, window: int = 1024, *, positions: str = "cache") -> Streaming:
    """StreamingLLM: keep ``sinks`` first tokens and the last ``window`` (see the module docstring)."""
    return Streaming(sinks, window, positions)
