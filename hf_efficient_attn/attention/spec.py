"""The command-line spelling of a named method: ``NAME[:KEY=VALUE,...]`` (``hfa eval --sparse``, ``--kv``)."""

from __future__ import annotations

import inspect

__all__ = ["parse_value", "from_spec"]


def parse_value(text: str):
    """``"4"`` -> 4, ``"0.95"`` -> 0.95, ``"true"``/``"false"``/``"none"`` -> True/False/None, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def from_spec(spec: str, factories: dict, kind: str, example: str):
    """``factories[NAME](**options)`` for a spec ``NAME[:KEY=VALUE,...]``; ValueError naming the choices (``kind``
    says what they are, ``example`` shows a spelling) or the factory's options when the spec does not fit."""
    name, _, args = spec.strip().partition(":")
    if name not in factories:
        raise ValueError(f"unknown {kind} {name!r} in {spec!r}; choose one of {', '.join(factories)} "
                         f"(e.g. {example})")
    factory = factories[name]
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"{kind} option {item!r} in {spec!r} is not KEY=VALUE")
        kwargs[key.strip()] = parse_value(val.strip())
    try:
        return factory(**kwargs)
    except TypeError:
        options = ", ".join(f"{k}={v.default}" for k, v in inspect.signature(factory).parameters.items())
        raise ValueError(f"{spec!r}: {name} takes the options {options} (defaults shown)") from None
