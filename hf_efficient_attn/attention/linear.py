"""Linear attention (LoLCATs / Hedgehog) as a drop-in for the attention layers of a Llama-family model.

    from hf_efficient_attn.attention.linear import LinearAttention, linear_model_class, FEATURE_MAPS

The conversion (``hf_efficient_attn.conversions.linear``) builds these from a pretrained model; this module
holds the architecture: feature maps, the attention module, its cache layer and the model classes.

Per layer, the original q/k/v/o projections (and q/k norms, RoPE, scaling) are kept as they were; only the
softmax over all past keys is replaced:

* ``window = w > 0`` (the LoLCATs hybrid): exact softmax over the last w keys (the query's own included) and
  linear attention ``phi_q(q) . phi_k(k)`` over every older key, one shared normaliser, a trained per-head mix
  ``g = sigmoid(window_factor)`` (see ``kernels.linear.reference`` for the formula);
* ``window = 0``: pure linear attention over every key.

Feature maps (`FEATURE_MAPS`), applied per head AFTER RoPE, to queries (one map per query head) and keys (one per
KV head — a GQA group shares its state):
    "hedgehog": phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))]   (2 x feature_dim; W_h starts at identity)
    "elu":      phi(x) = elu(x) + 1                                          (no parameters; a baseline)
    "relu":     phi(x) = relu(x)                                             (no parameters; a baseline)

The cache: the model's own ``DynamicCache`` is used; on first use each linear layer swaps its (still empty) cache
layer for a `LinearAttentionCacheLayer`, which holds the fp32 state ``S = sum phi(k) v^T`` and normaliser
``z = sum phi(k)`` of every key older than the next token's window, plus the raw keys and values of the last
``w - 1`` tokens. Its size does not depend on how many tokens came before: decoding costs the same at token 100
and at token 100,000. ``get_seq_length`` still counts every token seen, so positions and masks stay right.
Cropping (assisted decoding) cannot undo a state update and raises.

Checkpoints: the model classes are made per family (`linear_model_class`): model_type ``hfa_linear_<family>``
(e.g. ``hfa_linear_llama``) with the options in ``config.hfa_linear``. Importing this module registers them
with the Auto classes, so ``hfa.load`` loads them; stock transformers without this package refuses them
(unknown model type) instead of loading a softmax model with the feature maps ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..kernels.linear.reference import (
    fold_into_state,
    hybrid_attention_chunked,
    hybrid_attention_reference,
    hybrid_decode_step,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
)
from .backends import BACKENDS, check_backend, use_triton
from .families import FAMILIES as ALL_FAMILIES
from .families import converted_model_class
from .registry import HFAMask

__all__ = ["FEATURE_MAPS", "FAMILIES", "LinearAttention", "LinearAttentionCacheLayer", "OwnCacheLayer",
           "linear_model_class", "make_feature_map", "project_qkv"]


# -- feature maps ---------------------------------------------------------------------------------------

class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))] per head h: (B, heads, S, D) -> (B, heads, S, 2 F).

    W_h starts at the identity (F = D) or its first F columns, so the initial map is a softmax over the
    (rotated) query/key coordinates — the Hedgehog paper's spiky, monotone approximation of exp(q.k)."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.feature_dim = feature_dim or head_dim
        self.weight = nn.Parameter(torch.empty(heads, head_dim, self.feature_dim))
        self.bias = nn.Parameter(torch.empty(heads, self.feature_dim))
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        return 2 * self.feature_dim

    def reset_parameters(self) -> None:
        with torch.no_grad():
            eye = torch.eye(self.head_dim, self.feature_dim, dtype=self.weight.dtype, device=self.weight.device)
            self.weight.copy_(eye.expand_as(self.weight))
            self.bias.zero_()

    def forward(self, x):
        u = torch.einsum("bhsd,hdf->bhsf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)[None, :, None]
        return torch.cat([torch.softmax(u.float(), -1), torch.softmax(-u.float(), -1)], -1).to(x.dtype)


class EluFeatureMap(nn.Module):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, no parameters."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.out_dim = head_dim

    def reset_parameters(self) -> None:
        pass

    def forward(self, x):
        return F.elu(x) + 1


class ReluFeatureMap(EluFeatureMap):
    """phi(x) = relu(x): non-negative, no parameters (a row whose features are all 0 reads nothing: eps guards it)."""

    def forward(self, x):
        return F.relu(x)


FEATURE_MAPS = {"hedgehog": HedgehogFeatureMap, "elu": EluFeatureMap, "relu": ReluFeatureMap}


def make_feature_map(name: str, heads: int, head_dim: int, feature_dim: int | None = None) -> nn.Module:
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {name!r}; the feature maps are: {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](heads, head_dim, feature_dim)


# -- the cache layer ------------------------------------------------------------------------------------

class OwnCacheLayer(CacheLayerMixin):
    """A cache layer its converted attention module reads and writes itself (linear, learned sparsity), in the
    model's own ``DynamicCache``: ``seen`` counts every token fed, so positions and masks stay those of the whole
    sequence whatever the layer keeps; ``Cache.update`` is refused (the layer index belongs to the module)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False
    owner = "its attention module"

    def __init__(self):
        super().__init__()
        self.seen = 0

    def lazy_initialization(self, key_states, value_states=None) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(f"this cache layer is read and written by {self.owner}, not through Cache.update: this "
                           "layer index belongs to a converted attention layer")

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        q_len = query if isinstance(query, int) else int(query.shape[0])   # query length or cache_position
        return self.seen + q_len, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1


