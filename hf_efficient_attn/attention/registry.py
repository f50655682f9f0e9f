"""How transformers calls our softmax attention: the registered attention and mask functions.

transformers (v5) builds one mask per forward pass through ``AttentionMaskInterface`` and calls the
attention function of every layer through ``AttentionInterface``. We register three names:

    "hfa"            backend "auto"
    "hfa_reference"  the blockwise plain-PyTorch reference (exact everywhere, any device)
    "hfa_triton"     the Triton kernels (CUDA, or the interpreter with TRITON_INTERPRET=1)
    "hfa_ring"       ring attention across the processes of a torch.distributed group (:mod:`.ring`)

**What the layers and our attention function receive as ``attention_mask``.** Always an
:class:`HFAMask`: to the model, the eager-format 4-D mask (``[B, 1, q_len, kv_len]``, 0 = attend,
``finfo.min`` = masked), built only if a layer touches it, so layers that index, rewrite or add the mask
themselves behave exactly as under eager. To our attention function, its structure: when the mask is
exactly "causal or bidirectional, maybe a sliding window, plus key padding" with queries aligned to the
end of the keys, the kernels get (causal, window, key padding) and skip blocks instead of reading an
S x S mask; anything else (packed sequences found from position_ids, overlays, static caches) is an
explicit bool mask applied as is. The mask is the truth, as in eager: a structured mask's causal flag
and window win over the layer's ``is_causal``/``sliding_window`` kwargs (PhiMoE builds a window mask and
never passes the window). A mask a layer rewrote arrives as a plain 4-D tensor and is applied as is.
``None`` (a layer that drops the mask) means: causal iff the module is causal, the ``sliding_window``
kwarg, no padding (what SDPA does with None).

**Under torch.compile** the mask is the plain eager-format tensor with its structure attached (:class:`TracedMask`,
read through :func:`mask_info`: Dynamo cannot build a tensor subclass in a graph), and no check reads tensor
data: an all-True key padding is kept (it cuts nothing), a mask function we do not recognise stays an explicit
mask (not verified against the structures), fallbacks are not logged. Every result stays exact.

**Keyword arguments.** Every kwarg of a call is understood (``UNDERSTOOD_KWARGS``: sliding_window,
softcap, s_aux and per-query sinks, position_bias, is_causal, packed-sequence lengths), known to be
harmless (``HARMLESS_KWARGS``), or unknown: then backend "auto" runs the layer's own eager function
for that call (logged once) and "reference"/"triton" raise naming the kwarg. Never dropped silently.

**Sparse patterns.** On a model patched with ``sparse=`` (``hfa.patch(model, sparse=hfa.sparse.top_p(0.95))``)
each call goes to the pattern's layer state (:mod:`.sparse.apply`): prefill on the block-sparse kernels, decode
steps and sliding-window layers dense, and calls a pattern cannot compute exactly (explicit masks, sinks,
softcap, unknown kwargs) refused with a ValueError instead of running something else.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask

from ..kernels.softmax import dense_attention_mask, softmax_attention_reference
from .backends import BACKENDS, _logged_once, log_once, logger, triton_can_run, use_triton  # noqa: F401
from . import ring as _ring
from .kv.apply import kv_layer
from .sparse.apply import sparse_layer

IMPL_NAMES = {"auto": "hfa", "reference": "hfa_reference", "triton": "hfa_triton", "ring": "hfa_ring"}
BACKEND_OF_IMPL = {v: k for k, v in IMPL_NAMES.items()}


# ---------------------------------------------------------------------------------------------
# the mask object
# ---------------------------------------------------------------------------------------------

_CHECK_ELEMENTS = 1 << 22  # mask entries evaluated at once when verifying a structure (bounded memory)


class HFAMask(torch.Tensor):
    """The attention mask our mask function hands to the model: an eager-format 4-D mask that knows its structure.

    To the model it is the tensor eager attention would receive: shape ``[B, 1, q_len, kv_len]``, dtype the
    model's (0 = attend, ``finfo.min`` = masked). Any operation a layer applies to it (indexing, ``where``,
    adding it to scores, ...) runs on that dense tensor, built on first use and kept, so a layer that reads
    or rewrites the mask gets exactly what eager would give it, and a rewritten mask reaches our attention
    function as the plain 4-D tensor it now is. Our attention function reads the structure instead and
    never builds it:

    * structured: ``causal`` (bottom-right aligned), ``window`` (keys ``p - j < window``; None = no window)
      and ``padding`` (``[B, kv_len]`` bool, True = real key; None = no padding), so the kernels skip
      blocks and a long context never materialises S x S. The structure travels with the mask: a layer
      that builds a window mask but does not pass ``sliding_window=`` still gets its window.
    * explicit: ``allowed`` (``[B, 1, q_len, kv_len]`` bool) for every other pattern (packed sequences,
      overlays, static caches), consumed as the exact mask it is.
    """

    causal: bool
    window: int | None
    padding: torch.Tensor | None
    explicit: torch.Tensor | None

    @staticmethod
    def __new__(cls, shape, dtype, device, *, causal=False, window=None, padding=None, explicit=None):
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        r.causal, r.window, r.padding, r.explicit = bool(causal), window, padding, explicit
        r._dense = None
        return r

    @property
    def structured(self) -> bool:
        return self.explicit is None

    def same(self) -> "HFAMask":
        """A new handle on the same mask (ops that would return the mask unchanged return this)."""
        out = HFAMask(self.shape, self.dtype, self.device, causal=self.causal, window=self.window,
                      padding=self.padding, explicit=self.explicit)
        out._dense = self._dense
        return out

    def allowed(self) -> torch.Tensor:
        """The bool mask ``[B, 1, q_len, kv_len]`` (True = may attend). Materialises the whole mask."""
        if self.explicit is not None:
            return self.explicit
        B, _, Sq, Skv = self.shape
        return _structure_rows(B, 0, Sq, Sq, Skv, self.causal, self.window, self.padding, self.device)

    def dense(self) -> torch.Tensor:
        """The eager-format mask: 0 where attending, ``finfo(dtype).min`` elsewhere (built once, then kept)."""
        if self._dense is None:
            allowed = self.allowed()
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            self._dense = torch.where(allowed, zero, torch.finfo(self.dtype).min)
        return self._dense

    def key_padding(self) -> torch.Tensor | None:
        """``[B, kv_len]`` bool of the real keys, None when nothing is padded (structured masks only)."""
        if self.explicit is not None:
            raise ValueError("an explicit mask has no separate key padding; use allowed()")
        return self.padding

    def __repr__(self):
        if self.explicit is not None:
            return f"HFAMask(explicit, shape={tuple(self.shape)})"
        return (f"HFAMask(causal={self.causal}, window={self.window}, "
                f"padding={'none' if self.padding is None else tuple(self.padding.shape)}, shape={tuple(self.shape)})")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default) and isinstance(args[0], HFAMask):
            return args[0].same()
        if func is aten.slice.Tensor and isinstance(args[0], HFAMask):  # x[..., :n] that keeps everything
            t, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % 4
            start = args[2] if len(args) > 2 else kwargs.get("start")
            end = args[3] if len(args) > 3 else kwargs.get("end")
            step = args[4] if len(args) > 4 else kwargs.get("step", 1)
            if (start in (None, 0)) and (end is None or end >= t.shape[dim]) and step == 1:
                return t.same()

        def unwrap(x):
            return x.dense() if isinstance(x, HFAMask) else x

        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs))


class TracedMask:
    """What an :class:`HFAMask` knows, for a mask built under ``torch.compile``.

    Dynamo cannot build a tensor subclass inside a graph (``_make_wrapper_subclass`` breaks it), so under
    ``torch.compile`` our mask function returns the plain eager-format 4-D mask and keeps its structure in this
    object, attached to the mask as ``mask._hfa_mask`` (a Python attribute Dynamo tracks). A layer that rewrites
    the mask gets a new tensor without the attribute, which our attention function applies as the exact 4-D
    mask it is, as with an HFAMask. The dense mask is built in the graph; when only our attention function
    reads the structure, the compiler drops it as dead code. Read it through :func:`mask_info`.
    """

    def __init__(self, shape, dtype, device, *, causal=False, window=None, padding=None, explicit=None):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device
        self.causal, self.window, self.padding, self.explicit = bool(causal), window, padding, explicit

    structured = HFAMask.structured
    allowed = HFAMask.allowed
    key_padding = HFAMask.key_padding

    def dense(self) -> torch.Tensor:
        """The eager-format mask (0 = attend, ``finfo(dtype).min`` = masked), carrying this object."""
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        mask = torch.where(self.allowed(), zero, torch.finfo(self.dtype).min)
        mask._hfa_mask = self
        return mask

    def __repr__(self):
        return "Traced" + HFAMask.__repr__(self)


def mask_info(attention_mask):
    """The structure our mask function gave ``attention_mask``: the :class:`HFAMask` itself, the
    :class:`TracedMask` of a mask built under ``torch.compile``, or None (a mask a layer built or rewrote)."""
    if isinstance(attention_mask, HFAMask):
        return attention_mask
    return getattr(attention_mask, "_hfa_mask", None)


def _structure_rows(batch_size, r0, r1, q_length, kv_length, causal, window, padding, device):
    """Rows r0:r1 of the bool mask a structure describes, queries aligned to the end of the keys."""
    q_pos = torch.arange(r0, r1, device=device)[:, None] + (kv_length - q_length)
    kv_pos = torch.arange(kv_length, device=device)[None, :]
    allowed = torch.ones(r1 - r0, kv_length, dtype=torch.bool, device=device)
    if causal:
        allowed = kv_pos <= q_pos
        if window is not None:
            allowed = allowed & (q_pos - kv_pos < window)
    allowed = allowed[None, None].expand(batch_size, 1, r1 - r0, kv_length)
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    return allowed


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


@torch.compiler.assume_constant_result  # a pure function of the mask function: torch.compile evaluates it while
def _recognised_structure(mask_function):   # tracing (Dynamo cannot read a closure it builds in the graph)
    """(causal, window) for transformers' own causal / sliding-window / bidirectional mask functions, else None.

    Recognised by code object, so an equal-looking user function is verified instead (``_verified_structure``)."""
    from transformers import masking_utils as mu
    if mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None
    if getattr(mask_function, "__code__", None) is mu.and_masks(mu.causal_mask_function).__code__:
        parts = _closure(mask_function).get("mask_functions", ())
        if len(parts) == 2 and parts[1] is mu.causal_mask_function and \
                getattr(parts[0], "__code__", None) is mu.sliding_window_overlay(1).__code__:
            window = _closure(parts[0]).get("sliding_window")
            if isinstance(window, int) and window >= 1:
                return True, window
    return None


def _window_guess(last_row, padding):
    """The causal window the last query row suggests (its first attended key), or None. Only a guess:
    ``_verified_structure`` checks it against every row."""
    b = 0 if padding is None else int(padding.sum(-1).argmax())
    seen = last_row[b, 0, 0].nonzero()
    if len(seen) == 0 or int(seen[0]) == 0:
        return None
    return last_row.shape[-1] - int(seen[0])


def _verified_structure(candidates, exact_rows, batch_size, q_length, kv_length, padding, device):
    """The first (causal, window) candidate whose mask equals the exact one, checked a few rows at a time."""
    rows = max(1, _CHECK_ELEMENTS // max(1, batch_size * kv_length))
    alive = list(candidates)
    for r0 in range(0, q_length, rows):
        r1 = min(q_length, r0 + rows)
        exact = exact_rows(r0, r1)
        alive = [c for c in alive if torch.equal(
            _structure_rows(batch_size, r0, r1, q_length, kv_length, *c, padding, device), exact)]
        if not alive:
            return None
    return alive[0]


def hfa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask=None, local_size=None, dtype=torch.float32, **kwargs):
    """AttentionMaskInterface function for our names: always an :class:`HFAMask` (never None).

    Structured when the mask transformers asks for is exactly causal (or bidirectional), maybe a sliding
    window, plus key padding, with queries aligned to the end of the keys: transformers' own mask
    functions are recognised at no cost; any other function is evaluated a few rows at a time and
    compared (exact, memory bounded). Everything else is an explicit mask, exactly as sdpa_mask builds it.
    """
    from transformers.masking_utils import causal_mask_function
    for k in ("allow_is_causal_skip", "allow_is_bidirectional_skip", "allow_torch_fix"):
        kwargs.pop(k, None)
    if mask_function is None:
        mask_function = causal_mask_function
    device = torch.device(kwargs.get("device", "cpu"))
    if attention_mask is not None:
        device = attention_mask.device
    kwargs["device"] = device
    shape = (batch_size, 1, q_length, kv_length)

    def exact_rows(r0, r1):
        return sdpa_mask(batch_size=batch_size, q_length=r1 - r0, kv_length=kv_length, q_offset=q_offset + r0,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=False, **kwargs)

    # under torch.compile: no check that reads tensor data (each would break the graph), and a plain tensor
    # carrying its structure (see TracedMask); every answer stays exact, only some are less structured
    compiling = torch.compiler.is_compiling()
    mask_class = TracedMask if compiling else HFAMask
    static = isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor)
    aligned = not static and q_offset + q_length == kv_offset + kv_length
    if not static:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is not None:
            padding = padding[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
            if not compiling and bool(padding.all()):  # compiled: an all-True padding stays (it cuts nothing)
                padding = None
        structure = _recognised_structure(mask_function)
        if structure is None and not compiling:  # compiled: an unrecognised mask function stays explicit
            candidates = [(True, local_size), (True, None), (False, None)] if aligned else [(False, None)]
            if aligned and local_size is None and q_length > 0:  # a window nobody told us about?
                candidates.insert(0, (True, _window_guess(exact_rows(q_length - 1, q_length), padding)))
            structure = _verified_structure(dict.fromkeys(candidates), exact_rows, batch_size, q_length, kv_length,
                                            padding, device)
        if structure is not None and (aligned or structure == (False, None)):
            causal, window = structure
            if window is not None and window >= kv_length:
                window = None  # a window longer than every key cuts nothing
            mask = mask_class(shape, dtype, device, causal=causal, window=window, padding=padding)
            return mask.dense() if compiling else mask
    explicit = exact_rows(0, q_length).expand(shape)
    mask = mask_class(shape, dtype, device, explicit=explicit)
    return mask.dense() if compiling else mask


# ---------------------------------------------------------------------------------------------
# attention functions
# ---------------------------------------------------------------------------------------------

def _triton_reason(q, k, v, opts) -> str | None:
    reason = triton_can_run(q.device)
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
    if use_triton(backend, q.device, lambda: _triton_reason(q, k, v, opts), "this attention call"):
        from ..kernels.softmax.triton_dispatch import triton_softmax_attention
        return triton_softmax_attention(q, k, v, **opts)[0]
    reason = _sdpa_reason(opts)
    if reason is None:
        return _sdpa_attention(q, k, v, **opts)
    log_once(f"hf_efficient_attn: torch SDPA cannot compute {reason} exactly; using the blockwise reference")
    return softmax_attention_reference(q, k, v, **opts)[0]


# Keyword arguments an attention call may carry. UNDERSTOOD ones change the math and are translated into
# kernel options; HARMLESS ones do not change the output (bookkeeping, or read by the layer itself). A kwarg in
# neither list is unknown: "auto" runs the layer's own eager function for that call (exact by definition),
# "reference"/"triton" raise naming it. A kwarg whose value is None/False is always harmless (feature off).
UNDERSTOOD_KWARGS = frozenset({
    "sliding_window", "softcap", "s_aux", "sinks", "position_bias", "is_causal",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
})
HARMLESS_KWARGS = frozenset({
    "position_ids", "position_embeddings", "output_attentions", "use_cache", "cache_position", "cache",
    "past_key_values", "past_key_value", "layer_idx", "layer_head_mask", "head_mask", "query_length",
    "target_dtype", "attention_type", "implementation", "return_dict", "token_type_ids", "seq_idx",
})


def unknown_kwargs(kwargs) -> list[str]:
    """Names of the kwargs of one attention call that we neither understand nor know to be harmless."""
    out = []
    for name, value in kwargs.items():
        if name in UNDERSTOOD_KWARGS or name in HARMLESS_KWARGS or value is None or value is False:
            continue
        out.append(name)
    return sorted(out)


def _eager_function(module):
    """The eager attention function of the layer's own modeling module (the definition of exact), or None."""
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    return fn if callable(fn) else None


