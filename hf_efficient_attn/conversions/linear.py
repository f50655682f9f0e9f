"""Softmax -> linear attention (LoLCATs): swap the attention, then heal it by distillation in two stages.

    new = convert(model, "linear", feature_map="hedgehog", window=64)      # convert_linear
    distill(new, model, texts, tokenizer=tok, stage="attention", max_tokens=...)   # 1: attention transfer
    distill(new, model, texts, tokenizer=tok, stage="logits", trainable="lora", max_tokens=...)   # 2

`convert_linear` keeps every weight of the original (q/k/v/o projections, norms, RoPE) and adds per layer
the feature maps and, for the hybrid, the per-head window mix (see ``attention.linear``). Right after
conversion the feature maps are at their initial state: the model is only usable after stage 1.

Stage ``"attention"`` (`attention_transfer_loss`, listed in ``distill.STAGES``): attention transfer. For each
batch the TEACHER runs once; every student linear layer then runs on the teacher's own input to that layer
(so layers learn independently, in parallel, as if trained layer by layer on cached inputs) and is scored by
the relative mean squared error between its output and the teacher layer's output (after o_proj):
``mean over layers of ||y_student - y_teacher||^2 / ||y_teacher||^2``. Only the feature maps and the mix train
(``trainable="feature_maps"``, the stage's default, at lr 3e-2: on SmolLM2-135M, window 64, 64 steps of
2 x 512 tokens, it ends at relative MSE 0.164 against 0.209 at LoLCATs' 1e-2). Stage ``"logits"`` then trains
LoRA adapters (or any parameters) on the KL to the teacher, as for the other conversions.
"""

from __future__ import annotations

import torch

from ..attention.families import family_of, without_windows
from ..attention.linear import FEATURE_MAPS, LinearAttention, linear_model_class
from .toolkit import calibration_forward, config_fields, provenance_record, rebuild

__all__ = ["LINEAR_NEW_MODULES", "attention_transfer_loss", "check_linear_student", "convert_linear", "full_mask_fields",
           "linear_layers", "softmax_layers"]

LINEAR_NEW_MODULES = ("feature_map_q", "feature_map_k", "window_factor")   # what the conversion adds per layer


def convert_linear(model, feature_map: str = "hedgehog", window: int = 64, layers: list[int] | None = None,
                   feature_dim: int | None = None, eps: float = 1e-6):
    """A copy of `model` whose attention layers are linear (window=0) or sliding-window + linear (window=w > 0).

    feature_map: a name in ``attention.linear.FEATURE_MAPS``. window: tokens of exact softmax per query (its own
    included); 0 for pure linear attention. layers: indices of layers to KEEP as softmax attention (None: convert
    every layer). feature_dim: Hedgehog's projection size per head (default: the head dim; the map outputs twice
    that). The model must be a decoder of a family whose entry in ``attention.families.FAMILIES`` lists "linear".
    `model` is not modified.
    """
    entry = family_of(model, "linear")
    family = entry.model_type
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; the feature maps are: {', '.join(FEATURE_MAPS)}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: pure linear attention), got {window!r}")
    if feature_dim is not None and (not isinstance(feature_dim, int) or feature_dim < 1):
        raise ValueError(f"feature_dim must be a positive int (or None: the head dim), got {feature_dim!r}")
    keep = softmax_layers(model, layers)
    opts = {"family": family, "feature_map": feature_map, "window": window, "feature_dim": feature_dim, "eps": eps,
            "softmax_layers": keep}
    base = full_mask_fields(entry, model, opts)
    cfg_cls, lm_cls = linear_model_class(family)
    record = provenance_record("linear", model, **{k: v for k, v in opts.items() if k != "family"})
    return rebuild(model, cfg_cls, lm_cls, {**base, "hfa_linear": opts}, model.state_dict(), record,
                   new_weights=LINEAR_NEW_MODULES)


def softmax_layers(model, layers) -> list[int]:
    """The sorted indices in `layers` (None: none) of the layers to keep as softmax; ValueError for a bad list or
    one that keeps every layer."""
    n = model.config.num_hidden_layers
    if layers is not None and (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")):
        raise ValueError(f"layers must be a list of layer indices to keep as softmax (e.g. [0, 15]), got {layers!r}")
    keep = sorted(set(layers or []))
    bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layers={layers!r}: layer indices to keep as softmax must lie in 0 .. {n - 1}; bad: {bad}")
    if len(keep) == n:
        raise ValueError(f"layers={layers!r} keeps all {n} layers softmax: nothing to convert")
    return keep


def full_mask_fields(entry, model, opts: dict) -> dict:
    """`model`'s config fields with its sliding windows switched off, so its masks mark causality and padding only
    (a sliding-window mask would hide the keys the linear part reads; a family whose RoPE follows the layer types
    keeps them: see attention.families.without_windows); the window it had is kept in
    ``opts["original_sliding_window"]``."""
    base = config_fields(model)
    if base.get("sliding_window") is not None or base.get("use_sliding_window"):
        opts["original_sliding_window"] = base.get("sliding_window")
        base = without_windows(entry, base)
    return base


def linear_layers(model) -> dict[int, LinearAttention]:
    """{layer index: LinearAttention} of a (possibly wrapped: DDP, peft) model (the Mamba-2-form layers of
    ``convert(model, "mamba2")`` are LinearAttention too)."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, LinearAttention)}


def _decoder_layers(model):
    """The decoder layers of a causal LM (unwrapping DDP's .module)."""
    inner = getattr(model, "module", model)
    base = getattr(inner, "model", inner)
    return base.layers


def attention_transfer_loss(student, teacher, input_ids, **_):
    """Mean over linear layers of ||student layer(x_i) - teacher layer(x_i)||^2 / ||teacher layer(x_i)||^2, where x_i
    is the TEACHER's input to attention layer i on `input_ids` (B, T). Returns ``(loss, {"attention_mse": ...})``."""
    students = linear_layers(student)
    teachers = _decoder_layers(teacher)
    captured: dict[int, tuple] = {}

    def capture(i):
        def hook(module, args, kwargs, output):
            h = kwargs.get("hidden_states", args[0] if args else None)
            captured[i] = (h.detach(), tuple(t.detach() for t in kwargs["position_embeddings"]), output[0].detach())
        return hook

    # one forward of the whole batch; only the layers' inputs and outputs matter
    calibration_forward(teacher, input_ids, [(teachers[i].self_attn, capture(i)) for i in students],
                        batch_size=len(input_ids))
    errors = []
    for i, attn in students.items():
        h, pe, want = captured[i]
        got, _ = attn(h, pe, attention_mask=None)
        errors.append((got.float() - want.float()).pow(2).mean() / want.float().pow(2).mean().clamp_min(1e-12))
    loss = torch.stack(errors).mean()
    return loss, {"attention_mse": loss.detach()}


def check_linear_student(student) -> None:
    """Stage "attention"'s check: `student` must have linear-attention layers (made by ``convert(model, "linear")``
    or ``convert(model, "mamba2")``)."""
    if not linear_layers(student):
        raise ValueError(f"stage='attention' is layer-by-layer attention transfer: it trains the linear-attention "
                         f"layers of a student made by convert(model, 'linear' or 'mamba2', ...), and "
                         f"{type(student).__name__} "
                         f"has none (it keeps softmax attention). Heal it with stage='logits'")

