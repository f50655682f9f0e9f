"""`convert(model, name, **options)`: one entry point for every conversion, dispatched by name.

    new = convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=texts, tokenizer=tok)

A conversion is a function ``fn(model, **options) -> new_model`` that never modifies `model`. Adding
one is one line in `CONVERSIONS` (or `register_conversion` from outside the package). Options are
checked against the function's signature before anything runs, so a typo fails at once with the
list of accepted options. Before a conversion runs, the model must be a transformers model with finite
weights (the first NaN/inf tensor is named); after it, the new model's weights are checked again, so a
conversion never hands back NaN silently.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..errors import ConversionError, HFAError, OptionError
from .gqa import convert_gqa
from .io import check_finite
from .linear import convert_linear
from .linformer import convert_linformer
from .mamba2 import convert_mamba2
from .mla import convert_mla
from .span import convert_adaptive_span, convert_duo, convert_longformer

__all__ = ["CONVERSIONS", "convert", "options_of", "register_conversion", "unknown_and_missing"]

CONVERSIONS: dict[str, Callable] = {
    "gqa": convert_gqa,          # fewer KV heads (MHA -> GQA/MQA): a native checkpoint of the same family
    "mla": convert_mla,          # a low-rank latent KV cache plus one shared RoPE key (GQA -> MLA)
    "linear": convert_linear,    # softmax -> (sliding-window +) linear attention, healed by distillation
    "mamba2": convert_mamba2,    # softmax -> Mamba-2 form (gated linear attention, data-dependent decay)
    "adaptive_span": convert_adaptive_span,   # a learned span per KV head (soft), then freeze: hard windows
    "duo": convert_duo,          # a learned gate per KV head between full and sinks + window, then freeze
    "longformer": convert_longformer,   # local window + global first tokens, healed; constant-size cache
    "linformer": convert_linformer,     # encoders only: K/V projected along the sequence to k rows
}


def register_conversion(name: str, fn: Callable) -> None:
    """Make `fn(model, **options) -> new_model` available as ``convert(model, name, ...)``."""
    if name in CONVERSIONS and CONVERSIONS[name] is not fn:
        raise HFAError(f"a conversion named {name!r} is already registered ({CONVERSIONS[name].__qualname__})")
    CONVERSIONS[name] = fn


def options_of(name: str) -> dict[str, object]:
    """The options conversion `name` accepts, with their defaults (``inspect.Parameter.empty`` if required)."""
    params = list(inspect.signature(CONVERSIONS[name]).parameters.values())[1:]   # [0] is the model
    return {p.name: p.default for p in params}


def unknown_and_missing(name: str, given, filled=()) -> tuple[list[str], list[str]]:
    """The options in `given` that conversion `name` does not accept, and the required ones neither in `given` nor
    in `filled` (options a caller will fill itself): the check `convert` makes before anything runs."""
    accepted = options_of(name)
    unknown = [k for k in given if k not in accepted]
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in given and k not in filled]
    return unknown, missing


def convert(model, conversion: str, /, **options):
    """A converted copy of `model` (which is not modified). conversion: a name in `CONVERSIONS`.

    Raises `HFAError` (a ``ValueError``) for an unknown conversion, `OptionError` (a ``TypeError``) for an option
    the conversion does not accept or a required option left out, naming the accepted ones, and
    `NonFiniteError` when `model` (or the result) holds a NaN or infinite weight.
    """
    if not isinstance(conversion, str) or conversion not in CONVERSIONS:
        raise HFAError(f"unknown conversion {conversion!r}; the conversions are: {', '.join(CONVERSIONS)}")
    accepted = options_of(conversion)
    unknown, missing = unknown_and_missing(conversion, options)
    if unknown:
        raise OptionError(f"conversion {conversion!r} got unknown option(s) {', '.join(map(repr, unknown))}; it "
                          f"accepts: {', '.join(accepted)}")
    if missing:
        raise OptionError(f"conversion {conversion!r} needs option(s) {', '.join(map(repr, missing))} "
                          f"(accepted: {', '.join(accepted)})")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise OptionError(f"convert takes a transformers model (e.g. from AutoModelForCausalLM.from_pretrained or "
                          f"hfa.load_model), got a {type(model).__name__}")
    check_finite(model, "the model to convert", "Converting would spread it into every merged weight: reload the "
                                                "checkpoint or fix that tensor first")
    try:
        new = CONVERSIONS[conversion](model, **options)
    except torch.linalg.LinAlgError as e:
        raise ConversionError(f"conversion {conversion!r} failed in a matrix factorization ({str(e).splitlines()[0]}): "
                              "the weights or calibration activations are degenerate (e.g. inf after an fp16 "
                              "overflow). Convert in float32, or with other calibration text") from e
    check_finite(new, f"the result of conversion {conversion!r}",
                 "The conversion overflowed (calibration activations in fp16/bf16?): convert the model in "
                 "float32, or with other calibration text")
    return new