class LinearAttentionCacheLayer(OwnCacheLayer):
    """One linear layer's decoding state: fp32 ``state`` (B, Hkv, F, D) and ``normalizer`` (B, Hkv, F) over every
    key older than the next token's window, and ``keys``/``values`` (B, Hkv, <= w - 1, D) of the window."""

    owner = "its LinearAttention module (read / write)"

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.state = self.normalizer = None

    def read(self):
        """(context keys, context values, (state, normalizer)) — all None before the first token."""
        state = None if self.state is None else (self.state, self.normalizer)
        return self.keys, self.values, state

    def write(self, keys, values, state, new_tokens: int) -> None:
        """Store the window's keys/values and the state (None: no key has left the window yet)."""
        if not self.is_initialized:
            self.lazy_initialization(keys)
        self.keys, self.values = keys, values
        self.state, self.normalizer = (None, None) if state is None else state
        self.seen += new_tokens

    def _tensors(self):
        return ("keys", "values", "state", "normalizer")

    def _apply(self, fn) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reset(self) -> None:
        self.keys = self.values = self.state = self.normalizer = None
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a linear-attention cache cannot be cropped: its state has already absorbed the tokens "
                             "(assisted/speculative decoding needs a softmax model)")

    def offload(self):
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._apply(lambda t: t.to(self.device, non_blocking=True))


def own_cache_layer(cache, layer_idx: int, cls: type, make, what: str):
    """The `cls` cache layer at `layer_idx` of a transformers Cache, swapped in (``make()``) on first use; a layer
    that already holds softmax keys/values is refused (`what`: the converted layer, for the message)."""
    layers = cache.layers
    while len(layers) <= layer_idx:             # a lazily grown cache (DynamicCache() without a config)
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if not isinstance(layer, cls):
        if layer.get_seq_length() > 0:
            raise ValueError(f"layer {layer_idx} is a {what} layer but the cache passed in already holds "
                             f"softmax keys/values for it ({type(layer).__name__}); start from an empty cache")
        layer = layers[layer_idx] = make()
    return layer


def _cache_layer(cache, layer_idx: int, window: int) -> LinearAttentionCacheLayer:
    """The linear cache layer at `layer_idx` of a transformers Cache, swapped in on first use."""
    return own_cache_layer(cache, layer_idx, LinearAttentionCacheLayer, lambda: LinearAttentionCacheLayer(window),
                           "linear-attention")


