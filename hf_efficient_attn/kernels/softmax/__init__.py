"""Softmax attention: the reference (spec) and the Triton kernels tested against it."""

from .reference import (
    check_attention_inputs,
    dense_attention_mask,
    softmax_attention_naive,
    softmax_attention_reference,
)

__all__ = ["check_attention_inputs", "dense_attention_mask", "softmax_attention_naive", "softmax_attention_reference"]
