"""The `hfa` command. Each subcommand lives with the layer that does the work; this file parses. `hfa convert` is
the one exception: it only chains public calls of the layers below (`convert`, `distill`, `save`,
`evaluate_models`), so its few lines of orchestration live here with its option typing."""

from __future__ import annotations

import argparse
import collections.abc
import inspect
import os
import sys
import tempfile
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import HFAError, MissingFileError, NonFiniteError, OptionError, is_user_error


def _add_patch_check(sub):
    p = sub.add_parser("patch-check", help="run MODEL stock and patched on a fixed text; compare logits, greedy text, time")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="Hub id, local path, or bundled name (smollm2-135m, gemma3-270m, minilm-l6); default smollm2-135m")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--reference-impl", default="sdpa", help="stock implementation to compare with (sdpa or eager)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate and compare")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto",
                   help="where MODEL runs: auto (cuda when available, else cpu), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")

    def run(args):
        from .eval.patch_check import patch_check, print_patch_check
        res = patch_check(args.model, backend=args.backend, reference_impl=args.reference_impl,
                          new_tokens=args.new_tokens, dtype=args.dtype, json_path=args.json,
                          device=_device(args.device))
        print_patch_check(res)
        return 0 if res["ok"] else 1

    p.set_defaults(func=run)


def _device(spec: str):
    """--device: checked against this machine (`eval.models.resolve_device`). On cpu the heal stays there too:
    accelerate would otherwise move it to a GPU it finds."""
    import os

    from .eval.models import resolve_device
    dev = resolve_device(spec)
    if dev.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return dev


def _task_list(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise OptionError(f"--tasks {text!r} names no task: give NAME[,NAME], e.g. hfa_lastword")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 128,512,2048, got {text!r}")
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"context lengths must be positive, got {text!r}")
    return vals


