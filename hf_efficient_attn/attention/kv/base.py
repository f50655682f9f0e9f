"""What a KV-cache policy is, and the cache layer that carries it in the model's own ``DynamicCache``.

A policy decides, per layer, which cached tokens an attention call reads and which ones the cache keeps. The
cache layer (:class:`PolicyCacheLayer`, a ``DynamicLayer``) stores per slot the key and value **as the model
cached them** (after RoPE, at the token's own position), the token's position in its row (``pos``, counted over
the real tokens of the row: the position transformers gives it) and whether the slot is a real token (``valid``;
left padding is not). Slots stay in position order in every (row, KV head), so a policy that keeps different
tokens per KV head (SnapKV) still yields rectangular tensors: rows keep the same number of slots and pad the
shorter ones with invalid slots.

``get_seq_length`` is the number of *columns* seen (what ``generate`` counts positions and masks by), not the
number of slots kept, so masks, ``cache_position`` and ``position_ids`` are those of the full sequence; the
policy's attention (:mod:`.apply`) reads validity and positions from the slots instead of the 4-D mask.

The order of one call: ``update`` appends the new keys/values (slot metadata pending), the attention function
fills in the new slots' positions from the call's padding mask, computes the policy's attention and then lets
the policy evict (``keep``). A layer updated but never attended by our function would keep growing unseen: the
model's forward hook checks that every updated layer was settled and raises otherwise.
"""

from __future__ import annotations

import torch
import transformers  # noqa: F401  (without transformers: the ModuleNotFoundError the package expects)
from transformers.cache_utils import DynamicLayer

GROW_SLOTS = 256  # spare slots a policy layer's buffers get when they grow (see PolicyCacheLayer._append)

__all__ = ["KVPolicy", "PolicyCacheLayer", "check_int"]


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class KVPolicy:
    """A training-free KV-cache policy (subclasses: :mod:`.streaming`, :mod:`.snapkv`, :mod:`.quest`).

    name: what reports call it (``streaming_s4_w1024``). bounded: the cache stays below a fixed size however long
    the sequence (``max_tokens`` slots). approximate: True for every policy but an exact control. needs_rope: the
    policy re-rotates cached keys (:mod:`.rope`), so the model must have a RoPE it can shift."""

    approximate = True
    bounded = False
    needs_rope = False

    def __init__(self, name: str):
        self.name = name

    # --- one attention call: which slots each query may read (on top of causal + valid) -------------------
    def visible(self, layer: "PolicyCacheLayer", q_pos: torch.Tensor) -> torch.Tensor | None:
        """Extra visibility ``[B, Hkv, Sq, T]`` bool for the queries at positions ``q_pos`` [B, Sq] over the
        layer's slots, or None (every causal, valid slot)."""
        return None

    def after_attention(self, layer: "PolicyCacheLayer", q: torch.Tensor, q_pos: torch.Tensor, q_valid, scale):
        """Evict what the policy drops (``layer.keep``) once the call's attention is computed."""

    def max_tokens(self) -> int | None:
        """The most slots a bounded policy's cache holds between calls (None: unbounded)."""
        return None

    def __repr__(self):
        return f"hfa.kv.{self.name}"


