"""How a KV policy runs: the cache layers it puts in the model's ``DynamicCache``, and one attention call.

``attach(model, policy)`` (what ``hfa.patch(model, kv=...)`` does) hooks the model's decoder:

* before each forward pass, the cache it is given (``generate``'s, the user's) gets a :class:`PolicyCacheLayer`
  in place of each empty full-attention ``DynamicLayer`` (sliding-window layers keep the model's own bounded
  cache); a forward pass that would create its own cache (``use_cache`` on, no cache given) gets a fresh
  ``DynamicCache(config=...)`` so that it too starts under the policy. A cache already filled without the
  policy is refused (its padding and positions are unknown);
* after it, every policy layer must have been attended through our attention function (else its layer bypasses
  the registry, and the forward raises instead of leaving a cache that grows unseen).

One attention call on a policy layer (:meth:`KVLayer.attend`): the new slots get their positions from the call's
padding mask; the policy either leaves the call to the exact dense path (a prefill over a cache that holds every
column: SnapKV and Quest prefill exactly) or computes softmax attention over the slots it allows (causal by
position, valid slots only, plus the policy's own rule and extra per-query keys: StreamingLLM's shifted sinks),
chunked over queries with bounded memory; then it evicts. With ``use_cache=False`` the call runs the policy's
rule on its own keys (a fresh layer per call), so a plain forward pass scores what the policy computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers  # noqa: F401  (without transformers: the ModuleNotFoundError the package expects)
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..backends import use_triton
from ..families import layer_window
from ..model_io import CACHE_NAMES
from .base import KVPolicy, PolicyCacheLayer

__all__ = ["KVLayer", "KVState", "attach", "detach", "kv_layer", "policy_layer_ids", "policy_of", "read_fraction",
           "slot_attention", "state_of"]

_LAYER_ATTR = "_hfa_kv_layer"
_STATE_ATTR = "_hfa_kv_state"
_SCORE_ELEMENTS = 1 << 23   # score entries computed at once (bounded memory at any length)


@dataclass
class KVState:
    """The model's policy, its RoPE shifts (when the policy moves keys) and what the last forward pass read."""

    policy: KVPolicy
    shifts: list | None = None
    cache: object = None                 # the cache of the forward pass in progress (None: no cache)
    hooks: list = field(default_factory=list)
    reads: dict = field(default_factory=dict)   # layer idx -> (slots read per query, slots held), last call


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def policy_layer_ids(config) -> list[int]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return [i for i in range(text.num_hidden_layers) if layer_window(text, i) is None]


def _install(state: KVState, cache, config) -> None:
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"KV policy {state.policy.name} runs on transformers' DynamicCache (what generate and a "
                         f"plain forward create); got a {type(cache).__name__}. Pass no cache, or a DynamicCache.")
    for i in policy_layer_ids(config):
        while len(cache.layers) <= i:
            cache.layers.append(DynamicLayer())
        layer = cache.layers[i]
        if isinstance(layer, PolicyCacheLayer):
            if layer.policy is not state.policy:
                raise ValueError(f"this cache was filled under KV policy {layer.policy.name}, the model now runs "
                                 f"{state.policy.name}: start a new cache")
            continue
        if type(layer) is not DynamicLayer:
            continue  # a layer kind the policy does not take over (sliding window, linear, ...)
        if layer.is_initialized and layer.get_seq_length() > 0:
            raise ValueError(f"KV policy {state.policy.name}: the cache passed in already holds "
                             f"{layer.get_seq_length()} tokens filled without the policy; start generation from an "
                             f"empty cache (or none) after hfa.patch(model, kv=...)")
        cache.layers[i] = PolicyCacheLayer(state.policy, i)


def _before(model, state: KVState):
    def hook(module, args, kwargs):
        name = next((n for n in CACHE_NAMES if n in kwargs and n != "cache_params"), None)
        cache = kwargs.get(name) if name else None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and use_cache and not (module.training and getattr(module, "gradient_checkpointing",
                                                                             False)):
            from ..model_io import cache_kwarg
            cache = DynamicCache(config=module.config)
            kwargs[name or cache_kwarg(module)] = cache
        if cache is not None:
            _install(state, cache, module.config)
        state.cache = cache
        return args, kwargs
    return hook


