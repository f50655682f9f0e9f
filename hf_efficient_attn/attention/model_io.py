"""How to call a model across transformers 5.x: the cache keyword and where a forward pass returns its cache.

The cache keyword was renamed across transformers 5.x (``past_key_values`` -> ``cache`` in 5.24); code that runs
cached forward passes (decode speed, passkey, ring generation) asks here instead of spelling one name.
"""

from __future__ import annotations

__all__ = ["cache_kwarg", "forward_params", "output_cache"]

# The cache keyword was renamed across transformers 5.x (past_key_values -> cache); use whichever exists.
CACHE_NAMES = ("cache", "past_key_values", "cache_params")


def output_cache(out):
    """The cache object of a model output, under whichever name this transformers version uses."""
    fields = getattr(out, "__dataclass_fields__", None) or {}
    for name in CACHE_NAMES:
        if name in fields:
            return getattr(out, name)
    if isinstance(out, tuple) and len(out) > 1:
        return out[1]
    return None


def cache_kwarg(model) -> str:
    params = forward_params(model)
    for name in CACHE_NAMES:
        if name in params:
            return name
    return "past_key_values"


def forward_params(model) -> set[str]:
    import inspect
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