class PolicyCacheLayer(DynamicLayer):
    """One layer's cache under a policy (see the module docstring). keys/values ``[B, Hkv, T, D]``; pos/valid
    ``[B, Hkv, T]`` (int64 / bool); ``seen``: columns fed so far; ``real``: real tokens per row ``[B]``."""

    is_croppable = False

    def __init__(self, policy: KVPolicy, layer_idx: int):
        super().__init__()
        self.policy, self.layer_idx = policy, layer_idx
        self.pos = self.valid = self.real = None
        self.seen = 0
        self.evicted = 0          # slots dropped so far (crop refuses once this is > 0)
        self.pending = 0          # new slots whose positions the attention call has not filled in yet
        self.extra: dict = {}     # the policy's own per-layer state (Quest's page bounds, SnapKV's queries)
        self._buffers_: dict = {}  # name -> the buffer whose prefix the attribute views (see _append)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H = key_states.shape[:2]
        self.pos = torch.empty(B, H, 0, dtype=torch.long, device=self.device)
        self.valid = torch.empty(B, H, 0, dtype=torch.bool, device=self.device)
        self.real = torch.zeros(B, dtype=torch.long, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending:
            raise RuntimeError(
                f"KV policy {self.policy.name}: layer {self.layer_idx} was updated twice without an attention call "
                f"through hf_efficient_attn in between; this layer's attention does not go through transformers' "
                f"attention registry, so the policy cannot run on it. hfa.unpatch(model) restores the full cache.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._append("keys", self.keys, key_states, -2)
        self.values = self._append("values", self.values, value_states, -2)
        self.pending = key_states.shape[-2]
        self.seen += self.pending
        return self.keys, self.values

    def _append(self, name: str, cur: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
        """``cat([cur, new], dim)`` in amortised O(new): ``cur`` is kept as a prefix view of a buffer with room
        for GROW_SLOTS more slots (torch.cat copies the whole cache every decode step: at 16k tokens on a CPU
        that copy cost more than the attention Quest saves). Any other tensor in ``cur`` (evicted, reordered,
        offloaded) or a call under autograd starts over from a plain cat. The buffer is reachable from the layer,
        so ``kv_cache_bytes`` counts its spare slots too (at most GROW_SLOTS per layer)."""
        if torch.is_grad_enabled() and (new.requires_grad or cur.requires_grad):
            self._buffers_.pop(name, None)
            return torch.cat([cur, new], dim=dim)
        if cur.dim() != new.dim():     # transformers starts a layer at torch.tensor([]), which cat skips
            cur = new.narrow(dim, 0, 0)
        dim = dim % cur.dim()
        T, S = cur.shape[dim], new.shape[dim]
        buf = self._buffers_.get(name)
        fits = (buf is not None and buf.data_ptr() == cur.data_ptr() and buf.dtype == cur.dtype
                and buf.device == cur.device and buf.shape[dim] >= T + S
                and buf.shape[:dim] == cur.shape[:dim] and buf.shape[dim + 1:] == cur.shape[dim + 1:])
        if not fits:
            shape = list(cur.shape)
            shape[dim] = T + S + GROW_SLOTS
            buf = cur.new_empty(shape)
            buf.narrow(dim, 0, T).copy_(cur)
            self._buffers_[name] = buf
        buf.narrow(dim, T, S).copy_(new)
        return buf.narrow(dim, 0, T + S)

    # --- what the attention function does -------------------------------------------------------------
    def settle_positions(self, new_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[B, S]`` and validity ``[B, S]`` of the pending slots (S = the call's queries), appended to
        the slot metadata. ``new_valid`` [B, S] bool from the call's padding mask (None = all real)."""
        B, H, S = self.keys.shape[0], self.keys.shape[1], self.pending
        if new_valid is None:
            new_valid = torch.ones(B, S, dtype=torch.bool, device=self.device)
        new_valid = new_valid.to(self.device, torch.bool)
        count = torch.cumsum(new_valid.long(), dim=1)
        pos = self.real[:, None] + count - 1  # a pad takes its predecessor's position: slots stay sorted
        self.real = self.real + count[:, -1]
        self.pos = self._append("pos", self.pos, pos[:, None].expand(B, H, S), -1)
        self.valid = self._append("valid", self.valid, new_valid[:, None].expand(B, H, S), -1)
        self.pending = 0
        return pos, new_valid

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the slots where ``keep`` [B, Hkv, T] is True (order preserved); rows keep the same number of
        slots, the shorter ones padded with invalid slots."""
        keep = keep & self.valid
        n = int(keep.sum(-1).max()) if keep.numel() else 0
        T = keep.shape[-1]
        if n == T and bool(keep.all()):
            return
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :n]  # kept first, in order
        self.evicted += T - n
        self._buffers_ = {}  # the gathered tensors below are new: drop the old buffers now, not at the next append
        gather4 = order[..., None].expand(*order.shape, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather4)
        self.values = self.values.gather(2, order[..., None].expand(*order.shape, self.values.shape[-1]))
        self.valid = keep.gather(2, order)
        self.pos = self.pos.gather(2, order)
        self.on_reindex(order)

    def on_reindex(self, order: torch.Tensor) -> None:
        """Slots were gathered by ``order`` [B, Hkv, T']: per-slot policy state follows (none here)."""

    # --- what transformers asks ----------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # the mask spans every column; the policy reads slots itself

    def get_max_length(self) -> int:
        return -1

    def slots(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.pos = self.valid = self.real = None
        self.seen = self.evicted = self.pending = 0
        self.extra = {}
        self._buffers_ = {}

    def crop(self, tokens_to_remove: int) -> None:
        if self.evicted:
            raise ValueError(
                f"KV policy {self.policy.name} already evicted {self.evicted} cached tokens of layer "
                f"{self.layer_idx}; the cache cannot be cropped back (assisted/speculative decoding and "
                f"DoLa need a full cache: hfa.unpatch(model) first)")
        if tokens_to_remove > 0:
            tokens_to_remove = self.seen - tokens_to_remove
        n = abs(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        real_removed = self.valid[:, 0, -n:].sum(-1)
        self._buffers_ = {}  # the next append copies: nothing that viewed the cropped slots sees them rewritten
        super().crop(-n)
        self.pos, self.valid = self.pos[..., :-n], self.valid[..., :-n]
        self.real = self.real - real_removed
        self.seen -= n
        self.extra = {}

    def _rows(self, fn) -> None:
        if self.is_initialized and self.keys.numel():
            self._buffers_ = {}  # the rows below are new tensors: let the old buffers go now
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.pos, self.valid, self.real = fn(self.pos), fn(self.valid), fn(self.real)
            self.extra = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self):
        raise ValueError(f"KV policy {self.policy.name}: cache offloading is not supported with a policy")

    def __repr__(self):
        return f"PolicyCacheLayer({self.policy.name}, slots={self.slots()}, seen={self.seen})"
