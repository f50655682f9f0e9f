"""The model-family adapter table: what each transformers family's attention looks like, in one place.

    from hf_efficient_attn.attention.families import FAMILIES, family_of
    fam = family_of(model, "mla")          # the entry, or a ValueError naming the families "mla" supports
    fam.qkv, fam.qk_norm, fam.norm_gain(attn.k_norm.weight), layer_window(model.config, 3)

Every conversion (``conversions.gqa``, ``.mla``, ``.linear``, ``.mamba2``) and every converted model class
(``attention.mla``, ``attention.linear``, ``attention.mamba2``, through :func:`converted_model_class`) reads these
facts here and nowhere else. Adding a family is one `Family` entry (plus its tests); a method supports the families
whose entry lists it in ``methods``.

The facts per family:

* ``config`` / ``causal_lm`` / ``attention``: its transformers classes (by name: resolved on use);
* ``qkv``: ``"separate"`` (q_proj, k_proj, v_proj, o_proj; biases where the config has them) or ``"fused"``
  (one ``qkv_proj`` whose rows are [q | k | v], then o_proj);
* ``qk_norm``: per-head RMS norms of q and k before RoPE, one weight of size head_dim shared by all heads:
  ``None`` (none), ``"w"`` (``x * w``, Qwen3) or ``"1+w"`` (``x * (1 + w)``, Gemma 3); ``norm`` names the class,
  ``norm_layout`` the axes of the tensors it sees (``"bhsd"``: heads before tokens, Gemma 3; ``"bshd"``: Qwen3);
* ``kv_heads``: whether the config has ``num_key_value_heads`` (GPT-NeoX is always MHA);
* ``rope_per_layer_type``: one inv_freq per layer type (Gemma 3: local theta on sliding layers) rather than one
  for the model; the rotary dim is read from the inv_freq buffers (:func:`rotary_dim`);
* sliding windows: per layer from ``layer_types`` + ``sliding_window``, else ``sliding_window`` for every
  layer unless ``use_sliding_window`` is False (:func:`layer_window`);
* the cache: every family here uses the model's own ``DynamicCache(config=...)``: a sliding layer keeps its last
  ``window - 1`` tokens; converted layers store their own tensors in the layer slot (MLA) or swap in their own
  cache layer (linear).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

__all__ = ["FAMILIES", "Family", "attention_layers", "converted_model_class", "family_of", "layer_inv_freqs",
           "layer_window", "rotary_dim", "without_windows"]


@dataclass(frozen=True)
class Family:
    """One model family's attention, as the conversions and converted model classes need it (see the module)."""

    model_type: str
    prefix: str                       # class-name prefix of its converted models: f"{prefix}MLAConfig", ...
    config: str                       # transformers' config class, by its top-level name
    causal_lm: str                    # transformers' causal-LM class
    attention: str                    # its attention module, "models.<family>.modeling_<family>.<Class>"
    methods: tuple[str, ...] = ()     # the conversions that support it (each tested on it)
    qkv: str = "separate"             # "separate" | "fused"
    qk_norm: str | None = None        # None | "w" | "1+w": the form of its per-head q/k RMS norms
    norm: str | None = None           # the q/k norm's class, "models.<family>.modeling_<family>.<Class>"
    norm_layout: str = "bhsd"         # the q/k norms' input and output: (B, H, S, D) (Gemma 3) or "bshd" (Qwen3)
    kv_heads: bool = True             # config.num_key_value_heads exists
    rope_per_layer_type: bool = False  # one inv_freq per layer type (config.layer_types)

    @property
    def name(self) -> str:
        """The short name in converted model types: ``hfa_<method>_<name>`` (``gemma3_text`` -> ``gemma3``)."""
        return self.model_type.removesuffix("_text")

    def config_class(self) -> type:
        return _resolve(self.config)

    def causal_lm_class(self) -> type:
        return _resolve(self.causal_lm)

    def attention_class(self) -> type:
        return _resolve(self.attention)

    def make_norm(self, dim: int, eps: float) -> nn.Module:
        """A fresh q/k norm of this family (its own class, so its forward is the family's)."""
        if self.norm is None:
            raise ValueError(f"{self.model_type} has no per-head q/k norms")
        return _resolve(self.norm)(dim, eps=eps)

    def norm_gain(self, weight: torch.Tensor) -> torch.Tensor:
        """The factor a q/k norm multiplies the RMS-normalised head by: ``w`` or ``1 + w`` (Gemma)."""
        if self.qk_norm == "1+w":
            return 1.0 + weight
        if self.qk_norm == "w":
            return weight
        raise ValueError(f"{self.model_type} has no per-head q/k norms")


