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
from .cost import kv_cache_bytes, measure_speed, parameter_count
from .data import TextData, load_text
from .perplexity import perplexity

__all__ = [
    "DEMO_CONVERSIONS", "DemoConversion", "ModelReport", "demo_conversions", "evaluate_model", "evaluate_models", "format_table",
    "run_demo", "to_markdown", "write_report",
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

    @property
    def layer_error(self) -> float | None:
        """The mean of the per-layer relative errors (None: not measured)."""
        return None if not self.layer_errors else sum(self.layer_errors.values()) / len(self.layer_errors)

    @property
    def kv_bytes_per_token(self) -> float | None:
        return None if self.kv_cache_bytes is None else self.kv_cache_bytes / self.kv_tokens

    def decode_tok_s(self, context: int | None = None) -> float | None:
        """Decode speed at `context` (default: the largest measured context not above the eval context)."""
        if not self.speed:
            return None
        if context is None:
            ctx = self.protocol.get("context_length") or 0
            fitting = [p for p in self.speed if p["context"] <= ctx]
            point = max(fitting, key=lambda p: p["context"]) if fitting else min(self.speed, key=lambda p: p["context"])
        else:
            matches = [p for p in self.speed if p["context"] == context]
            if not matches:
                return None
            point = matches[0]
        return point["decode_tok_s"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_bytes_per_token"] = self.kv_bytes_per_token
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
                   passkey_lengths=(), stream_tokens: int | None = None, progress: bool = True) -> ModelReport:
    """Measure one model: perplexity on `data`, KV-cache bytes after `kv_tokens` tokens (default: the
    context length), decode speed at `speed_contexts` (empty: skip), parameter count, passkey accuracy at
    `passkey_lengths` (empty: skip).

    A sparse-patched model (``hfa.patch(model, sparse=...)``) is labelled with its pattern and also reports the mean
    block density of its perplexity windows and each layer's output error against dense attention on the first
    window (``hfa.sparse.layer_errors``).

    stream_tokens: also score this many tokens after a ``context_length``-token prefill under the streaming protocol
    (:func:`..kv_check.kv_perplexity`, one token at a time through the cache): what a KV policy changes. A model
    with a KV policy (``hfa.patch(model, kv=...)``) is labelled approximate with its policy."""
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
    speed = [p.to_dict() for p in measure_speed(model, tuple(speed_contexts), decode_tokens=decode_tokens)] \
        if speed_contexts else []
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
                       stream_protocol=None if stream is None else stream["protocol"])


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
                    split: str | None = None, sparse=(), kv=(), stream_tokens: int = 128, passkey_lengths=(),
                    progress: bool = True) -> list[ModelReport]:
    """Evaluate several models on the same text under the same protocol; Δppl is against the first.

    models: names/paths for `load_model`, or `(name, model, tokenizer)` tuples, mixed freely.
    Models given by name are loaded one at a time and released before the next.
    sparse: patterns from ``hfa.sparse``: after each model's own row, one row per pattern with the model patched
    (``hfa.patched(model, sparse=pattern)``, backend auto), named ``"MODEL + PATTERN"`` and labelled approximate.
    kv: policies from ``hfa.kv``: likewise one row per policy (``hfa.patched(model, kv=policy)``); then every row,
    the model's own included, also reports ``stream_ppl`` over ``stream_tokens`` tokens (the streaming protocol).
    passkey_lengths: prompt lengths for passkey retrieval on every row (empty: none).
    """
    from ..attention import patched
    from .models import load_model

    if not models:
        raise ValueError("give at least one model")
    text = load_text(data, split=split)  # load once: every model sees exactly the same text
    run = dict(context_length=context_length, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
               kv_tokens=kv_tokens, speed_contexts=speed_contexts, decode_tokens=decode_tokens,
               passkey_lengths=passkey_lengths, stream_tokens=stream_tokens if kv else None, progress=progress)
    reports = []
    for entry in models:
        if isinstance(entry, tuple):
            name, model, tok = entry
        else:
            name = str(entry)
            model, tok = load_model(name, dtype=dtype)
        reports.append(evaluate_model(model, tok, text, name=name, **run))
        for pattern in sparse:
            with patched(model, sparse=pattern):
                reports.append(evaluate_model(model, tok, text, name=f"{name} + {pattern.name}", **run))
        for policy in kv:
            with patched(model, kv=policy):
                reports.append(evaluate_model(model, tok, text, name=f"{name} + {policy.name}", **run))
        del model
    return _fill_deltas(reports)


# -- the table ---------------------------------------------------------------------------------------

