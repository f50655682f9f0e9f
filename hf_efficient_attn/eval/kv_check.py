"""What a KV-cache policy costs: perplexity under the streaming protocol, its curve by position, cache bytes.

The protocol (StreamingLLM's): the first ``prompt_tokens`` tokens of the held-out stream are one prefill with the
policy active; the next ``eval_tokens`` are then fed ``chunk`` at a time through the cache the policy left, each
scored by the model's next-token loss. With ``chunk=1`` every token is scored with exactly the cache the policy
left after the previous token — what generation sees. (For ``streaming`` any chunk computes the same, since its
rule is per query; SnapKV and Quest run their decode rule on chunks of at most 16 tokens.) The full cache runs the
same protocol on the same tokens, so the difference is the policy's alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..attention.kv import policy_of, read_fraction
from ..attention.model_io import cache_kwarg, forward_params, output_cache
from ..attention.patch import patched
from .cost import _deduplicated_bytes, cache_tensors
from .data import load_text
from .perplexity import _model_name, tokenize_stream, tokenizer_adds_bos

__all__ = ["KVCheck", "kv_check", "kv_perplexity", "format_kv_check"]


def kv_perplexity(model, tokenizer, data=None, *, prompt_tokens: int = 1024, eval_tokens: int = 256,
                  chunk: int = 1, progress: bool = False) -> dict:
    """The streaming protocol (module docstring) on ``model`` as it is patched. Returns ``{"ppl", "nll" (per scored
    token, fp32 CPU tensor), "cache_bytes" (what the cache held at the end), "read_fraction" (policy models:
    share of the cache the last step read), "protocol"}``."""
    for name, v, lo in (("prompt_tokens", prompt_tokens, 1), ("eval_tokens", eval_tokens, 1), ("chunk", chunk, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    text = load_text(data)
    stream = tokenize_stream(tokenizer, text, max_tokens=prompt_tokens + eval_tokens + 1)
    bos = tokenizer_adds_bos(tokenizer)
    need = prompt_tokens + eval_tokens + (0 if bos else 1)
    if stream.numel() < need:
        raise ValueError(f"the text has {stream.numel()} tokens; the protocol needs {need} (prompt_tokens + "
                         f"eval_tokens): use more text or smaller lengths")
    ids = stream[:need]
    if bos:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])[:prompt_tokens + eval_tokens + 1]
    device = next(model.parameters()).device
    ids = ids.to(device)[None]
    kw = cache_kwarg(model)
    was = model.training
    model.eval()
    nll = []
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}
            out = model(input_ids=ids[:, :prompt_tokens], use_cache=True, **keep)
            cache = output_cache(out)
            last = out.logits[:, -1]
            pos = prompt_tokens
            while pos < prompt_tokens + eval_tokens:
                n = min(chunk, prompt_tokens + eval_tokens - pos)
                x = ids[:, pos:pos + n]
                out = model(input_ids=x, use_cache=True, **{kw: cache})
                cache = output_cache(out)
                step = torch.cat([last[:, None], out.logits[:, :-1]], 1).float()  # logits for x[0..n)
                nll.append(torch.nn.functional.cross_entropy(step[0], x[0], reduction="none").cpu())
                last = out.logits[:, -1]
                pos += n
                if progress and (pos - prompt_tokens) % max(chunk, 256) < chunk:
                    print(f"  {pos - prompt_tokens}/{eval_tokens} tokens", flush=True)
    finally:
        model.train(was)
    nll = torch.cat(nll)
    policy = policy_of(model)
    held = _deduplicated_bytes(cache_tensors(cache))
    return {"ppl": math.exp(float(nll.mean())), "nll": nll, "cache_bytes": held,
            "read_fraction": read_fraction(model) if policy is not None else 1.0,
            "protocol": {"model": _model_name(model), "policy": None if policy is None else policy.name,
                         "prompt_tokens": prompt_tokens, "eval_tokens": eval_tokens, "chunk": chunk,
                         "bos": bos, "token_stream_sha256": _sha(ids), "seconds": time.perf_counter() - t0}}


def _sha(ids: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]


@dataclass
class KVCheck:
    """A policy beside the full cache, same tokens, same protocol. ``curve``: (first position, ppl policy, ppl
    full) per bucket of scored tokens."""

    policy: str
    prompt_tokens: int
    eval_tokens: int
    chunk: int
    ppl: float
    ppl_full: float
    cache_bytes: int
    cache_bytes_full: int
    read_fraction: float
    curve: list = field(default_factory=list)
    protocol: dict = field(default_factory=dict)

    @property
    def delta(self) -> float:
        return self.ppl / self.ppl_full - 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "delta": self.delta}


def kv_check(model, tokenizer, policy, data=None, *, prompt_tokens: int = 1024, eval_tokens: int = 256,
             chunk: int = 1, buckets: int = 4, progress: bool = False, full: dict | None = None) -> KVCheck:
    """``policy`` against the full cache under the streaming protocol (:func:`kv_perplexity`), on an unpatched or
    plainly patched ``model`` (it is patched with the policy for the call and restored after).

    full: a :func:`kv_perplexity` result of this model with the full cache under the same protocol, to reuse when
    several policies are compared with one baseline (checked: same model, lengths, chunk and token stream)."""
    if policy_of(model) is not None:
        raise ValueError(f"kv_check compares a policy with the full cache; the model already runs KV policy "
                         f"{policy_of(model).name}: hfa.unpatch(model) first")
    opts = dict(prompt_tokens=prompt_tokens, eval_tokens=eval_tokens, chunk=chunk, progress=progress)
    if full is not None:
        base = full.get("protocol", {}) if isinstance(full, dict) else {}
        want = {"model": _model_name(model), "policy": None, "prompt_tokens": prompt_tokens,
                "eval_tokens": eval_tokens, "chunk": chunk}
        wrong = {k: (base.get(k), v) for k, v in want.items() if base.get(k) != v}
        if wrong:
            raise ValueError(f"full= is not this model's full-cache run under this protocol (got vs wanted: {wrong}); "
                             f"pass kv_perplexity(model, tokenizer, prompt_tokens=..., eval_tokens=..., chunk=...) "
                             f"of the model without a policy, or leave full=None")
    else:
        full = kv_perplexity(model, tokenizer, data, **opts)
    with patched(model, kv=policy):
        got = kv_perplexity(model, tokenizer, data, **opts)
    if got["protocol"]["token_stream_sha256"] != full["protocol"]["token_stream_sha256"]:
        raise ValueError("full= scored other tokens than this call (another text or tokenizer): the baseline must "
                         "come from the same data")
    curve = []
    for b in range(buckets):
        lo, hi = b * eval_tokens // buckets, (b + 1) * eval_tokens // buckets
        if hi > lo:
            curve.append((prompt_tokens + lo, math.exp(float(got["nll"][lo:hi].mean())),
                          math.exp(float(full["nll"][lo:hi].mean()))))
    return KVCheck(policy.name, prompt_tokens, eval_tokens, chunk, got["ppl"], full["ppl"], got["cache_bytes"],
                   full["cache_bytes"], got["read_fraction"], curve, got["protocol"])


def format_kv_check(checks: list[KVCheck]) -> str:
    rows = ["| policy | prompt | scored | ppl (full) | ppl (policy) | Δ | cache MiB (full → policy) | read |",
            "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        rows.append(f"| {c.policy} | {c.prompt_tokens} | {c.eval_tokens} | {c.ppl_full:.3f} | {c.ppl:.3f} | "
                    f"{100 * c.delta:+.1f}% | {c.cache_bytes_full / 2**20:.2f} → {c.cache_bytes / 2**20:.2f} | "
                    f"{c.read_fraction:.2f} |")
    return "\n".join(rows)
