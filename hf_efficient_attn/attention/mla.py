"""Multi-head latent attention (MLA) as a drop-in for a Llama, Qwen3 or Gemma 3 attention module, and their model classes.

    from hf_efficient_attn.attention.mla import LlamaMLAConfig, LlamaMLAForCausalLM, MLAAttention
    from hf_efficient_attn.attention.mla import Gemma3MLAConfig, Gemma3MLAForCausalLM, Gemma3MLAAttention

The conversion (``hf_efficient_attn.conversions.mla``) builds these from a pretrained model; this module
holds only the architecture. Notation: C hidden size, Hq query heads, Hkv the original KV heads (now
*head groups*: query head h reads group h // (Hq // Hkv)), D head dim, r = ``kv_lora_rank``, d_r =
``mla_rope_dim`` (P = d_r / 2 RoPE planes), B batch, S new tokens, T cached tokens.

Per token the layer computes and CACHES only
    latent   c      = kv_a_proj(x)                         (r,)
    RoPE key k_rope = RoPE(k_rope_proj(x))                 (d_r,)  shared by every head
and per head
    q_h             = q_proj(x)_h                          (D,)    no RoPE (the original query, unrotated)
    q_rope_h[p]     = RoPE(q_rope_coef[g, p] * q_h[plane f_p])     (d_r,)  plane p rotates at frequency f_p
    k_nope_g, v_g   = kv_b_proj(c) split per group          (D,), (D,)
    score_h(t)      = scaling * (q_h . k_nope_g(t) + q_rope_h . k_rope(t))

`scaling` is the ORIGINAL model's 1/sqrt(D) (``config.mla_scaling``): the score is the same sum of products the
original layer formed, only split into a no-RoPE and a RoPE part, so the default 1/sqrt of the new key dim
(D + d_r here, r + d_r in the absorbed form) would be wrong.

Two ways to run it, equal in exact arithmetic (tested):
* *expanded* (prefill, and whenever the cache is empty): up-project K and V, ordinary attention through the
  model's attention implementation (eager, sdpa, ...; keys of dim D + d_r, values of dim D);
* *absorbed* (decode: the cache already holds tokens): q_lat_h = W_uk[g]^T q_h, attention over the cached
  latents only (``kernels.mla``: the Triton split-KV kernel on CUDA for one new token, the reference
  otherwise), then out_h = W_uv[g] out_lat_h before o_proj. The K/V up-projections are never applied to
  the cache. (Folding W_uk into q_proj and W_uv into o_proj as DeepSeek does would cost more FLOPs here,
  since r > D: C*Hq*r vs C*Hq*D + Hq*D*r; the cache traffic, which decides decode speed, is the same.)

The cache: no custom Cache class. The model's own ``DynamicCache(config=...)`` (created by LlamaModel.forward
and by ``generate``) is used as it is: each MLA layer calls ``cache.update(latent, k_rope, layer_idx)``, so the
layer's ``keys`` slot holds the latents ``(B, 1, T, r)`` and its ``values`` slot the rotated RoPE keys
``(B, 1, T, d_r)``. Everything the cache does along the token axis (growth, ``crop``, beam-search
``reorder_cache``, ``get_seq_length`` for masks) is then right without a hook, and ``hfa.kv_cache_bytes`` sees
(r + d_r) values per token per layer. `latent_cache` reads them back by their MLA names.

Checkpoints: ``model_type = "hfa_mla_llama"`` with ``architectures = ["LlamaMLAForCausalLM"]``, ``"hfa_mla_qwen3"`` /
``Qwen3MLAForCausalLM`` and ``"hfa_mla_gemma3"`` / ``Gemma3MLAForCausalLM`` (`QKNormMLAAttention`, alias
`Gemma3MLAAttention`: the same layer with the family's q_norm and k_norm; the latent is a linear map of the normed
keys and the values). The classes come from ``attention.families.converted_model_class``, one per family whose
table entry lists "mla". Importing this module registers them
with the Auto classes, so ``hfa.load`` (``AutoModelForCausalLM.from_pretrained``) loads
them; stock transformers without this package refuses them (unknown model type) instead of loading a Llama
with missing k/v projections.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from ..kernels.mla import absorb_query, expand_latent_output, latent_attention_reference
from .backends import BACKENDS, triton_can_run, use_triton
from .families import FAMILIES, converted_model_class, layer_window
from .registry import HFAMask

__all__ = ["DECODE_MODES", "Gemma3MLAAttention", "Gemma3MLAConfig", "Gemma3MLAForCausalLM", "LlamaMLAConfig",
           "LlamaMLAForCausalLM", "MLAAttention", "MLA_FIELDS", "QKNormMLAAttention", "Qwen3MLAConfig",
           "Qwen3MLAForCausalLM", "latent_cache", "mla_model_class"]

DECODE_MODES = ("absorbed", "expanded")

# the MLA shape every MLA config adds to its family's config. mla_rope_frequencies[i]: the P = d_r / 2 RoPE
# frequency indices of layer i's planes (into that layer's own inv_freq, 0 .. rotary_dim / 2 - 1; repeats allowed)
MLA_FIELDS = {"kv_lora_rank": (int, 0), "mla_rope_dim": (int, 0), "mla_rope_frequencies": (list | None, None),
              "mla_scaling": (float | None, None)}


def _validate_mla_config(cfg):
    if getattr(cfg, "attn_logit_softcapping", None) is not None or getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError("MLA supports causal attention without attn_logit_softcapping only")
    if cfg.kv_lora_rank < 1 or cfg.mla_rope_dim < 2 or cfg.mla_rope_dim % 2:
        raise ValueError(f"an MLA config needs kv_lora_rank >= 1 and an even mla_rope_dim >= 2, got "
                         f"{cfg.kv_lora_rank}, {cfg.mla_rope_dim}")
    freqs = cfg.mla_rope_frequencies
    if freqs is None or len(freqs) != cfg.num_hidden_layers or any(len(f) != cfg.mla_rope_dim // 2 for f in freqs):
        raise ValueError(f"mla_rope_frequencies must hold {cfg.mla_rope_dim // 2} frequency indices for each of "
                         f"the {cfg.num_hidden_layers} layers")


def latent_cache(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent (B, T, r), rotated RoPE keys (B, T, d_r)) that an MLA layer stored in a DynamicCache."""
    layer = cache.layers[layer_idx]
    return layer.keys[:, 0], layer.values[:, 0]


