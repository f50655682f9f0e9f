"""What attention costs: KV-cache bytes measured on the real cache object, speed, parameters.

`kv_cache_bytes` does not compute a formula from the config: it runs the model over `tokens`
tokens with ``use_cache=True`` and adds up the tensors the returned cache object holds, whatever
they are — keys and values of full or sliding-window layers, the latent of an MLA cache, the state
and normaliser of linear attention — so a converted model is measured by the same code as the
original. `kv_cache_bytes_at_length` gets the same count at a long context without computing it: the forward runs
on the meta device (shapes and dtypes, no data), so the cache object is the real one with empty tensors.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..attention.model_io import cache_kwarg as _cache_kwarg  # noqa: F401  (tests and passkey use these names)
from ..attention.model_io import forward_params as _forward_params
from ..attention.model_io import output_cache as _output_cache

__all__ = ["SpeedPoint", "cache_tensors", "kv_cache_bytes", "kv_cache_bytes_at_length", "measure_speed",
           "merge_speed", "parameter_count"]

_MAX_DEPTH = 12


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _probe_ids(model, tokens: int, batch: int = 1) -> torch.Tensor:
    """Deterministic token ids `[batch, tokens]` (a fixed generator; the cache size does not depend on content)."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, tokens), generator=g).to(_model_device(model))


