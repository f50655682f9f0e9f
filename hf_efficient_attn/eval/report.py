"""The comparison report: models side by side on the same data under the same protocol.

`evaluate_models` measures each model (perplexity, KV-cache bytes from the real cache, decode
speed at several context lengths, parameters); `format_table` / `to_markdown` print the one table;
`write_report` writes JSON, Markdown and (with matplotlib) two plots. `run_demo` is the main job of
`hfa demo`: the bundled SmolLM2, the patch check, every conversion listed in `DEMO_CONVERSIONS`, one table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..conversions.toolkit import atomic_write
from ..errors import OptionError
from .cost import kv_cache_bytes, measure_speed, parameter_count
from .data import TextData, load_text
from .perplexity import perplexity

__all__ = [
    "DEMO_CONVERSIONS", "DemoConversion", "ModelReport", "demo_conversions", "evaluate_model", "evaluate_models", "format_table",
    "heal_tokens", "pareto_frontier", "pareto_points", "run_demo", "to_markdown", "write_report",
]


@dataclass
class ModelReport:
    """One row of the comparison, with everything needed to reproduce it."""

    model: str
    ppl: float
    nll: float
    tokens: int
    params: int
    kv_cache_bytes: int | None       # total bytes of the real cache after `kv_tokens` tokens
    kv_tokens: int
    speed: list[dict] = field(default_factory=list)   # SpeedPoint dicts, one per context length
    protocol: dict = field(default_factory=dict)
    delta_ppl: float | None = None   # ppl - ppl of the first model; None where token streams differ
    seconds: float = 0.0             # wall time to evaluate this model
    note: str = ""
    pattern: str | None = None       # the sparse pattern the model ran (hfa.patch(model, sparse=...)), None: dense
    approximate: bool = False        # a sparse pattern other than the exact control: labelled in every table
    density: float | None = None     # mean block density over the perplexity windows (sparse rows)
    layer_errors: dict | None = None  # {layer: ||sparse - dense|| / ||dense||} on the first window (sparse rows)
    passkey: dict = field(default_factory=dict)   # {prompt length: accuracy} (passkey_retrieval)
    passkey_detail: list = field(default_factory=list)  # PasskeyResult dicts
    kv_policy: str | None = None     # the KV-cache policy the model ran (hfa.patch(model, kv=...)), None: full cache
    stream_ppl: float | None = None  # ppl under the streaming protocol (eval.kv_check), rows of a run with kv=
    stream_protocol: dict | None = None
    bits_per_byte: float | None = None   # NLL in bits per UTF-8 byte of the scored text: comparable across tokenizers
    kv_long_bytes: int | None = None     # bytes of the cache after `kv_long_tokens` tokens (cost.kv_cache_bytes_at_length)
    kv_long_tokens: int | None = None
    heal_tokens: int = 0                 # tokens the model was distilled on (its conversion record), 0: none
    family: str | None = None            # what kind of method the row is (dense, gqa, mla, ..., sparse, kv): the plot's groups
    tasks: dict = field(default_factory=dict)   # downstream task results {task: {metric: value}} (hfa eval --tasks)

    @property
    def layer_error(self) -> float | None:
        """The mean of the per-layer relative errors (None: not measured)."""
        return None if not self.layer_errors else sum(self.layer_errors.values()) / len(self.layer_errors)

    @property
    def kv_bytes_per_token(self) -> float | None:
        return None if self.kv_cache_bytes is None else self.kv_cache_bytes / self.kv_tokens

    @property
    def kv_long_bytes_per_token(self) -> float | None:
        return None if self.kv_long_bytes is None else self.kv_long_bytes / self.kv_long_tokens

    def speed_point(self, context: int | None = None) -> dict | None:
        """The speed point at `context` (default: the largest measured context not above the eval context)."""
        if not self.speed:
            return None
        if context is None:
            ctx = self.protocol.get("context_length") or 0
            fitting = [p for p in self.speed if p["context"] <= ctx]
            return max(fitting, key=lambda p: p["context"]) if fitting else min(self.speed, key=lambda p: p["context"])
        return next((p for p in self.speed if p["context"] == context), None)

    def decode_tok_s(self, context: int | None = None) -> float | None:
        """Decode speed at `context` (default: the largest measured context not above the eval context)."""
        point = self.speed_point(context)
        return None if point is None else point["decode_tok_s"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_bytes_per_token"] = self.kv_bytes_per_token
        d["kv_long_bytes_per_token"] = self.kv_long_bytes_per_token
        d["decode_tok_s"] = self.decode_tok_s()
        d["layer_error"] = self.layer_error
        return d


def _sparse_checks(model, tokenizer, text, context_length: int, max_tokens: int | None, run_perplexity):
    """Perplexity with the density of every window recorded, then the per-layer error on the first window."""
    from ..attention import sparse as sp
    from .perplexity import tokenize_stream

    densities = []
    hook = model.register_forward_hook(lambda *_: densities.append(sp.density(model)))
    try:
        res = run_perplexity()
    finally:
        hook.remove()
    first = tokenize_stream(tokenizer, text, max_tokens=min(context_length, max_tokens or context_length))
    errors = sp.layer_errors(model, first[None].to(next(model.parameters()).device))
    return res, sum(densities) / len(densities), errors


def evaluate_model(model, tokenizer, data=None, *, name: str | None = None, context_length: int = 512,
                   stride: int | None = None, max_tokens: int | None = None, batch_size: int | None = None,
                   kv_tokens: int | None = None, speed_contexts=(128, 512, 2048), decode_tokens: int = 32,
                   passkey_lengths=(), stream_tokens: int | None = None, kv_long_tokens: int | None = None,
                   speed_repeats: int = 1, family: str | None = None, tasks=(), task_limit=None,
                   progress: bool = True) -> ModelReport:
    """Measure one model: perplexity on `data`, KV-cache bytes after `kv_tokens` tokens (default: the
    context length), decode speed at `speed_contexts` (empty: skip), parameter count, passkey accuracy at
    `passkey_lengths` (empty: skip).

    A sparse-patched model (``hfa.patch(model, sparse=...)``) is labelled with its pattern and also reports the mean
    block density of its perplexity windows and each layer's output error against dense attention on the first
    window (``hfa.sparse.layer_errors``).

    stream_tokens: also score this many tokens after a ``context_length``-token prefill under the streaming protocol
    (:func:`..kv_check.kv_perplexity`, one token at a time through the cache): what a KV policy changes. A model
    with a KV policy (``hfa.patch(model, kv=...)``) is labelled approximate with its policy.

    kv_long_tokens: also the cache bytes after this many tokens (:func:`.cost.kv_cache_bytes_at_length`: a forward on
    the meta device, no compute; a KV policy's cache depends on the data, so its row measures the real cache
    there). speed_repeats: timed runs per context (the median is reported, with the decode spread). family: the
    row's kind of method for the plot (default: from the model — its last conversion, its sparse pattern or KV
    policy, else "dense"). The row's heal tokens are read from the model's conversion record."""
    from ..attention import kv as kvp
    from ..attention import sparse as sp
    from .kv_check import kv_perplexity
    from .passkey import passkey_retrieval

    t0 = time.perf_counter()
    text = load_text(data)
    run = lambda: perplexity(model, tokenizer, text, context_length=context_length, stride=stride,  # noqa: E731
                             max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    pattern = sp.pattern_of(model)
    density = errors = None
    if pattern is None:
        res = run()
    else:
        res, density, errors = _sparse_checks(model, tokenizer, text, context_length, max_tokens, run)
    if name is not None:
        res.protocol["model"] = name
    kv_tokens = kv_tokens or context_length
    kv = kv_cache_bytes(model, tokens=kv_tokens)
    kv_long = _long_cache_bytes(model, kv_long_tokens) if kv_long_tokens else None
    task_scores = {}
    if tasks:
        import os
        from unittest import mock

        from .tasks import run_tasks
        quiet = {} if progress else {"TQDM_DISABLE": "1"}   # lm-eval's own progress bars follow `progress`
        with mock.patch.dict(os.environ, quiet):
            task_scores = run_tasks(model, tokenizer, tasks, limit=task_limit).scores
    speed = [p.to_dict() for p in measure_speed(model, tuple(speed_contexts), decode_tokens=decode_tokens,
                                                repeats=speed_repeats)] if speed_contexts else []
    keys = passkey_retrieval(model, tokenizer, lengths=tuple(passkey_lengths)) if passkey_lengths else []
    stream = kv_perplexity(model, tokenizer, text, prompt_tokens=context_length, eval_tokens=stream_tokens) \
        if stream_tokens else None
    policy = kvp.policy_of(model)
    note = ""
    if pattern is not None and pattern.approximate:
        note = (f"approximate: sparse attention {pattern.name} on the prefill (mean block density {density:.3f}), "
                f"measured against the exact model")
    if policy is not None:
        note = (f"approximate: KV-cache policy {policy.name}; 'stream ppl' scores {stream_tokens} tokens after a "
                f"{context_length}-token prefill one at a time through the cache the policy left (ppl: the "
                f"windowed protocol, where the policy acts inside each window)") if stream else \
            f"approximate: KV-cache policy {policy.name}"
    return ModelReport(model=res.protocol["model"], ppl=res.ppl, nll=res.nll, tokens=res.tokens,
                       params=parameter_count(model), kv_cache_bytes=kv, kv_tokens=kv_tokens, speed=speed,
                       protocol=res.protocol, seconds=time.perf_counter() - t0, note=note,
                       pattern=None if pattern is None else pattern.name,
                       approximate=(pattern is not None and pattern.approximate) or policy is not None,
                       density=density, layer_errors=errors,
                       passkey={r.length: r.accuracy for r in keys}, passkey_detail=[r.to_dict() for r in keys],
                       kv_policy=None if policy is None else policy.name,
                       stream_ppl=None if stream is None else stream["ppl"],
                       stream_protocol=None if stream is None else stream["protocol"],
                       bits_per_byte=res.bits_per_byte, kv_long_bytes=kv_long,
                       kv_long_tokens=kv_long_tokens if kv_long is not None else None,
                       heal_tokens=heal_tokens(model), family=family or _family(model), tasks=task_scores)


def heal_tokens(model) -> int:
    """Tokens `model` was distilled on, all heals together, from its conversion record (0: never healed)."""
    from ..conversions.toolkit import conversion_history
    return sum(int(r.get("tokens") or 0) for r in conversion_history(model) if isinstance(r, dict) and "distill" in r)


def _family(model) -> str:
    """The row's kind of method: its KV policy or sparse pattern ("kv", "sparse"), else its last conversion's name,
    else "dense"."""
    from ..attention import kv as kvp
    from ..attention import sparse as sp
    from ..conversions.toolkit import conversion_history

    if kvp.policy_of(model) is not None:
        return "kv"
    if sp.pattern_of(model) is not None:
        return "sparse"
    names = [r.get("conversion") for r in conversion_history(model) if isinstance(r, dict) and r.get("conversion")]
    return names[-1] if names else "dense"


def _long_cache_bytes(model, tokens: int) -> int | None:
    """Cache bytes after `tokens` tokens. Shapes only (meta device) where the cache does not depend on the data; a
    sparse prefill pattern leaves the cache as the dense model's, so that one is measured with the pattern off on
    the meta copy; a KV policy's cache is the policy's choice, so that one runs the real forward."""
    from ..attention import kv as kvp
    from ..attention import sparse as sp
    from ..attention import unpatch
    from .cost import _meta_copy, kv_cache_bytes_at_length

    if kvp.policy_of(model) is not None:
        return kv_cache_bytes(model, tokens=tokens)
    if sp.pattern_of(model) is None:
        return kv_cache_bytes_at_length(model, tokens)
    return kv_cache_bytes_at_length(unpatch(_meta_copy(model)), tokens)


def _fill_deltas(reports: list[ModelReport]) -> list[ModelReport]:
    """Δppl against the first model, only between models scored on the same tokens the same way."""
    if not reports:
        return reports
    keys = ("token_stream_sha256", "bos_per_window", "context_length", "stride")
    base = reports[0]
    for r in reports:
        same = all(r.protocol.get(k) == base.protocol.get(k) for k in keys)
        r.delta_ppl = r.ppl - base.ppl if same else None
        if not same and "not comparable" not in r.note:
            r.note = (r.note + "; " if r.note else "") + ("scored on other tokens than the first model (another "
                                                          "tokenizer or BOS handling): ppl not comparable")
    return reports


def evaluate_models(models, data=None, *, context_length: int = 512, stride: int | None = None,
                    max_tokens: int | None = None, batch_size: int | None = None, kv_tokens: int | None = None,
                    speed_contexts=(128, 512, 2048), decode_tokens: int = 32, dtype=torch.float32,
                    split: str | None = None, sparse=(), kv=(), stream_tokens: int = 128, stream: bool | None = None,
                    passkey_lengths=(), kv_long_tokens: int | None = None, speed_rounds: int = 1,
                    families=None, device=None, tasks=(), task_limit=None, progress: bool = True) -> list[ModelReport]:
    """Evaluate several models on the same text under the same protocol; Δppl is against the first.

    models: names/paths for `load_model`, or `(name, model, tokenizer)` tuples, mixed freely.
    Models given by name are loaded one at a time and released before the next.
    sparse: patterns from ``hfa.sparse``: after each model's own row, one row per pattern with the model patched
    (``hfa.patched(model, sparse=pattern)``, backend auto), named ``"MODEL + PATTERN"`` and labelled approximate.
    kv: policies from ``hfa.kv``: likewise one row per policy (``hfa.patched(model, kv=policy)``).
    stream: rows also report ``stream_ppl`` over ``stream_tokens`` tokens (the streaming protocol, where a KV policy
    acts): True every row, ``"kv"`` the first row and every row with a KV policy (what the others change shows in
    the windowed ppl already), False none; None: every row when `kv` is given.
    passkey_lengths: prompt lengths for passkey retrieval on every row (empty: none).
    kv_long_tokens: also each row's cache bytes at this length (see `evaluate_model`).
    speed_rounds: decode speed is timed this many times per row, and the rows of in-memory models take turns round
    by round (a load on the machine then slows every row alike instead of a few); the table shows medians and spread.
    families: the plot group of each entry (by position; default: from each model, see `evaluate_model`).
    device: where models given by name load (None: CPU; "auto": CUDA where available); tuples stay where they are.
    tasks / task_limit: downstream tasks (lm-eval-harness) on every row, see `evaluate_model`.
    """
    from ..attention import kv as kvp
    from ..attention import patched
    from .models import load_model

    if not models:
        raise ValueError("give at least one model")
    if not isinstance(speed_rounds, int) or speed_rounds < 1:
        raise ValueError(f"speed_rounds must be a positive integer, got {speed_rounds!r}")
    text = load_text(data, split=split)  # load once: every model sees exactly the same text
    streamed = bool(kv) if stream is None else stream
    if streamed not in (True, False, "kv"):
        raise ValueError(f"stream must be True, False, 'kv' or None, got {stream!r}")
    interleave = speed_rounds > 1 and bool(speed_contexts) and all(isinstance(e, tuple) for e in models)
    run = dict(context_length=context_length, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
               kv_tokens=kv_tokens, speed_contexts=() if interleave else speed_contexts, decode_tokens=decode_tokens,
               passkey_lengths=passkey_lengths, stream_tokens=stream_tokens if streamed is True else None,
               kv_long_tokens=kv_long_tokens, speed_repeats=speed_rounds, tasks=tasks, task_limit=task_limit,
               progress=progress)
    reports, variants = [], []   # variants: (model, patch options) of each row, for the interleaved speed rounds
    for i, entry in enumerate(models):
        if isinstance(entry, tuple):
            name, model, tok = entry
        else:
            name = str(entry)
            model, tok = load_model(name, dtype=dtype, device=device)
        family = families[i] if families is not None else None
        own = run if streamed != "kv" else \
            {**run, "stream_tokens": stream_tokens if i == 0 or kvp.policy_of(model) is not None else None}
        reports.append(evaluate_model(model, tok, text, name=name, family=family, **own))
        variants.append((model, {}) if interleave else None)   # only in-memory models are kept for the rounds
        for pattern in sparse:
            with patched(model, sparse=pattern):
                reports.append(evaluate_model(model, tok, text, name=f"{name} + {pattern.name}", **run))
            variants.append((model, {"sparse": pattern}) if interleave else None)
        for policy in kv:
            with patched(model, kv=policy):
                reports.append(evaluate_model(model, tok, text, name=f"{name} + {policy.name}",
                                              **{**run, "stream_tokens": stream_tokens if streamed else None}))
            variants.append((model, {"kv": policy}) if interleave else None)
        del model
    if interleave:
        _interleaved_speed(reports, variants, tuple(speed_contexts), decode_tokens, speed_rounds, progress)
    return _fill_deltas(reports)


def _interleaved_speed(reports, variants, contexts, decode_tokens: int, rounds: int, progress: bool) -> None:
    """Time every row's decode speed `rounds` times, the rows taking turns each round; fill ``report.speed``."""
    from ..attention import patched
    from .cost import merge_speed

    runs: list[list] = [[] for _ in reports]
    for r in range(rounds):
        if progress:
            print(f"decode speed: round {r + 1} of {rounds} over {len(reports)} rows", flush=True)
        for i, (model, options) in enumerate(variants):
            if options:
                with patched(model, **options):
                    runs[i].append(measure_speed(model, contexts, decode_tokens=decode_tokens, warmup=r == 0))
            else:
                runs[i].append(measure_speed(model, contexts, decode_tokens=decode_tokens, warmup=r == 0))
    for report, samples in zip(reports, runs):
        report.speed = [p.to_dict() for p in merge_speed(samples)]