def _sparse_spec(text: str):
    from .attention.sparse import from_spec
    try:
        return from_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _kv_spec(text: str):
    from .attention.kv import from_spec
    try:
        return from_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity, KV-cache bytes/token, decode speed and parameters of MODEL(s), "
                                    "side by side on the same data and protocol")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="Hub id, local path, or bundled name (smollm2-135m, gemma3-270m); Δppl is against the first")
    p.add_argument("--data", default=None,
                   help="text file, folder of text files, 'datasets:NAME[:CONFIG]' (needs the Hub), or "
                        "'python-docs' (default: the bundled corpus)")
    p.add_argument("--split", default=None, choices=["eval", "calibration", "train"],
                   help="document split (default: all of your data; the held-out 'eval' split of the bundled corpus)")
    p.add_argument("--context", type=int, default=512, help="tokens per window, BOS included (default 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window step: each window scores its last N tokens (default: disjoint windows)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the data")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: automatic)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto",
                   help="where MODEL runs: auto (cuda when available, else cpu), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="tokens in the forward pass that measures the KV cache (default: --context)")
    p.add_argument("--speed-contexts", type=_int_list, default=(128, 512, 2048),
                   help="context lengths for decode speed, comma-separated (default 128,512,2048)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per speed measurement")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--sparse", action="append", type=_sparse_spec, default=[], metavar="PATTERN[:K=V,...]",
                   help="also evaluate each MODEL with this training-free sparse pattern (repeatable), e.g. "
                        "top_p:gamma=0.95, vertical_slash:vertical=256,slash=256, streaming:sinks=4,window=1024; "
                        "each row reports its block density and per-layer error against dense, beside the dense row")
    p.add_argument("--kv", action="append", type=_kv_spec, default=[], metavar="POLICY[:K=V,...]",
                   help="also evaluate each MODEL with this KV-cache policy (repeatable), e.g. "
                        "streaming:sinks=4,window=1024, snapkv:budget=1024, quest:budget=1024; every row then "
                        "also reports 'stream ppl' (--stream-tokens tokens fed one at a time through the cache after "
                        "a --context prefill) beside the full cache")
    p.add_argument("--stream-tokens", type=int, default=128,
                   help="tokens scored through the cache for 'stream ppl' when --kv is given (default 128)")
    p.add_argument("--passkey", type=_int_list, default=(), metavar="LENGTHS",
                   help="passkey retrieval accuracy at these prompt lengths, comma-separated (e.g. 1024,4096,8192)")
    p.add_argument("--tasks", default=None, metavar="NAME[,NAME]",
                   help="downstream tasks through lm-eval-harness on every row (pip install "
                        "'hf_efficient_attn[tasks]'): the bundled hfa_lastword, hfa_passkey[_N] run offline; any "
                        "lm-eval task where the Hub is reachable")
    p.add_argument("--task-limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--out", default="hfa-eval", help="folder for report.json, report.md and plots (default hfa-eval)")
    p.add_argument("--no-plots", action="store_true", help="write no plots (plots need matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args):
        from .eval.report import evaluate_models, format_table, write_report
        reports = evaluate_models(args.models, args.data, context_length=args.context, stride=args.stride,
                                  max_tokens=args.max_tokens, batch_size=args.batch_size, kv_tokens=args.kv_tokens,
                                  speed_contexts=() if args.no_speed else args.speed_contexts,
                                  decode_tokens=args.decode_tokens, dtype=args.dtype, split=args.split,
                                  device=_device(args.device),
                                  sparse=args.sparse, kv=args.kv, stream_tokens=args.stream_tokens,
                                  passkey_lengths=args.passkey, tasks=_task_list(args.tasks),
                                  task_limit=args.task_limit, progress=not args.quiet)
        print(format_table(reports))
        files = write_report(reports, args.out, plots=not args.no_plots)
        print(f"wrote {files['json']}, {files['markdown']}" + "".join(f", {p}" for p in files["plots"]))
        return 0

    p.set_defaults(func=run)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job, offline: SmolLM2-135M patch check, ring check, every method of "
                                    "eval.report.DEMO_CONVERSIONS (GQA, MLA, linear, Mamba-2, sparse patterns, KV "
                                    "policies) in one perplexity / bits-per-byte / KV-cache / speed table and one "
                                    "Pareto plot (about 12 min on 2 CPU cores; --quick: under 3)")
    p.add_argument("--quick", action="store_true",
                   help="small budgets (eval.report.QUICK: 512 held-out tokens, 256-token windows, heals cut 16x)")
    p.add_argument("--max-tokens", type=int, default=None, help="held-out tokens to evaluate (default 4096; quick 512)")
    p.add_argument("--context", type=int, default=None, help="tokens per window (default 512; quick 256)")
    p.add_argument("--speed-contexts", type=_int_list, default=None,
                   help="context lengths for decode speed, comma-separated (default 512; quick 64)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per speed measurement")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens compared by the patch check")
    p.add_argument("--no-conversions", action="store_true", help="only the base model: patch check and baseline")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto",
                   help="where MODEL runs: auto (cuda when available, else cpu), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--out", default="hfa-demo", help="folder for report.json, report.md and plots (default hfa-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args):
        from .eval.report import run_demo
        for flag in ("max_tokens", "context", "decode_tokens", "new_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise OptionError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        res = run_demo(max_tokens=args.max_tokens, context_length=args.context, out_dir=args.out,
                       speed_contexts=args.speed_contexts, decode_tokens=args.decode_tokens,
                       patch_new_tokens=args.new_tokens, conversions=[] if args.no_conversions else None,
                       progress=not args.quiet, quick=args.quick, device=_device(args.device), dtype=args.dtype)
        return 0 if res["ok"] else 1

    p.set_defaults(func=run)


# -- hfa convert ---------------------------------------------------------------------------------------
#
# Generic over the conversion registry: the options of `--method NAME` are read from the conversion's
# signature (`conversions.options_of`), so a conversion registered later needs no change here. Values
# given as `--set KEY=VALUE` are typed by the option's annotation, else by its default.