LEARNED_SPARSITY = ("adaptive_span", "duo", "longformer")   # the conversions of attention.span: one family set

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama", "LlamaConfig", "LlamaForCausalLM", "models.llama.modeling_llama.LlamaAttention",
           methods=("gqa", "mla", "linear", *LEARNED_SPARSITY, "mamba2")),
    Family("mistral", "Mistral", "MistralConfig", "MistralForCausalLM",
           "models.mistral.modeling_mistral.MistralAttention", methods=("gqa", "linear", *LEARNED_SPARSITY)),
    Family("qwen2", "Qwen2", "Qwen2Config", "Qwen2ForCausalLM", "models.qwen2.modeling_qwen2.Qwen2Attention",
           methods=("gqa", "linear", *LEARNED_SPARSITY)),
    Family("qwen3", "Qwen3", "Qwen3Config", "Qwen3ForCausalLM", "models.qwen3.modeling_qwen3.Qwen3Attention",
           methods=("gqa", "mla", "linear", *LEARNED_SPARSITY, "mamba2"), qk_norm="w",
           norm="models.qwen3.modeling_qwen3.Qwen3RMSNorm",
           norm_layout="bshd"),
    Family("gemma", "Gemma", "GemmaConfig", "GemmaForCausalLM", "models.gemma.modeling_gemma.GemmaAttention",
           methods=("gqa",)),
    Family("gemma2", "Gemma2", "Gemma2Config", "Gemma2ForCausalLM", "models.gemma2.modeling_gemma2.Gemma2Attention",
           methods=("gqa",)),
    Family("gemma3_text", "Gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
           "models.gemma3.modeling_gemma3.Gemma3Attention", methods=("gqa", "mla", "linear", *LEARNED_SPARSITY),
           qk_norm="1+w",
           norm="models.gemma3.modeling_gemma3.Gemma3RMSNorm", rope_per_layer_type=True),
    Family("phi3", "Phi3", "Phi3Config", "Phi3ForCausalLM", "models.phi3.modeling_phi3.Phi3Attention",
           methods=("gqa",), qkv="fused"),
    Family("gpt_neox", "GPTNeoX", "GPTNeoXConfig", "GPTNeoXForCausalLM",
           "models.gpt_neox.modeling_gpt_neox.GPTNeoXAttention", qkv="fused", kv_heads=False),
)}

# why a method refuses a family it does not list, where there is more to say than "not supported"
WHY_NOT = {
    ("gqa", "gpt_neox"): "GPT-NeoX cannot be converted to fewer KV heads: its modeling code has no "
                         "num_key_value_heads (every layer is MHA), so transformers could not load such a checkpoint",
}


def _resolve(path: str):
    """A transformers class by its top-level name ("LlamaConfig") or module path ("models.llama....Class")."""
    if "." not in path:
        import transformers
        return getattr(transformers, path)
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.{module}"), name)


def family_of(model_or_config, method: str | None = None) -> Family:
    """The table entry of a model (or config); with `method`, only a family that method supports.

    Raises ValueError naming the model type, the families `method` supports and how a family is added."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is not None and (method is None or method in fam.methods):
        return fam
    if (method, model_type) in WHY_NOT:
        raise ValueError(WHY_NOT[method, model_type])
    supported = [f for f, e in FAMILIES.items() if method is None or method in e.methods]
    what = f"{method.upper() if len(method) <= 3 else method} conversion" if method else "hf_efficient_attn"
    raise ValueError(
        f"{what} does not support model_type {model_type!r} ({type(model_or_config).__name__}); supported: "
        f"{', '.join(supported)}. A family is added by one entry in FAMILIES in "
        "hf_efficient_attn/attention/families.py (see the README's 'How to add one')")


# -- facts read from a loaded model -------------------------------------------------------------------

def attention_layers(model) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(model).__name__} has no decoder layers with a self_attn module")
    return [layer.self_attn for layer in layers]


def rotary_dim(model) -> int:
    """How many of each head's dims RoPE rotates (2 x the inv_freq buffers' length); RoPE pairs dim f with
    f + rotary_dim // 2 (HF's rotate_half layout) and leaves dims rotary_dim.. D untouched."""
    dims = {2 * b.numel() for n, b in model.named_buffers() if n.endswith("inv_freq") and "original" not in n}
    if len(dims) != 1:
        raise ValueError(f"cannot tell {type(model).__name__}'s rotary dimension from its inv_freq buffers {dims}")
    return dims.pop()


