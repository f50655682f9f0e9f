"""Layer 1: the only code that touches transformers internals (registry, patching, converted modules)."""

from . import kv, ring, sparse
from .patch import is_patched, patch, patched, unpatch
from .registry import BACKENDS, IMPL_NAMES, register, softmax_attention

register()

__all__ = ["BACKENDS", "IMPL_NAMES", "is_patched", "kv", "patch", "patched", "register", "ring", "softmax_attention", "sparse",
           "unpatch"]
