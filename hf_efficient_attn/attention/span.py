"""Learned sparsity in place of softmax attention: each KV head reads a reach it learned (or was given).

    from hf_efficient_attn.attention.span import SpanAttention, span_model_class

The conversions (``hf_efficient_attn.conversions.span``: ``convert(model, "adaptive_span" | "duo" |
"longformer")``) build these from a pretrained model; this module holds the architecture. Each converted layer
keeps the original q/k/v/o projections, q/k norms, RoPE and scaling; only WHICH keys each query reads changes.
Positions count from each row's first real token (a left-padded row reads what the row alone would). For a query
at position p and a key at position j <= p, KV head h (its GQA group of query heads shares it) reads:

* **hard reach** (what deploys: ``longformer``, and ``adaptive_span`` / ``duo`` after `freeze`): the key is read
  when ``j < sinks`` (the first tokens of the row: Longformer's global tokens, StreamingLLM's sinks) or
  ``p - j < window_h``; ``window_h = None`` is full attention. Prefill runs on the block-sparse kernels
  (``hfa.sparse.streaming(sinks, window)`` per group of KV heads that share a window: blocks outside the reach
  are never computed; Triton on CUDA, the PyTorch block-gather path elsewhere), full heads on the exact dense
  path. With a cache (`SpanCacheLayer`) each group keeps only what its reach can still read: the sinks and the
  last ``window - 1`` tokens (a full head keeps everything), so the bytes saved are real and constant-size for a
  layer whose heads all have windows.
* **adaptive span** (soft, before `freeze`; Sukhbaatar et al. 2019): a learnable ``span`` per KV head in [0, 1]
  (init 1), span z_h = span_h * max_span tokens, and the attention weights multiplied by the ramp
  ``m(d) = clamp((z_h + ramp - d) / ramp, 0, 1)`` at distance d = p - j, then renormalised (softmax of
  scores + log m); sinks are always read. At span 1, over texts of at most ``max_span`` tokens, m = 1 on every key:
  exactly the original attention. `freeze` turns z_h into the hard window ``ceil(z_h + ramp)`` (every key the
  ramp reaches; where the ramp is 0 or 1 on every key, the frozen layer equals the soft one).
* **duo** (soft, before `freeze`; DuoAttention, Xiao et al. 2024): a ``gate`` per KV head in [0, 1] (init 1) mixes
  the head's full attention with its sinks + window attention, ``out = g * full + (1 - g) * streaming``. At gate
  1: the original. `freeze` keeps full the heads with the largest gates, the others become sinks + window.

The soft forms run an exact eager product (scores of every query and key, fp32): they are for training (and
checking); deploy a frozen model. The cache of a soft layer is the full one.

Checkpoints: model classes per family and method (`span_model_class`), model_type ``hfa_<method>_<family>``
(``hfa_adaptive_span_llama``, ``hfa_duo_qwen3``, ``hfa_longformer_llama``), options in ``config.hfa_span``;
registered with the Auto classes on import, so ``hfa.load`` loads them, and stock transformers without this
package refuses them (unknown model type) instead of loading a full-attention model that ignores the reach.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backends import BACKENDS, check_backend
from .families import FAMILIES as ALL_FAMILIES
from .families import converted_model_class, layer_window
from .kv.base import PolicyCacheLayer
from .kv.streaming import Streaming
from .linear import OwnCacheLayer, key_padding, own_cache_layer, project_qkv
from .registry import softmax_attention
from .sparse.apply import sparse_attention
from .sparse.streaming import streaming as streaming_pattern

__all__ = ["METHODS", "SPAN_NEW_MODULES", "SpanAttention", "SpanCacheLayer", "span_layers", "span_model_class",
           "span_options"]

METHODS = ("adaptive_span", "duo", "longformer")
SPAN_NEW_MODULES = ("span", "gate")   # what a soft layer adds: adaptive span's spans, duo's gates (per KV head)
FULL = None                           # a head's window when it reads every key
BLOCK = 64                            # the block size of the kernels' layouts for a hard reach


def span_options(config) -> dict:
    """``config.hfa_span``, or a ValueError saying what a learned-sparsity config needs."""
    opts = getattr(config, "hfa_span", None)
    if not opts or opts.get("method") not in METHODS:
        raise ValueError(f"a {config.model_type} config needs hfa_span = {{method ({', '.join(METHODS)}), sinks, "
                         "window, ...}}")
    return opts


# -- one attention call -----------------------------------------------------------------------------------

def row_positions(kpm: torch.Tensor | None, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, T] int64 counted over each row's real tokens, real [B, T] bool) of T keys; kpm: [B, T] or
    None (all real). A pad takes its predecessor's position (it is never read)."""
    if kpm is None:
        pos = torch.arange(length, device=device).expand(batch, length)
        return pos, torch.ones(batch, length, dtype=torch.bool, device=device)
    kpm = kpm.to(device=device, dtype=torch.bool)
    return kpm.long().cumsum(-1) - 1, kpm