def layer_inv_freqs(model) -> list[torch.Tensor]:
    """Each decoder layer's RoPE inv_freq (R/2,) on CPU: per layer type where the family has one per type
    (Gemma 3: local theta on sliding layers, global on full ones), else the model's one buffer."""
    n = model.config.num_hidden_layers
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    types = getattr(model.config, "layer_types", None)
    if rotary is not None and types and all(hasattr(rotary, f"{t}_inv_freq") for t in types):
        return [getattr(rotary, f"{t}_inv_freq").detach().cpu() for t in types]
    inv_freq = next(b for name, b in model.named_buffers() if name.endswith("inv_freq") and "original" not in name)
    return [inv_freq.detach().cpu()] * n


def layer_window(config, layer_idx: int) -> int | None:
    """The sliding window (tokens, the query's own included) of layer `layer_idx`, or None (full attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return window if types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def without_windows(family: Family, config_dict: dict) -> dict:
    """`config_dict` (a config's to_dict()) changed so the model's masks mark causality and padding only.

    Families whose RoPE follows the layer types keep them (a sliding layer keeps its local RoPE) and get a
    window no sequence reaches; the others lose their windows."""
    out = dict(config_dict)
    if family.rope_per_layer_type:
        out["sliding_window"] = 2 ** 31 - 1
        return out
    out.update(sliding_window=None, use_sliding_window=False)
    if out.get("layer_types"):
        out["layer_types"] = ["full_attention"] * len(out["layer_types"])
    return out


# -- converted model classes ----------------------------------------------------------------------------

_CONVERTED: dict[tuple[str, str], tuple[type, type]] = {}


def converted_model_class(family: Family, method: str, *, fields: dict, make_attention, validate=None,
                          after_init=None, module: str | None = None) -> tuple[type, type]:
    """(config class, causal-LM class) of `family` with its attention replaced by method `method`.

    The config class subclasses the family's config with model_type ``hfa_<method>_<family.name>`` and the
    extra `fields` ({name: (type, default)}); ``validate(config)`` runs after the family's own checks. The model
    class replaces each decoder layer's ``self_attn`` by ``make_attention(config, layer_idx, base_attention)``
    (None keeps the layer), then runs ``after_init(model)``. Both are registered with AutoConfig /
    AutoModelForCausalLM, so ``from_pretrained`` loads saved checkpoints; names are ``<prefix><Method>Config`` and
    ``<prefix><Method>ForCausalLM`` (``LlamaMLAConfig``); made once per (family, method)."""
    key = (family.model_type, method)
    if key in _CONVERTED:
        return _CONVERTED[key]
    base_cfg, base_lm = family.config_class(), family.causal_lm_class()
    model_type = f"hfa_{method}_{family.name}"
    tag = {"mla": "MLA"}.get(method, "".join(part.capitalize() for part in method.split("_")))

    def validate_architecture(self):
        if hasattr(base_cfg, "validate_architecture"):
            base_cfg.validate_architecture(self)
        if validate is not None:
            validate(self)

    namespace = {"model_type": model_type, "hfa_family": family.model_type, "hfa_method": method,
                 "validate_architecture": validate_architecture,
                 "__annotations__": {name: typ for name, (typ, _) in fields.items()},
                 **{name: default for name, (_, default) in fields.items()},
                 "__doc__": f"A {base_cfg.__name__} plus the {method} fields ({', '.join(fields)}).",
                 "__module__": module or __name__}
    cfg_cls = type(f"{family.prefix}{tag}Config", (base_cfg,), namespace)

    def __init__(self, config):
        base_lm.__init__(self, config)
        for i, layer in enumerate(self.model.layers):
            new = make_attention(config, i, layer.self_attn)
            if new is not None:
                layer.self_attn = new
        self.post_init()
        if after_init is not None:
            after_init(self)

    # transformers guesses from the class's module source whether attention dispatches through its registry; here
    # it does: kept softmax layers are the family's own, converted ones honour `backend` (see hfa.patch)
    can_set = classmethod(lambda cls: True)
    lm_cls = type(f"{family.prefix}{tag}ForCausalLM", (base_lm,),
                  {"config_class": cfg_cls, "__init__": __init__, "__module__": module or __name__,
                   "_can_set_attn_implementation": can_set,
                   "__doc__": f"A {base_lm.__name__} whose attention layers are {method} attention "
                              f"(checkpoint model_type {model_type!r})."})
    AutoConfig.register(model_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, lm_cls, exist_ok=True)
    _CONVERTED[key] = (cfg_cls, lm_cls)
    return cfg_cls, lm_cls