def _eager_mask(attention_mask, dtype):
    """Whatever mask we hold, in the form eager attention adds to its scores."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, HFAMask):
        return attention_mask.dense().to(dtype)
    if mask_info(attention_mask) is not None:  # a compiled mask: already the eager-format mask
        return attention_mask.to(dtype)
    if attention_mask.dtype == torch.bool:
        if attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :]
        return torch.where(attention_mask, torch.zeros((), dtype=dtype, device=attention_mask.device),
                           torch.finfo(dtype).min)
    return attention_mask


def _options_from_call(module, query, key, attention_mask, scaling, dropout, kwargs):
    """Translate one transformers attention call into our kernel options (see the module docstring)."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    opts = dict(scale=scaling, causal=bool(is_causal), window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), key_padding_mask=None,
                attn_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=float(dropout or 0.0))
    if kwargs.get("sinks") is not None:
        if opts["sinks"] is not None:
            raise ValueError("an attention call passed both s_aux= and sinks=; only one sink logit is defined")
        opts["sinks"] = kwargs["sinks"]
    if opts["softcap"] is not None and opts["softcap"] <= 0:
        opts["softcap"] = None
    Sq, Skv = query.shape[2], key.shape[2]
    info = mask_info(attention_mask)
    if info is not None and info.structured and tuple(info.shape[-2:]) == (Sq, Skv):
        # the mask is the truth (as in eager): its structure, not the layer's kwargs, says causal/window
        opts["causal"], opts["window"] = info.causal, info.window
        opts["key_padding_mask"] = info.padding
    elif info is not None:
        opts["attn_mask"] = info.allowed()[:, :, :, :Skv]
        opts["causal"], opts["window"] = False, None
    elif attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.shape[-1] != Skv:
                raise ValueError(f"2-D attention mask covers {attention_mask.shape[-1]} keys but the layer has "
                                 f"{Skv}; this cache layout is not supported")
            opts["key_padding_mask"] = attention_mask.bool()
        elif attention_mask.dim() == 4:  # a mask the layer built or rewrote: exact as it is
            opts["attn_mask"] = attention_mask[:, :, :, :Skv]
            opts["causal"], opts["window"] = False, None
        else:
            raise ValueError(f"attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")
    bias = kwargs.get("position_bias")
    if bias is not None:  # an additive score bias joins the 4-D mask (eager: scores * scale + bias + mask)
        m = opts["attn_mask"]
        bias = bias.to(query.dtype)
        opts["attn_mask"] = bias if m is None else (bias.masked_fill(~m, float("-inf")) if m.dtype == torch.bool
                                                    else bias + m)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and opts["attn_mask"] is None and query.shape[0] == 1 \
            and opts["key_padding_mask"] is None:
        opts["cu_seqlens_q"], opts["cu_seqlens_k"] = cu_q, cu_k
    return opts


