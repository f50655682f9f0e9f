"""Block-sparse softmax attention: a block layout plus token rules (sinks, causal, window, padding).

The reference (spec, and the vectorised CPU block-gather path) is here; the Triton kernels
(``block_sparse_attention``, ``block_sparse_decode``, ``block_sparse_unsupported_reason`` from
`triton_block_sparse`) are importable from here too; they load triton on first use, so this package imports on
machines without triton (they are left out of ``__all__``).
"""

from .reference import (
    BlockLayout,
    block_sparse_attention_naive,
    block_sparse_attention_reference,
    check_block_sparse_inputs,
)

__all__ = ["BlockLayout", "block_sparse_attention_naive", "block_sparse_attention_reference",
           "check_block_sparse_inputs"]

_TRITON = ("block_sparse_attention", "block_sparse_decode", "block_sparse_unsupported_reason")


def __getattr__(name):
    if name in _TRITON:
        from . import triton_block_sparse
        return getattr(triton_block_sparse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
