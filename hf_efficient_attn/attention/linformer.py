"""Linformer self-attention (Wang et al. 2020) in place of the softmax self-attention of a BERT encoder.

    from hf_efficient_attn.attention.linformer import LinformerSelfAttention, LinformerBertModel

The conversion (``hf_efficient_attn.conversions.linformer``) builds these from a pretrained encoder; this module
holds the architecture. Per layer, with n the input length (n <= max_length) and the layer's own q/k/v:

    K' = E[:, :n] (m * K)        V' = F[:, :n] (m * V)        (k, n) x (n, C): the sequence projected to k rows
    out = softmax(Q K'^T * scaling + mask') V'                 (B, H, n, D): n queries attend to k rows, not n keys

* m (B, n, 1): the padding mask (1 = real token). Padding keys and values are zeroed BEFORE the projection, so a
  padded token adds nothing to any row (padding the input changes nothing).
* mask': a projected row that receives no real token (``|E| m == 0`` for that row) is left out of the softmax.
  Without it, such a row is a zero key that scores 0 and draws attention to a zero value.
* E, F: (k, max_length) parameters per layer, one column per position (an input shorter than max_length uses the
  first n columns: the same as padding it to max_length, since padding keys are zeroed). Shared across the heads
  of the layer (the paper's "headwise" sharing); ``share_kv=True`` also uses E for V (F = E, the paper's
  "key-value" sharing: one (k, max_length) matrix per layer, ``linformer_e``); ``share_kv=False`` gives V its own
  ``linformer_f``. The paper's third option, one matrix for all layers ("layerwise"), is not offered.
* Initialisation: E = F = identity on the first k positions (row i picks position i, every other entry 0). For
  an input of n <= k tokens, K' is K with k - n masked zero rows: the layer IS the original softmax attention,
  and a converted encoder equals the original exactly. Tokens past position k start out ignored as keys and
  values; healing (``distill(..., stage="encoder")``) trains E/F to fold them in.
* Past max_length: refused with `HFAError` (E has no column for position max_length + 1). Convert again with
  a larger max_length (at most ``max_position_embeddings``), or truncate the input.
* Non-causal only: every projected row mixes tokens from the whole sequence, so a causal model would let each
  token see the tokens after it. The conversion refuses causal models.

The attention itself runs on ``torch.nn.functional.scaled_dot_product_attention`` (a boolean mask over the k
rows), or explicitly when the config's attention implementation is ``"eager"`` (which also returns the weights,
``(B, H, n, k)``, for ``output_attentions``). Attention-probability dropout follows the layer's ``dropout``
module (off in eval mode, or when that module alone is put in eval mode).

Checkpoints: `LinformerBertConfig` (model_type ``hfa_linformer_bert``, options in ``config.hfa_linformer``:
k, share_kv, max_length, pooler) and `LinformerBertModel` (a ``BertModel`` whose every
``encoder.layer[i].attention.self`` is a `LinformerSelfAttention`), registered with AutoConfig / AutoModel on
import, so ``hfa.load`` and ``AutoModel.from_pretrained`` of a saved folder rebuild it; stock transformers
without this package refuses the folder (unknown model type) rather than loading full attention with E/F ignored.
The model's forward takes the usual 2-D padding mask ``attention_mask`` (B, n) and hands it to the layers
itself (as ``linformer_key_mask``), instead of transformers' 4-D masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertSelfAttention

from ..errors import HFAError, OptionError

__all__ = ["LINFORMER_PARAMETERS", "LinformerBertConfig", "LinformerBertModel", "LinformerSelfAttention",
           "check_length", "linformer_layers", "validate_linformer_options"]

LINFORMER_PARAMETERS = ("linformer_e", "linformer_f")   # what the conversion adds per layer (f: share_kv=False)


def check_length(n: int, max_length: int, max_positions: int | None = None) -> None:
    """Refuse an input of `n` tokens past `max_length`, the most the E/F projections have columns for."""
    if n > max_length:
        most = f" (at most max_position_embeddings={max_positions})" if max_positions else ""
        raise HFAError(
            f"the input has {n} tokens, more than max_length={max_length} of this Linformer encoder: its sequence "
            f"projections E/F have one column per position, {max_length} in all. Truncate the input "
            f"(tokenizer(..., truncation=True, max_length={max_length})), or convert the original encoder again "
            f"with a larger max_length{most}")


class LinformerSelfAttention(BertSelfAttention):
    """BERT self-attention with K and V projected along the sequence to k rows (see the module docstring).

    forward(hidden_states (B, n, C), attention_mask=None, linformer_key_mask=None (B, n) bool) -> (out (B, n, C),
    weights (B, H, n, k) under "eager", else None). The padding mask is `linformer_key_mask`, else a 2-D
    `attention_mask`; transformers' 4-D masks are refused (LinformerBertModel passes the 2-D one)."""

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, is_causal=False, layer_idx=layer_idx)
        opts = config.hfa_linformer
        self.k_rows, self.max_length = int(opts["k"]), int(opts["max_length"])
        self.share_kv = bool(opts["share_kv"])
        self.linformer_e = nn.Parameter(torch.empty(self.k_rows, self.max_length))
        if not self.share_kv:
            self.linformer_f = nn.Parameter(torch.empty(self.k_rows, self.max_length))
        self.reset_linformer_parameters()

    def reset_linformer_parameters(self) -> None:
        """E (and F) to the identity on the first k positions: row i picks position i (exact for n <= k)."""
        with torch.no_grad():
            for p in self.projections():
                p.copy_(torch.eye(self.k_rows, self.max_length, dtype=p.dtype, device=p.device))

    def projections(self) -> tuple[nn.Parameter, ...]:
        return (self.linformer_e,) if self.share_kv else (self.linformer_e, self.linformer_f)

    def forward(self, hidden_states, attention_mask=None, cache=None, linformer_key_mask=None, **kwargs):
        B, n, _ = hidden_states.shape
        check_length(n, self.max_length)
        key_mask = linformer_key_mask
        if key_mask is None and attention_mask is not None:
            if attention_mask.dim() != 2:
                raise HFAError(f"LinformerSelfAttention takes the 2-D padding mask (batch, length), got a "
                               f"{attention_mask.dim()}-D attention_mask: call it through LinformerBertModel, which "
                               "passes the 2-D mask (linformer_key_mask=)")
            key_mask = attention_mask.bool()
        H, D = self.num_attention_heads, self.attention_head_size
        q = self.query(hidden_states).view(B, n, H, D).transpose(1, 2)        # (B, H, n, D)
        k, v = self.key(hidden_states), self.value(hidden_states)              # (B, n, C)
        if key_mask is not None:                                               # padding adds nothing to a row
            m = key_mask.to(k.dtype)[..., None]
            k, v = k * m, v * m
        e = self.linformer_e[:, :n].to(k.dtype)                                # (k, n)
        f = e if self.share_kv else self.linformer_f[:, :n].to(k.dtype)
        r = self.k_rows
        kp = torch.matmul(e, k).view(B, r, H, D).transpose(1, 2)               # (B, H, k, D)
        vp = torch.matmul(f, v).view(B, r, H, D).transpose(1, 2)

        # -- which projected rows receive a real token: (B, k); a sample with none keeps every row (no NaN)
        real = (key_mask.float() if key_mask is not None else hidden_states.new_ones(1, n, dtype=torch.float32))
        reach = torch.matmul(real, e.detach().abs().float().T) > 0             # (B or 1, k)
        reach = reach | ~reach.any(-1, keepdim=True)
        keep = reach[:, None, None, :]                                         # (B, 1, 1, k)

        p_drop = self.dropout.p if self.dropout.training else 0.0
        if self.config._attn_implementation == "eager":
            scores = torch.matmul(q, kp.transpose(-1, -2)) * self.scaling      # (B, H, n, k)
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1)
            out = torch.matmul(F.dropout(weights, p=p_drop, training=p_drop > 0), vp)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, kp, vp, attn_mask=keep, dropout_p=p_drop, scale=self.scaling)
        return out.transpose(1, 2).reshape(B, n, H * D), weights


