"""What a sparse pattern is: for one attention call, a block layout plus the token rules it cannot express.

A pattern is a named object (``hfa.sparse.streaming(sinks=4, window=1024).name == "streaming_s4_w1024"``) whose
:meth:`SparsePattern.plan` looks at one attention call (``q: [B, Hq, Sq, D]``, ``k: [B, Hkv, Skv, D]`` after
RoPE, the call's causal flag and key padding) and returns a :class:`SparsePlan`: the
:class:`~hf_efficient_attn.kernels.sparse.BlockLayout` the block-sparse kernels run, and the token rules on top
(``sink_tokens``, ``window``, and query rows computed densely). What a plan computes is the kernels' definition
(read ``kernels/sparse/reference.py``): for query ``i`` at position ``p = i + Skv - Sq`` (bottom-right aligned) and
key ``j``::

    allowed(i, j) = real(j) and (not causal or j <= p)
                    and ((block(j) in layout[block(i)] and in_window(p, j)) or j < sink_tokens or i < dense_query_rows)

Positions count from a sequence's first real token: :mod:`.apply` cuts each row's leading padding off before a
pattern sees it, so a left-padded row gets the same pattern as the row alone.

Two kinds (``pattern.dynamic``): static patterns are fixed by positions (exact equivalents of a 4-D mask; tested
against eager with that mask), dynamic ones are estimated per call from the queries and keys (training-free
approximations: what they skip is chosen by an estimate, and the density they reach depends on the input).

Adding a pattern: a file with a :class:`SparsePattern` subclass (``plan`` from the helpers below) and a factory
that names it, listed in ``__init__``; its tests in ``tests/attention/test_sparse_patterns.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...kernels.sparse import BlockLayout

__all__ = ["DECODE_MAX_Q_LEN", "SparsePattern", "SparsePlan", "allowed_blocks", "band_blocks", "block_means",
           "block_spans", "cdiv", "check_int", "diagonal_blocks", "full"]

DECODE_MAX_Q_LEN = 16  # a call with at most this many queries over a cache (kv_len > q_len) is a decode step


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming the option (patterns are built by users: say what is wrong)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """What one attention call computes under a pattern.

    layout: which KV blocks each query block reads (``[B|1, Hkv|1, n_q_blocks, max_k]``, one layout row per batch
    row and KV head: the query heads of a GQA group share it). sink_tokens: the first n keys, seen by every query
    (whatever the layout and the window). window: the layout's keys are limited to ``p - j < window``
    (``|p - j| < window`` when not causal); None = no limit. dense_query_rows: the first n queries attend every key
    the call allows (computed densely, then merged: Longformer's global queries in an encoder)."""

    layout: BlockLayout
    sink_tokens: int = 0
    window: int | None = None
    dense_query_rows: int = 0

    def block_mask(self, causal: bool) -> torch.Tensor:
        """bool ``[B|1, Hkv|1, n_q_blocks, n_kv_blocks]``: the blocks this plan computes (layout, sink blocks and
        the dense rows' blocks), within the blocks the call allows."""
        lay = self.layout
        blocks = lay.to_block_mask()
        nq, nk = lay.n_q_blocks, lay.n_kv_blocks
        dev = blocks.device
        blocks = blocks | (torch.arange(nk, device=dev) < cdiv(self.sink_tokens, lay.block_n))
        blocks = blocks | (torch.arange(nq, device=dev) < cdiv(self.dense_query_rows, lay.block_m))[:, None]
        return blocks & allowed_blocks(lay.q_len, lay.kv_len, lay.block_m, lay.block_n, causal, dev)


class SparsePattern:
    """A training-free sparse attention pattern (see the module docstring). Subclasses implement :meth:`plan`.

    name: what reports call it (``streaming_s4_w1024``). block: the query and KV block size of its layouts (the
    Triton kernels take powers of two in 16..128; any size runs on the reference). dynamic: estimated from q/k per
    call. decode: also applies to decode calls (at most ``DECODE_MAX_Q_LEN`` queries over a cache); otherwise those
    stay dense. approximate: False only for the all-blocks control :func:`full`."""

    dynamic: bool = False
    decode: bool = False
    approximate: bool = True

    def __init__(self, name: str, block: int):
        self.name = name
        self.block = check_int("block", block)

    def unsupported_reason(self, *, causal: bool) -> str | None:
        """None when the pattern is defined for such a call, else why not (e.g. a causal-only estimate)."""
        return None

    def plan(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool, key_padding_mask: torch.Tensor | None = None,
             scale: float | None = None) -> SparsePlan:
        """The plan for one call. q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D] (after RoPE), key_padding_mask: [B, Skv]
        bool (True = real key) or None, scale: the softmax scale (None = 1/sqrt(D))."""
        raise NotImplementedError

    def __repr__(self):
        return f"hfa.sparse.{self.name}"


class StaticPattern(SparsePattern):
    """A pattern fixed by positions: one block mask per call shape, cached (30 layers share one layout)."""

    _CACHE_SIZE = 8

    def __init__(self, name: str, block: int):
        super().__init__(name, block)
        self._layouts: dict = {}

    def block_mask(self, q_len: int, kv_len: int, causal: bool, device) -> torch.Tensor:
        """bool [n_q_blocks, n_kv_blocks]: the blocks the pattern reads."""
        raise NotImplementedError

    def layout(self, q_len: int, kv_len: int, causal: bool, device) -> BlockLayout:
        key = (q_len, kv_len, causal, str(device))
        if key not in self._layouts:
            if len(self._layouts) >= self._CACHE_SIZE:
                self._layouts.pop(next(iter(self._layouts)))
            b = self.block
            mask = self.block_mask(q_len, kv_len, causal, device) & allowed_blocks(q_len, kv_len, b, b, causal,
                                                                                   device)
            self._layouts[key] = BlockLayout.from_block_mask(mask[None, None], b, b, q_len, kv_len)
        return self._layouts[key]


# ----------------------------------------------------------------------------------------------
# block geometry (bottom-right aligned: query index i sits at position i + kv_len - q_len)
# ----------------------------------------------------------------------------------------------

def block_spans(q_len: int, kv_len: int, block_m: int, block_n: int, device):
    """(first, last) position of each query block's queries ([n_q_blocks] each) and (first, last) index of each key
    block's keys ([n_kv_blocks] each), int64."""
    off = kv_len - q_len
    qf = torch.arange(cdiv(q_len, block_m), device=device) * block_m
    kf = torch.arange(cdiv(kv_len, block_n), device=device) * block_n
    return qf + off, (qf + block_m - 1).clamp_max(q_len - 1) + off, kf, (kf + block_n - 1).clamp_max(kv_len - 1)


def band_blocks(q_len: int, kv_len: int, block_m: int, block_n: int, lo: int, hi: int, device) -> torch.Tensor:
    """bool [n_q_blocks, n_kv_blocks]: blocks holding at least one pair with ``lo <= p - j <= hi``."""
    pf, pl, kf, kl = block_spans(q_len, kv_len, block_m, block_n, device)
    return (pf[:, None] - kl[None, :] <= hi) & (pl[:, None] - kf[None, :] >= lo)


def allowed_blocks(q_len, kv_len, block_m, block_n, causal: bool, device) -> torch.Tensor:
    """bool [n_q_blocks, n_kv_blocks]: the blocks a call may compute at all (causal: holding a pair ``j <= p``)."""
    if causal:
        return band_blocks(q_len, kv_len, block_m, block_n, 0, kv_len + q_len, device)
    return torch.ones(cdiv(q_len, block_m), cdiv(kv_len, block_n), dtype=torch.bool, device=device)


def window_blocks(q_len, kv_len, block_m, block_n, window: int | None, causal: bool, device) -> torch.Tensor:
    """bool [n_q_blocks, n_kv_blocks]: blocks holding a pair within the window (``p - j < window``; both sides
    when not causal) that the call allows."""
    if window is None:
        return allowed_blocks(q_len, kv_len, block_m, block_n, causal, device)
    return band_blocks(q_len, kv_len, block_m, block_n, 0 if causal else 1 - window, window - 1, device)


def diagonal_blocks(q_len, kv_len, block_m, block_n, device) -> torch.Tensor:
    """bool [n_q_blocks, n_kv_blocks]: blocks holding some query's own position (``p == j``): the local blocks
    every dynamic pattern keeps, so that no query is left with nothing to attend."""
    return band_blocks(q_len, kv_len, block_m, block_n, 0, 0, device)


def block_means(x: torch.Tensor, block: int, real: torch.Tensor | None = None):
    """Mean of each block's (real) tokens: x [B, H, S, D] -> (means [B, H, ceil(S / block), D] fp32,
    counts [B, 1, ceil(S / block)] of the real tokens averaged). real: [B, S] bool or None (all real)."""
    B, H, S, D = x.shape
    n = cdiv(S, block)
    w = torch.ones(B, S, dtype=torch.float32, device=x.device) if real is None else real.to(x.device).float()
    w = torch.nn.functional.pad(w, (0, n * block - S)).view(B, 1, n, block)
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - S)).view(B, H, n, block, D)
    counts = w.sum(-1)
    means = (xs * w[..., None]).sum(-2) / counts.clamp_min(1)[..., None]
    return means, counts


def group_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, G, ...]: the query heads of each KV head's GQA group."""
    return x.view(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# the control: every block
# ----------------------------------------------------------------------------------------------

class Full(StaticPattern):
    """Every block the call allows: the sparse machinery at density 1, equal to dense attention (a control for
    reports and tests; not an approximation)."""

    decode = True
    approximate = False

    def block_mask(self, q_len, kv_len, causal, device):
        return allowed_blocks(q_len, kv_len, self.block, self.block, causal, device)

    def plan(self, q, k, *, causal, key_padding_mask=None, scale=None):
        return SparsePlan(self.layout(q.shape[2], k.shape[2], causal, q.device))


def full(*, block: int = 64) -> Full:
    """The all-blocks control: ``full_b64``. Runs the block-sparse path and equals dense attention."""
    return Full(f"full_b{block}", block)
