"""Longformer (Beltagy et al., 2020): a sliding window plus global tokens, both directions in an encoder.

The first ``global_tokens`` tokens of a sequence are global: every query sees them, and (in an encoder) they see
every key. Every other pair is local: keys within ``window`` positions (``|p - j| < window`` in an encoder,
``p - j < window`` in a decoder; counting the query itself)::

    allowed(i, j) = causal(i, j) and (j < global_tokens or |p - j| < window or i < global_tokens)

How it runs: the window and the global keys are the kernels' token rules (the window band's blocks plus
``sink_tokens``). The kernels cannot give single query rows every block (a layout row serves a whole query block,
and the window cuts all its keys), so **global query rows are computed densely and merged**: the first
``global_tokens`` rows of the output are dense attention over every key the call allows. In a decoder they need no
such step: a query ``i < global_tokens`` can only see keys ``j <= i``, all of them global. A causal Longformer is
therefore :func:`~.streaming.streaming` with ``sinks = global_tokens``. Token-exact; applies to decode steps too.
"""

from __future__ import annotations

from .base import SparsePlan, StaticPattern, check_int, window_blocks

__all__ = ["Longformer", "longformer"]


class Longformer(StaticPattern):
    decode = True

    def __init__(self, window: int, global_tokens: int, block: int):
        self.window = check_int("window", window)
        self.global_tokens = check_int("global_tokens", global_tokens, minimum=0)
        super().__init__(f"longformer_w{self.window}_g{self.global_tokens}", block)

    def block_mask(self, q_len, kv_len, causal, device):
        return window_blocks(q_len, kv_len, self.block, self.block, self.window, causal, device)

    def plan(self, q, k, *, causal, key_padding_mask=None, scale=None):
        g = self.global_tokens
        # global query rows: only an encoder's; a decoder's already see all they may (global keys j <= i < g)
        return SparsePlan(self.layout(q.shape[2], k.shape[2], causal, q.device), sink_tokens=g, window=self.window,
                          dense_query_rows=0 if causal else g)


def longformer(window: int = 512, global_tokens: int = 1, *, block: int = 64) -> Longformer:
    """Local window plus global tokens (Longformer), e.g. ``longformer(512, 1).name == "longformer_w512_g1"``.

    window: keys with ``|p - j| < window`` (one side, counting the query; Longformer's "w" is ``2 * window - 1``);
    global_tokens: the first n tokens (e.g. [CLS]) see and are seen by every token; block: layout block size (speed
    only: token-exact)."""
    return Longformer(window, global_tokens, block)


def main():  # pragma: no cover - a look at the pattern
    import torch
    p = longformer(3, 2, block=4)
    q = torch.zeros(1, 1, 12, 8)
    plan = p.plan(q, q, causal=False)
    m = plan.layout.dense_mask(window=plan.window, sink_tokens=plan.sink_tokens)[0, 0]
    m[:plan.dense_query_rows] = True
    print(p.name, "(encoder)")
    print(m.int())


if __name__ == "__main__":  # pragma: no cover
    main()
