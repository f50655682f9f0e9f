"""StreamingLLM (Xiao et al., 2023): a few attention-sink tokens plus a local window.

Every query sees the first ``sinks`` tokens of its sequence and the keys within ``window`` positions of itself
(``p - j < window``, counting itself; both sides in an encoder)::

    allowed(p, j) = causal(p, j) and (j < sinks or p - j < window)

Token-exact: the window and the sinks are the kernels' own token rules, the layout is the blocks the window band
crosses. The rule means the same at every position, so it also applies to decode steps (a generated token sees the
sinks and its window, as in StreamingLLM; evicting the rest of the cache is ``hfa.kv.streaming``'s job).
"""

from __future__ import annotations

from .base import SparsePlan, StaticPattern, check_int, window_blocks

__all__ = ["Streaming", "streaming"]


class Streaming(StaticPattern):
    decode = True

    def __init__(self, sinks: int, window: int, block: int):
        self.sinks = check_int("sinks", sinks, minimum=0)
        self.window = check_int("window", window)
        super().__init__(f"streaming_s{self.sinks}_w{self.window}", block)

    def block_mask(self, q_len, kv_len, causal, device):
        return window_blocks(q_len, kv_len, self.block, self.block, self.window, causal, device)

    def plan(self, q, k, *, causal, key_padding_mask=None, scale=None):
        return SparsePlan(self.layout(q.shape[2], k.shape[2], causal, q.device), sink_tokens=self.sinks,
                          window=self.window)


def streaming(sinks: int = 4, window: int = 1024, *, block: int = 64) -> Streaming:
    """Attention sinks plus a sliding window (StreamingLLM), e.g. ``streaming(4, 1024).name == "streaming_s4_w1024"``.

    sinks: the first tokens every query sees; window: keys with ``p - j < window`` (counting the query itself);
    block: the layout's block size (speed only: the pattern is token-exact at any block size)."""
    return Streaming(sinks, window, block)


def main():  # pragma: no cover - a look at the pattern
    import torch
    p = streaming(2, 4, block=4)
    q = torch.zeros(1, 1, 16, 8)
    plan = p.plan(q, q, causal=True)
    print(p.name, "density", round(plan.layout.density(sink_tokens=plan.sink_tokens), 3))
    print(plan.layout.dense_mask(causal=True, window=plan.window, sink_tokens=plan.sink_tokens)[0, 0].int())


if __name__ == "__main__":  # pragma: no cover
    main()