# options the command fills itself, and the flag that sets each
_CLI_OPTIONS = {
    "calibration": "--calibration DATA (default: the calibration split of the bundled corpus; --no-calibration: none)",
    "tokenizer": "MODEL's tokenizer",
    "calibration_tokens": "--calibration-tokens N",
    "progress": "on unless --quiet",
}
_NONE_WORDS = {"none", "null"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class OptionType:
    """How a `--set KEY=VALUE` string becomes a Python value. base: bool, int, float, str, list or any
    (any: none/true/false/number/comma list/text, guessed from the text)."""

    base: str
    nullable: bool = False
    item: str = "any"                       # element type of a list
    container: type = list                  # list or tuple
    choices: tuple | None = None            # typing.Literal values

    def describe(self) -> str:
        if self.base == "any":
            return "any (read as none, true/false, a number or text; a list needs [..] or a comma)"
        name = f"{self.base} of {self.item}" if self.base == "list" else self.base
        if self.choices:
            name += f" (one of {', '.join(map(str, self.choices))})"
        return name + " or none" if self.nullable and self.base != "any" else name


_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)


def _type_from_annotation(ann) -> OptionType | None:
    """The OptionType of a resolved annotation; None when it says nothing a command line can give."""
    if ann is inspect.Parameter.empty or isinstance(ann, str):
        return None
    if ann in _SCALARS:
        return OptionType(_SCALARS[ann])
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        bases = {type(a) for a in args if a is not None}
        base = _SCALARS.get(bases.pop(), "any") if len(bases) == 1 else "any"
        return OptionType(base, None in args, choices=tuple(a for a in args if a is not None))
    if origin in (typing.Union, types.UnionType):
        nullable = type(None) in args
        kinds = [k for k in (_type_from_annotation(a) for a in args if a is not type(None)) if k is not None]
        bases = {k.base for k in kinds}
        if len(kinds) == 1:
            k = kinds[0]
            return OptionType(k.base, nullable or k.nullable, k.item, k.container, k.choices)
        if bases == {"int", "float"}:
            return OptionType("float", nullable)
        return OptionType("str", nullable) if bases == {"str"} else OptionType("any", nullable)
    if ann in (list, tuple) or origin in _SEQUENCES:
        item = _type_from_annotation(args[0]) if args and args[0] is not Ellipsis else None
        container = tuple if (ann is tuple or origin is tuple) else list
        return OptionType("list", item=item.base if item and item.base != "list" else "any", container=container)
    return None


def _type_from_default(default) -> OptionType:
    if default is None or default is inspect.Parameter.empty:
        return OptionType("any", nullable=default is None)
    if type(default) in _SCALARS:
        return OptionType(_SCALARS[type(default)])
    if isinstance(default, (list, tuple)):
        items = {_SCALARS.get(type(x), "any") for x in default}
        return OptionType("list", item=items.pop() if len(items) == 1 else "any", container=type(default))
    return OptionType("any")


def option_types(method: str) -> dict[str, tuple[OptionType, object]]:
    """``{option: (OptionType, default)}`` for conversion `method`, from its signature (annotations first,
    then defaults; ``inspect.Parameter.empty`` marks a required option)."""
    from .conversions.convert import CONVERSIONS, options_of

    fn = CONVERSIONS[method]
    try:
        params = inspect.signature(fn, eval_str=True).parameters
    except Exception:  # an annotation that does not evaluate: fall back to the defaults
        params = inspect.signature(fn).parameters
    out = {}
    for name, default in options_of(method).items():
        ann = params[name].annotation if name in params else inspect.Parameter.empty
        kind = _type_from_annotation(ann) or _type_from_default(default)
        if default is None and not kind.nullable:
            kind = OptionType(kind.base, True, kind.item, kind.container, kind.choices)
        out[name] = (kind, default)
    return out


