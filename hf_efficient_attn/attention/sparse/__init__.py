"""Training-free sparse attention patterns, applied at patch time: ``hfa.patch(model, sparse=hfa.sparse.top_p(0.95))``.

One idea per file, each a factory returning a named pattern (``pattern.name``: what reports call it):

======================  ==========================  =========================================================
pattern                 name                        what a query block reads
======================  ==========================  =========================================================
``streaming(4, 1024)``  ``streaming_s4_w1024``      4 sink tokens + a 1024-token window (StreamingLLM)
``longformer(512, 1)``  ``longformer_w512_g1``      a window + global tokens, both directions in encoders
``dilated(2048, 2)``    ``dilated_w2048_d2_b64``    every 2nd key block within a 2048-token window
``vertical_slash()``    ``vertical_slash_v1000_...``  the key columns / diagonals the last queries attend most
``top_p(0.95)``         ``top_p_g0.95_b64``         the fewest blocks with 95% of the estimated mass
``lsh(8, 2)``           ``lsh_n8_r2_b64``           blocks whose query/key summaries hash alike (Reformer)
``full()``              ``full_b64``                every block: the exact control
======================  ==========================  =========================================================

The first three are static (fixed by positions: exact equivalents of a 4-D mask), the next three dynamic
(estimated per call from the queries and keys). :mod:`.base` says what a pattern returns, :mod:`.apply` how a call
runs and what is refused. After a forward pass, :func:`density` says how much was computed; :func:`is_sparse` and
:func:`pattern_of` say whether (and how) the model is an approximation; :func:`layer_errors` measures each layer's
output error against dense on the exact model's own inputs.
"""

from ..spec import from_spec as _from_spec
from .apply import density, is_sparse, layer_errors, pattern_of
from .base import DECODE_MAX_Q_LEN, SparsePattern, SparsePlan, full
from .dilated import dilated
from .longformer import longformer
from .lsh import lsh
from .streaming import streaming
from .top_p import top_p
from .vertical_slash import vertical_slash

PATTERNS = {"streaming": streaming, "longformer": longformer, "dilated": dilated, "vertical_slash": vertical_slash,
            "top_p": top_p, "lsh": lsh, "full": full}



def from_spec(spec: str) -> SparsePattern:
    """A pattern from its command-line spelling ``NAME[:KEY=VALUE,...]``, e.g. ``top_p:gamma=0.95,block=64`` or
    ``streaming:sinks=4,window=1024`` (what ``hfa eval --sparse`` takes). Raises ValueError naming the patterns or
    the factory's options when the spec does not fit."""
    return _from_spec(spec, PATTERNS, "sparse pattern", "top_p:gamma=0.95 or streaming:sinks=4,window=1024")


__all__ = ["DECODE_MAX_Q_LEN", "PATTERNS", "SparsePattern", "SparsePlan", "density", "dilated", "from_spec", "full", "is_sparse",
           "layer_errors", "longformer", "lsh", "pattern_of", "streaming", "top_p", "vertical_slash"]
