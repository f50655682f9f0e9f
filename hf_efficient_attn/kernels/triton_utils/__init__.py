"""What every Triton kernel of this package shares, in one place: the host side (this module) and the device
side (:mod:`.jit`).

This module never imports triton, so it answers on machines without it (macOS) and importing it builds no
kernel: whether Triton can run here (:func:`triton_unavailable_reason`), the interpreter switch, the
constants, tile padding, dot precision flags, split-KV heuristics, argument preparation, the registration of
kernels as ``torch.library`` custom ops (:func:`kernel_op`). :mod:`.jit` holds
what needs triton: the ``@triton.jit`` helpers (the dot, the varlen sequence bounds), the log-sum-exp merge of
split-KV partial results, and the autotuning grid helpers.

Why the import time matters: ``triton.jit`` builds interpreter or GPU kernels depending on
``TRITON_INTERPRET`` when a kernel module is IMPORTED, so every module that defines kernels calls
:func:`record_build` first, and :func:`triton_unavailable_reason` refuses CPU tensors when a module was built
for the GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["KERNEL_DTYPES", "LN2", "LOG2E", "MAX_HEAD_DIM", "MIN_KEYS_PER_SPLIT", "auto_num_splits", "cu_seqlens_arg",
           "dot_flags", "f32_precision", "inputs_unsupported_reason", "interpreting", "kernel_op", "key_padding_arg",
           "last_dim_contiguous", "max_seqlen", "num_sms", "OP_NAMESPACE", "pad_dim", "record_build", "triton_unavailable_reason"]

LOG2E = 1.4426950408889634  # 1/ln 2: exp(x) = exp2(x * LOG2E); kernels keep scores in base 2
LN2 = 0.6931471805599453    # ln 2: a base-2 log-sum-exp times LN2 is the natural one
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every kernel takes
MAX_HEAD_DIM = 256          # the largest head / feature / value dim whose tile row a program holds
MIN_KEYS_PER_SPLIT = 256    # split-KV: below this a split's fixed cost (the q load, the partial write) dominates
OP_NAMESPACE = "hfa"        # our custom ops: torch.ops.hfa.<name>


# ----------------------------------------------------------------------------------------------
# Can Triton run here
# ----------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 is set now (kernels built now run on CPU, in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_BUILT: dict[str, bool] = {}  # kernel module -> True when its kernels were built for the interpreter


def record_build(module: str) -> bool:
    """Record how ``module``'s ``@triton.jit`` functions are built; call it at the top of a kernel module.

    Returns True for interpreter kernels (the module keeps it as ``INTERPRETED``)."""
    _BUILT[module] = interpreting()
    return _BUILT[module]


def triton_unavailable_reason(device) -> str | None:
    """None when the Triton kernels can run on tensors of ``device``; else a short reason.

    CUDA tensors: None when triton is installed. Other devices need the interpreter: TRITON_INTERPRET=1 now,
    and set already when every kernel module imported so far was imported. Never imports triton or a kernel.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if not interpreting():
        return f"tensors on {device.type} and TRITON_INTERPRET is not 1"
    if not all(_BUILT.values()):
        return f"tensors on {device.type} and the kernels were imported before TRITON_INTERPRET=1 was set"
    return None


def inputs_unsupported_reason(named: dict, extra=()) -> str | None:
    """What every kernel's ``*_unsupported_reason`` checks first, or None: all inputs (`named` {name: tensor}
    and the optional `extra` ones, None skipped) on one device, Triton able to run there, the `named` ones in one
    dtype, and that dtype one the kernels take."""
    tensors = [t for t in (*named.values(), *extra) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"inputs on different devices ({', '.join(sorted(str(d) for d in devices))})"
    why = triton_unavailable_reason(tensors[0].device)
    if why is not None:
        return why
    dtypes = {name: str(t.dtype).replace("torch.", "") for name, t in named.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        return "mixed dtypes (" + ", ".join(f"{name} {d}" for name, d in dtypes.items()) + ")"
    dtype = next(t.dtype for t in named.values() if t is not None)
    if dtype not in KERNEL_DTYPES:
        return f"dtype {str(dtype).replace('torch.', '')}"
    return None


# ----------------------------------------------------------------------------------------------
# Tiles, dots, splits
# ----------------------------------------------------------------------------------------------

def pad_dim(d: int) -> int:
    """The tile width for a dim of size d: a power of two, at least 16 (tl.dot needs every tile dim >= 16)."""
    return max(16, 1 << (d - 1).bit_length())


def dot_flags(dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) of dots of two input tiles: exact fp32 dots for fp32 inputs; in the interpreter
    16-bit tiles go through fp32 (its low-precision dot is wrong)."""
    upcast = interpreting() and dtype != torch.float32
    return upcast, ("ieee" if dtype == torch.float32 or upcast else "tf32")


def f32_precision(dtype) -> str:
    """PRECISION of dots with an fp32 operand (a state, a gradient): exact for fp32 inputs and in the
    interpreter, else TF32."""
    return "ieee" if dtype == torch.float32 or interpreting() else "tf32"


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 in the interpreter (a few splits, so tests exercise merges)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def auto_num_splits(n_programs: int, max_seqlen_k: int, device) -> int:
    """Split-KV: enough splits for about two programs per SM, each with at least MIN_KEYS_PER_SPLIT keys
    (n_programs: the programs of one split)."""
    by_len = max(1, _cdiv(max_seqlen_k, MIN_KEYS_PER_SPLIT))
    by_sms = max(1, _cdiv(2 * num_sms(device), n_programs))
    return min(by_len, by_sms, 128)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (what the kernels' pointer arithmetic assumes), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cu_seqlens_arg(cu_seqlens) -> torch.Tensor | None:
    """Packed-sequence offsets ``[N + 1]`` as the kernels read them (int32, contiguous), or None."""
    return None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()


def key_padding_arg(key_padding_mask):
    """(mask ``[B, S]`` as int8, its batch stride), or (None, 0)."""
    if key_padding_mask is None:
        return None, 0
    kpm = key_padding_mask.to(torch.int8).contiguous()
    return kpm, kpm.stride(0)


def max_seqlen(cu_seqlens) -> int:
    """The longest packed sequence of ``cu_seqlens`` (one device sync; callers that know it pass it)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
# Every kernel entry point that torch.compile may meet is a torch.library custom op: Dynamo records it as one
# node of the graph (no graph break, no tracing into the launcher), its fake (meta) function gives the output
# shapes and strides without running it, and its autograd formula is registered with it. torch.library.custom_op,
# not triton_op: triton_op needs every launch wrapped in wrap_triton, which accepts neither our
# @triton.heuristics-wrapped kernels nor (before torch 2.13) the interpreter's kernels, and the kernels must run
# the same way on a GPU and in the interpreter. The cost: Inductor calls the kernels as they are, it does not fuse
# into them.

def kernel_op(name: str, schema: str):
    """Decorator: the function becomes the custom op ``torch.ops.hfa.<name>`` with the given schema
    (``"(Tensor q, ...) -> (Tensor, Tensor)"``; outputs are new tensors, no input is mutated). The caller adds
    ``register_fake`` (and ``register_autograd``) on the returned op; ``torch.library.opcheck`` checks all three."""
    return torch.library.custom_op(f"{OP_NAMESPACE}::{name}", mutates_args=(), schema=schema)
