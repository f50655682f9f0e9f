"""How transformers calls our softmax attention: the registered attention and mask functions.

transformers (v5) builds one mask per forward pass through ``AttentionMaskInterface`` and calls the
attention function of every layer through ``AttentionInterface``. We register three names:

    "hfa"            backend "auto"
    "hfa_reference"  the blockwise plain-PyTorch reference (exact everywhere, any device)
    "hfa_triton"     the Triton kernels (CUDA, or the interpreter with TRITON_INTERPRET=1)

**What the attention function receives as ``attention_mask``.** Our mask function first asks
transformers' own SDPA mask builder for the exact mask (a 4-D bool tensor, or None when SDPA would
rely on ``is_causal``). When that mask is exactly "causal or bidirectional, maybe a sliding window,
plus key padding" with queries aligned to the end of the keys, it is replaced by the 2-D key padding
mask ``[B, kv_len]`` (or None when nothing is padded), so kernels can skip blocks instead of reading
an S x S mask. Anything else (packed sequences found from position_ids, chunked or bidirectional
overlays, static caches, custom 4-D masks) stays a 4-D mask and is applied as is. So:

* ``None``  -> no padding; causal iff the module is causal (``is_causal`` kwarg, else
  ``module.is_causal``), sliding window from the ``sliding_window`` kwarg. With one query token
  causal and full attention coincide (bottom-right alignment).
* 2-D bool -> the same plus key padding.
* 4-D      -> the mask says everything about which pairs attend; causal/window are not re-applied.

This is the same contract transformers' flash-attention path relies on (``is_causal`` and
``sliding_window`` come with every call), and the tiny-model tests check it family by family.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask

from ..kernels.softmax import dense_attention_mask, softmax_attention_reference

logger = logging.getLogger("hf_efficient_attn")

BACKENDS = ("auto", "triton", "reference")
IMPL_NAMES = {"auto": "hfa", "reference": "hfa_reference", "triton": "hfa_triton"}
BACKEND_OF_IMPL = {v: k for k, v in IMPL_NAMES.items()}

_logged_once: set[str] = set()


def log_once(message: str) -> None:
    """Log a fallback once per distinct message, not once per layer and call."""
    if message not in _logged_once:
        _logged_once.add(message)
        logger.warning(message)


# ---------------------------------------------------------------------------------------------
# mask function
# ---------------------------------------------------------------------------------------------

def _structured_mask(batch_size, q_length, kv_length, q_offset, kv_offset, padding, local_size, causal, device):
    """The 4-D bool mask that (causal|bidirectional, window, key padding) describes, as transformers builds it."""
    q_pos = torch.arange(q_length, device=device)[:, None] + q_offset
    kv_pos = torch.arange(kv_length, device=device)[None, :] + kv_offset
    allowed = torch.ones(q_length, kv_length, dtype=torch.bool, device=device)
    if causal:
        allowed = kv_pos <= q_pos
        if local_size is not None:
            allowed = allowed & (q_pos - kv_pos < local_size)
    allowed = allowed[None, None].expand(batch_size, 1, q_length, kv_length)
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    return allowed


def hfa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask=None, local_size=None, **kwargs):
    """AttentionMaskInterface function for our names: a 2-D key padding mask, None, or an exact 4-D mask."""
    kwargs.pop("dtype", None)
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, **kwargs)
    if full is None:
        return None
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return full  # static caches: lengths differ from what is written, keep the exact mask
    if q_offset + q_length != kv_offset + kv_length:
        return full  # queries are not aligned to the end of the keys
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, kv_offset:kv_offset + kv_length].to(device=full.device, dtype=torch.bool)
    for causal in (True, False):
        if causal is False and local_size is not None:
            break
        candidate = _structured_mask(batch_size, q_length, kv_length, q_offset, kv_offset, padding,
                                     local_size, causal, full.device)
        if torch.equal(candidate, full):
            if padding is None or bool(padding.all()):
                return None
            return padding
    return full


# ---------------------------------------------------------------------------------------------
# attention functions
# ---------------------------------------------------------------------------------------------

def _triton_can_run(device: torch.device) -> str | None:
    """None when Triton kernels can run on tensors of this device; else the reason."""
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton kernels need a CUDA GPU or the interpreter (TRITON_INTERPRET=1 set before "
            f"importing triton); the tensors are on {device.type}")


def _triton_reason(q, k, v, opts) -> str | None:
    reason = _triton_can_run(q.device)
    if reason is not None:
        return reason
    try:
        from ..kernels.softmax.triton_dispatch import triton_unsupported_reason
    except ImportError as e:  # triton missing (e.g. macOS) or the kernels failed to import
        return f"the Triton kernels are unavailable ({e})"
    return triton_unsupported_reason(q, k, v, **opts)


def _sdpa_reason(opts) -> str | None:
    """None when torch SDPA computes exactly this case."""
    if opts["softcap"] is not None:
        return "logit softcap"
    if opts["sinks"] is not None:
        return "attention sinks"
    return None


def _sdpa_attention(q, k, v, *, scale, causal, window, key_padding_mask, attn_mask, cu_seqlens_q,
                    cu_seqlens_k, dropout_p, **_):
    Sq, Skv = q.shape[2], k.shape[2]
    plain = key_padding_mask is None and cu_seqlens_q is None and (window is None or window >= Skv)
    if attn_mask is None and plain and (not causal or Sq == 1 or Sq == Skv):
        mask, is_causal = None, causal and Sq > 1  # SDPA's own causal flag: its fastest kernels
    else:
        is_causal = False
        mask = None
        if not (plain and (not causal or Sq == 1)):  # some structural rule cuts: spell it out
            mask = dense_attention_mask(Sq, Skv, causal=causal, window=window, key_padding_mask=key_padding_mask,
                                        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, device=q.device)
        if attn_mask is not None:  # combined with the rules above, as in the reference
            if attn_mask.dtype == torch.bool:
                mask = attn_mask if mask is None else mask & attn_mask
            else:
                bias = attn_mask.to(q.dtype)
                mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def softmax_attention(q, k, v, *, backend="auto", **opts):
    """Run one attention call on the chosen backend. q/k/v: [B, H, S, D]; returns [B, Hq, Sq, Dv].

    backend "auto": Triton on CUDA when it serves the case, else torch SDPA where SDPA is exact,
    else the reference (the fallback is logged once). "triton"/"reference": that backend or a clear
    error, never a silently different computation.
    """
    if backend == "reference":
        return softmax_attention_reference(q, k, v, **opts)[0]
    if backend == "triton":
        reason = _triton_reason(q, k, v, opts)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this attention call: {reason}. "
                             f"Use backend='auto' to fall back to an exact path, or backend='reference'.")
        from ..kernels.softmax.triton_dispatch import triton_softmax_attention
        return triton_softmax_attention(q, k, v, **opts)[0]
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if q.device.type == "cuda":
        reason = _triton_reason(q, k, v, opts)
        if reason is None:
            from ..kernels.softmax.triton_dispatch import triton_softmax_attention
            return triton_softmax_attention(q, k, v, **opts)[0]
        log_once(f"hf_efficient_attn: Triton cannot serve this call ({reason}); using an exact fallback")
    reason = _sdpa_reason(opts)
    if reason is None:
        return _sdpa_attention(q, k, v, **opts)
    log_once(f"hf_efficient_attn: torch SDPA cannot compute {reason} exactly; using the blockwise reference")
    return softmax_attention_reference(q, k, v, **opts)[0]


def _options_from_call(module, query, key, attention_mask, scaling, dropout, kwargs):
    """Translate one transformers attention call into our kernel options (see the module docstring)."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    opts = dict(scale=scaling, causal=bool(is_causal), window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), key_padding_mask=None,
                attn_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=float(dropout or 0.0))
    if opts["softcap"] is not None and opts["softcap"] <= 0:
        opts["softcap"] = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.shape[-1] != key.shape[2]:
                raise ValueError(f"2-D attention mask covers {attention_mask.shape[-1]} keys but the layer has "
                                 f"{key.shape[2]}; this cache layout is not supported")
            opts["key_padding_mask"] = attention_mask.bool()
        elif attention_mask.dim() == 4:
            opts["attn_mask"] = attention_mask[:, :, :, : key.shape[2]]
            opts["causal"], opts["window"] = False, None
        else:
            raise ValueError(f"attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and opts["attn_mask"] is None and query.shape[0] == 1:
        opts["cu_seqlens_q"], opts["cu_seqlens_k"] = cu_q, cu_k
    return opts


def make_attention_function(backend: str):
    def hfa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        opts = _options_from_call(module, query, key, attention_mask, scaling, dropout, kwargs)
        out = softmax_attention(query, key, value, backend=backend, **opts)  # (B, Hq, Sq, Dv)
        return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, Dv); no weights materialised

    hfa_attention.__name__ = hfa_attention.__qualname__ = f"hfa_attention_{backend}"
    return hfa_attention


def register() -> None:
    """Register our attention and mask functions with transformers (idempotent)."""
    for backend, name in IMPL_NAMES.items():
        AttentionInterface.register(name, make_attention_function(backend))
        AttentionMaskInterface.register(name, hfa_mask)
