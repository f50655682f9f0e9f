"""Causal linear attention (plain, gated, and the sliding-window hybrid): the reference (spec) here,
Triton kernels beside it. See `reference` for the definitions and conventions."""

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
