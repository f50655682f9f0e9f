"""Mamba-2-form attention (gated linear attention with a data-dependent decay) in place of softmax attention.

    from hf_efficient_attn.attention.mamba2 import Mamba2Attention, mamba2_model_class

The conversion (``hf_efficient_attn.conversions.mamba2``) builds these from a pretrained model (the
Mamba-in-the-Llama mapping); this module holds the architecture. Per layer, with x_t the layer's input:

    C = q (q_proj, then q_norm where the family has it)     B = k (k_proj, k_norm)     x = v (v_proj)
    log a_t = -softplus(x_t . w_dt + dt_bias) * exp(A_log)        one decay per KV head and token, a_t in (0, 1]
    S_t     = a_t S_{t-1} + k_t v_t^T                             fp32 state (Hkv, D, D): a GQA group shares it
    y_t     = scale * q_t S_t                                     no normaliser (scale: the original `scaling`)
    out_t   = o_proj(RMSNorm_h(y_t))                              per-head output norm (``output_norm``, default on)

This is ``kernels.linear.reference.linear_attention_reference(q * scale, k, v, log_decay=..., normalize=False)``
per layer, the gated form every linear kernel serves (PyTorch quadratic / chunked / recurrent, and the chunked
Triton kernel). `Mamba2Attention` is a `LinearAttention` with the identity feature map: it shares its cache layer
(`LinearAttentionCacheLayer`, constant size: the fp32 state of every past token, plus its small unused key sum),
its padding rules (a padded token neither adds to the state nor decays it), its backends and its decoding.

New parameters per layer (everything else is the original layer's):

* ``dt_proj`` (hidden -> Hkv, no bias), initialised to ZERO, so at conversion the decay is the same for every
  token; ``dt_bias`` (Hkv,) = softplus^-1(dt_init); ``A_log`` (Hkv,) = 0 (A = 1). With the default
  ``dt_init = 1/256`` every token starts with a_t = exp(-1/256) ~ 0.996: a key 256 tokens back still weighs
  e^-1, so the converted layer starts close to the linear attention its q/k/v already compute over the
  contexts it is distilled on (a few hundred tokens), while softplus is far from saturated and the decay can
  learn to shorten per head and per token.
* ``out_norm`` (H, D) weight, initialised to 1 (``output_norm=True``): without a normaliser, the size of
  q_t S_t grows with the number of keys the state holds; Mamba-2 and GLA RMS-normalise each head's output, and
  so does this layer (in fp32, eps = the family's ``rms_norm_eps``).

RoPE (``rope``, default False): Mamba-in-the-Llama drops it, because the decay already carries position and
the state then holds no absolute positions (q and k are the projections themselves, as C and B of a Mamba
layer are). ``rope=True`` keeps rotating q and k as the original layer did (the state stays the same size; the
teacher's position-dependent q . k patterns survive at initialisation). No short convolution (Mamba's conv1d
over x, B, C) and no output gate: the layer is the attention it replaces plus a decay and a norm.

Checkpoints: model classes per family (`mamba2_model_class`), model_type ``hfa_mamba2_<family>`` (e.g.
``hfa_mamba2_llama``), options in ``config.hfa_mamba2``; registered with the Auto classes on import, so
``hfa.load`` loads them, and stock transformers without this package refuses them (unknown model type).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .families import FAMILIES as ALL_FAMILIES
from .families import converted_model_class
from .linear import LinearAttention

__all__ = ["FAMILIES", "HeadRMSNorm", "MAMBA2_NEW_MODULES", "Mamba2Attention", "inverse_softplus",
           "mamba2_model_class"]

# the families the Mamba-2 form supports: the entries of the one family table that list it
FAMILIES = {mt: fam for mt, fam in ALL_FAMILIES.items() if "mamba2" in fam.methods}

MAMBA2_NEW_MODULES = ("dt_proj", "dt_bias", "A_log", "out_norm")   # what the conversion adds per layer
DT_INIT = 1 / 256                                                  # see the module docstring


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0 (``y + log(-expm1(-y))``, exact for small y)."""
    return y + math.log(-math.expm1(-y))