# -- the table ---------------------------------------------------------------------------------------

def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _decode_cell(point: dict | None) -> str:
    if point is None:
        return "n/a"
    cell = f"{point['decode_tok_s']:.1f}"
    lo, hi = point.get("decode_tok_s_min"), point.get("decode_tok_s_max")
    if (point.get("repeats") or 1) > 1 and lo is not None and hi is not None:
        cell += f" ({lo:.1f}–{hi:.1f})"
    return cell


def _rows(reports: list[ModelReport]) -> tuple[list[str], list[list[str]]]:
    kv_tok = {r.kv_tokens for r in reports}
    kv_head = f"KV bytes/token @{kv_tok.pop()}" if len(kv_tok) == 1 else "KV bytes/token"
    long_tok = {r.kv_long_tokens for r in reports if r.kv_long_tokens}
    has_long = bool(long_tok)
    speed_ctx = _speed_context(reports)
    rounds = max((p.get("repeats") or 1 for r in reports for p in r.speed), default=1)
    dec_head = (f"decode tok/s @{speed_ctx}" if speed_ctx else "decode tok/s") + \
        (f" (median of {rounds}, min–max)" if rounds > 1 else "")
    bpb = any(r.bits_per_byte is not None for r in reports)
    healed = any(r.heal_tokens for r in reports)
    header = ["model", "ppl", "Δppl"] + (["bits/byte"] if bpb else []) + ["tokens", kv_head]
    if has_long:
        header.append(f"KV bytes/token @{long_tok.pop()}" if len(long_tok) == 1 else "KV bytes/token long")
    header += [dec_head, "params"] + (["heal tokens"] if healed else [])
    sparse = any(r.pattern is not None for r in reports)
    lengths = sorted({n for r in reports for n in r.passkey})
    tasks = sorted({(t, m) for r in reports for t, metrics in r.tasks.items() for m in metrics
                    if not m.endswith("_stderr")})
    stream = any(r.stream_ppl is not None for r in reports)
    at = 3 + bpb  # where the stream columns go: after Δppl and bits/byte
    if stream:
        header[at:at] = ["stream ppl", "Δstream"]
    if sparse:
        header[1:1] = ["density", "layer err"]
    header += [f"passkey @{n}" for n in lengths] + [f"{t} {m}" for t, m in tasks]
    rows = []
    for i, r in enumerate(reports):
        if r.delta_ppl is None:
            delta = "n/a"
        elif i == 0:
            delta = "—"
        else:
            delta = f"{r.delta_ppl:+.3f}"
        kvpt = r.kv_bytes_per_token
        name = r.model + (" (approx.)" if r.approximate else "")
        row = [name, f"{r.ppl:.3f}", delta]
        if bpb:
            row.append("n/a" if r.bits_per_byte is None else f"{r.bits_per_byte:.4f}")
        row += [f"{r.tokens:,}", "n/a" if kvpt is None else f"{kvpt:,.0f}"]
        if has_long:
            long = r.kv_long_bytes_per_token
            row.append("n/a" if long is None else f"{long:,.0f}")
        row += [_decode_cell(r.speed_point()), _human(r.params)]
        if healed:
            row.append(f"{r.heal_tokens:,}" if r.heal_tokens else "—")
        if stream:
            base = reports[0].stream_ppl
            same = r.stream_protocol and reports[0].stream_protocol and \
                r.stream_protocol.get("token_stream_sha256") == reports[0].stream_protocol.get("token_stream_sha256")
            row[at:at] = ["n/a" if r.stream_ppl is None else f"{r.stream_ppl:.3f}",
                          "—" if i == 0 or r.stream_ppl is None else
                          (f"{r.stream_ppl / base - 1:+.1%}" if same and base else "n/a")]
        if sparse:
            row[1:1] = ["dense" if r.density is None else f"{r.density:.3f}",
                        "—" if r.layer_error is None else f"{r.layer_error:.4f}"]
        row += [f"{r.passkey[n]:.0%}" if n in r.passkey else "n/a" for n in lengths]
        row += [_metric_cell(r.tasks.get(t, {}), m) for t, m in tasks]
        rows.append(row)
    return header, rows


