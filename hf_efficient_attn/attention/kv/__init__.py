"""Training-free KV-cache policies, applied at patch time: ``hfa.patch(model, kv=hfa.kv.streaming(4, 1024))``.

=====================  ===========================  ==========================================================
policy                 name                         what the cache keeps / a decode step reads
=====================  ===========================  ==========================================================
``streaming(4, 1024)``  ``streaming_s4_w1024``      4 sink tokens + the last 1024 (StreamingLLM), constant size
``snapkv(1024)``       ``snapkv_b1024_w32_p7``      per KV head the 1024 tokens the last 32 queries attend most
``quest(16, 1024)``    ``quest_p16_b1024``          everything; a step reads the 64 pages of 16 with the best
                                                    q·k bound (Quest): bounded bandwidth, not memory
=====================  ===========================  ==========================================================

The policies live in the model's own ``DynamicCache`` as cache layers (:mod:`.base`), so ``generate``, beam
search and left-padded batches run as usual; :mod:`.apply` says how a call runs and what is refused;
``hfa.kv_cache_bytes`` counts what the cache really holds. :func:`policy_of` names the policy of a model,
:func:`read_fraction` says what share of its cache the last step read.
"""

from ..spec import from_spec as _from_spec
from .apply import policy_of, read_fraction
from .base import KVPolicy, PolicyCacheLayer
from .quest import quest
from .snapkv import snapkv
from .streaming import streaming

POLICIES = {"streaming": streaming, "snapkv": snapkv, "quest": quest}


def from_spec(spec: str) -> KVPolicy:
    """A policy from its command-line spelling ``NAME[:KEY=VALUE,...]`` (``streaming:sinks=4,window=1024``,
    ``snapkv:budget=1024``, ``quest:budget=1024``): what ``hfa eval --kv`` takes."""
    return _from_spec(spec, POLICIES, "KV policy", "streaming:sinks=4,window=1024 or snapkv:budget=1024")


__all__ = ["KVPolicy", "POLICIES", "PolicyCacheLayer", "from_spec", "policy_of", "quest", "read_fraction",
           "snapkv", "streaming"]