def key_padding(attention_mask, kv_len: int):
    """The (B, kv_len) bool mask of real keys (True = attend) from whatever the model built, or None.

    Our HFAMask: its key padding (structured) or last row (explicit); 2-D: a key-padding mask; 4-D bool or additive (B, 1, S, T):
    the last query row (it may attend every real key before it). Only the last `kv_len` keys are returned."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, HFAMask):  # ours: read its structure, never build the S x S mask
        mask = attention_mask.key_padding() if attention_mask.structured else attention_mask.allowed()[:, 0, -1, :]
        if mask is None:
            return None
    elif attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]
        mask = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    elif attention_mask.dim() == 2:
        mask = attention_mask.bool()
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    mask = mask[:, -kv_len:]
    return None if bool(mask.all()) else mask


# -- the attention module -------------------------------------------------------------------------------

# rows*keys above which the PyTorch path switches from the quadratic form to the chunked one (memory)
QUADRATIC_LIMIT = 1024 * 1024


def project_qkv(module, hidden_states, position_embeddings, rope: bool = True):
    """q (B, H, S, D), k and v (B, Hkv, S, D) of a converted layer that kept the original q/k/v projections (and
    q_norm/k_norm where the family has them), rotated by RoPE unless `rope` is False: the original layer's view."""
    b, s, _ = hidden_states.shape
    q = module.q_proj(hidden_states).view(b, s, -1, module.head_dim)
    k = module.k_proj(hidden_states).view(b, s, -1, module.head_dim)
    v = module.v_proj(hidden_states).view(b, s, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if rope:
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


class LinearAttention(nn.Module):
    """Linear (window=0) or hybrid sliding-window + linear attention in place of a softmax attention layer.

    Reuses the original module's q/k/v/o projections (and q_norm/k_norm where the family has them); adds the
    feature maps ``feature_map_q`` (per query head) and ``feature_map_k`` (per KV head), and for the hybrid the
    per-head mix ``window_factor`` (g = sigmoid(window_factor)). forward(hidden_states, position_embeddings,
    attention_mask, cache) -> (out (B, S, C), None), the contract of the modules it replaces.

    Subclasses (the gated Mamba-2 form, ``attention.mamba2``) change the method through a few hooks and keep the
    rest (cache, padding, backends, decoding): `CONFIG_FIELD` (where the options live), `normalize` (divide by
    q . z), ``rope`` (an option, default on), `init_new_modules` / `reset_linear_parameters` (what the conversion
    adds), `features` (the maps applied to q and k), `token_log_decay` (a per-token decay; None here) and
    `head_output` (applied to each head's output before o_proj).
    """

    HFA_BACKENDS = (*BACKENDS, "chunked")   # "reference": the quadratic PyTorch form; "chunked": the chunked one
    CONFIG_FIELD = "hfa_linear"             # the config attribute that holds this module's options
    normalize = True                        # o = q S / (q . z + eps); False: o = q S (Mamba-2 / GLA)

    def __init__(self, config, layer_idx: int, base: nn.Module | None = None):
        super().__init__()
        opts = getattr(config, self.CONFIG_FIELD)
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.window = int(opts["window"])
        self.eps = float(opts.get("eps", 1e-6))
        self.rope = bool(opts.get("rope", True))                  # rotate q and k as the original layer did
        self.backend = check_backend("auto", self.HFA_BACKENDS)   # see `attend`; hfa.patch sets it
        if base is None:
            base = ALL_FAMILIES[opts["family"]].attention_class()(config, layer_idx)
        self.scaling = base.scaling
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        self.init_new_modules(config, opts)

    def init_new_modules(self, config, opts: dict) -> None:
        """Create what the conversion adds to the original layer: the feature maps and, for the hybrid, the mix."""
        fm, fdim = opts["feature_map"], opts.get("feature_dim")
        self.feature_map_q = make_feature_map(fm, self.num_heads, self.head_dim, fdim)
        self.feature_map_k = make_feature_map(fm, self.num_kv_heads, self.head_dim, fdim)
        self.window_factor_init = float(opts.get("window_factor_init", 0.0))
        if self.window:
            self.window_factor = nn.Parameter(torch.full((self.num_heads,), self.window_factor_init))

    def reset_linear_parameters(self) -> None:
        """Feature maps to their initial state, the mix to sigmoid(window_factor_init)."""
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()
        if self.window:
            with torch.no_grad():
                self.window_factor.fill_(self.window_factor_init)

    def project(self, hidden_states, position_embeddings):
        """(q (B, H, S, D), k (B, Hkv, S, D), v (B, Hkv, S, D)) after norms and RoPE (``rope``): the original
        layer's view."""
        return project_qkv(self, hidden_states, position_embeddings, rope=self.rope)


    def features(self, q, k):
        """(phi_q(q) (B, H, S, F), phi_k(k) (B, Hkv, T, F)): what the linear part multiplies."""
        return self.feature_map_q(q), self.feature_map_k(k)

    def token_log_decay(self, hidden_states):
        """The per-token log decay (B, Hkv, S) <= 0 of the state, from the layer's input; None: no decay."""
        return None

    def head_output(self, out):
        """Each head's output (B, H, S, D) as o_proj reads it (here unchanged)."""
        return out

    def attend(self, q, k, v, kpm=None, state=None, return_state=False, log_decay=None):
        """Attention of q (B, H, S, D) over k, v (B, Hkv, context + S, D) and an earlier state -> (out, state);
        log_decay (B, Hkv, S): the state's per-token decay (window=0 only).

        backend: "auto" (the Triton kernels on CUDA where they serve the call, else PyTorch: the quadratic form for
        short inputs, the chunked one for long), "triton" (raise where it cannot run), "reference" (quadratic),
        "chunked"."""
        if self.window and log_decay is not None:
            raise ValueError("a decay with a softmax window has no kernel form here: window must be 0")
        fq, fk = self.features(q, k)
        if not self.window and kpm is not None:       # a padded key adds nothing to the state or the normaliser
            fk = fk * kpm[:, None, :, None].to(fk.dtype)
            if log_decay is not None:                 # ... and does not decay it
                log_decay = log_decay.masked_fill(~kpm[:, None, :], 0.0)
        res = self._attend_triton(q, k, v, fq, fk, kpm, state, return_state, log_decay)
        if res is None:
            res = self._attend_torch(q, k, v, fq, fk, kpm, state, return_state, log_decay)
        return res if return_state else (res, None)

    def _triton_wanted(self, q) -> bool:
        """Whether the backend rule would try the kernels here (then decoding goes through them too)."""
        return self.backend == "triton" or (self.backend == "auto" and q.is_cuda)

    def _decode_step(self, q, k, v, kpm, state):
        """One new token of the hybrid from the cache (k, v: the cached window + the new token, all inside its
        window): `hybrid_decode_step`, then the keys that leave the window join the state."""
        out = hybrid_decode_step(q, k, v, self.feature_map_q(q), state,
                                 window_factor=torch.sigmoid(self.window_factor.float()), scale=self.scaling,
                                 eps=self.eps, key_padding_mask=kpm)
        leaving = k.shape[2] - (self.window - 1)
        if leaving > 0:
            fk = self.feature_map_k(k[:, :, :leaving])
            if kpm is not None:
                fk = fk * kpm[:, None, :leaving, None].to(fk.dtype)
            state = fold_into_state(state, fk, v[:, :, :leaving])
        return out, state

    def _attend_triton(self, q, k, v, fq, fk, kpm, state, return_state, log_decay=None):
        """The Triton kernels' result, or None where the backend rule (``attention.backends``) says PyTorch."""
        def why_not():
            if self.window:
                from ..kernels.linear.triton_hybrid import hybrid_unsupported_reason
                return hybrid_unsupported_reason(q, k, v, fq, fk, initial_state=state, key_padding_mask=kpm)
            from ..kernels.linear.triton_chunked import linear_triton_unsupported_reason
            return linear_triton_unsupported_reason(fq, fk, v, log_decay=log_decay, initial_state=state)

        if not use_triton(self.backend, q.device, why_not, f"linear-attention layer {self.layer_idx}",
                          choices=self.HFA_BACKENDS):
            return None
        from ..kernels.linear import triton_chunked as tc
        if self.window:
            from ..kernels.linear import triton_hybrid as th
        if self.window:
            return th.hybrid_attention_triton(q, k, v, fq, fk, window=self.window,
                                              window_factor=torch.sigmoid(self.window_factor.float()),
                                              scale=self.scaling, eps=self.eps, initial_state=state,
                                              return_state=return_state, key_padding_mask=kpm)
        gate = dict(log_decay=log_decay, normalize=self.normalize, eps=self.eps)
        if q.shape[2] == 1 and state is not None and not torch.is_grad_enabled():
            out, new_state = tc.linear_attention_step_triton(fq, fk, v, state, **gate)
            return (out, new_state) if return_state else out
        return tc.linear_attention_triton(fq, fk, v, initial_state=state, return_state=return_state, **gate)

    def _attend_torch(self, q, k, v, fq, fk, kpm, state, return_state, log_decay=None):
        rows, keys = q.shape[2], k.shape[2]
        quadratic = self.backend == "reference" or (self.backend != "chunked" and rows * keys <= QUADRATIC_LIMIT)
        if self.window:
            opts = dict(window=self.window, window_factor=torch.sigmoid(self.window_factor.float()),
                        scale=self.scaling, eps=self.eps, initial_state=state, return_state=return_state,
                        key_padding_mask=kpm)
            if quadratic:
                return hybrid_attention_reference(q, k, v, fq, fk, **opts)
            return hybrid_attention_chunked(q, k, v, fq, fk, chunk_size=256, **opts)
        opts = dict(log_decay=log_decay, normalize=self.normalize, eps=self.eps, initial_state=state,
                    return_state=return_state)
        if rows == 1 and state is not None:
            return linear_attention_recurrent(fq, fk, v, **opts)
        if quadratic:
            return linear_attention_reference(fq, fk, v, **opts)
        return linear_attention_chunked(fq, fk, v, chunk_size=256, **opts)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        if cache is None:                  # the keyword was past_key_values before transformers 5.24
            cache = past_key_values
        b, s, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        log_decay = self.token_log_decay(hidden_states)
        if cache is None:
            out, _ = self.attend(q, k, v, key_padding(attention_mask, k.shape[2]), log_decay=log_decay)
        else:
            layer = _cache_layer(cache, self.layer_idx, self.window)
            ctx_k, ctx_v, state = layer.read()
            if ctx_k is not None and ctx_k.shape[2]:
                k, v = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
            kpm = key_padding(attention_mask, k.shape[2])
            keep = max(self.window - 1, 0)
            if s == 1 and self.window and not self._triton_wanted(q):
                out, state = self._decode_step(q, k, v, kpm, state)
            else:
                out, state = self.attend(q, k, v, kpm, state, return_state=True, log_decay=log_decay)
            layer.write(k[:, :, k.shape[2] - min(keep, k.shape[2]):], v[:, :, v.shape[2] - min(keep, v.shape[2]):],
                        state, s)
        out = self.head_output(out).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), None


