"""Causal linear attention (plain, gated, and the sliding-window hybrid): the reference (spec) here,
Triton kernels beside it. See `reference` for the definitions and conventions.

The Triton entry points (``linear_attention_triton``, ``linear_attention_step_triton``,
``linear_triton_unsupported_reason`` from `triton_chunked`; ``hybrid_attention_triton``,
``hybrid_unsupported_reason`` from `triton_hybrid`) are importable from here too; they load triton on
first use, so this package imports on machines without triton (they are left out of ``__all__``).
"""

from .reference import (
    check_linear_inputs,
    hybrid_attention_chunked,
    hybrid_attention_reference,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
)

__all__ = ["check_linear_inputs", "hybrid_attention_chunked", "hybrid_attention_reference",
           "linear_attention_chunked", "linear_attention_recurrent", "linear_attention_reference"]


_TRITON = {"linear_attention_triton": "triton_chunked", "linear_attention_step_triton": "triton_chunked",
           "linear_triton_unsupported_reason": "triton_chunked", "hybrid_attention_triton": "triton_hybrid",
           "hybrid_unsupported_reason": "triton_hybrid"}


def __getattr__(name):
    if name in _TRITON:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_TRITON[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