def _bool_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int):
    """The model's mask as (bool (B or 1, 1, S, T) True = attend, or None, causal?)."""
    if attention_mask is None:
        return None, q_len > 1                                # None: causal for a chunk, all for one token
    if isinstance(attention_mask, HFAMask):                   # ours: the bool mask it describes
        return attention_mask.allowed()[..., -kv_len:], False
    if attention_mask.dtype == torch.bool:
        mask = attention_mask
    else:                                                     # eager: additive, 0 = attend, finfo.min = masked
        mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return mask[..., -kv_len:], False


class MLAAttention(nn.Module):
    """MLA replacing a Llama-style attention layer (see the module docstring for the math and the cache).

    forward(hidden_states (B, S, C), position_embeddings (cos, sin) each (B, S, rotary_dim), attention_mask,
    cache) -> (out (B, S, C), None).
    """

    HFA_BACKENDS = BACKENDS    # `backend`: the absorbed decode's (see attention.backends); hfa.patch sets it

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_key_value_heads          # head groups sharing one K_nope / V up-projection
        self.num_key_value_groups = self.num_heads // self.num_groups   # read by eager_attention_forward
        self.kv_lora_rank = config.kv_lora_rank
        self.rope_dim = config.mla_rope_dim
        self.scaling = config.mla_scaling or self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.decode_mode = "absorbed"       # or "expanded": up-project the cache (for tests and comparisons)
        self.backend = "auto"               # "auto": Triton for one new token on CUDA; "triton"; "reference"
        if config.attention_bias:
            raise ValueError("MLA attention does not support q/k/v/o biases (attention_bias=True)")
        self.sliding_window = layer_window(config, layer_idx)   # passed to the attention implementation
        c, hq, hkv, d, r, dr = (config.hidden_size, self.num_heads, self.num_groups, self.head_dim,
                                self.kv_lora_rank, self.rope_dim)
        latent_in, rope_in = self.kv_input_dims()
        self.q_proj = nn.Linear(c, hq * d, bias=False)
        self.kv_a_proj = nn.Linear(latent_in, r, bias=False)         # the latent: all the cache holds, with k_rope
        self.k_rope_proj = nn.Linear(rope_in, dr, bias=False)        # the shared RoPE key, before rotation
        self.kv_b_proj = nn.Linear(r, 2 * hkv * d, bias=False)       # rows [K_nope of each group; V of each group]
        self.q_rope_coef = nn.Parameter(torch.ones(hkv, dr // 2))    # q_rope_h[p] = coef[g, p] * q_h[plane f_p]
        self.o_proj = nn.Linear(hq * d, c, bias=False)
        # the frequency of each RoPE plane: from the config, not a buffer (from_pretrained leaves
        # non-persistent buffers of custom modules uninitialised)
        self.rope_frequency_list = tuple(int(f) for f in config.mla_rope_frequencies[layer_idx])
        assert len(self.rope_frequency_list) == dr // 2, f"layer {layer_idx}: {len(self.rope_frequency_list)} RoPE " \
            f"frequencies for d_r={dr}"

    def kv_input_dims(self) -> tuple[int, int]:
        """Input sizes of kv_a_proj and k_rope_proj: both read the hidden state x (C) here."""
        return self.config.hidden_size, self.config.hidden_size

    def rope_frequencies(self, device) -> torch.Tensor:
        """(P,) int64: the RoPE frequency index of each plane, on `device` (made per call: a tensor kept from an
        inference_mode call could not be used under autograd)."""
        return torch.tensor(self.rope_frequency_list, dtype=torch.long, device=device)

    # -- pieces -------------------------------------------------------------------------------------------

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk (Hkv, D, r), W_uv (Hkv, D, r)): the per-group key and value up-projections."""
        hkv, d, r = self.num_groups, self.head_dim, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(2, hkv, d, r)
        return w[0], w[1]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., S, d_r) whose plane p = dims (p, P + p) turns at frequency f_p; cos/sin: (B, S, rotary_dim)."""
        f = self.rope_frequencies(x.device)
        cos_r = cos[..., f].repeat(1, 1, 2).unsqueeze(1)     # (B, 1, S, d_r): HF's rotate_half layout
        sin_r = sin[..., f].repeat(1, 1, 2).unsqueeze(1)
        return x * cos_r.to(x.dtype) + rotate_half(x) * sin_r.to(x.dtype)

    def query_heads(self, hidden_states):
        """The original layer's per-head queries before RoPE, (B, Hq, S, D)."""
        b, s, _ = hidden_states.shape
        return self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def queries(self, hidden_states, cos, sin):
        """(q (B, Hq, S, D) unrotated, q_rope (B, Hq, S, d_r) rotated)."""
        rot = cos.shape[-1]
        q = self.query_heads(hidden_states)                                         # (B, Hq, S, D)
        f = self.rope_frequencies(q.device)
        planes = torch.cat([q[..., f], q[..., f + rot // 2]], dim=-1)              # (B, Hq, S, d_r)
        coef = self.q_rope_coef.repeat_interleave(self.num_key_value_groups, 0)     # (Hq, P)
        q_rope = planes * coef.repeat(1, 2)[None, :, None, :].to(q.dtype)
        return q, self._rope(q_rope, cos, sin)

    def latents(self, hidden_states, cos, sin):
        """(latent (B, 1, S, r), k_rope (B, 1, S, d_r) rotated): what the cache stores."""
        latent = self.kv_a_proj(hidden_states).unsqueeze(1)
        k_rope = self._rope(self.k_rope_proj(hidden_states).unsqueeze(1), cos, sin)
        return latent, k_rope

    def expand(self, latent, k_rope):
        """Per-group keys [K_nope; k_rope] (B, Hkv, T, D + d_r) and values (B, Hkv, T, D) from latents (B, 1, T, r)."""
        b, _, t, _ = latent.shape
        hkv, d = self.num_groups, self.head_dim
        kv = self.kv_b_proj(latent[:, 0]).view(b, t, 2, hkv, d)
        k_nope, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)       # (B, Hkv, T, D)
        k = torch.cat([k_nope, k_rope.expand(b, hkv, t, self.rope_dim)], dim=-1)
        return k, v

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
        if cache is None:                  # the keyword was past_key_values before transformers 5.24
            cache = past_key_values
        b, s, _ = hidden_states.shape
        cos, sin = position_embeddings
        q, q_rope = self.queries(hidden_states, cos, sin)
        latent, k_rope = self.latents(hidden_states, cos, sin)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)           # (B, 1, T, r), (B, 1, T, d_r)
        if past > 0 and self.decode_mode == "absorbed":
            out = self._absorbed(q, q_rope, latent[:, 0], k_rope[:, 0], attention_mask)        # (B, Hq, S, D)
            out = out.transpose(1, 2)
        else:
            k, v = self.expand(latent, k_rope)
            interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                        eager_attention_forward)
            if self.sliding_window is not None:
                kwargs["sliding_window"] = self.sliding_window
            out, _ = interface(self, torch.cat([q, q_rope], dim=-1), k, v, attention_mask,
                               dropout=0.0 if not self.training else self.attention_dropout,
                               scaling=self.scaling, **kwargs)                     # (B, S, Hq, D)
        assert out.shape == (b, s, self.num_heads, self.head_dim), tuple(out.shape)
        return self.o_proj(out.reshape(b, s, -1)), None

    def _absorbed(self, q, q_rope, latent, k_rope, attention_mask):
        """Attention over the latent cache only. q (B, Hq, S, D), q_rope (B, Hq, S, d_r), latent (B, T, r),
        k_rope (B, T, d_r) -> (B, Hq, S, D)."""
        w_uk, w_uv = self.up_weights()
        q_lat = absorb_query(q, w_uk)                                                # (B, Hq, S, r)
        mask, causal = _bool_mask(attention_mask, q.shape[2], latent.shape[1])
        out_lat = None
        if use_triton(self.backend, q.device, lambda: self._triton_reason(q, mask),
                      f"MLA decode in layer {self.layer_idx}"):
            from ..kernels.mla.triton_decode import mla_decode
            kpm = None if mask is None else mask[:, 0, 0, :].expand(latent.shape[0], -1)
            out_lat, _ = mla_decode(q_lat, q_rope, latent, k_rope, scale=self.scaling, key_padding_mask=kpm)
        if out_lat is None:
            out_lat, _ = latent_attention_reference(q_lat, q_rope, latent, k_rope, scale=self.scaling,
                                                    causal=causal, attn_mask=mask)
        return expand_latent_output(out_lat, w_uv)

    def _triton_reason(self, q, mask) -> str | None:
        """None when the Triton MLA decode kernel serves this call (one new token, no grad, a per-key mask)."""
        if q.shape[2] != 1:
            return f"{q.shape[2]} new tokens (the kernel decodes one)"
        if torch.is_grad_enabled():
            return "gradients (the kernel is forward-only)"
        if mask is not None and mask.shape[1] != 1:
            return "a per-head mask"
        return triton_can_run(q.device)

    @property
    def decode_backend(self) -> str:   # the attribute's name before every module had one `backend`
        return self.backend

    @decode_backend.setter
    def decode_backend(self, value: str) -> None:
        self.backend = value


class QKNormMLAAttention(MLAAttention):
    """MLA replacing the attention layer of a qk-norm family (Gemma 3, Qwen3): `MLAAttention` with the family's
    per-head RMS norms kept where they were (`Gemma3MLAAttention` is this class).

    q_norm acts on the queries before anything else, as in the original (q_h = q_norm(q_proj(x)_h)). k_norm is not
    linear in x, so the latent is a linear map of the NORMED keys and the values, not of x:
        k_n     = k_norm(k_proj(x) per KV head)                  (Hkv D,)  computed for new tokens only
        latent  = kv_a_proj([k_n ; v_proj(x)])                   (r,)      cached
        k_rope  = RoPE(k_rope_proj(k_n))                         (d_r,)    cached
    The cache still holds r + d_r values per token; k_proj and v_proj stay to compute them, and kv_b_proj
    up-projects K_nope (of the normed keys) and V exactly as for Llama, so absorbed decode is unchanged. At
    full rank with every RoPE plane kept this is the original layer. Sliding-window layers pass their window to
    the attention implementation; the model's DynamicCache keeps their last window - 1 latents only.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        c, hkv, d = config.hidden_size, self.num_groups, self.head_dim
        family = FAMILIES[config.hfa_family]
        self.k_proj = nn.Linear(c, hkv * d, bias=False)
        self.v_proj = nn.Linear(c, hkv * d, bias=False)
        self.q_norm = family.make_norm(d, eps=config.rms_norm_eps)
        self.k_norm = family.make_norm(d, eps=config.rms_norm_eps)

    def kv_input_dims(self) -> tuple[int, int]:
        """kv_a_proj reads [k_n ; v] (2 Hkv D), k_rope_proj reads k_n (Hkv D)."""
        hkv_d = self.num_groups * self.head_dim
        return 2 * hkv_d, hkv_d

    def query_heads(self, hidden_states):
        return self.q_norm(super().query_heads(hidden_states))

    def normed_keys(self, hidden_states):
        """k_norm(k_proj(x)) per KV head, flattened to (B, S, Hkv D)."""
        b, s, _ = hidden_states.shape
        k = self.k_proj(hidden_states).view(b, s, self.num_groups, self.head_dim)
        return self.k_norm(k).reshape(b, s, -1)

    def latents(self, hidden_states, cos, sin):
        k_n = self.normed_keys(hidden_states)
        latent = self.kv_a_proj(torch.cat([k_n, self.v_proj(hidden_states)], dim=-1)).unsqueeze(1)
        k_rope = self._rope(self.k_rope_proj(k_n).unsqueeze(1), cos, sin)
        return latent, k_rope


Gemma3MLAAttention = QKNormMLAAttention


def _make_attention(config, layer_idx: int, base) -> MLAAttention:
    return (QKNormMLAAttention if FAMILIES[config.hfa_family].qk_norm else MLAAttention)(config, layer_idx)


def mla_model_class(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the MLA variant of family `model_type` (a key of `FAMILIES` whose entry
    lists "mla"): model_type ``hfa_mla_<family>``, registered with the Auto classes."""
    family = FAMILIES.get(model_type)
    if family is None or "mla" not in family.methods:
        raise ValueError(f"MLA supports the families {', '.join(f for f, e in FAMILIES.items() if 'mla' in e.methods)}; "
                         f"got {model_type!r}")
    return converted_model_class(family, "mla", fields=MLA_FIELDS, make_attention=_make_attention,
                                 validate=_validate_mla_config, module=__name__)


# every MLA family's classes exist (and are registered) once this module is imported, so hfa.load finds them
LlamaMLAConfig, LlamaMLAForCausalLM = mla_model_class("llama")
Gemma3MLAConfig, Gemma3MLAForCausalLM = mla_model_class("gemma3_text")
Qwen3MLAConfig, Qwen3MLAForCausalLM = mla_model_class("qwen3")