def _metric_cell(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    if not isinstance(value, (int, float)):
        return "n/a"
    err = metrics.get(f"{name}_stderr")
    return f"{value:.4f}" + (f" ±{err:.4f}" if isinstance(err, (int, float)) else "")


def _speed_context(reports: list[ModelReport]) -> int | None:
    if not reports or not reports[0].speed:
        return None
    ctx = reports[0].protocol.get("context_length") or 0
    fitting = [p["context"] for p in reports[0].speed if p["context"] <= ctx]
    return max(fitting) if fitting else min(p["context"] for p in reports[0].speed)


def protocol_line(reports: list[ModelReport]) -> str:
    """One sentence saying how the numbers were measured (same for every row)."""
    if not reports:
        return ""
    p = reports[0].protocol
    stride = "disjoint windows" if p.get("stride") is None else f"stride {p['stride']}"
    bos = ", BOS at the start of each window" if p.get("bos_per_window") else ""
    counts = {r.tokens for r in reports}
    tokens = f", {counts.pop()} scored tokens" if len(counts) == 1 else ""
    return (f"data {p.get('data')} (sha256 {str(p.get('data_sha256'))[:12]}){tokens}, "
            f"context {p.get('context_length')}, {stride}{bos}, {p.get('dtype')}, device {p.get('device')}, "
            f"torch {p.get('torch')}, transformers {p.get('transformers')}")


def format_table(reports: list[ModelReport]) -> str:
    """The comparison as an aligned plain-text table, followed by the protocol and any notes."""
    header, rows = _rows(reports)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    right = set(range(1, len(header)))
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines.append(f"protocol: {protocol_line(reports)}")
    lines += [f"note ({r.model}): {r.note}" for r in reports if r.note]
    return "\n".join(lines)


def to_markdown(reports: list[ModelReport]) -> str:
    header, rows = _rows(reports)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    out.append(f"Protocol: {protocol_line(reports)}.")
    out += [f"Note ({r.model}): {r.note}." for r in reports if r.note]
    if any(r.speed for r in reports):
        out += ["", "Decode speed (tokens/s, greedy, batch 1) by context length:", ""]
        ctxs = sorted({p["context"] for r in reports for p in r.speed})
        out.append("| model | " + " | ".join(str(c) for c in ctxs) + " |")
        out.append("|---|" + "|".join(["---:"] * len(ctxs)) + "|")
        for r in reports:
            cells = []
            for c in ctxs:
                v = r.decode_tok_s(c)
                cells.append("n/a" if v is None else f"{v:.1f}")
            out.append(f"| {r.model} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# -- files and plots ---------------------------------------------------------------------------------

def _save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def pareto_points(reports: list[ModelReport]) -> list[dict]:
    """The points of the Pareto plot, one per row: x the row's KV-cache bytes per token (at the long length where
    every row has it, else at ``kv_tokens``), y its perplexity divided by the first row's under the protocol where
    the method acts — the decode protocol (``stream_ppl``) for a KV-cache policy, which changes nothing inside one
    forward pass, the windowed one for everything else. Rows without a comparable figure are left out."""
    if not reports:
        return []
    long = all(r.kv_long_bytes_per_token is not None for r in reports)
    base = reports[0]
    pts = []
    for r in reports:
        x = r.kv_long_bytes_per_token if long else r.kv_bytes_per_token
        if r.kv_policy is not None:
            y = r.stream_ppl / base.stream_ppl if r.stream_ppl and base.stream_ppl else None
        else:
            y = r.ppl / base.ppl if r.delta_ppl is not None else None
        if x is None or y is None:
            continue
        pts.append({"label": r.model, "family": r.family or "dense", "x": x, "y": y,
                    "tokens": r.kv_long_tokens if long else r.kv_tokens, "protocol": "decode" if r.kv_policy else
                    "windowed"})
    return pts


def pareto_frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both axes (fewer bytes and lower perplexity), by increasing bytes."""
    frontier, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["x"], p["y"])):
        if p["y"] < best:
            frontier.append(p)
            best = p["y"]
    return frontier


def _plots(reports: list[ModelReport], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    pts = pareto_points(reports)
    if pts:
        fig, ax = plt.subplots(figsize=(8, 5))
        markers = "osD^vP*Xh<>"
        colors = {}
        for i, pt in enumerate(pts):
            color = colors.setdefault(pt["family"], f"C{len(colors) % 10}")
            dense = pt["family"] == "dense" or i == 0
            ax.scatter(pt["x"], pt["y"], s=160 if dense else 45, marker="*" if dense else markers[i % len(markers)],
                       color=color, edgecolors="black" if dense else "none", zorder=3,
                       label=pt["label"] + (" (dense)" if dense else ""))
        frontier = pareto_frontier(pts)
        if len(frontier) > 1:
            ax.plot([p["x"] for p in frontier], [p["y"] for p in frontier], color="gray", lw=1, ls="--", zorder=2,
                    label="Pareto frontier")
        ax.axhline(1.0, color="black", lw=0.6, alpha=0.5)
        ax.set_xscale("log")
        ys = [pt["y"] for pt in pts]
        if max(ys) / min(ys) > 4:
            ax.set_yscale("log")
        ax.set_xlabel(f"KV-cache bytes per token at {pts[0]['tokens']:,} tokens (log)")
        ax.set_ylabel("perplexity ÷ the dense model's (lower is better)")
        ax.set_title("accuracy vs KV-cache size (KV policies: decode protocol; others: windowed)", fontsize=9)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3, which="both")
        paths.append(_save_figure(plt, fig, out / "ppl_vs_kv_bytes.png"))
    if any(r.speed for r in reports):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in reports:
            if r.speed:
                ax.plot([p["context"] for p in r.speed], [p["decode_tok_s"] for p in r.speed], marker="o", label=r.model)
        ax.set_xscale("log", base=2)
        ctxs = sorted({p["context"] for r in reports for p in r.speed})
        ax.set_xticks(ctxs, [str(c) for c in ctxs])
        ax.set_ylim(bottom=0)  # from zero: differences of a few percent must look like a few percent
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_title(f"decode speed ({reports[0].protocol.get('device')})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save_figure(plt, fig, out / "decode_speed.png"))
    return paths


def write_report(reports: list[ModelReport], out_dir, extra: dict | None = None, plots: bool = True) -> dict:
    """Write ``report.json``, ``report.md`` and (if matplotlib is installed) the plots to `out_dir`.

    Returns ``{"json": path, "markdown": path, "plots": [paths]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = pareto_points(reports)
    payload = {"models": [r.to_dict() for r in reports], "protocol": protocol_line(reports), "pareto": points,
               "pareto_frontier": [p["label"] for p in pareto_frontier(points)], **(extra or {})}
    jpath, mpath = out / "report.json", out / "report.md"
    atomic_write(jpath, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n"))
    atomic_write(mpath, lambda tmp: tmp.write_text(to_markdown(reports)))
    return {"json": jpath, "markdown": mpath, "plots": _plots(reports, out) if plots else []}


# -- the demo ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoConversion:
    """One method `hfa demo` runs on the bundled model: one line of `DEMO_CONVERSIONS`.

    label: the row name. family: the method's kind and its group in the plot: a conversion's name (``"gqa"``,
    ``"mla"``, ...; then `method`/`options` are ``hfa.convert(model, method, **options, calibration=...,
    tokenizer=...)`` with the calibration split of the bundled corpus), ``"sparse"`` (`method` a name in
    ``hfa.sparse.PATTERNS``, `options` its arguments: a copy of the base model patched with it) or ``"kv"`` (a name
    in ``hfa.kv.POLICIES``, likewise). heal: distillation stages run after the conversion, in order, each
    ``hfa.distill(new, model, train, tokenizer=..., **stage)`` on the train split (the demo evaluates on the
    held-out one); a stage with ``"data": "passkey"`` trains on synthetic passkey prompts of its seq_len
    (``passkey.passkey_training_ids``) instead. after: ``after(model) -> model`` once the stages ran (e.g.
    ``hfa.freeze``). build: instead, a function ``build(model, tokenizer, calibration: TextData, max_tokens: int) ->
    model`` for recipes that are none of these. Either way the base model must come back unmodified: it is the
    first row of the table.
    """

    label: str
    method: str | None = None
    options: dict = field(default_factory=dict)
    build: Callable | None = None
    heal: dict | tuple | None = None
    family: str | None = None
    after: Callable | None = None

    @property
    def kind(self) -> str:
        """The plot group: `family`, else the conversion's name."""
        return self.family or self.method or "custom"

    @property
    def stages(self) -> tuple[dict, ...]:
        if self.heal is None:
            return ()
        return (self.heal,) if isinstance(self.heal, dict) else tuple(self.heal)

    @property
    def heal_budget(self) -> int:
        return sum(int(st.get("max_tokens") or 0) for st in self.stages)


_GQA_KV1 = {"num_kv_heads": 1, "calibration_tokens": 4096}
_HEAL = {"max_tokens": 8192, "seq_len": 256, "batch_size": 4}


def _frozen(**options) -> Callable:
    """``after`` of a learned-sparsity row: ``hfa.freeze(model, **options)`` (soft spans/gates -> hard reach)."""
    def after(model):
        from ..conversions import freeze
        return freeze(model, **options)
    return after


def _patched_copy(family: str, method: str, options: dict):
    """A copy of the base model patched with a training-free sparse pattern or KV-cache policy (the base stays as it
    is)."""
    import copy

    from ..attention import kv as kvp
    from ..attention import patch
    from ..attention import sparse as sp

    table = sp.PATTERNS if family == "sparse" else kvp.POLICIES
    option = {"sparse" if family == "sparse" else "kv": table[method](**options)}

    def build(model):
        # the copy shares the base's weights (nothing trains them): nine patched rows cost no extra model memory
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        return patch(copy.deepcopy(model, shared), **option)
    return build


# Everything `hfa demo` runs after the base model, in table order — one line per method; a method that lands joins
# here. SmolLM2-135M (30 layers, 9 query heads, 3 KV heads x 64) at 512-token windows:
# - GQA: the 3 KV heads merged into 1 by each method, then the best one healed;
# - MLA: a 160-dim latent + 32 RoPE dims per token and layer (50 % of the cache), training-free and healed;
# - linear (Hedgehog, a 64-token softmax window) and Mamba-2 form: both after attention transfer only (stage 1 of
#   their recipes; see conversions/linear_smollm2.py and mamba2_smollm2.py for the full heals);
# - sparse prefill patterns (labelled approximate, with their density and per-layer error), sized for 512 tokens;
# - learned sparsity: adaptive span (spans trained by the sparsity penalty, then frozen to windows), duo (gates
#   trained on synthetic passkey prompts, 25 % of KV heads kept full) and a healed Longformer (window + 4 global
#   tokens): each keeps only its reach in the cache;
# - KV-cache policies at 25 % of a 512-token prefill (scored by the decode protocol, where they act).
# About 12 minutes in all on 2 idle CPU cores; `hfa demo --quick` runs the same lines on small budgets.
DEMO_CONVERSIONS: list[DemoConversion] = [
    DemoConversion("gqa kv=1 mean", "gqa", {**_GQA_KV1, "method": "mean"}),
    DemoConversion("gqa kv=1 aligned", "gqa", {**_GQA_KV1, "method": "aligned"}),
    DemoConversion("gqa kv=1 pca", "gqa", {**_GQA_KV1, "method": "pca"}),
    DemoConversion("gqa kv=1 pca + heal", "gqa", {**_GQA_KV1, "method": "pca"}, heal=_HEAL),
    DemoConversion("mla r=160 d_r=32", "mla", {"kv_lora_rank": 160, "rope_dim": 32, "calibration_tokens": 4096}),
    DemoConversion("mla r=160 d_r=32 + heal", "mla", {"kv_lora_rank": 160, "rope_dim": 32, "calibration_tokens": 4096},
                   heal=_HEAL),
    DemoConversion("linear w=64 + attention transfer", "linear", {"window": 64}, heal={**_HEAL, "stage": "attention"}),
    DemoConversion("mamba2 + attention transfer", "mamba2", {}, heal={**_HEAL, "stage": "attention", "lr": 1e-2}),
    DemoConversion("adaptive span max 512 + sparsity, frozen", "adaptive_span",
                   {"max_span": 512, "ramp": 32, "sinks": 4},
                   heal={**_HEAL, "stage": "sparsity", "stage_options": {"penalty": 0.05}},
                   after=_frozen()),
    DemoConversion("duo s4 w64 + passkey gates, 25% full", "duo", {"sinks": 4, "window": 64},
                   heal={**_HEAL, "stage": "sparsity", "data": "passkey", "stage_options": {"penalty": 0.05}},
                   after=_frozen(full_heads=0.25)),
    DemoConversion("longformer w128 g4 + heal", "longformer", {"window": 128, "global_tokens": 4}, heal=_HEAL),
    DemoConversion("sparse streaming s4 w128", "streaming", {"sinks": 4, "window": 128}, family="sparse"),
    DemoConversion("sparse longformer w128 g4", "longformer", {"window": 128, "global_tokens": 4}, family="sparse"),
    DemoConversion("sparse dilated w256 d2", "dilated", {"window": 256, "dilation": 2}, family="sparse"),
    DemoConversion("sparse vertical_slash v128 s128", "vertical_slash", {"vertical": 128, "slash": 128, "last_q": 64},
                   family="sparse"),
    DemoConversion("sparse top_p 0.95", "top_p", {"gamma": 0.95}, family="sparse"),
    DemoConversion("sparse lsh n4 r2", "lsh", {"buckets": 4, "rounds": 2}, family="sparse"),
    DemoConversion("kv streaming s4 w124", "streaming", {"sinks": 4, "window": 124}, family="kv"),
    DemoConversion("kv snapkv b128", "snapkv", {"budget": 128}, family="kv"),
    DemoConversion("kv quest b128", "quest", {"page_size": 16, "budget": 128}, family="kv"),
]


# conversions of encoders (the demo's model is a decoder): `hfa demo` measures them in its encoder step (encoder_check)
DEMO_ENCODER_CONVERSIONS = ("linformer",)


def demo_conversions() -> list[DemoConversion]:
    """Every method `hfa demo` runs: `DEMO_CONVERSIONS`."""
    return list(DEMO_CONVERSIONS)


@dataclass(frozen=True)
class DemoBudget:
    """How much the demo measures: the full run (about 12 minutes on 2 CPU cores) or ``--quick`` (under 3)."""

    max_tokens: int = 4096          # held-out tokens for perplexity
    context_length: int = 512
    stream_tokens: int = 256        # tokens scored one at a time after a context_length prefill (decode protocol:
    #                                 the base model's and the KV policies' rows)
    kv_long_tokens: int = 8192      # the long-context cache column
    speed_contexts: tuple = (512,)
    decode_tokens: int = 16
    speed_rounds: int = 3
    heal_scale: float = 1.0         # multiplies every heal stage's max_tokens
    calibration_tokens: int | None = None   # caps every conversion's calibration_tokens
    patch_new_tokens: int = 32
    encoder_heal_tokens: int | None = 16384   # the encoder-only conversion (Linformer on MiniLM); None: skip it
    encoder_inputs: int = 16                   # held-out inputs its cosine is measured on


QUICK = DemoBudget(max_tokens=512, context_length=256, stream_tokens=32, kv_long_tokens=1024, speed_contexts=(64,),
                   decode_tokens=4, speed_rounds=3, heal_scale=1 / 16, calibration_tokens=512, patch_new_tokens=8,
                   encoder_heal_tokens=2048, encoder_inputs=4)
FULL = DemoBudget()


def _scaled(step: DemoConversion, budget: DemoBudget) -> DemoConversion:
    """`step` with its heal and calibration budgets cut to `budget`'s."""
    import dataclasses

    options = dict(step.options)
    if budget.calibration_tokens is not None and "calibration_tokens" in options:
        options["calibration_tokens"] = min(options["calibration_tokens"], budget.calibration_tokens)
    stages = tuple({**st, "max_tokens": max(st.get("batch_size", 1) * st.get("seq_len", 256),
                                            int(st["max_tokens"] * budget.heal_scale))}
                   if "max_tokens" in st else st for st in step.stages)
    return dataclasses.replace(step, options=options, heal=stages or None)


def _run_conversion(step: DemoConversion, model, tokenizer, calibration: TextData, train: TextData | None,
                    max_tokens: int):
    if step.build is not None:
        return step.build(model, tokenizer, calibration, max_tokens)
    if step.kind in ("sparse", "kv"):
        return _patched_copy(step.kind, step.method, step.options)(model)
    from ..conversions import convert, distill, options_of

    accepted = options_of(step.method)    # training-free conversions without calibration (linear, mamba2) take none
    given = {"calibration": list(calibration.documents), "tokenizer": tokenizer}
    new = convert(model, step.method, **{k: v for k, v in given.items() if k in accepted}, **step.options)
    for stage in step.stages:
        stage = dict(stage)
        if stage.pop("data", None) == "passkey":
            from .passkey import passkey_training_ids
            seq = stage.get("seq_len", 512)
            data, tok = passkey_training_ids(tokenizer, max(1, stage["max_tokens"] // seq), seq), None
        else:
            data, tok = list(train.documents), tokenizer
        distill(new, model, data, tokenizer=tok, progress=False, **stage)
    if step.after is not None:
        new = step.after(new)
    return new.eval()


def run_demo(max_tokens: int | None = None, context_length: int | None = None, out_dir=None, speed_contexts=None,
             decode_tokens: int | None = None, patch_new_tokens: int | None = None, conversions=None,
             progress: bool = True, echo: Callable[[str], None] = print, quick: bool = False,
             budget: DemoBudget | None = None, device=None, dtype: str = "float32") -> dict:
    """The main job on the bundled defaults, offline: SmolLM2-135M, the patch check, the ring-attention check (2 local
    processes, `ring_check`), every method of `DEMO_CONVERSIONS` (or the given list; ``[]`` for none), each
    evaluated on the held-out split of the bundled corpus; one table, one Pareto plot.

    budget: `FULL` (default) or `QUICK` (``quick=True``); the other arguments override single fields of it.
    device/dtype: where and in what the model runs (None: CPU; "auto": CUDA where available); the ring check runs
    its 2 processes on CPU (gloo) whatever the device.
    Then the encoder-only conversions (Linformer) on the bundled encoder, `encoder_check` (not rows of the table).
    Returns ``{"patch_check": dict, "ring_check": dict, "reports": [ModelReport], "table": str, "files": dict | None,
    "encoder_check": dict | None,
    "ok": bool, "seconds": float}``.
    """
    import dataclasses

    from .models import load_model

    t_start = time.perf_counter()
    budget = budget or (QUICK if quick else FULL)
    overrides = {k: v for k, v in dict(max_tokens=max_tokens, context_length=context_length,
                                       speed_contexts=None if speed_contexts is None else tuple(speed_contexts),
                                       decode_tokens=decode_tokens, patch_new_tokens=patch_new_tokens).items()
                 if v is not None}
    budget = dataclasses.replace(budget, **overrides)
    conversions = demo_conversions() if conversions is None else conversions
    steps = [_scaled(c, budget) for c in conversions]
    echo("hfa demo: SmolLM2-135M-Instruct (bundled), held-out split of the bundled Python-docs corpus"
         + (" (--quick budgets)" if budget == QUICK else ""))
    from .patch_check import _DTYPES, patch_check, print_patch_check
    if dtype not in _DTYPES:
        raise OptionError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    model, tok = load_model("smollm2-135m", dtype=_DTYPES[dtype], device=device)
    echo(f"device {next(model.parameters()).device}, {dtype}")

    echo("\n[1/4] patch check: stock sdpa vs hf_efficient_attn")
    check = patch_check("smollm2-135m", new_tokens=budget.patch_new_tokens, dtype=dtype, device=device)
    print_patch_check(check)

    ctx = budget.context_length
    echo(f"\n[2/4] ring attention: {ctx} held-out tokens split over 2 local processes (gloo) vs one")
    from .ring_check import format_ring_check, ring_check
    ring_res = ring_check("smollm2-135m", world=2, tokens=ctx, gen_prompt=min(64, ctx), new_tokens=4)
    echo(format_ring_check(ring_res))
    ring_ok = ring_res["ok"]

    echo(f"\n[3/4] methods: {', '.join(c.label for c in steps) if steps else 'none'}")
    entries, families = [("smollm2-135m", model, tok)], ["dense"]
    calibration = load_text(None, split="calibration") if steps else None
    train = load_text(None, split="train") if any(c.stages for c in steps) else None
    for step in steps:
        t0 = time.perf_counter()
        converted = _run_conversion(step, model, tok, calibration, train, budget.max_tokens)
        heal = f", healed on {step.heal_budget:,} tokens" if step.heal_budget else ""
        echo(f"  {step.label}: ready in {time.perf_counter() - t0:.1f} s{heal}")
        entries.append((f"smollm2-135m {step.label}", converted, tok))
        families.append(step.kind)

    echo(f"\n[4/4] evaluating {len(entries)} model(s) on {budget.max_tokens} held-out tokens, context {ctx}; "
         f"the base and KV-policy rows also on {budget.stream_tokens} tokens decoded one at a time after a "
         f"{ctx}-token prefill; decode speed {budget.speed_rounds} rounds")
    reports = evaluate_models(entries, None, context_length=ctx, max_tokens=budget.max_tokens,
                              speed_contexts=budget.speed_contexts, decode_tokens=budget.decode_tokens,
                              stream="kv", stream_tokens=budget.stream_tokens, kv_long_tokens=budget.kv_long_tokens,
                              speed_rounds=budget.speed_rounds, families=families, progress=progress)
    table = format_table(reports)
    echo("\n" + table)
    encoder = None
    if budget.encoder_heal_tokens is not None:
        from .encoder_check import encoder_check, format_encoder_check
        echo("\nencoder-only conversion (not a SmolLM2 row: Linformer projects along the sequence, which a decoder "
             "cannot): all-MiniLM-L6-v2")
        encoder = encoder_check(heal_tokens=budget.encoder_heal_tokens, inputs=budget.encoder_inputs,
                                repeats=budget.speed_rounds)
        echo("  " + format_encoder_check(encoder))
    seconds = time.perf_counter() - t_start
    files = None
    if out_dir is not None:
        files = write_report(reports, out_dir, extra={"patch_check": check, "ring_check": ring_res,
                                                      "encoder_check": encoder,
                                                      "budget": dataclasses.asdict(budget), "seconds": seconds})
        echo(f"\nwrote {files['json']}, {files['markdown']}" + "".join(f", {p}" for p in files["plots"]))
    echo(f"hfa demo: {seconds / 60:.1f} min")
    return {"patch_check": check, "ring_check": ring_res, "reports": reports, "table": table, "files": files,
            "encoder_check": encoder, "ok": bool(check.get("ok")) and ring_ok, "seconds": seconds}