def _auto_value(text: str):
    low = text.strip().lower()
    if low in _NONE_WORDS:
        return None
    if low in ("true", "false"):
        return low == "true"
    if text.strip().startswith("[") or "," in text:
        return [_auto_value(x) for x in text.strip().removeprefix("[").removesuffix("]").split(",") if x.strip()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_option(key: str, text: str, kind: OptionType):
    """`text` as a value of option `key` of type `kind`; ValueError naming the option and what it takes."""
    low = text.strip().lower()
    if kind.nullable and low in _NONE_WORDS:
        return None
    if kind.base == "any":
        return _auto_value(text)
    if kind.base == "list":
        parts = [x.strip() for x in text.strip().removeprefix("[").removesuffix("]").split(",") if x.strip()]
        return kind.container(parse_option(f"{key}[{i}]", x, OptionType(kind.item)) for i, x in enumerate(parts))
    if kind.base == "bool":
        if low in _TRUE_WORDS | _FALSE_WORDS:
            return low in _TRUE_WORDS
        raise HFAError(f"option {key!r} is true or false, got {text!r}")
    try:
        value = {"int": int, "float": float, "str": str}[kind.base](text)
    except ValueError:
        article = "an integer" if kind.base == "int" else "a number"
        raise HFAError(f"option {key!r} takes {article}" + (" or none" if kind.nullable else "") +
                       f", got {text!r}") from None
    if kind.choices and value not in kind.choices:
        raise HFAError(f"option {key!r} is one of {', '.join(map(str, kind.choices))}; got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")         # --set num-kv-heads=1 reads like the other flags
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. num_kv_heads=1), got {text!r}")
    return key, value


def _check_method(method: str) -> None:
    from .conversions.convert import CONVERSIONS

    if method not in CONVERSIONS:
        raise HFAError(f"unknown conversion {method!r}; the conversions are: {', '.join(CONVERSIONS)}")


def conversion_options(method: str, settings, calibration_tokens=None) -> dict:
    """The typed options of ``--set KEY=VALUE ...`` (``settings``: [(key, text)]) for conversion `method`,
    checked before any work by `convert`'s own check (`unknown_and_missing`): unknown, repeated, command-set or
    missing options raise."""
    from .conversions.convert import unknown_and_missing

    _check_method(method)
    types_ = option_types(method)
    accepted = ", ".join(types_)
    unknown = set(unknown_and_missing(method, [key for key, _ in settings])[0])
    options = {}
    for key, text in settings:
        if key in unknown:
            raise OptionError(f"conversion {method!r} got unknown option {key!r}; it accepts: {accepted} "
                              f"(hfa convert --method {method} --help-options lists them with types and defaults)")
        if key in ("calibration", "tokenizer"):
            raise HFAError(f"option {key!r} is set by the command ({_CLI_OPTIONS[key]}), not with --set")
        if key in options:
            raise HFAError(f"option {key!r} is given twice")
        options[key] = parse_option(key, text, types_[key][0])
    if calibration_tokens is not None:
        if unknown_and_missing(method, ["calibration_tokens"])[0]:
            raise OptionError(f"conversion {method!r} takes no calibration_tokens (--calibration-tokens); it "
                              f"accepts: {accepted}")
        if "calibration_tokens" in options:
            raise HFAError("calibration_tokens is given twice (--calibration-tokens and --set)")
        options["calibration_tokens"] = calibration_tokens
    missing = unknown_and_missing(method, options, filled=("calibration", "tokenizer"))[1]
    if missing:
        raise OptionError(f"conversion {method!r} needs option(s) {', '.join(map(repr, missing))}: pass "
                          + " ".join(f"--set {k}=..." for k in missing) + f" (accepted: {accepted})")
    return options


def format_options(method: str | None = None) -> str:
    """The text of ``hfa convert [--method NAME] --help-options``: every option with its type and default."""
    from .conversions.convert import CONVERSIONS

    if method is not None:
        _check_method(method)
    lines = []
    for name in [method] if method else list(CONVERSIONS):
        fn = CONVERSIONS[name]
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        lines += [f"--method {name}: {doc}", f"  options (--set KEY=VALUE; {fn.__module__}.{fn.__qualname__}):"]
        rows = []
        for key, (kind, default) in option_types(name).items():
            if key in ("calibration", "tokenizer"):
                rows.append((key, "", f"set by the command: {_CLI_OPTIONS[key]}"))
                continue
            shown = "required" if default is inspect.Parameter.empty else f"default {default!r}"
            also = f"  (hfa convert: {_CLI_OPTIONS[key]})" if key in _CLI_OPTIONS else ""
            rows.append((key, kind.describe(), shown + also))
        w0 = max(len(r[0]) for r in rows) if rows else 0
        w1 = max(len(r[1]) for r in rows) if rows else 0
        lines += [f"    {k.ljust(w0)}  {t.ljust(w1)}  {d}".rstrip() for k, t, d in rows]
        lines.append("")
    lines.append("Values: none/null for None; true/false for booleans; lists as 0,1,2 or [0,1,2].")
    return "\n".join(lines)