def _after(state: KVState):
    def hook(module, args, kwargs, output):
        cache, state.cache = state.cache, None
        if cache is None:
            return output
        stuck = [layer.layer_idx for layer in cache.layers if isinstance(layer, PolicyCacheLayer) and layer.pending]
        if stuck:
            for i in stuck:
                cache.layers[i].pending = 0
            raise RuntimeError(
                f"KV policy {state.policy.name}: layers {stuck} were cached but never attended through "
                f"hf_efficient_attn's attention function (the model's attention implementation is not ours, or "
                f"these layers bypass the registry); their cache would grow without the policy. "
                f"Use hfa.patch(model, kv=...) without changing attn_implementation, or hfa.unpatch(model).")
        return output
    return hook


def attach(model, policy: KVPolicy, shifts=None) -> None:
    """Give ``model`` the policy (replacing an earlier one): cache hooks on its decoder, a :class:`KVLayer` on
    each attention module."""
    detach(model)
    state = KVState(policy, shifts)
    dec = _decoder(model)
    state.hooks = [dec.register_forward_pre_hook(_before(model, state), with_kwargs=True),
                   dec.register_forward_hook(_after(state), with_kwargs=True, always_call=True)]
    model.__dict__[_STATE_ATTR] = state
    for m in model.modules():
        if hasattr(m, "layer_idx"):
            m.__dict__[_LAYER_ATTR] = KVLayer(state)


def detach(model) -> None:
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is not None:
        for h in state.hooks:
            h.remove()
    for m in model.modules():
        m.__dict__.pop(_LAYER_ATTR, None)


def kv_layer(module) -> "KVLayer | None":
    return module.__dict__.get(_LAYER_ATTR)


def state_of(model) -> KVState | None:
    return model.__dict__.get(_STATE_ATTR)


def policy_of(model) -> KVPolicy | None:
    """The policy ``hfa.patch(model, kv=...)`` applied, or None (the full cache)."""
    state = model.__dict__.get(_STATE_ATTR)
    return None if state is None else state.policy