def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _rows(reports: list[ModelReport]) -> tuple[list[str], list[list[str]]]:
    kv_tok = {r.kv_tokens for r in reports}
    kv_head = f"KV bytes/token @{kv_tok.pop()}" if len(kv_tok) == 1 else "KV bytes/token"
    speed_ctx = _speed_context(reports)
    dec_head = f"decode tok/s @{speed_ctx}" if speed_ctx else "decode tok/s"
    header = ["model", "ppl", "Δppl", "tokens", kv_head, dec_head, "params"]
    sparse = any(r.pattern is not None for r in reports)
    lengths = sorted({n for r in reports for n in r.passkey})
    stream = any(r.stream_ppl is not None for r in reports)
    if stream:
        header[3:3] = ["stream ppl", "Δstream"]
    if sparse:
        header[1:1] = ["density", "layer err"]
    header += [f"passkey @{n}" for n in lengths]
    rows = []
    for i, r in enumerate(reports):
        if r.delta_ppl is None:
            delta = "n/a"
        elif i == 0:
            delta = "—"
        else:
            delta = f"{r.delta_ppl:+.3f}"
        kvpt = r.kv_bytes_per_token
        dec = r.decode_tok_s()
        name = r.model + (" (approx.)" if r.approximate else "")
        row = [name, f"{r.ppl:.3f}", delta, f"{r.tokens:,}", "n/a" if kvpt is None else f"{kvpt:,.0f}",
               "n/a" if dec is None else f"{dec:.1f}", _human(r.params)]
        if stream:
            base = reports[0].stream_ppl
            same = r.stream_protocol and reports[0].stream_protocol and \
                r.stream_protocol.get("token_stream_sha256") == reports[0].stream_protocol.get("token_stream_sha256")
            row[3:3] = ["n/a" if r.stream_ppl is None else f"{r.stream_ppl:.3f}",
                        "—" if i == 0 or r.stream_ppl is None else
                        (f"{r.stream_ppl / base - 1:+.1%}" if same and base else "n/a")]
        if sparse:
            row[1:1] = ["dense" if r.density is None else f"{r.density:.3f}",
                        "—" if r.layer_error is None else f"{r.layer_error:.4f}"]
        row += [f"{r.passkey[n]:.0%}" if n in r.passkey else "n/a" for n in lengths]
        rows.append(row)
    return header, rows


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


