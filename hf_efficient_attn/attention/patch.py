"""patch / unpatch / patched: switch a loaded model's attention to ours through the registry, and back."""

from __future__ import annotations

import contextlib

import torch

from . import ring as _ring
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


def patch(model, backend: str = "auto", sparse=None, *, group=None, ring_mode: str = "auto",
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
    return model


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
    _ring.detach(model)
    return model


def _restore_backends(model, saved: dict) -> None:
    for name, m in _converted_modules(model):
        if name in saved:
            m.backend = saved[name]


@contextlib.contextmanager
def patched(model, backend: str = "auto", sparse=None, **ring_options):
    """Context manager: the model is patched inside the block and restored after it, even on error.
    ring_options: group / ring_mode / ring_layout of :func:`patch` (backend="ring")."""
    was_patched = is_patched(model)
    before = model.config._attn_implementation
    backends_before = {name: m.backend for name, m in _converted_modules(model)}
    pattern_before = pattern_of(model)
    ring_before = _ring.attached(model)
    patch(model, backend=backend, sparse=sparse, **ring_options)
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
        else:
            unpatch(model)