def _text(data, split: str, flag: str):
    """Calibration/heal/eval text: a bundled corpus name (its `split`), a datasets name, or an existing file
    or folder. A command line never means a literal string as text, so anything else is a missing file."""
    from .eval.data import _DATASET_SHORTHANDS, BUNDLED_CORPORA, load_text

    if data is None or data in BUNDLED_CORPORA or data == "bundled":
        return load_text(None if data == "bundled" else data, split=split)
    if data.startswith("datasets:") or data in _DATASET_SHORTHANDS:
        return load_text(data, split=split)
    path = Path(data).expanduser()
    if not path.exists():
        raise MissingFileError(f"{flag}: no file or folder at {data!r}; give a UTF-8 text file, a folder of them, "
                               f"{', '.join(BUNDLED_CORPORA)} (the bundled corpus) or datasets:NAME[:CONFIG]")
    return load_text(path)


def _check_out(out: Path, overwrite: bool, model_arg: str) -> None:
    """Refuse a bad --out before any work, by the rules `hfa.save` applies again when it writes (`check_target`),
    and check that the folder it writes into is writable."""
    from .conversions.io import check_target

    src = Path(model_arg).expanduser()
    check_target(out, overwrite=overwrite, sources=[src] if src.is_dir() else [], label=f"--out {out}",
                 overwrite_hint="pass --overwrite")
    target = out.expanduser().resolve()
    probe = target.parent                      # save writes a temporary sibling of --out, then renames it
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HFAError(f"--out {out} cannot be created: {probe} is a file, not a folder. Choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".hfa-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise HFAError(f"--out {out} is not writable ({e.strerror or e} in {probe}); choose a folder you can write "
                       "to") from None


def _check_positive(args) -> None:
    """Every count and rate a flag gives is checked before any work."""
    for flag, value, least in (("--heal-tokens", args.heal_tokens, 1), ("--seq-len", args.seq_len, 2),
                               ("--batch-size", args.batch_size, 1), ("--eval-tokens", args.eval_tokens, 1),
                               ("--context", args.context, 2), ("--calibration-tokens", args.calibration_tokens, 1)):
        if value is not None and value < least:
            raise HFAError(f"{flag} must be at least {least}, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise HFAError(f"--lr must be a positive number, got {args.lr}")


def _world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _check_heal_budget(args) -> None:
    """--heal-tokens must pay for one optimizer step (--seq-len x --batch-size tokens on each process)."""
    seq_len, batch, world = args.seq_len or 512, args.batch_size or 4, _world_size()
    per_step = seq_len * batch * world
    if args.heal_tokens < per_step:
        procs = f" x {world} processes" if world > 1 else ""
        raise HFAError(f"--heal-tokens {args.heal_tokens} is less than one step (--seq-len {seq_len} x --batch-size "
                       f"{batch}{procs} = {per_step} tokens): raise --heal-tokens to at least {per_step}, or lower "
                       "--seq-len / --batch-size")


def _barrier() -> None:
    """Wait for every process of an initialised process group (the main one writes meanwhile)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _label(model_name: str, method: str, settings, heal_tokens) -> str:
    opts = ",".join(f"{k}={v}" for k, v in settings)
    return f"{model_name} {method}" + (f"({opts})" if opts else "") + (f" +{heal_tokens} heal tokens" if heal_tokens else "")


def _trainable(spec: str):
    """--trainable: a name distill knows (kv, attention, all, lora, ...) or MODULE:FUNCTION, a selector
    ``(name, param) -> bool`` such as hf_efficient_attn.conversions.mla:MLA_TRAINABLE."""
    from .conversions import TRAINABLE

    if ":" not in spec:
        if spec not in TRAINABLE and spec != "lora":
            raise HFAError(f"unknown --trainable {spec!r}; use one of {', '.join([*TRAINABLE, 'lora'])} or "
                           "MODULE:FUNCTION, a selector (name, param) -> bool")
        return spec
    import importlib

    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise HFAError(f"--trainable {spec}: cannot import it ({e}); give MODULE:FUNCTION with FUNCTION(name, "
                       "param) -> bool, or a name: kv, attention, all, lora") from None
    if not callable(fn):
        raise HFAError(f"--trainable {spec} is a {type(fn).__name__}, not a function (name, param) -> bool")
    return fn


def _check_trainable(student, trainable, defaulted: bool) -> None:
    """Fail with the fix when a named selector picks nothing (e.g. kv after a conversion that replaced k/v)."""
    from .conversions import TRAINABLE

    if not isinstance(trainable, str) or trainable not in TRAINABLE:
        return   # lora, a callable, or an unknown name: hfa.distill decides and says why
    if any(TRAINABLE[trainable](n, p) for n, p in student.named_parameters()):
        return
    how = "the default --trainable" if defaulted else "--trainable"
    raise HFAError(f"{how} {trainable} selects no parameter of the converted {type(student).__name__}; pass "
                   f"--trainable with one of {', '.join(t for t in TRAINABLE if t != trainable)}, lora, or "
                   "MODULE:FUNCTION (a selector (name, param) -> bool, e.g. "
                   "hf_efficient_attn.conversions.mla:MLA_TRAINABLE for MLA)")


_HEAL_FLAGS = ("heal_data", "stage", "trainable", "seq_len", "batch_size", "lr", "bf16")


def _check_convert_flags(args) -> tuple[list, dict, dict]:
    """Every flag of `hfa convert` checked before any work; returns (--set settings, typed options, the
    conversion's accepted options)."""
    if args.method is None:
        raise HFAError("--method NAME is required (hfa convert --help-options lists the conversions)")
    _check_method(args.method)
    if args.model is None or args.out is None:
        raise HFAError("give MODEL and --out DIR: hfa convert MODEL --method NAME [--set KEY=VALUE ...] --out DIR")
    settings = args.set or []
    options = conversion_options(args.method, settings, args.calibration_tokens)
    accepted = option_types(args.method)
    if "calibration" not in accepted and (args.calibration is not None or args.no_calibration):
        raise HFAError(f"conversion {args.method!r} takes no calibration data: drop --calibration/--no-calibration")
    if args.calibration is not None and args.no_calibration:
        raise HFAError("--calibration and --no-calibration contradict each other: give one")
    given = [f"--{f.replace('_', '-')}" for f in _HEAL_FLAGS if getattr(args, f) not in (None, False)]
    if args.heal_tokens is None and given:
        raise HFAError(f"{', '.join(given)} only apply with --heal-tokens N (the distillation budget)")
    _check_positive(args)
    eval_given = [f for f, v in (("--eval-data", args.eval_data), ("--eval-tokens", args.eval_tokens),
                                 ("--context", args.context)) if v is not None]
    if eval_given and not args.eval:
        raise HFAError(f"{', '.join(eval_given)} only apply with --eval")
    return settings, options, accepted


def _read_inputs(args, accepted) -> tuple:
    """(calibration, heal text, --trainable, eval text): every text read before the slow part, so a missing file
    fails at once, and the heal settings checked."""
    calibration = None
    if "calibration" in accepted and not args.no_calibration:
        calibration = _text(args.calibration, "calibration", "--calibration")
    heal_text = _text(args.heal_data, "train", "--heal-data") if args.heal_tokens else None
    trainable_spec = _trainable(args.trainable) if args.trainable else None
    from .conversions import STAGES
    if args.stage is not None and args.stage not in STAGES:
        raise HFAError(f"unknown --stage {args.stage!r}; the stages are: {', '.join(STAGES)}")
    if args.heal_tokens is not None:
        _check_heal_budget(args)
    eval_text = _text(args.eval_data, "eval", "--eval-data") if args.eval else None
    return calibration, heal_text, trainable_spec, eval_text


def _load_and_convert(args, options, accepted, calibration, main: bool, say):
    """(MODEL, its tokenizer, the converted model)."""
    import hf_efficient_attn as hfa
    from .eval.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=_device(args.device))
    if model.get_output_embeddings() is None:
        raise HFAError(f"{args.model} is not a causal language model ({type(model).__name__}): hfa convert "
                       "converts decoder checkpoints (e.g. LlamaForCausalLM)")
    say(f"loaded {args.model} ({type(model).__name__}) in {time.perf_counter() - t0:.1f} s")

    if "tokenizer" in accepted:
        options["tokenizer"] = tok
    if calibration is not None:
        options["calibration"] = list(calibration.documents)
    if "progress" in accepted and "progress" not in options:
        options["progress"] = not args.quiet and main
    t0 = time.perf_counter()
    new = hfa.convert(model, args.method, **options)
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if k not in ("calibration", "tokenizer", "progress"))
    say(f"converted with {args.method}({shown})" + (f", calibration {calibration.name}" if calibration else "")
        + f" in {time.perf_counter() - t0:.1f} s")
    return model, tok, new


def _heal(args, new, model, tok, heal_text, trainable_spec, say) -> dict:
    """Distill `new` from `model` on `heal_text` (in place); returns what the report records of it."""
    import hf_efficient_attn as hfa
    from .conversions import default_trainable

    stage = args.stage or "logits"
    trainable = trainable_spec or default_trainable(new, stage)
    _check_trainable(new, trainable, args.trainable is None)
    try:
        res = hfa.distill(new, model, list(heal_text.documents), tokenizer=tok, stage=stage,
                          max_tokens=args.heal_tokens, seq_len=args.seq_len or 512,
                          batch_size=args.batch_size or 4, trainable=trainable, lr=args.lr,
                          bf16=True if args.bf16 else None, progress=not args.quiet)
    except NonFiniteError as e:           # say the fix in flags, not in Python
        what = str(e).split(" Fix: ")[0]
        raise NonFiniteError(f"{what} Nothing was saved. Fix: lower --lr"
                             + (", or drop --bf16" if args.bf16 else "") + " (the teacher's weights and outputs "
                             "are checked too: a NaN at step 1 means MODEL itself is broken)") from None
    new.eval()
    heal = {"stage": stage, "trainable": args.trainable or trainable, "tokens": res.tokens, "steps": res.steps,
            "data": heal_text.name, "data_sha256": heal_text.sha256, "first_loss": res.losses[0],
            "last_loss": res.losses[-1], "seconds": round(res.seconds, 1)}
    say(f"healed on {res.tokens} tokens of {heal_text.name} ({stage}, trainable={heal['trainable']}): loss "
        f"{res.losses[0]:.4f} -> {res.losses[-1]:.4f} in {res.seconds:.1f} s")
    return heal


def run_convert(args) -> int:
    """`hfa convert`: load, convert, optionally heal and evaluate, then save atomically."""
    if args.help_options:
        print(format_options(args.method))
        return 0
    settings, options, accepted = _check_convert_flags(args)
    from .conversions.io import is_main_process

    main = is_main_process()        # under torchrun / accelerate launch only the main process writes
    out = Path(args.out).expanduser()
    if main:
        _check_out(out, args.overwrite, args.model)
    calibration, heal_text, trainable_spec, eval_text = _read_inputs(args, accepted)

    say = (lambda msg: print(f"hfa convert: {msg}", flush=True)) if main else (lambda msg: None)
    model, tok, new = _load_and_convert(args, options, accepted, calibration, main, say)
    heal = _heal(args, new, model, tok, heal_text, trainable_spec, say) if args.heal_tokens else None
    if not main:                    # the others wait while the main process evaluates and writes
        _barrier()
        return 0
    reports = None
    if args.eval:  # before saving: a failure here leaves nothing written
        from .eval.report import evaluate_models, format_table
        label = _label(args.model, args.method, settings, heal["tokens"] if heal else None)
        reports = evaluate_models([(args.model, model, tok), (label, new, tok)], eval_text,
                                  context_length=args.context or 512, max_tokens=args.eval_tokens or 8192,
                                  speed_contexts=(), progress=not args.quiet)
        print(format_table(reports), flush=True)

    import hf_efficient_attn as hfa
    from .eval.report import to_markdown
    saved = hfa.save(new, out, tokenizer=tok, overwrite=args.overwrite,
                     eval_table=None if reports is None else to_markdown(reports))   # into the model card
    say(f"saved {saved} (load it with hf_efficient_attn.load({str(saved)!r}))")
    if reports is not None:
        from .eval.report import write_report
        record = {"command": "hfa convert", "model": args.model, "method": args.method,
                  "options": {k: v for k, v in options.items() if k not in ("calibration", "tokenizer")},
                  "calibration": None if calibration is None else {"data": calibration.name,
                                                                  "sha256": calibration.sha256},
                  "heal": heal, "checkpoint": str(saved)}
        files = write_report(reports, saved, extra={"convert": record}, plots=False)
        say(f"wrote {files['json']}, {files['markdown']}")
    _barrier()
    return 0


def _add_convert(sub):
    p = sub.add_parser(
        "convert", help="convert MODEL's attention (e.g. --method gqa or mla), optionally heal and evaluate it, "
                        "and save the checkpoint",
        description="Convert MODEL with a registered conversion, optionally heal it by distillation from MODEL and "
                    "compare both on held-out text, then save the checkpoint atomically to --out. Options of the "
                    "conversion go in --set KEY=VALUE; `hfa convert --method NAME --help-options` lists them.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="Hub id, local path, or bundled name (smollm2-135m, gemma3-270m)")
    p.add_argument("--method", default=None, help="the conversion (see --help-options), e.g. gqa, mla")
    p.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="an option of the conversion, typed by its signature (repeatable), e.g. --set num_kv_heads=1")
    p.add_argument("--help-options", action="store_true",
                   help="list the options of --method (or of every conversion) with types and defaults, and exit")
    p.add_argument("--out", default=None, metavar="DIR", help="checkpoint folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, only once the new checkpoint is complete")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype to load MODEL in")
    p.add_argument("--device", default="auto",
                   help="where MODEL loads, converts and heals: auto (cuda when available, else cpu), cpu, cuda, cuda:N (default auto)")
    g = p.add_argument_group("calibration (for conversions that take calibration text)")
    g.add_argument("--calibration", default=None, metavar="DATA",
                   help="text file, folder, 'python-docs' or 'datasets:NAME[:CONFIG]' (default: the calibration "
                        "split of the bundled corpus)")
    g.add_argument("--no-calibration", action="store_true", help="pass no calibration text (e.g. mla method=weights)")
    g.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens to read (the conversion's calibration_tokens; default: its own)")
    g = p.add_argument_group("healing by distillation from MODEL (hfa.distill)")
    g.add_argument("--heal-tokens", type=int, default=None, metavar="N", help="training tokens (default: no healing)")
    g.add_argument("--heal-data", default=None, metavar="DATA", help="training text (default: the train split of the "
                                                                     "bundled corpus)")
    g.add_argument("--stage", default=None, help="distillation stage (default logits)")
    g.add_argument("--trainable", default=None,
                   help="what trains: kv, attention, all, lora, or MODULE:FUNCTION, a selector (name, param) -> "
                        "bool (default: the selector registered under the method's name, else kv)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per training block (default 512)")
    g.add_argument("--batch-size", type=int, default=None, help="blocks per step (default 4)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by --trainable)")
    g.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    g = p.add_argument_group("before/after report (perplexity and KV bytes/token, same tokens and protocol)")
    g.add_argument("--eval", action="store_true",
                   help="evaluate MODEL and the converted model; prints the table and writes report.json and "
                        "report.md into --out beside the checkpoint")
    g.add_argument("--eval-data", default=None, metavar="DATA",
                   help="held-out text (default: the eval split of the bundled corpus)")
    g.add_argument("--eval-tokens", type=int, default=None, metavar="N", help="tokens to score (default 8192)")
    g.add_argument("--context", type=int, default=None, metavar="N", help="tokens per window (default 512)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfa", description="Efficient attention for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_patch_check(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_convert(sub)
    return parser


def main(argv=None) -> int:
    """Run the ``hfa`` command. Our own errors (an `HFAError`, or an error this package raises on purpose with a
    message for the user) print as one line, exit status 2; anything else is a bug and keeps its traceback.
    Ctrl-C exits 130 with one line (a checkpoint is written atomically, so nothing is left half-written)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nhfa {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"hfa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
