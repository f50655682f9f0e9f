"""`convert(model, name, **options)`: one entry point for every conversion, dispatched by name.

    new = convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=texts, tokenizer=tok)

A conversion is a function ``fn(model, **options) -> new_model`` that never modifies `model`. Adding
one is one line in `CONVERSIONS` (or `register_conversion` from outside the package). Options are
checked against the function's signature before anything runs, so a typo fails at once with the
list of accepted options.
"""

from __future__ import annotations

import inspect
from typing import Callable

from .gqa import convert_gqa

__all__ = ["CONVERSIONS", "convert", "options_of", "register_conversion"]

CONVERSIONS: dict[str, Callable] = {
    "gqa": convert_gqa,
}


def register_conversion(name: str, fn: Callable) -> None:
    """Make `fn(model, **options) -> new_model` available as ``convert(model, name, ...)``."""
    if name in CONVERSIONS and CONVERSIONS[name] is not fn:
        raise ValueError(f"a conversion named {name!r} is already registered ({CONVERSIONS[name].__qualname__})")
    CONVERSIONS[name] = fn


def options_of(name: str) -> dict[str, object]:
    """The options conversion `name` accepts, with their defaults (``inspect.Parameter.empty`` if required)."""
    params = list(inspect.signature(CONVERSIONS[name]).parameters.values())[1:]   # [0] is the model
    return {p.name: p.default for p in params}


def convert(model, conversion: str, /, **options):
    """A converted copy of `model` (which is not modified). conversion: a name in `CONVERSIONS`.

    Raises ``ValueError`` for an unknown conversion and ``TypeError`` for an option the conversion does
    not accept or a required option left out, naming the accepted ones.
    """
    if conversion not in CONVERSIONS:
        raise ValueError(f"unknown conversion {conversion!r}; the conversions are: {', '.join(CONVERSIONS)}")
    accepted = options_of(conversion)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise TypeError(f"conversion {conversion!r} got unknown option(s) {', '.join(map(repr, unknown))}; it "
                        f"accepts: {', '.join(accepted)}")
    missing = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        raise TypeError(f"conversion {conversion!r} needs option(s) {', '.join(map(repr, missing))} "
                        f"(accepted: {', '.join(accepted)})")
    return CONVERSIONS[conversion](model, **options)