def cache_tensors(cache) -> list[tuple[str, torch.Tensor]]:
    """Every tensor reachable from a cache object, with its attribute path (e.g. ``layers.3.keys``).

    Walks attributes, lists, tuples and dicts (the legacy tuple-of-tuples format too); never enters
    an ``nn.Module`` (a cache that references its model must not count the model's weights), and
    visits each object once.
    """
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()

    def walk(obj, path: str, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            found.append((path, obj))
            return
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device, nn.Module)):
            return
        if depth > _MAX_DEPTH or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict) or (hasattr(obj, "items") and hasattr(obj, "keys") and hasattr(obj, "data")):
            for k, v in list(obj.items()):
                walk(v, f"{path}.{k}" if path else str(k), depth + 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, v in enumerate(obj):
                walk(v, f"{path}.{i}" if path else str(i), depth + 1)
            return
        attrs = getattr(obj, "__dict__", None)
        if attrs is None:
            return
        for k, v in attrs.items():
            walk(v, f"{path}.{k}" if path else k, depth + 1)

    walk(cache, "", 0)
    return found


def _deduplicated_bytes(tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Bytes of the tensors, each distinct view counted once, never more than the storage they view.

    A tensor counts its own extent (a sliding-window layer's ``keys`` right after prefill is a view of
    the last window of a larger buffer: it counts the window). Two names for one tensor count once;
    views of one storage add up to at most that storage's size.
    """
    per_storage: dict[int, dict[tuple, int]] = {}
    storage_size: dict[int, int] = {}
    for _, t in tensors:
        if t.numel() == 0:
            continue
        st = t.untyped_storage()
        key = st._cdata if t.is_meta else st.data_ptr()  # meta storages all sit at address 0
        storage_size[key] = st.nbytes()
        view = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        per_storage.setdefault(key, {})[view] = t.numel() * t.element_size()
    return sum(min(sum(views.values()), storage_size[k]) for k, views in per_storage.items())


def kv_cache_bytes(model, tokens: int = 1024, batch_size: int = 1) -> int:
    """TOTAL bytes held by the model's cache after one forward pass over `tokens` tokens.

    Runs `model(input_ids [batch_size, tokens], use_cache=True)` and sums the tensors of the
    returned cache object (`cache_tensors`), shared storage counted once. Per-token cost is
    ``kv_cache_bytes(model, tokens) / tokens`` (not constant for sliding-window layers, which stop
    growing at their window). Raises ``ValueError`` for a model that returns no cache (an encoder).
    """
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    ids = _probe_ids(model, tokens, batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            kwargs = {"use_cache": True}
            if "logits_to_keep" in _forward_params(model):
                kwargs["logits_to_keep"] = 1  # only the cache matters; skip the [tokens, vocab] logits
            out = model(input_ids=ids, **kwargs)
    finally:
        model.train(was_training)
    cache = _output_cache(out)
    if cache is None:
        raise ValueError(
            f"{type(model).__name__} returned no cache from a forward pass with use_cache=True: it keeps no "
            "KV cache (an encoder such as BERT attends over the whole input at once). kv_cache_bytes applies "
            "to decoders"
        )
    tensors = cache_tensors(cache)
    if not tensors:
        raise ValueError(f"the cache returned by {type(model).__name__} ({type(cache).__name__}) holds no tensors")
    return _deduplicated_bytes(tensors)


def _meta_copy(model):
    """A copy of `model` whose parameters and buffers are meta tensors (no data copied: cheap at any size)."""
    import copy

    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def kv_cache_bytes_at_length(model, tokens: int, batch_size: int = 1) -> int | None:
    """What :func:`kv_cache_bytes` would return after `tokens` tokens, without computing them: the same forward on a
    meta-device copy of the model (shapes and dtypes only, seconds at any length), the same count over the real cache
    object. None where the cache's size depends on the data (a KV-cache policy choosing what to keep, a sparse
    pattern estimated from the scores: their code reads values, which meta tensors do not have) — measure those
    with :func:`kv_cache_bytes`."""
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    from ..attention import kv as kvp
    from ..attention import sparse as sp

    if kvp.policy_of(model) is not None or sp.pattern_of(model) is not None:
        return None
    meta = _meta_copy(model).eval()
    ids = torch.zeros(batch_size, tokens, dtype=torch.long, device="meta")
    kwargs = {"use_cache": True}
    if "logits_to_keep" in _forward_params(meta):
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        out = meta(input_ids=ids, **kwargs)
    cache = _output_cache(out)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no cache from a forward pass with use_cache=True: it keeps "
                         "no KV cache. kv_cache_bytes_at_length applies to decoders")
    return _deduplicated_bytes(cache_tensors(cache))


def parameter_count(model, trainable_only: bool = False) -> int:
    """Number of parameters; tied weights (e.g. input and output embeddings) count once."""
    seen, total = set(), 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass
class SpeedPoint:
    context: int           # tokens in the prompt
    prefill_s: float       # one forward pass over the prompt (median of repeats)
    prefill_tok_s: float
    decode_tokens: int     # tokens generated after the prompt, one at a time with the cache
    decode_s: float        # for all decode steps (median of repeats)
    decode_tok_s: float
    cache_bytes: int | None = None   # bytes the real cache held right after the prefill (see kv_cache_bytes)
    repeats: int = 1                 # timed runs the medians are over
    decode_tok_s_min: float | None = None   # the spread of those runs
    decode_tok_s_max: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _point(length: int, batch_size: int, decode_tokens: int, times: list[tuple[float, float, int]]) -> SpeedPoint:
    """A SpeedPoint from timed runs ``(prefill_s, decode_s, cache_bytes)``: medians, with the decode spread."""
    pre, dec = _median([t[0] for t in times]), _median([t[1] for t in times])
    rates = [batch_size * decode_tokens / t[1] for t in times]
    return SpeedPoint(length, pre, batch_size * length / pre, decode_tokens, dec, batch_size * decode_tokens / dec,
                      times[0][2], len(times), min(rates), max(rates))


def merge_speed(runs: list[list[SpeedPoint]]) -> list[SpeedPoint]:
    """One list of SpeedPoints from several `measure_speed` runs of the same model and context lengths (rounds
    interleaved with other models, so a load on the machine hits every model alike): each run's point is one sample
    (its median where it had repeats); the result holds the medians and the decode spread over the samples."""
    if not runs:
        raise ValueError("merge_speed needs at least one run")
    merged = []
    for points in zip(*runs, strict=True):
        length = points[0].context
        if any(p.context != length or p.decode_tokens != points[0].decode_tokens for p in points):
            raise ValueError("merge_speed: the runs measured different context lengths or decode tokens")
        batch = round(points[0].prefill_tok_s * points[0].prefill_s / length)
        times = [(p.prefill_s, p.decode_s, p.cache_bytes) for p in points]
        merged.append(_point(length, batch, points[0].decode_tokens, times))
    return merged


def measure_speed(model, context_lengths=(128, 512, 2048), decode_tokens: int = 32, repeats: int = 1,
                  batch_size: int = 1, warmup: bool = True) -> list[SpeedPoint]:
    """Prefill time and greedy decode tokens/s with the cache, at each context length.

    For each length L: a forward pass over L fixed tokens with ``use_cache=True`` (prefill), then
    `decode_tokens` single-token steps feeding back the argmax and the cache (decode). Times are the
    median over `repeats`. On CUDA the device is synchronized around each timed region.
    """
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be >= 1, got {decode_tokens}")
    if not context_lengths or any((not isinstance(c, int)) or c < 1 for c in context_lengths):
        raise ValueError(f"context_lengths must be positive integers, got {context_lengths!r}")
    device = _model_device(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    cache_kw = _cache_kwarg(model)
    was_training = model.training
    model.eval()

    def run(length: int) -> tuple[float, float, int]:
        ids = _probe_ids(model, length, batch_size)
        _synchronize(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **keep)
        _synchronize(device)
        t1 = time.perf_counter()
        cache = _output_cache(out)
        if cache is None:
            raise ValueError(f"{type(model).__name__} returned no cache with use_cache=True; decode speed "
                             "needs a decoder that caches")
        held = _deduplicated_bytes(cache_tensors(cache))
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache}, **keep)
            cache = _output_cache(out)
            nxt = out.logits[:, -1:].argmax(-1)
        _synchronize(device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, held

    points = []
    try:
        with torch.inference_mode():
            if warmup:
                run(min(16, min(context_lengths)))
            for length in context_lengths:
                times = [run(length) for _ in range(repeats)]
                points.append(_point(length, batch_size, decode_tokens, times))
    finally:
        model.train(was_training)
    return points
