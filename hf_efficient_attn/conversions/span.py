"""Learned sparsity: adaptive span, DuoAttention-style retrieval/streaming heads, Longformer — conversions of any
served decoder, healed through `distill`, deployed on the block-sparse kernels with a cache that keeps only the
reach (architecture: ``attention.span``).

    new = convert(model, "adaptive_span", max_span=2048, ramp=32)      # soft spans, exact at init (texts <= max_span)
    distill(new, model, texts, tokenizer=tok, stage="sparsity", stage_options={"penalty": 0.05}, ...)
    new = freeze(new)                                                   # hard windows: ceil(span + ramp) per KV head

    new = convert(model, "duo", sinks=4, window=256)                   # gates at 1: exact
    distill(new, model, passkey_texts, tokenizer=tok, stage="sparsity", stage_options={"penalty": 0.05}, ...)
    new = freeze(new, full_heads=0.25)                                  # 25% of KV heads full, the rest sinks + window

    new = convert(model, "longformer", window=256, global_tokens=4)    # hard reach now: heal with stage "logits"
    distill(new, model, texts, tokenizer=tok, max_tokens=...)           # trains the attention projections

Stage ``"sparsity"`` (`sparsity_loss`, in ``distill.STAGES``): the KL to the teacher (stage "logits") plus
``penalty`` (``stage_options={"penalty": ...}``, default 0.05) x the mean reach of the student's soft layers —
adaptive span: the mean span as a fraction of ``max_span`` (the L1 span penalty of Sukhbaatar et al.); duo: the
mean gate (DuoAttention's L1 on the gates). The
penalty's weight sets the trade-off: higher, shorter spans / fewer full heads, more loss. Without `trainable`, it
trains only the spans or gates (``TRAINABLE["adaptive_span"]`` / ``["duo"]``: the base stays frozen, as both papers
do); a longformer student's default is its attention projections (``TRAINABLE["longformer"]``).
"""

from __future__ import annotations

import math

import torch

from ..attention.families import family_of
from ..attention.span import (SPAN_NEW_MODULES, SpanAttention, freeze_windows, full_attention_layers,
                              span_layers, span_model_class)
from .toolkit import config_fields, provenance_record, rebuild

__all__ = ["SPAN_TRAINABLE", "check_sparsity_student", "convert_adaptive_span", "convert_duo", "convert_longformer",
           "freeze", "kv_fraction", "reach_summary", "sparsity_loss"]


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _convert(model, method: str, opts: dict, record_opts: dict):
    entry = family_of(model, method)
    layers = full_attention_layers(model.config)
    if not layers:
        raise ValueError(f"{method}: every layer of this {model.config.model_type} model already attends through a "
                         f"sliding window (config.sliding_window={model.config.sliding_window}); there is no "
                         "full-attention layer to convert")
    opts = {"family": entry.model_type, "method": method, **opts, "layers": layers}
    cfg_cls, lm_cls = span_model_class(entry.model_type, method)
    record = provenance_record(method, model, **record_opts)
    return rebuild(model, cfg_cls, lm_cls, {**config_fields(model), "hfa_span": opts}, model.state_dict(), record,
                   new_weights=SPAN_NEW_MODULES)


def convert_adaptive_span(model, max_span: int | None = None, ramp: int = 32, sinks: int = 4):
    """A copy of `model` whose full-attention layers learn a span per KV head (adaptive span, soft; see
    ``attention.span``). max_span: the longest span, in tokens (default: the model's max_position_embeddings); the
    converted model equals the original on texts of at most max_span tokens. ramp: the soft mask's ramp R (tokens).
    sinks: first tokens every query always reads (StreamingLLM's attention sinks; 0: none). Train the spans with
    ``distill(new, model, ..., stage="sparsity", stage_options={"penalty": ...})``, then `freeze`. `model` is not
    modified."""
    max_span = model.config.max_position_embeddings if max_span is None else max_span
    max_span, ramp, sinks = _int("max_span", max_span, 1), _int("ramp", ramp, 1), _int("sinks", sinks, 0)
    opts = {"max_span": max_span, "ramp": ramp, "sinks": sinks, "window": None}
    return _convert(model, "adaptive_span", opts, {"max_span": max_span, "ramp": ramp, "sinks": sinks})


def convert_duo(model, sinks: int = 4, window: int = 256):
    """A copy of `model` whose full-attention layers gate each KV head between full attention and `sinks` +
    `window` (DuoAttention, soft; see ``attention.span``): gates start at 1, the original. Train them with
    ``distill(new, model, passkey_texts, ..., stage="sparsity", stage_options={"penalty": ...})``, then
    ``freeze(new, full_heads=...)`` keeps that fraction of KV heads full. `model` is not modified."""
    sinks, window = _int("sinks", sinks, 0), _int("window", window, 1)
    return _convert(model, "duo", {"sinks": sinks, "window": window}, {"sinks": sinks, "window": window})


def convert_longformer(model, window: int = 256, global_tokens: int = 4):
    """A copy of `model` whose full-attention layers read a local `window` (the query's own token included) plus
    the first `global_tokens` tokens (Longformer for a decoder: its global tokens are the first ones; every query
    reads them, and they read only what precedes them). A hard reach from the start: heal it with `distill`
    (stage "logits"; default trainable: the attention projections). With a cache, each layer keeps
    ``global_tokens + window - 1`` tokens however long the generation. `model` is not modified."""
    window, global_tokens = _int("window", window, 1), _int("global_tokens", global_tokens, 0)
    return _convert(model, "longformer", {"sinks": global_tokens, "window": window},
                    {"window": window, "global_tokens": global_tokens})