def eager_reach_attention(q, k, v, scale: float, q_pos, k_pos, real, *, sinks: int = 0, window=None, log_weight=None):
    """The exact eager product of a reach: q [B, Hq, S, D] at positions q_pos [B, S] over k, v [B, Hkv, T, D] at
    k_pos [B, T] (real [B, T]). Causal by position; ``window`` (int, or a [Hkv] tensor, None: full) limits keys to
    ``p - j < window`` unless ``j < sinks``; ``log_weight(d)`` ([B, 1, S, T] distances -> [B, Hkv, S, T]) is added
    to the scores of the keys it may read (adaptive span's log ramp). fp32; a query that reads nothing gets 0."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().view(B, Hkv, Hq // Hkv, S, D)
    scores = torch.einsum("bhgsd,bhtd->bhgst", qg, k.float()) * scale                 # [B, Hkv, G, S, T]
    d = q_pos[:, None, :, None] - k_pos[:, None, None, :]                             # [B, 1, S, T]
    allowed = (d >= 0) & real[:, None, None, :]
    sink = k_pos[:, None, None, :] < sinks
    if window is not None:
        w = window if isinstance(window, torch.Tensor) else torch.tensor([window], device=q.device)
        allowed = allowed & ((d < w.view(1, -1, 1, 1)) | sink)                       # [B, Hkv|1, S, T]
    if log_weight is not None:
        scores = scores + log_weight(d).masked_fill(sink, 0.0)[:, :, None]
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgst,bhtd->bhgsd", p, v.float())
    return out.reshape(B, Hq, S, -1).to(q.dtype)


_DENSE_DEFAULTS = dict(window=None, softcap=None, sinks=None, attn_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
                       dropout_p=0.0, key_padding_mask=None)


def _dense(q, k, v, *, backend, **opts):
    """Exact dense attention (``registry.softmax_attention``: Triton on CUDA, SDPA or the reference elsewhere)."""
    return softmax_attention(q, k, v, backend=backend, **{**_DENSE_DEFAULTS, **opts})


# -- the cache layer ----------------------------------------------------------------------------------------

class FullReach(Streaming):
    """The cache rule of a full head inside a `SpanCacheLayer`: read and keep every token (exact)."""

    approximate = False
    bounded = False

    def __init__(self):
        super().__init__(0, 1, "original")
        self.name = "full"

    def max_tokens(self):
        return None

    def attention(self, layer, q, q_pos, scale, **_):
        from .kv.apply import slot_attention
        return slot_attention(q, layer.keys, layer.values, layer.pos, layer.valid, q_pos, scale), layer.slots()

    def after_attention(self, layer, q, q_pos, q_valid, scale):
        pass


class _GroupCache(PolicyCacheLayer):
    """The slots of one group of KV heads sharing a reach (a `PolicyCacheLayer`: positions, validity, padding).
    Appends are plain concatenations, as in transformers' DynamicLayer, so the cache holds no spare room (a
    windowed group gathers its kept slots anew every step anyway)."""

    def _append(self, name, cur, new, dim):
        if cur.dim() != new.dim():
            return new
        return torch.cat([cur, new], dim=dim)


class SpanCacheLayer(OwnCacheLayer):
    """One learned-sparsity layer's cache: per group of KV heads sharing a reach (``groups``: [(window, kv heads)]),
    the slots that reach can still read (`_GroupCache` under ``hfa.kv.streaming(sinks, window, positions="original")``
    or, for full heads, every slot). ``get_seq_length`` counts every token seen, so positions and masks stay those
    of the whole sequence."""

    owner = "its SpanAttention module"

    def __init__(self, groups, sinks: int, layer_idx: int):
        super().__init__()
        self.groups = [(w, idx) for w, idx in groups]
        self.sub = [_GroupCache(FullReach() if w is FULL else Streaming(sinks, w, "original"), layer_idx)
                    for w, _ in groups]

    def slots(self) -> list[int]:
        """Slots kept per group (a group's KV heads each hold that many)."""
        return [s.slots() for s in self.sub]

    def reset(self) -> None:
        for s in self.sub:
            s.reset()
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx) -> None:
        for s in self.sub:
            s.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for s in self.sub:
            s.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        for s in self.sub:
            s.batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a learned-sparsity cache cannot be cropped: heads with a window have already dropped "
                             "tokens (assisted/speculative decoding needs the original model)")

    def offload(self):
        raise ValueError("cache offloading is not supported by a learned-sparsity cache")

    def prefetch(self):
        raise ValueError("cache offloading is not supported by a learned-sparsity cache")