def _plots(reports: list[ModelReport], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    pts = [r for r in reports if r.kv_bytes_per_token is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        markers = "osD^vP*Xh<>"
        for i, r in enumerate(pts):  # a legend, not annotations: conversions often share one x
            ax.scatter(r.kv_bytes_per_token, r.ppl, s=45, marker=markers[i % len(markers)], label=r.model)
        ppls = [r.ppl for r in pts]
        if max(ppls) / min(ppls) > 10:
            ax.set_yscale("log")
        ax.set_xlim(left=0, right=max(r.kv_bytes_per_token for r in pts) * 1.1)
        ax.set_xlabel(f"KV-cache bytes per token (at {pts[0].kv_tokens} tokens)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.legend(fontsize=7, loc="best")
        ax.set_title("accuracy vs KV-cache size")
        ax.grid(alpha=0.3)
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
    payload = {"models": [r.to_dict() for r in reports], "protocol": protocol_line(reports), **(extra or {})}
    jpath, mpath = out / "report.json", out / "report.md"
    atomic_write(jpath, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n"))
    atomic_write(mpath, lambda tmp: tmp.write_text(to_markdown(reports)))
    return {"json": jpath, "markdown": mpath, "plots": _plots(reports, out) if plots else []}


# -- the demo ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoConversion:
    """One conversion `hfa demo` runs on the bundled model: one line of `DEMO_CONVERSIONS`.

    label: the row name. method/options: ``hfa.convert(model, method, **options, calibration=...,
    tokenizer=...)`` with the calibration split of the bundled corpus; heal: then ``hfa.distill(new, model,
    calibration, tokenizer=..., **heal)`` on that split too (the demo evaluates on the held-out one). build:
    instead of `method`, a function ``build(model, tokenizer, calibration: TextData, max_tokens: int) -> model``
    for recipes that are neither. Either way the base model must come back unmodified: it is the first row of the
    table.
    """

    label: str
    method: str | None = None
    options: dict = field(default_factory=dict)
    build: Callable | None = None
    heal: dict | None = None


_GQA_KV1 = {"num_kv_heads": 1, "calibration_tokens": 4096}


def _sparse_copy(spec: str) -> Callable:
    """A demo build: a copy of the base model patched with a training-free sparse pattern (the base stays dense)."""
    def build(model, tokenizer, calibration, max_tokens):
        import copy

        from ..attention import patch
        from ..attention.sparse import from_spec
        return patch(copy.deepcopy(model), sparse=from_spec(spec))
    return build

def _kv_copy(spec: str) -> Callable:
    """A demo build: a copy of the base model patched with a KV-cache policy (the base keeps its full cache)."""
    def build(model, tokenizer, calibration, max_tokens):
        import copy

        from ..attention import patch
        from ..attention.kv import from_spec
        return patch(copy.deepcopy(model), kv=from_spec(spec))
    return build


# Everything `hfa demo` runs after the base model, in table order: SmolLM2-135M's 3 KV heads merged into 1 by
# each GQA method, then the best one healed, then a training-free sparse prefill (labelled approximate, with its
# density and per-layer error), then a KV-cache policy (StreamingLLM: 4 sinks + 256 recent tokens, inside the
# 512-token windows; its KV bytes are the bounded cache's). About 5 minutes in all on 2 idle CPU cores.
DEMO_CONVERSIONS: list[DemoConversion] = [
    DemoConversion("gqa kv=1 mean", "gqa", {**_GQA_KV1, "method": "mean"}),
    DemoConversion("gqa kv=1 aligned", "gqa", {**_GQA_KV1, "method": "aligned"}),
    DemoConversion("gqa kv=1 pca", "gqa", {**_GQA_KV1, "method": "pca"}),
    DemoConversion("gqa kv=1 pca + 8k-token heal", "gqa", {**_GQA_KV1, "method": "pca"},
                   heal={"max_tokens": 8192, "seq_len": 256, "batch_size": 4}),
    DemoConversion("sparse top_p_g0.95_b64", build=_sparse_copy("top_p:gamma=0.95")),
    DemoConversion("kv streaming_s4_w256", build=_kv_copy("streaming:sinks=4,window=256")),
]


def demo_conversions() -> list[DemoConversion]:
    """Every conversion `hfa demo` runs: `DEMO_CONVERSIONS`."""
    return list(DEMO_CONVERSIONS)


def _run_conversion(step: DemoConversion, model, tokenizer, calibration: TextData, max_tokens: int):
    if step.build is not None:
        return step.build(model, tokenizer, calibration, max_tokens)
    from ..conversions import convert, distill

    new = convert(model, step.method, calibration=list(calibration.documents), tokenizer=tokenizer, **step.options)
    if step.heal is not None:
        distill(new, model, list(calibration.documents), tokenizer=tokenizer, **step.heal)
    return new.eval()


def run_demo(max_tokens: int = 8192, context_length: int = 512, out_dir=None, speed_contexts=(128, 512),
             decode_tokens: int = 16, patch_new_tokens: int = 32, conversions=None, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """The main job on the bundled defaults, offline: SmolLM2-135M, the patch check, the ring-attention check (2 local
    processes, `ring_check`), every conversion of
    `DEMO_CONVERSIONS` (or the given list; ``[]`` for none), each evaluated on the held-out split of the
    bundled corpus; one table.

    Returns ``{"patch_check": dict, "reports": [ModelReport], "table": str, "files": dict | None, "ok": bool}``.
    """
    from .models import load_model

    conversions = demo_conversions() if conversions is None else conversions
    echo("hfa demo: SmolLM2-135M-Instruct (bundled), held-out split of the bundled Python-docs corpus")
    model, tok = load_model("smollm2-135m")

    echo("\n[1/4] patch check: stock sdpa vs hf_efficient_attn")
    from .patch_check import patch_check, print_patch_check
    check = patch_check("smollm2-135m", new_tokens=patch_new_tokens)
    print_patch_check(check)

    echo(f"\n[2/4] ring attention: {context_length} held-out tokens split over 2 local processes (gloo) vs one")
    from .ring_check import format_ring_check, ring_check
    ring_res = ring_check("smollm2-135m", world=2, tokens=context_length, gen_prompt=min(64, context_length),
                          new_tokens=4)
    echo(format_ring_check(ring_res))
    ring_ok = ring_res["ok"]

    echo(f"\n[3/4] conversions: {', '.join(c.label for c in conversions) if conversions else 'none'}")
    entries = [("smollm2-135m", model, tok)]
    calibration = load_text(None, split="calibration") if conversions else None
    for step in conversions:
        t0 = time.perf_counter()
        converted = _run_conversion(step, model, tok, calibration, max_tokens)
        echo(f"  {step.label}: converted in {time.perf_counter() - t0:.1f} s")
        entries.append((f"smollm2-135m {step.label}", converted, tok))

    echo(f"\n[4/4] evaluating {len(entries)} model(s) on {max_tokens} held-out tokens, context {context_length}")
    reports = evaluate_models(entries, None, context_length=context_length, max_tokens=max_tokens,
                              speed_contexts=speed_contexts, decode_tokens=decode_tokens, progress=progress)
    table = format_table(reports)
    echo("\n" + table)
    files = None
    if out_dir is not None:
        files = write_report(reports, out_dir, extra={"patch_check": check, "ring_check": ring_res})
        echo(f"\nwrote {files['json']}, {files['markdown']}" + "".join(f", {p}" for p in files["plots"]))
    return {"patch_check": check, "ring_check": ring_res, "reports": reports, "table": table, "files": files,
            "ok": bool(check.get("ok")) and ring_ok}