# -- model classes, one per family ------------------------------------------------------------------------

# the families linear attention supports: the entries of the one family table that list it
FAMILIES = {mt: fam for mt, fam in ALL_FAMILIES.items() if "linear" in fam.methods}

# config.hfa_linear: the options of a linear model (family: the original model_type)
LINEAR_FIELDS = {"hfa_linear": (dict | None, None)}


def _validate_linear_config(cfg):
    opts = getattr(cfg, "hfa_linear", None)
    if not opts or "feature_map" not in opts or "window" not in opts:
        raise ValueError(f"a {cfg.model_type} config needs hfa_linear = {{feature_map, window, softmax_layers, ...}}")


def _make_attention(config, layer_idx: int, base):
    keep = set(config.hfa_linear.get("softmax_layers") or [])
    return None if layer_idx in keep else LinearAttention(config, layer_idx, base=base)


def _reset_feature_maps(model) -> None:
    for layer in model.model.layers:               # post_init's init does not know the feature maps
        if isinstance(layer.self_attn, LinearAttention):
            layer.self_attn.reset_linear_parameters()


def linear_model_class(family: str) -> tuple[type, type]:
    """(config class, model class) of the linear-attention variant of `family` (a key of FAMILIES), registered
    with AutoConfig / AutoModelForCausalLM as model_type ``hfa_linear_<family>`` (``hfa_linear_gemma3`` for
    gemma3_text)."""
    if family not in FAMILIES:
        raise ValueError(f"linear attention supports the families {', '.join(FAMILIES)}; got {family!r}")
    return converted_model_class(FAMILIES[family], "linear", fields=LINEAR_FIELDS, make_attention=_make_attention,
                                 validate=_validate_linear_config, after_init=_reset_feature_maps, module=__name__)


for _family in FAMILIES:                # register every family now, so hfa.load finds any saved checkpoint
    linear_model_class(_family)
