"""Softmax -> linear attention (LoLCATs): swap the attention, then heal it by distillation in two stages.

    new = convert(model, "linear", feature_map="hedgehog", window=64)      # registered here
    distill(new, model, texts, tokenizer=tok, stage="attention", max_tokens=...)   # 1: attention transfer
    distill(new, model, texts, tokenizer=tok, stage="logits", trainable="lora", max_tokens=...)   # 2

`convert_linear` keeps every weight of the original (q/k/v/o projections, norms, RoPE) and adds per layer
the feature maps and, for the hybrid, the per-head window mix (see ``attention.linear``). Right after
conversion the feature maps are at their initial state: the model is only usable after stage 1.

Stage ``"attention"`` (registered with `distill` by importing this module): attention transfer. For each
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

from ..attention.linear import FAMILIES, FEATURE_MAPS, LinearAttention, linear_model_class
from .convert import register_conversion
from .distill import DEFAULT_LR, TRAINABLE, Stage, _modules_named, register_stage

__all__ = ["attention_transfer_loss", "convert_linear", "linear_layers"]


def convert_linear(model, feature_map: str = "hedgehog", window: int = 64, layers: list[int] | None = None,
                   feature_dim: int | None = None, eps: float = 1e-6):
    """A copy of `model` whose attention layers are linear (window=0) or sliding-window + linear (window=w > 0).

    feature_map: a name in ``attention.linear.FEATURE_MAPS``. window: tokens of exact softmax per query (its own
    included); 0 for pure linear attention. layers: indices of layers to KEEP as softmax attention (None: convert
    every layer). feature_dim: Hedgehog's projection size per head (default: the head dim; the map outputs twice
    that). The model must be a decoder of a family in ``attention.linear.FAMILIES``. `model` is not modified.
    """
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"linear attention does not support model_type {family!r} ({type(model).__name__}); "
                         f"supported: {', '.join(FAMILIES)}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; the feature maps are: {', '.join(FEATURE_MAPS)}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: pure linear attention), got {window!r}")
    if feature_dim is not None and (not isinstance(feature_dim, int) or feature_dim < 1):
        raise ValueError(f"feature_dim must be a positive int (or None: the head dim), got {feature_dim!r}")
    n = model.config.num_hidden_layers
    if layers is not None and (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")):
        raise ValueError(f"layers must be a list of layer indices to keep as softmax (e.g. [0, 15]), got {layers!r}")
    keep = sorted(set(layers or []))
    bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layers={layers!r}: layer indices to keep as softmax must lie in 0 .. {n - 1}; bad: {bad}")
    if len(keep) == n:
        raise ValueError(f"layers={layers!r} keeps all {n} layers softmax: nothing to convert")
    cfg = model.config
    opts = {"family": family, "feature_map": feature_map, "window": window, "feature_dim": feature_dim, "eps": eps,
            "softmax_layers": keep}
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    if base.get("sliding_window") is not None or base.get("use_sliding_window"):
        # the model's masks must mark padding only: a sliding-window mask would hide the keys the linear part reads
        opts["original_sliding_window"] = base.get("sliding_window")
        base.update(sliding_window=None, use_sliding_window=False)
        if base.get("layer_types"):
            base["layer_types"] = ["full_attention"] * n
    cfg_cls, lm_cls = linear_model_class(family)
    new_cfg = cfg_cls(**base, hfa_linear=opts, architectures=[lm_cls.__name__])
    new_cfg._attn_implementation = cfg._attn_implementation
    param = next(model.parameters())
    new = lm_cls(new_cfg).to(dtype=param.dtype, device=param.device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, f"unexpected weights {unexpected[:5]}"
    new_params = ("feature_map_q", "feature_map_k", "window_factor")
    assert all(any(p in k for p in new_params) or (k.startswith("lm_head") and cfg.tie_word_embeddings)
               for k in missing), [k for k in missing if not any(p in k for p in new_params)][:5]
    new.train(model.training)
    record = {"conversion": "linear", **{k: v for k, v in opts.items() if k != "family"},
              "source": getattr(model, "name_or_path", None) or None}
    new.hfa_conversions = [*getattr(model, "hfa_conversions", []), record]
    new.name_or_path = getattr(model, "name_or_path", "")
    return new


def linear_layers(model) -> dict[int, LinearAttention]:
    """{layer index: LinearAttention} of a (possibly wrapped: DDP, peft) model."""
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

    handles = [teachers[i].self_attn.register_forward_hook(capture(i), with_kwargs=True) for i in students]
    try:
        with torch.no_grad():                  # only the layers' inputs/outputs matter: skip most of the vocab head
            teacher(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    errors = []
    for i, attn in students.items():
        h, pe, want = captured[i]
        got, _ = attn(h, pe, attention_mask=None)
        errors.append((got.float() - want.float()).pow(2).mean() / want.float().pow(2).mean().clamp_min(1e-12))
    loss = torch.stack(errors).mean()
    return loss, {"attention_mse": loss.detach()}


def _check_linear_student(student) -> None:
    if not linear_layers(student):
        raise ValueError(f"stage='attention' is layer-by-layer attention transfer: it trains the linear-attention "
                         f"layers of a student made by convert(model, 'linear', ...), and {type(student).__name__} "
                         f"has none (it keeps softmax attention). Heal it with stage='logits'")


TRAINABLE["feature_maps"] = _modules_named("feature_map_q", "feature_map_k", "window_factor")
DEFAULT_LR["feature_maps"] = 3e-2
register_stage(Stage("attention", attention_transfer_loss,
                     "per-layer attention-output MSE to the teacher, each layer on the teacher's own inputs",
                     check=_check_linear_student, default_trainable="feature_maps"))
register_conversion("linear", convert_linear)