class HeadRMSNorm(nn.Module):
    """RMS norm of each head's output: (B, H, S, D) -> the same, ``x / rms(x) * weight[h]`` in fp32."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()[None, :, None, :]).to(x.dtype)


class Mamba2Attention(LinearAttention):
    """The Mamba-2 / GLA form of one attention layer (see the module docstring): the original q/k/v/o (and q/k
    norms), the identity feature map, no normaliser, a per-KV-head data-dependent decay, a per-head output norm.
    forward(hidden_states, position_embeddings, attention_mask, cache) -> (out (B, S, C), None)."""

    CONFIG_FIELD = "hfa_mamba2"
    normalize = False

    def init_new_modules(self, config, opts: dict) -> None:
        if self.window:
            raise ValueError("the Mamba-2 form has no softmax window (a windowed + gated hybrid needs a kernel form "
                             "this package does not have): hfa_mamba2['window'] must be 0")
        hidden = config.hidden_size
        self.dt_init = float(opts.get("dt_init", DT_INIT))
        self.dt_proj = nn.Linear(hidden, self.num_kv_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_kv_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_kv_heads))
        if opts.get("output_norm", True):
            eps = float(getattr(config, "rms_norm_eps", None) or 1e-6)
            self.out_norm = HeadRMSNorm(self.num_heads, self.head_dim, eps)
        self.reset_linear_parameters()

    def reset_linear_parameters(self) -> None:
        """dt_proj to 0, dt_bias to softplus^-1(dt_init), A_log to 0, the output norm to 1: a_t = exp(-dt_init)."""
        with torch.no_grad():
            self.dt_proj.weight.zero_()
            self.dt_bias.fill_(inverse_softplus(self.dt_init))
            self.A_log.zero_()
        if hasattr(self, "out_norm"):
            self.out_norm.reset_parameters()

    def features(self, q, k):
        return q * self.scaling, k                      # y = scale * q S: the scale rides on q (C)

    def token_log_decay(self, hidden_states):
        """log a_t = -softplus(x_t . w_dt + dt_bias) * exp(A_log): (B, S, C) -> (B, Hkv, S), fp32, <= 0."""
        dt = F.softplus(self.dt_proj(hidden_states).float() + self.dt_bias.float())      # (B, S, Hkv)
        return (-dt * torch.exp(self.A_log.float())).transpose(1, 2)

    def head_output(self, out):
        return self.out_norm(out) if hasattr(self, "out_norm") else out


# -- model classes, one per family ------------------------------------------------------------------------

# config.hfa_mamba2: the options of a Mamba-2-form model (family: the original model_type)
MAMBA2_FIELDS = {"hfa_mamba2": (dict | None, None)}


def _validate_mamba2_config(cfg):
    opts = getattr(cfg, "hfa_mamba2", None)
    if not opts or "family" not in opts or opts.get("window", 0) != 0:
        raise ValueError(f"a {cfg.model_type} config needs hfa_mamba2 = {{family, window: 0, output_norm, rope, "
                         f"dt_init, softmax_layers}}")


def _make_attention(config, layer_idx: int, base):
    keep = set(config.hfa_mamba2.get("softmax_layers") or [])
    return None if layer_idx in keep else Mamba2Attention(config, layer_idx, base=base)


def _reset_new_parameters(model) -> None:
    for layer in model.model.layers:               # post_init's init does not know the decay or the norm
        if isinstance(layer.self_attn, Mamba2Attention):
            layer.self_attn.reset_linear_parameters()


def mamba2_model_class(family: str) -> tuple[type, type]:
    """(config class, model class) of the Mamba-2-form variant of `family` (a key of FAMILIES), registered with
    AutoConfig / AutoModelForCausalLM as model_type ``hfa_mamba2_<family>``."""
    if family not in FAMILIES:
        raise ValueError(f"the Mamba-2 form supports the families {', '.join(FAMILIES)}; got {family!r}")
    return converted_model_class(FAMILIES[family], "mamba2", fields=MAMBA2_FIELDS, make_attention=_make_attention,
                                 validate=_validate_mamba2_config, after_init=_reset_new_parameters,
                                 module=__name__)


for _family in FAMILIES:                # register every family now, so hfa.load finds any saved checkpoint
    mamba2_model_class(_family)
