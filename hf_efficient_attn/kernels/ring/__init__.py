"""Ring attention (torch + torch.distributed only): exact attention over a sequence split across processes.

* :mod:`.layout`: the zigzag / contiguous splits (``shard_tensor``, ``unshard_tensor``, ``shard_positions``);
* :mod:`.reference`: one rank's queries against one K/V block, forward and backward from the global LSE, and the
  fp32 LSE merge (plain PyTorch: the CPU path and the spec of the Triton pieces);
* :mod:`.ring`: ``ring_attention`` (ring or all-gather, differentiable) and ``ring_decode_attention`` (a KV cache
  sharded across ranks, one all-gather per call), ``count_comm``;
* :mod:`.launch`: ``run_distributed`` (a function on W local processes, gloo by default).
"""

from .launch import run_distributed
from .layout import LAYOUTS, check_length, segments, shard_positions, shard_tensor, unshard_tensor
from .reference import block_attention_backward, block_attention_forward, merge_partials, pair_kind
from .ring import MODES, CommCounter, choose_mode, count_comm, group_info, ring_attention, ring_decode_attention

__all__ = ["LAYOUTS", "MODES", "CommCounter", "block_attention_backward", "block_attention_forward", "check_length",
           "choose_mode", "count_comm", "group_info", "merge_partials", "pair_kind", "ring_attention",
           "ring_decode_attention", "run_distributed", "segments", "shard_positions", "shard_tensor",
           "unshard_tensor"]