def _soft_layers(model) -> dict[int, SpanAttention]:
    layers = span_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no learned-sparsity layer: make one with convert(model, "
                         "'adaptive_span' | 'duo' | 'longformer')")
    return layers


def freeze(model, full_heads: float | None = None):
    """A copy of a soft learned-sparsity model with hard reaches, ready to deploy (`model` is not modified).

    adaptive span: each KV head's window becomes ``ceil(span + ramp)`` (every key its ramp reaches). duo:
    `full_heads` (a fraction in [0, 1], default 0.25) of the KV heads over all converted layers stay full — those
    with the largest gates (ties: the earlier layer and head) — the others read sinks + window. The span/gate
    parameters go; the record says what was frozen."""
    layers = _soft_layers(model)
    first = next(iter(layers.values()))
    if first.soft is None:
        raise ValueError(f"this {first.method} model already has a hard reach (a longformer model, or one frozen "
                         "before): there is nothing to freeze")
    if first.soft == "span" and full_heads is not None:
        raise ValueError("full_heads applies to duo models; an adaptive-span model freezes each span to a window")
    record = {"conversion": "freeze", "method": first.method}
    full = {}
    if first.soft == "duo":
        frac = 0.25 if full_heads is None else full_heads
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise ValueError(f"full_heads must be a fraction in [0, 1] (0.25: a quarter of the KV heads keep the "
                             f"full cache), got {full_heads!r}")
        gates = [(-float(g), i, h) for i, m in layers.items() for h, g in enumerate(m.gates().detach().tolist())]
        keep = sorted(gates)[:int(round(frac * len(gates)))]
        for _, i, h in keep:
            full.setdefault(i, set()).add(h)
        record.update(full_heads=frac, full_kv_heads=len(keep), kv_heads=len(gates))
    windows = {str(i): freeze_windows(m, full_heads=full.get(i, set())) for i, m in layers.items()}
    if first.soft == "span":
        record["mean_window"] = sum(w for ws in windows.values() for w in ws) / sum(map(len, windows.values()))
    opts = {**model.config.hfa_span, "windows": windows}
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in SPAN_NEW_MODULES}
    cfg_cls, lm_cls = type(model.config), type(model)
    return rebuild(model, cfg_cls, lm_cls, {**config_fields(model), "hfa_span": opts}, state, record)


def reach_summary(model) -> dict:
    """What the learned-sparsity layers of `model` read: method, soft or hard, and per layer the spans (tokens),
    gates or windows per KV head."""
    layers = _soft_layers(model)
    first = next(iter(layers.values()))
    out = {"method": first.method, "soft": first.soft, "sinks": first.sinks, "layers": {}}
    for i, m in layers.items():
        if m.soft == "span":
            out["layers"][i] = {"span": [round(float(z), 1) for z in m.spans().detach()]}
        elif m.soft == "duo":
            out["layers"][i] = {"gate": [round(float(g), 4) for g in m.gates().detach()]}
        else:
            out["layers"][i] = {"window": list(m.windows)}
    return out


def kv_fraction(model, tokens: int) -> float:
    """The fraction of a full cache the hard-reach layers of `model` keep after `tokens` tokens (layers not
    converted count as full): the analytic figure ``kv_cache_bytes`` measures."""
    n = model.config.num_hidden_layers
    layers = span_layers(model)
    kept = sum(layers[i].kv_slots(tokens) / tokens if i in layers else 1.0 for i in range(n))
    return kept / n


# -- training the reach ------------------------------------------------------------------------------------

def check_sparsity_student(student) -> None:
    """Stage "sparsity"'s check: the student must have soft learned-sparsity layers (adaptive span or duo)."""
    inner = getattr(student, "module", student)
    layers = span_layers(inner)
    if not layers or next(iter(layers.values())).soft is None:
        raise ValueError(f"stage='sparsity' trains the spans or gates of a model made by convert(model, "
                         f"'adaptive_span' | 'duo') (before freeze), and {type(inner).__name__} has none. Heal a "
                         "longformer or frozen model with stage='logits'")


def reach_penalty(student) -> torch.Tensor:
    """The mean reach of the soft layers: adaptive span's span / max_span, duo's gate (differentiable)."""
    terms = []
    for m in span_layers(getattr(student, "module", student)).values():
        terms.append(m.spans() / float(m.max_span) if m.soft == "span" else m.gates())
    return torch.cat(terms).mean()


def sparsity_loss(student, teacher, input_ids, *, penalty: float = 0.05, **logits_options):
    """KL to the teacher (`distill.logits_loss`) + `penalty` x the mean reach (`reach_penalty`). Returns
    ``(loss, {"kl": ..., "reach": ...})``."""
    from .distill import logits_loss
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 0 or not math.isfinite(penalty):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    loss, metrics = logits_loss(student, teacher, input_ids, **logits_options)
    reach = reach_penalty(student)
    metrics["reach"] = reach.detach()
    return loss + penalty * reach.to(loss.dtype), metrics


class SpanTrainable:
    """``TRAINABLE["adaptive_span"]`` / ``["duo"]``: the spans or gates of the soft layers (everything else frozen)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, name: str, param) -> bool:
        return name.rsplit(".", 1)[-1] == self.name and ".self_attn." in name


SPAN_TRAINABLE = {"adaptive_span": SpanTrainable("span"), "duo": SpanTrainable("gate")}