# -- model classes ----------------------------------------------------------------------------------------

def validate_linformer_options(opts, max_positions: int | None) -> None:
    """Raise `OptionError` unless `opts` = {k, share_kv, max_length, ...} describes a Linformer encoder."""
    if not isinstance(opts, dict) or not {"k", "share_kv", "max_length"} <= set(opts):
        raise OptionError(f"a Linformer config needs hfa_linformer = {{k, share_kv, max_length}}, got {opts!r}")
    k, share_kv, max_length = opts["k"], opts["share_kv"], opts["max_length"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise OptionError(f"k must be an integer >= 1 (the rows K and V are projected to; the paper uses 64-256), "
                          f"got {k!r}")
    if not isinstance(share_kv, bool):
        raise OptionError(f"share_kv must be True (one projection E per layer, for keys and values) or False "
                          f"(E for keys, F for values), got {share_kv!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise OptionError(f"max_length must be an integer >= 1 (the longest input, one column of E per position), "
                          f"got {max_length!r}")
    if max_positions is not None and max_length > max_positions:
        raise OptionError(f"max_length={max_length} is more than the encoder's max_position_embeddings="
                          f"{max_positions}: it has no position embedding past that. Use max_length <= {max_positions}")
    if k > max_length:
        raise OptionError(f"k={k} is more than max_length={max_length}: projecting {max_length} positions to more "
                          f"rows saves nothing. Use k <= max_length (k = max_length is exact at every length)")


class LinformerBertConfig(BertConfig):
    """A BertConfig plus ``hfa_linformer`` = {k, share_kv, max_length, pooler} (see the module docstring)."""

    model_type = "hfa_linformer_bert"
    hfa_linformer: dict | None = None

    def validate_architecture(self):
        super().validate_architecture()
        if self.is_decoder:
            raise OptionError("a Linformer encoder cannot be a decoder (is_decoder=True): its projected keys mix "
                              "every position, future ones included")
        validate_linformer_options(self.hfa_linformer, self.max_position_embeddings)


class LinformerBertModel(BertModel):
    """A BertModel whose self-attention layers are `LinformerSelfAttention` (model_type ``hfa_linformer_bert``).

    forward takes what BertModel's takes; `attention_mask` must be the 2-D padding mask (B, n), and an input
    longer than ``config.hfa_linformer["max_length"]`` raises `HFAError`."""

    config_class = LinformerBertConfig

    def __init__(self, config, add_pooling_layer: bool | None = None):
        config.validate_architecture()      # not run on construction (the subclass is not @strict itself)
        if add_pooling_layer is None:
            add_pooling_layer = bool(config.hfa_linformer.get("pooler", True))
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        for i, layer in enumerate(self.encoder.layer):
            layer.attention.self = LinformerSelfAttention(config, layer_idx=i)
        self.post_init()
        for attn in linformer_layers(self):     # post_init's init does not know E/F
            attn.reset_linformer_parameters()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is not None:
            check_length(ref.shape[1], self.config.hfa_linformer["max_length"], self.config.max_position_embeddings)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise HFAError(f"a Linformer encoder takes the 2-D padding mask attention_mask (batch, length), got "
                               f"{attention_mask.dim()}-D: its layers project the sequence, so a mask per (query, "
                               "key) pair has no meaning after the projection")
            key_mask = attention_mask.bool()
        return super().forward(input_ids=input_ids, attention_mask=None, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, linformer_key_mask=key_mask,
                               **kwargs)


def linformer_layers(model) -> list[LinformerSelfAttention]:
    """The Linformer self-attention modules of `model`, in order."""
    return [m for m in model.modules() if isinstance(m, LinformerSelfAttention)]


AutoConfig.register(LinformerBertConfig.model_type, LinformerBertConfig, exist_ok=True)
AutoModel.register(LinformerBertConfig, LinformerBertModel, exist_ok=True)
