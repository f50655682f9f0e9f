"""Softmax attention: the reference (spec) and the Triton kernels tested against it.

``flash_attention`` and ``decode_attention`` are importable from here too; they load triton on first use,
so this package imports on machines without triton (they are left out of ``__all__`` for that reason).
"""

from .reference import (
    check_attention_inputs,
    dense_attention_mask,
    softmax_attention_naive,
    softmax_attention_reference,
)
from .triton_dispatch import triton_softmax_attention, triton_unsupported_reason

__all__ = ["check_attention_inputs", "dense_attention_mask", "softmax_attention_naive", "softmax_attention_reference",
           "triton_softmax_attention", "triton_unsupported_reason"]


def __getattr__(name):
    # The Triton kernels import triton (absent on macOS): load them on first use only.
    if name == "flash_attention":
        from .triton_flash import flash_attention
        return flash_attention
    if name == "decode_attention":
        from .triton_decode import decode_attention
        return decode_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