def _span_cache_layer(cache, layer_idx: int, groups, sinks: int) -> SpanCacheLayer:
    return own_cache_layer(cache, layer_idx, SpanCacheLayer, lambda: SpanCacheLayer(groups, sinks, layer_idx),
                           "learned-sparsity")


# -- the attention module ------------------------------------------------------------------------------------

class SpanAttention(nn.Module):
    """Softmax attention whose KV heads each read a reach (see the module docstring) in place of a full-attention
    layer. forward(hidden_states, position_embeddings, attention_mask, cache) -> (out (B, S, C), None), the
    contract of the modules it replaces.

    ``soft``: "span" (adaptive span, trainable ``span``), "duo" (trainable ``gate``) or None (a hard reach:
    ``windows``, one per KV head, None = full). ``backend`` ("auto" | "triton" | "reference"; hfa.patch sets it)
    picks the kernels of the hard reach, as for the other converted layers."""

    HFA_BACKENDS = BACKENDS

    def __init__(self, config, layer_idx: int, base: nn.Module | None = None):
        super().__init__()
        opts = span_options(config)
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.backend = check_backend("auto", self.HFA_BACKENDS)
        if base is None:
            base = ALL_FAMILIES[opts["family"]].attention_class()(config, layer_idx)
        self.scaling = base.scaling
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        self.method = opts["method"]
        self.sinks = int(opts.get("sinks", 0))
        self.window = opts.get("window")                     # duo's streaming window, longformer's window
        self.max_span = opts.get("max_span")
        self.ramp = float(opts.get("ramp", 32))
        frozen = opts.get("windows")                         # {layer: [window or None per KV head]} after freeze
        self.soft = None
        if self.method == "longformer":
            self.windows = [int(self.window)] * self.num_kv_heads
        elif frozen is not None:
            self.windows = [FULL if w is None else int(w) for w in frozen[str(layer_idx)]]
        else:
            self.soft = "span" if self.method == "adaptive_span" else "duo"
            self.windows = [FULL] * self.num_kv_heads
            name = "span" if self.soft == "span" else "gate"
            setattr(self, name, nn.Parameter(torch.ones(self.num_kv_heads)))

    def reset_span_parameters(self) -> None:
        """Spans and gates at 1: the original attention (post_init does not know them)."""
        for name in SPAN_NEW_MODULES:
            if hasattr(self, name):
                with torch.no_grad():
                    getattr(self, name).fill_(1.0)

    # -- what the layer reads -------------------------------------------------------------------------
    def spans(self) -> torch.Tensor:
        """Adaptive span's span per KV head in tokens (fp32, differentiable): ``clamp(span, 0, 1) * max_span``."""
        return self.span.float().clamp(0.0, 1.0) * float(self.max_span)

    def gates(self) -> torch.Tensor:
        """Duo's gate per KV head in [0, 1] (fp32, differentiable)."""
        return self.gate.float().clamp(0.0, 1.0)

    def groups(self) -> list[tuple[int | None, list[int]]]:
        """[(window, [KV heads])]: the hard reach's KV heads grouped by window, full heads (None) first."""
        out: dict = {}
        for h, w in enumerate(self.windows):
            out.setdefault(w, []).append(h)
        return sorted(out.items(), key=lambda kv: (kv[0] is not FULL, kv[0] or 0))

    def kv_slots(self, tokens: int) -> float:
        """Mean slots a KV head of this layer keeps after `tokens` tokens (hard reach; a soft layer keeps all)."""
        keep = [tokens if w is FULL else min(tokens, self.sinks + w - 1) for w in self.windows]
        return sum(keep) / len(keep)

    # -- projections --------------------------------------------------------------------------------------
    def project(self, hidden_states, position_embeddings):
        return project_qkv(self, hidden_states, position_embeddings)

    # -- the soft forms -----------------------------------------------------------------------------------
    def _soft(self, q, k, v, kpm):
        if kpm is None:                    # no padding (training): the kernels, not the O(S x T) eager product
            return self._soft_span_fast(q, k, v) if self.soft == "span" else self._soft_duo_fast(q, k, v)
        return self._soft_eager(q, k, v, kpm)

    def _soft_duo_fast(self, q, k, v):
        """g * full + (1 - g) * (sinks + window): exact dense attention and the block-sparse streaming pattern."""
        full = _dense(q, k, v, scale=self.scaling, causal=True, backend=self.backend)
        pattern = streaming_pattern(sinks=self.sinks, window=int(self.window), block=BLOCK)
        local, _ = sparse_attention(q, k, v, pattern, scale=self.scaling, causal=True, backend=self.backend,
                                    dense=lambda *a, **kw: _dense(*a, backend=self.backend, **kw))
        g = self.gates().repeat_interleave(self.num_heads // self.num_kv_heads).view(1, -1, 1, 1)
        return (g * full.float() + (1 - g) * local.float()).to(q.dtype)

    def _soft_span_fast(self, q, k, v):
        """Adaptive span without padding, per KV head: the keys the ramp leaves at weight 1 (distance <= z, plus the
        sinks) on the block-sparse path (out and LSE), the <= ramp keys inside the ramp gathered per query with their
        log weights (the only place z gets a gradient), the two merged by LSE in fp32. Exactly the eager form."""
        from ..kernels.sparse import block_sparse_attention_reference
        B, Hq, S, D = q.shape
        T = k.shape[2]
        G = Hq // self.num_kv_heads
        z = self.spans()
        outs = []
        for h in range(self.num_kv_heads):
            qh, kh, vh = q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1]
            inner = int(math.floor(float(z[h].detach()))) + 1         # distances 0 .. inner - 1 have weight 1
            if inner >= T:                                            # every key at weight 1: the original head
                outs.append(_dense(qh, kh, vh, scale=self.scaling, causal=True, backend=self.backend))
                continue
            plan = streaming_pattern(sinks=self.sinks, window=inner, block=BLOCK).plan(qh, kh, causal=True)
            o_in, lse_in = block_sparse_attention_reference(qh, kh, vh, plan.layout, scale=self.scaling, causal=True,
                                                            window=plan.window, sink_tokens=plan.sink_tokens)
            d = inner + torch.arange(int(math.ceil(self.ramp)), device=q.device)        # the ramp's distances
            pos = torch.arange(T - S, T, device=q.device)
            j = pos[:, None] - d[None, :]                                               # [S, R] key index
            ok = j >= self.sinks                                                        # sinks are read above
            m = ((z[h] + self.ramp - d.float()) / self.ramp).clamp(0.0, 1.0)           # [R]
            log_m = torch.where(m > 0, torch.log(m.clamp_min(1e-30)), float("-inf"))
            kb, vb = kh[:, 0][:, j.clamp_min(0)].float(), vh[:, 0][:, j.clamp_min(0)].float()   # [B, S, R, D]
            sc = torch.einsum("bgsd,bsrd->bgsr", qh.float(), kb) * self.scaling + log_m
            sc = sc.masked_fill(~ok, float("-inf"))
            lse_b = torch.logsumexp(sc, dim=-1)                                         # [B, G, S]
            o_b = torch.einsum("bgsr,bsrd->bgsd", torch.softmax(sc, dim=-1).nan_to_num(0.0), vb)
            lse = torch.logaddexp(lse_in.float(), lse_b)
            w_in = torch.exp(lse_in.float() - lse).nan_to_num(0.0)[..., None]
            w_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
            outs.append((o_in.float() * w_in + o_b * w_b).to(q.dtype))
        return torch.cat(outs, dim=1)

    def _soft_eager(self, q, k, v, kpm):
        B, S, T = q.shape[0], q.shape[2], k.shape[2]
        k_pos, real = row_positions(kpm, B, T, q.device)
        q_pos = k_pos[:, T - S:]
        run = dict(sinks=self.sinks)
        if self.soft == "span":
            z = self.spans()                                                   # [Hkv]

            def log_ramp(d):                                                   # d [B, 1, S, T] -> [B, Hkv, S, T]
                m = ((z.view(1, -1, 1, 1) + self.ramp - d.float()) / self.ramp).clamp(0.0, 1.0)
                # log m, -inf where m = 0 (no gradient flows there: log's 1/m would meet clamp's 0 as NaN)
                return torch.where(m > 0, torch.log(m.clamp_min(1e-30)), float("-inf"))

            return eager_reach_attention(q, k, v, self.scaling, q_pos, k_pos, real, log_weight=log_ramp, **run)
        full = eager_reach_attention(q, k, v, self.scaling, q_pos, k_pos, real, **run)
        local = eager_reach_attention(q, k, v, self.scaling, q_pos, k_pos, real, window=int(self.window), **run)
        g = self.gates().repeat_interleave(self.num_heads // self.num_kv_heads).view(1, -1, 1, 1)
        return (g * full.float() + (1 - g) * local.float()).to(q.dtype)

    # -- the hard reach ----------------------------------------------------------------------------------
    def _pieces(self, q, k, v):
        """Per group: (window, KV heads, q of its query heads, k, v)."""
        B, Hq, S, D = q.shape
        G = Hq // self.num_kv_heads
        for w, heads in self.groups():
            if len(heads) == self.num_kv_heads:
                yield w, heads, q, k, v
                continue
            idx = torch.tensor(heads, device=q.device)
            qi = q.view(B, self.num_kv_heads, G, S, D).index_select(1, idx).reshape(B, len(heads) * G, S, D)
            yield w, heads, qi, k.index_select(1, idx), v.index_select(1, idx)

    def _merge(self, outs, q):
        """The groups' outputs (in `groups` order) back in head order: [B, Hq, S, Dv]."""
        if len(outs) == 1:
            return outs[0][1]
        B, _, S, _ = q.shape
        G = self.num_heads // self.num_kv_heads
        heads = [h for hs, _ in outs for h in hs]
        cat = torch.cat([o.view(B, len(hs), G, S, -1) for hs, o in outs], dim=1)
        order = torch.tensor([heads.index(h) for h in range(self.num_kv_heads)], device=q.device)
        return cat.index_select(1, order).reshape(B, self.num_heads, S, -1)

    def _hard(self, q, k, v, kpm):
        outs = []
        dense = dict(backend=self.backend)
        for w, heads, qi, ki, vi in self._pieces(q, k, v):
            if w is FULL:
                o = _dense(qi, ki, vi, scale=self.scaling, causal=True, key_padding_mask=kpm, **dense)
            else:
                pattern = streaming_pattern(sinks=self.sinks, window=w, block=BLOCK)
                o, _ = sparse_attention(qi, ki, vi, pattern, scale=self.scaling, causal=True, key_padding_mask=kpm,
                                        backend=self.backend, dense=lambda *a, **kw: _dense(*a, **dense, **kw))
            outs.append((heads, o))
        return self._merge(outs, q)

    def _cached(self, q, k, v, cache, attention_mask):
        """Attention over the cache of a hard reach; the cache keeps what each group can still read."""
        layer = _span_cache_layer(cache, self.layer_idx, self.groups(), self.sinks)
        S = q.shape[2]
        if not layer.is_initialized:
            layer.lazy_initialization(k)
        meta = q.device.type == "meta"                        # shapes only (kv_cache_bytes_at_length)
        kpm = None if meta else key_padding(attention_mask, layer.seen + S)
        new_valid = None if kpm is None else kpm[:, -S:]
        # the first call over an empty cache (a prefill) reads only its own keys: the kernels of the uncached path
        # compute it (the cache's per-slot product would be O(S x T) per group); the slots are then stored and cut
        prefill = None if meta or layer.seen or S <= 1 else self._hard(q, k, v, kpm)
        layer.seen += S
        outs = []
        for (w, heads, qi, ki, vi), sub in zip(self._pieces(q, k, v), layer.sub):
            if meta:
                if sub.is_initialized:
                    ki, vi = torch.cat([sub.keys, ki], 2), torch.cat([sub.values, vi], 2)
                bound = sub.policy.max_tokens()
                if bound is not None and ki.shape[2] > bound:
                    ki, vi = ki[:, :, -bound:], vi[:, :, -bound:]
                sub.keys, sub.values, sub.is_initialized = ki, vi, True
                outs.append((heads, qi.new_empty(*qi.shape[:3], vi.shape[-1])))
                continue
            sub.update(ki, vi)
            q_pos, q_valid = sub.settle_positions(new_valid)
            if prefill is None:
                out, _ = sub.policy.attention(sub, qi, q_pos, self.scaling, shift=None, exact_ok=False,
                                              device_backend="torch")
                outs.append((heads, out))
            sub.policy.after_attention(sub, qi, q_pos, q_valid, self.scaling)
        return prefill if prefill is not None else self._merge(outs, q)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        if cache is None:                  # the keyword was past_key_values before transformers 5.24
            cache = past_key_values
        b, s, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        if cache is not None and self.soft is None:
            out = self._cached(q, k, v, cache, attention_mask)
        else:
            if cache is not None:          # a soft layer keeps the full cache
                k, v = cache.update(k, v, self.layer_idx)
            kpm = key_padding(attention_mask, k.shape[2])
            out = self._soft(q, k, v, kpm) if self.soft else self._hard(q, k, v, kpm)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), None


