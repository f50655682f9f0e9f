"""patch / unpatch / patched: switch a loaded model's attention to ours through the registry, and back."""

from __future__ import annotations

import contextlib

import torch

from . import ring as _ring
from .kv import apply as _kv
from .backends import BACKENDS, triton_can_run
from .registry import BACKEND_OF_IMPL, IMPL_NAMES
from .sparse.apply import attach, detach, pattern_of

PATCH_BACKENDS = (*BACKENDS, "ring")

_SAVED_ATTR = "_hfa_saved_attn_implementation"
_SAVED_BACKENDS = "_hfa_saved_module_backends"


def _converted_modules(model):
    """The converted attention modules (MLA, linear, ...) of a model: they carry their own ``backend``."""
    return [(name, m) for name, m in model.named_modules() if getattr(type(m), "HFA_BACKENDS", None)]


def _check_model(model):
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - transformers is a hard dependency
        raise ImportError("hf_efficient_attn needs transformers>=5.17: pip install 'transformers>=5.17'") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch() takes a transformers PreTrainedModel, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and not m._can_set_attn_implementation():
            raise ValueError(
                f"{type(m).__name__} cannot be patched: its modeling code does not dispatch attention through "
                f"transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS), so changing the attention "
                f"implementation would silently do nothing. Models written for the transformers v5 attention "
                f"interface (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi3, GPT-NeoX, GPT-OSS, BERT, ...) work."
            )


def _current_implementations(config) -> dict:
    """The attention implementation of a config and of each nested sub-config, in set_attn_implementation's dict form."""
    out = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = _current_implementations(sub)
    return out


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def is_patched(model) -> bool:
    """True when the model's attention currently runs through one of our implementations."""
    return model.config._attn_implementation in BACKEND_OF_IMPL


def patch(model, backend: str = "auto", sparse=None, *, kv=None, group=None, ring_mode: str = "auto",
          ring_layout: str = "zigzag"):
    """Make every attention layer of ``model`` run on our kernels; returns the same model.

    backend: "auto" (Triton on CUDA where it serves the call, else an exact fallback: torch SDPA or
    the blockwise reference), "triton" (only Triton; error where it cannot run), "reference" (the
    blockwise plain-PyTorch reference). Patching twice is harmless; :func:`unpatch` restores the
    implementation the model had before the first patch.

    sparse: a training-free pattern from :mod:`hf_efficient_attn.attention.sparse` (``hfa.sparse.top_p(0.95)``,
    ``streaming``, ``longformer``, ``dilated``, ``vertical_slash``, ``lsh``): prefill runs on the block-sparse
    kernels (backend "auto": Triton on CUDA where they serve the call, else the PyTorch block-gather path), decode
    steps stay dense unless the pattern has a decode rule, sliding-window layers keep their window, and calls a
    pattern cannot compute exactly (softcap, attention sinks, explicit masks) raise a ValueError. None (default):
    dense attention (a pattern from an earlier patch is removed). ``hfa.sparse.density(model)`` reports what ran.

    kv: a training-free KV-cache policy from :mod:`hf_efficient_attn.attention.kv` (``hfa.kv.streaming(4, 1024)``,
    ``snapkv(1024)``, ``quest(16, 1024)``): the model's DynamicCache gets the policy's cache layers on its
    full-attention layers (generate, beam search and padded batches as usual), and their attention calls read what
    the policy keeps. None (default): the full cache (a policy from an earlier patch is removed).

    backend="ring" (under torchrun / accelerate launch, with a torch.distributed process group): exact attention over
    sequences split across the processes of ``group`` (default: all), see :mod:`hf_efficient_attn.attention.ring`;
    feed it batches from ``hfa.ring.prepare``. ring_mode: "auto" | "ring" | "allgather" (how K/V reach every rank);
    ring_layout: "zigzag" (balanced causal work) | "contiguous".
    """
    if backend not in PATCH_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(PATCH_BACKENDS)}")
    _check_model(model)
    if sparse is not None:
        _check_sparse(model, sparse)
    shifts = _check_kv(model, kv, sparse, backend)
    ring = None
    if backend == "ring":
        ring = _ring.check_settings(group, ring_mode, ring_layout)
        _check_ring(model, sparse)
    if backend == "triton":
        reason = triton_can_run(_model_device(model))
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}. Move the model to a GPU "
                             f"(model.cuda()), or use backend='auto' or 'reference'.")
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ImportError("backend='triton' needs the triton package: pip install triton") from e
    if not is_patched(model):
        model.__dict__[_SAVED_ATTR] = _current_implementations(model.config)
        model.__dict__[_SAVED_BACKENDS] = {name: m.backend for name, m in _converted_modules(model)}
    model.set_attn_implementation(IMPL_NAMES[backend])
    if model.config._attn_implementation != IMPL_NAMES[backend]:  # set_attn_implementation only warns
        raise ValueError(f"transformers refused attn_implementation={IMPL_NAMES[backend]!r} for "
                         f"{type(model).__name__}; the model is left unchanged")
    for _, m in _converted_modules(model):   # one backend rule: converted modules follow the same choice
        m.backend = backend
    if ring is None:
        _ring.detach(model)
    else:
        _ring.attach(model, ring)
    if sparse is None:
        detach(model)
    else:
        attach(model, sparse)
    if kv is None:
        _kv.detach(model)
    else:
        _kv.attach(model, kv, shifts)
    return model


