"""Softmax -> Mamba-2-form attention (Mamba-in-the-Llama): reuse q/k/v as C/B/x, add a data-dependent decay.

    new = convert(model, "mamba2")                                          # convert_mamba2
    distill(new, model, texts, tokenizer=tok, stage="attention", max_tokens=...)   # 1: layer-by-layer alignment
    distill(new, model, texts, tokenizer=tok, stage="logits", max_tokens=...)      # 2: end to end (KL)

`convert_mamba2` keeps every weight of the original (q/k/v/o projections, q/k norms) and adds per layer the
decay (``dt_proj``, ``dt_bias``, ``A_log``) and the per-head output norm (see ``attention.mamba2`` for the
layer, its initialisation and why). Right after conversion the decay is ~1 and the output norm at 1: the
model is only usable after stage 1.

Stage ``"attention"`` (``linear.attention_transfer_loss``) aligns every Mamba-2-form layer with the teacher's
layer on the teacher's own inputs, as for linear attention; without `trainable`, both stages train
``TRAINABLE["mamba2"]`` (`MAMBA2_TRAINABLE`: every parameter of the converted layers — q/k/v/o, q/k norms, the
decay and the output norm — the layer-wise then end-to-end distillation of Mamba-in-the-Llama; kept softmax
layers and the MLPs stay frozen).
"""

from __future__ import annotations

from ..attention.families import family_of
from ..attention.mamba2 import DT_INIT, MAMBA2_NEW_MODULES, Mamba2Attention, mamba2_model_class
from .linear import full_mask_fields, softmax_layers
from .toolkit import provenance_record, rebuild

__all__ = ["MAMBA2_NEW_MODULES", "MAMBA2_TRAINABLE", "Mamba2Trainable", "convert_mamba2"]

# the parameters of a converted layer: what it kept of the original attention and what the conversion added
MAMBA2_LAYER_PARAMETERS = (*MAMBA2_NEW_MODULES, "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def convert_mamba2(model, layers: list[int] | None = None, output_norm: bool = True, rope: bool = False,
                   window: int = 0, dt_init: float = DT_INIT):
    """A copy of `model` whose attention layers are Mamba-2-form (gated linear attention, data-dependent decay).

    layers: indices of layers to KEEP as softmax attention (None: convert every layer). output_norm: RMS-normalise
    each head's output before o_proj (Mamba-2 / GLA; the form has no normaliser). rope: keep rotating q and k
    (default False: Mamba-in-the-Llama drops RoPE, the decay carries position). window: must be 0 (a softmax
    window + gated hybrid needs a kernel form this package does not have yet). dt_init: the initial step,
    a_t = exp(-dt_init) for every token (default 1/256). No short convolution. The model must be a decoder of a
    family whose entry in ``attention.families.FAMILIES`` lists "mamba2". `model` is not modified.
    """
    entry = family_of(model, "mamba2")
    family = entry.model_type
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be 0 for the Mamba-2 form, got {window!r}")
    if window:
        raise ValueError(f"window={window}: the Mamba-2 form has no softmax window yet (a sliding-window softmax + "
                         "gated linear hybrid needs a new kernel form: the hybrid kernels have no decay). Use "
                         "window=0, or convert(model, 'linear', window=...) for the ungated hybrid")
    for name, value in (("output_norm", output_norm), ("rope", rope)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if isinstance(dt_init, bool) or not isinstance(dt_init, (int, float)) or not 0 < dt_init < 20:
        raise ValueError(f"dt_init must be a number in (0, 20) (the initial step: decay exp(-dt_init) per token; "
                         f"default 1/256), got {dt_init!r}")
    keep = softmax_layers(model, layers)
    opts = {"family": family, "window": 0, "output_norm": output_norm, "rope": rope, "dt_init": float(dt_init),
            "softmax_layers": keep}
    base = full_mask_fields(entry, model, opts)
    cfg_cls, lm_cls = mamba2_model_class(family)
    record = provenance_record("mamba2", model, **{k: v for k, v in opts.items() if k not in ("family", "window")})
    return rebuild(model, cfg_cls, lm_cls, {**base, "hfa_mamba2": opts}, model.state_dict(), record,
                   new_weights=MAMBA2_NEW_MODULES)


class Mamba2Trainable:
    """The selector ``TRAINABLE["mamba2"]`` (`MAMBA2_TRAINABLE`; the default for a Mamba-2-form student): every
    parameter of the converted layers (q/k/v/o, q/k norms, dt_proj, dt_bias, A_log, the output norm). `distill`
    binds it to the student (`for_model`), so the layers kept softmax (``layers=``) and everything outside
    attention stay frozen; unbound, it selects those modules in every attention layer."""

    def __init__(self, layers: frozenset | None = None):
        self.layers = layers            # the names of the student's Mamba2Attention modules (None: unbound)

    def for_model(self, model) -> "Mamba2Trainable":
        return Mamba2Trainable(frozenset(n for n, m in model.named_modules() if isinstance(m, Mamba2Attention)))

    def __call__(self, name: str, param) -> bool:
        owner, sep, rest = name.rpartition(".self_attn.")
        if not sep or rest.split(".")[0] not in MAMBA2_LAYER_PARAMETERS:
            return False
        return self.layers is None or f"{owner}.self_attn" in self.layers


MAMBA2_TRAINABLE = Mamba2Trainable()