def _not_native_reason(kwargs) -> str | None:
    """Why this call's kwargs cannot run on our kernels exactly (None when they can)."""
    unknown = unknown_kwargs(kwargs)
    if unknown:
        return f"unknown attention kwarg(s) {', '.join(unknown)}"
    if kwargs.get("position_bias") is not None and kwargs.get("softcap"):
        return "position_bias together with softcap (the order of the two is not defined)"
    return None


def _windowed(attention_mask, kwargs) -> bool:
    """Whether the layer restricts itself to a sliding window (its kwarg, or the window its mask carries)."""
    if kwargs.get("sliding_window") is not None:
        return True
    info = mask_info(attention_mask)
    return info is not None and info.structured and info.window is not None


def make_attention_function(backend: str):
    def dense(q, k, v, **opts):
        return softmax_attention(q, k, v, backend=backend, **opts)

    def hfa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        reason = _not_native_reason(kwargs)
        if backend == "ring":
            return ring_attention_call(module, query, key, value, attention_mask, scaling, dropout, kwargs, reason)
        kvl = kv_layer(module)  # set by hfa.patch(model, kv=...): the KV policy
        if kvl is not None:
            if reason is not None and kvl.cache_layer(module, key) is not None:
                raise ValueError(f"KV policy {kvl.state.policy.name} cannot run {type(module).__name__}: its "
                                 f"attention call carries {reason}. hfa.unpatch(model) restores the full cache.")

            def dense_call():
                opts = _options_from_call(module, query, key, attention_mask, scaling, dropout, kwargs)
                return softmax_attention(query, key, value, backend=backend, **opts)
            if reason is None:
                out = kvl.attend(module, query, key, value, attention_mask, scaling, dropout, kwargs, dense_call,
                                 backend)
                if out is not None:
                    return out.transpose(1, 2).contiguous(), None
        layer = sparse_layer(module)  # set by hfa.patch(model, sparse=...): the pattern and its records
        if layer is not None:
            windowed = _windowed(attention_mask, kwargs)
            if reason is not None and layer.applies(query.shape[2], key.shape[2], windowed):
                raise layer.refuse(module, reason)
            if reason is None:
                opts = _options_from_call(module, query, key, attention_mask, scaling, dropout, kwargs)
                out = layer.attend(module, query, key, value, opts, windowed=windowed, backend=backend, dense=dense)
                return out.transpose(1, 2).contiguous(), None
        if reason is not None:
            eager = _eager_function(module)
            if backend != "auto" or eager is None:
                why = (f"backend={backend!r} runs only what it understands" if backend != "auto" else
                       f"{type(module).__module__} has no eager_attention_forward to fall back to")
                raise ValueError(f"{type(module).__name__}: {reason}; {why}. Use backend='auto' (which runs the "
                                 f"layer's own eager attention for such calls), or the model's stock implementation.")
            log_once(f"hf_efficient_attn: {type(module).__name__} passes {reason}; running its own eager "
                     f"attention for these calls (exact)")
            return eager(module, query, key, value, _eager_mask(attention_mask, query.dtype), scaling=scaling,
                         dropout=dropout, **kwargs)
        opts = _options_from_call(module, query, key, attention_mask, scaling, dropout, kwargs)
        out = softmax_attention(query, key, value, backend=backend, **opts)  # (B, Hq, Sq, Dv)
        return out.transpose(1, 2).contiguous(), None  # (B, Sq, Hq, Dv); no weights materialised

    hfa_attention.__name__ = hfa_attention.__qualname__ = f"hfa_attention_{backend}"
    return hfa_attention


def ring_attention_call(module, query, key, value, attention_mask, scaling, dropout, kwargs, reason):
    """backend "ring": exact attention over a sequence split across processes (:mod:`.ring`), or a ValueError."""
    opts = None if reason is not None else _options_from_call(module, query, key, attention_mask, scaling, dropout,
                                                              kwargs)
    if reason is None:
        reason = _ring.refuse_reason(opts, kwargs)
    if reason is not None:
        raise ValueError(f"{type(module).__name__}: ring attention cannot compute {reason} exactly; run this model "
                         f"without backend='ring' (hfa.unpatch(model)) or without that feature")
    local = "triton" if use_triton("auto", query.device, lambda: _triton_reason(query, key, value, opts),
                                   "ring attention's per-block work") else "torch"
    out = _ring.attend(module, query, key, value, opts, kwargs, local)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register our attention and mask functions with transformers (idempotent)."""
    for backend, name in IMPL_NAMES.items():
        AttentionInterface.register(name, make_attention_function(backend))
        AttentionMaskInterface.register(name, hfa_mask)