def read_fraction(model) -> float:
    """Mean over policy layers of (cached tokens a query read) / (tokens the cache held) in the last attention call
    of each layer: Quest's bandwidth saving, 1.0 for policies that read all they keep. ValueError before any call."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("the model has no KV policy (hfa.patch(model, kv=...))")
    if not state.reads:
        raise ValueError("no attention call has run under the KV policy yet")
    return sum(r / max(h, 1) for r, h in state.reads.values()) / len(state.reads)


# ---------------------------------------------------------------------------------------------------------
# one call
# ---------------------------------------------------------------------------------------------------------

def slot_attention(q, keys, values, pos, valid, q_pos, scale, *, visible=None, extra=None, key_range=None,
                   rows=None):
    """Softmax attention of q [B, Hq, S, D] (positions q_pos [B, S]) over the slots of keys/values
    [B, Hkv, T, D|Dv] with pos/valid [B, Hkv, T]: causal by position, valid slots only. Optional, per block of
    query rows s0:s1: ``key_range(s0, s1)`` -> (lo, hi), the only slots those rows can see (default all);
    ``visible(lo, hi, s0, s1)`` an extra [B, Hkv, s1 - s0, hi - lo] bool rule; ``extra(s0, s1)`` -> (k [B, Hkv, s,
    n, D], v [B, Hkv, n, Dv], allowed [B, Hkv, s, n]) per-query keys. rows: query rows per block (default: as
    many as keep the scores near 8M entries). Computed in fp32; a query that sees nothing gets 0.
    Returns out [B, Hq, S, Dv] in q.dtype."""
    B, Hq, S, D = q.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    if rows is None:
        rows = max(1, _SCORE_ELEMENTS // max(1, B * Hq * (T + 4)))
    qg = q.float().view(B, Hkv, G, S, D)
    outs = []
    for s0 in range(0, S, rows):
        s1 = min(S, s0 + rows)
        lo, hi = (0, T) if key_range is None else key_range(s0, s1)
        k, v = keys[:, :, lo:hi].float(), values[:, :, lo:hi].float()
        allowed = valid[:, :, None, lo:hi] & (pos[:, :, None, lo:hi] <= q_pos[:, None, s0:s1, None])  # [B,Hkv,s,T']
        if visible is not None:
            allowed = allowed & visible(lo, hi, s0, s1)
        sc = torch.einsum("bhgsd,bhtd->bhgst", qg[:, :, :, s0:s1], k) * scale
        sc = sc.masked_fill(~allowed[:, :, None], float("-inf"))
        if extra is not None:
            ek, ev, eok = extra(s0, s1)
            se = torch.einsum("bhgsd,bhsnd->bhgsn", qg[:, :, :, s0:s1], ek.float()) * scale
            se = se.masked_fill(~eok[:, :, None], float("-inf"))
            p = torch.softmax(torch.cat([sc, se], dim=-1), dim=-1).nan_to_num(0.0)
            n = se.shape[-1]
            o = p[..., :-n] @ v[:, :, None] + torch.einsum("bhgsn,bhnd->bhgsd", p[..., -n:], ev.float())
        else:
            p = torch.softmax(sc, dim=-1).nan_to_num(0.0)
            o = p @ v[:, :, None]
        outs.append(o)
    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    return out.reshape(B, Hq, S, -1).to(q.dtype)


def _refusal(module, attention_mask, opts_kwargs, dropout) -> str | None:
    from ..registry import HFAMask  # (the registry imports this module)
    if isinstance(attention_mask, HFAMask):
        if not attention_mask.structured:
            return "an explicit attention mask (packed sequences, a static cache, or a mask the layer rewrote)"
        if not attention_mask.causal:
            return "bidirectional attention (an encoder); KV policies serve causal decoders"
    elif attention_mask is not None:
        return "a mask the layer built itself rather than transformers' mask function"
    if opts_kwargs.get("softcap"):
        return "a logit softcap"
    if opts_kwargs.get("s_aux") is not None or opts_kwargs.get("sinks") is not None:
        return "attention-sink logits (s_aux / sinks)"
    if opts_kwargs.get("position_bias") is not None:
        return "a position bias"
    if dropout:
        return "attention dropout (training)"
    return None


class KVLayer:
    """What an attention module of a policy-patched model carries (the model's :class:`KVState`)."""

    def __init__(self, state: KVState):
        self.state = state

    def cache_layer(self, module, key) -> PolicyCacheLayer | None:
        cache = self.state.cache
        idx = getattr(module, "layer_idx", None)
        if cache is None or idx is None or idx >= len(cache.layers):
            return None
        layer = cache.layers[idx]
        if not isinstance(layer, PolicyCacheLayer):
            return None
        if layer.keys is not key:
            raise RuntimeError(f"KV policy {self.state.policy.name}: {type(module).__name__} (layer {idx}) changed "
                               f"its keys between the cache update and the attention call; the policy cannot "
                               f"run on this family (hfa.unpatch(model))")
        return layer

    def applies(self, module) -> bool:
        """Whether the module is a layer the policy takes over (a full-attention layer of the decoder)."""
        idx = getattr(module, "layer_idx", None)
        cfg = getattr(module, "config", None)
        return idx is not None and cfg is not None and idx in policy_layer_ids(cfg)

    def attend(self, module, query, key, value, attention_mask, scaling, dropout, kwargs, dense_call, backend):
        """out [B, Hq, Sq, Dv] under the policy, or None to let the call run the ordinary exact path."""
        layer = self.cache_layer(module, key)
        if layer is None:
            if self.state.cache is not None or not self.applies(module):
                return None  # a layer the policy does not cover (e.g. sliding window) under a cache
            layer = PolicyCacheLayer(self.state.policy, module.layer_idx)   # use_cache=False: this call only
            layer.update(key, value)
        reason = _refusal(module, attention_mask, kwargs, dropout)
        if reason is not None:
            layer.pending = 0
            raise ValueError(f"KV policy {self.state.policy.name} cannot run {type(module).__name__} (layer "
                             f"{layer.layer_idx}): its attention call carries {reason}. hfa.unpatch(model) "
                             f"restores the full cache.")
        S = query.shape[2]
        padding = getattr(attention_mask, "padding", None)  # an HFAMask (the only mask _refusal lets through)
        new_valid = None if padding is None else padding[:, -S:]
        full_before = layer.evicted == 0 and layer.slots() == layer.seen
        q_pos, q_valid = layer.settle_positions(new_valid)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        policy = self.state.policy
        shift = None if self.state.shifts is None else self.state.shifts[layer.layer_idx]
        out = policy.attention(layer, query, q_pos, scale, shift=shift, exact_ok=full_before,
                               device_backend=_backend(query, backend))
        if out is None:
            out = dense_call()
            read = layer.slots()
        else:
            out, read = out
        self.state.reads[layer.layer_idx] = (read, layer.slots())
        policy.after_attention(layer, query, q_pos, q_valid, scale)
        return out


def _backend(query, backend: str) -> str:
    """"triton" when the policy's block-sparse reads may run on our Triton kernels (CUDA), else "torch"."""
    if query.device.type != "cuda" and backend != "triton":
        return "torch"

    def why_not():
        try:
            from ...kernels.sparse import triton_block_sparse  # noqa: F401
        except ImportError as e:
            return f"the Triton block-sparse kernels are unavailable ({e})"
        return None
    return "triton" if use_triton(backend, query.device, why_not, "a KV policy's block-sparse decode") else "torch"