def _check_kv(model, policy, sparse, backend):
    """None or the RoPE shifts the policy needs; TypeError/ValueError for what cannot run."""
    if policy is None:
        return None
    from .kv import KVPolicy
    if not isinstance(policy, KVPolicy):
        raise TypeError(f"kv= takes a policy from hfa.kv (streaming, snapkv, quest), got {type(policy).__name__}")
    if sparse is not None:
        raise ValueError("kv= and sparse= do not combine yet: a sparse prefill and a KV policy would both decide "
                         "which keys a query reads. Patch with one of them.")
    if backend == "ring":
        raise ValueError("backend='ring' computes exact attention over a sharded cache; it does not combine with kv=")
    converted = _converted_modules(model)
    if converted:
        name, m = converted[0]
        raise ValueError(f"KV policies apply to softmax attention layers with a KV cache; {name} is a converted "
                         f"{type(m).__name__}, which keeps its own cache. Patch it without kv=.")
    can_generate = getattr(model, "can_generate", lambda: False)
    if getattr(model.config, "is_encoder_decoder", False) or not can_generate():
        raise ValueError(f"KV policies serve decoder-only causal models with a KV cache; {type(model).__name__} is "
                         f"not one")
    if not _kv.policy_layer_ids(model.config):
        raise ValueError(f"{type(model).__name__} has no full-attention layer (all use a sliding window, whose "
                         f"cache is already bounded): a KV policy has nothing to take over")
    if not policy.needs_rope:
        return None
    from .kv.rope import rope_shifts
    shifts = rope_shifts(model)
    if isinstance(shifts, str):
        raise ValueError(f"KV policy {policy.name} places kept tokens by their cache slot (StreamingLLM), which "
                         f"needs their keys shifted along RoPE: {shifts}")
    return shifts


def _check_sparse(model, pattern) -> None:
    from .sparse import SparsePattern
    if not isinstance(pattern, SparsePattern):
        raise TypeError(f"sparse= takes a pattern from hfa.sparse (streaming, longformer, dilated, vertical_slash, "
                        f"top_p, lsh, full), got {type(pattern).__name__}")
    converted = _converted_modules(model)
    if converted:  # their attention is not softmax through the registry: a pattern would silently not apply
        name, m = converted[0]
        raise ValueError(f"sparse patterns apply to softmax attention layers; {name} is a converted "
                         f"{type(m).__name__}, which computes its own attention. Patch it without sparse=.")


def _check_ring(model, sparse) -> None:
    if sparse is not None:
        raise ValueError("backend='ring' computes exact attention; it does not combine with sparse= patterns")
    converted = _converted_modules(model)
    if converted:
        name, m = converted[0]
        raise ValueError(f"backend='ring' serves softmax attention layers; {name} is a converted {type(m).__name__}, "
                         f"which computes its own attention. Patch the original model, or use backend='auto'.")


def unpatch(model):
    """Restore the attention implementation the model had before :func:`patch`; returns the model.

    A model that is not patched is returned unchanged.
    """
    saved = model.__dict__.pop(_SAVED_ATTR, None)
    if saved is None:
        if is_patched(model):  # loaded with attn_implementation="hfa": there is no "before"
            raise ValueError("this model was created with an hfa attention implementation, so there is no "
                             "previous one to restore; use model.set_attn_implementation('sdpa') instead")
        return model
    model.set_attn_implementation(saved)
    _restore_backends(model, model.__dict__.pop(_SAVED_BACKENDS, {}))
    detach(model)
    _kv.detach(model)
    _ring.detach(model)
    return model


def _restore_backends(model, saved: dict) -> None:
    for name, m in _converted_modules(model):
        if name in saved:
            m.backend = saved[name]


@contextlib.contextmanager
def patched(model, backend: str = "auto", sparse=None, *, kv=None, **ring_options):
    """Context manager: the model is patched inside the block and restored after it, even on error.
    kv: a KV policy (:func:`patch`); ring_options: group / ring_mode / ring_layout of :func:`patch` (backend="ring")."""
    was_patched = is_patched(model)
    before = model.config._attn_implementation
    backends_before = {name: m.backend for name, m in _converted_modules(model)}
    pattern_before = pattern_of(model)
    ring_before = _ring.attached(model)
    kv_before = _kv.state_of(model)
    patch(model, backend=backend, sparse=sparse, kv=kv, **ring_options)
    try:
        yield model
    finally:
        if was_patched:
            model.set_attn_implementation(before)
            _restore_backends(model, backends_before)
            if pattern_before is None:
                detach(model)
            else:
                attach(model, pattern_before)
            if ring_before is None:
                _ring.detach(model)
            else:
                _ring.attach(model, ring_before)
            if kv_before is None:
                _kv.detach(model)
            else:
                _kv.attach(model, kv_before.policy, kv_before.shifts)
        else:
            unpatch(model)