def span_layers(model) -> dict[int, SpanAttention]:
    """{layer index: SpanAttention} of a (possibly wrapped: DDP, peft) model."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, SpanAttention)}


# -- model classes, one per family and method ----------------------------------------------------------------

FAMILIES = {mt: fam for mt, fam in ALL_FAMILIES.items() if "longformer" in fam.methods}
SPAN_FIELDS = {"hfa_span": (dict | None, None)}


def _make_attention(config, layer_idx: int, base):
    if layer_idx not in set(span_options(config).get("layers") or []):
        return None                        # a layer the model restricts to a sliding window keeps it
    return SpanAttention(config, layer_idx, base=base)


def _reset(model) -> None:
    for m in model.modules():
        if isinstance(m, SpanAttention):
            m.reset_span_parameters()


def span_model_class(family: str, method: str) -> tuple[type, type]:
    """(config class, model class) of `method` (one of `METHODS`) for `family` (a key of FAMILIES), registered with
    AutoConfig / AutoModelForCausalLM as model_type ``hfa_<method>_<family>``."""
    if family not in FAMILIES:
        raise ValueError(f"learned sparsity supports the families {', '.join(FAMILIES)}; got {family!r}")
    if method not in METHODS:
        raise ValueError(f"unknown learned-sparsity method {method!r}; the methods are: {', '.join(METHODS)}")
    return converted_model_class(FAMILIES[family], method, fields=SPAN_FIELDS, make_attention=_make_attention,
                                 validate=span_options, after_init=_reset, module=__name__)


def full_attention_layers(config) -> list[int]:
    """The layers a learned reach replaces: those the model does not already restrict to a sliding window."""
    return [i for i in range(config.num_hidden_layers) if layer_window(config, i) is None]


for _family in FAMILIES:                # register every family now, so hfa.load finds any saved checkpoint
    for _method in METHODS:
        span_model_class(_family, _method)


def freeze_windows(layer: SpanAttention, *, full_heads: set | None = None) -> list[int | None]:
    """The hard windows of a soft layer (see the module docstring): adaptive span's ``ceil(z + ramp)`` per KV head;
    duo's None (full) for the KV heads in `full_heads`, else the streaming window."""
    if layer.soft == "span":
        z = layer.spans().detach()
        return [int(math.ceil(float(v) + layer.ramp)) for v in z]
    if layer.soft == "duo":
        return [FULL if h in (full_heads or set()) else int(layer.window) for h in range(layer.num_kv_heads)]
    return list(layer.windows)
