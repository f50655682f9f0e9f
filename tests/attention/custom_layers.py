"""Hand-built attention layers that do what some model families do, to pin the patch's contract on each:

* ``WindowlessAttention``: the model builds a sliding-window mask, the layer never passes ``sliding_window=``
  (PhiMoE);
* ``BiasedAttention``: the layer passes a score-changing kwarg our attention function does not know
  (``score_offset=``, a per-head constant added to the scores), handled by this module's own
  ``eager_attention_forward`` as a real modeling file would (Inkling2's ``position_bias``, HY-V4's ``indices``);
* ``MaskEditingAttention``: the layer indexes and rewrites the 4-D mask before the attention call (Doge);
* ``SinkBiasAttention``: per-query ``sinks=`` and ``position_bias=`` (Inkling2), which we support natively.

Each replaces the ``self_attn`` of a tiny Mistral model (window 6, sequences longer than that), so eager and
patched run the same weights.
"""

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mistral.modeling_mistral import MistralAttention, apply_rotary_pos_emb, repeat_kv


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, score_offset=None,
                            position_bias=None, sinks=None, **kwargs):
    """The eager definition these layers are exact against (what a modeling file's eager function is)."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if score_offset is not None:
        w = w + score_offset.view(1, -1, 1, 1) * torch.arange(key.shape[2], dtype=w.dtype) / key.shape[2]
    if position_bias is not None:
        w = w + position_bias
    if attention_mask is not None:
        w = w + attention_mask
    if sinks is not None:
        w = torch.softmax(torch.cat([w, sinks], dim=-1).float(), dim=-1)[..., :-1].to(query.dtype)
    else:
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


class _Base(MistralAttention):
    def extra(self, hidden_states, query, key, attention_mask):
        """(the mask the layer passes on, the extra kwargs): the one thing each layer does differently."""
        return attention_mask, {}

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        mask, extra = self.extra(hidden_states, q, k, attention_mask)
        out, w = interface(self, q, k, v, mask, dropout=0.0, scaling=self.scaling, **extra)  # no sliding_window=
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), w


class WindowlessAttention(_Base):
    pass


class BiasedAttention(_Base):
    def extra(self, hidden_states, query, key, attention_mask):
        return attention_mask, {"score_offset": torch.linspace(-2.0, 2.0, query.shape[1])}


class MaskEditingAttention(_Base):
    def extra(self, hidden_states, query, key, attention_mask):
        # as Doge's prepare_dynamic_mask: index the 4-D mask, then hide every third key on top of it
        m = attention_mask[:, :, :, : key.shape[2]]
        hidden = (torch.arange(key.shape[2]) % 3 == 1).view(1, 1, 1, -1)
        return m.masked_fill(hidden, torch.finfo(m.dtype).min), {}


class SinkBiasAttention(_Base):
    def extra(self, hidden_states, query, key, attention_mask):
        B, H, Sq, _ = query.shape
        sinks = torch.sin(hidden_states[..., :H]).transpose(1, 2).unsqueeze(-1)          # (B, H, Sq, 1)
        dist = torch.arange(Sq)[:, None] + key.shape[2] - Sq - torch.arange(key.shape[2])[None, :]
        bias = (0.1 * torch.arange(1, H + 1).view(1, H, 1, 1) * torch.cos(dist / 3.0)).expand(B, H, Sq, -1)
        return attention_mask, {"sinks": sinks, "position_bias": bias}


def tiny_mistral_with(layer_cls, seed=0):
    """A tiny eager Mistral (window 6) whose attention layers are ``layer_cls``."""
    from tests.tiny_models import make_model
    model = make_model("mistral", seed=seed)
    for i, layer in enumerate(model.model.layers):
        new = layer_cls(model.config, i)
        new.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = new
    return model
