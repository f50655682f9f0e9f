"""Multi-head latent attention (MLA) over a latent KV cache: the reference (spec) and a Triton decode kernel.

``mla_decode`` is importable from here too; it loads triton on first use, so this package imports on
machines without triton (it is left out of ``__all__`` for that reason).
"""

from .reference import (
    absorb_query,
    expand_latent_output,
    latent_attention_reference,
    mla_attention_expanded,
    mla_attention_reference,
)

__all__ = ["absorb_query", "expand_latent_output", "latent_attention_reference", "mla_attention_expanded",
           "mla_attention_reference"]


def __getattr__(name):
    if name == "mla_decode":
        from .triton_decode import mla_decode
        return mla_decode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
