"""The `hfa` command. Each subcommand lives with the layer that does the work; this file only parses."""

from __future__ import annotations

import argparse
import sys


def _add_patch_check(sub):
    p = sub.add_parser("patch-check", help="run MODEL stock and patched on a fixed text; compare logits, greedy text, time")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="Hub id, local path, or bundled name (smollm2-135m, gemma3-270m, minilm-l6); default smollm2-135m")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--reference-impl", default="sdpa", help="stock implementation to compare with (sdpa or eager)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate and compare")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")

    def run(args):
        from .eval.patch_check import patch_check, print_patch_check
        res = patch_check(args.model, backend=args.backend, reference_impl=args.reference_impl,
                          new_tokens=args.new_tokens, dtype=args.dtype, json_path=args.json)
        print_patch_check(res)
        return 0 if res["ok"] else 1

    p.set_defaults(func=run)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 128,512,2048, got {text!r}")
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"context lengths must be positive, got {text!r}")
    return vals


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
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="tokens in the forward pass that measures the KV cache (default: --context)")
    p.add_argument("--speed-contexts", type=_int_list, default=(128, 512, 2048),
                   help="context lengths for decode speed, comma-separated (default 128,512,2048)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per speed measurement")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--out", default="hfa-eval", help="folder for report.json, report.md and plots (default hfa-eval)")
    p.add_argument("--no-plots", action="store_true", help="write no plots (plots need matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args):
        from .eval.report import evaluate_models, format_table, write_report
        reports = evaluate_models(args.models, args.data, context_length=args.context, stride=args.stride,
                                  max_tokens=args.max_tokens, batch_size=args.batch_size, kv_tokens=args.kv_tokens,
                                  speed_contexts=() if args.no_speed else args.speed_contexts,
                                  decode_tokens=args.decode_tokens, dtype=args.dtype, split=args.split,
                                  progress=not args.quiet)
        print(format_table(reports))
        files = write_report(reports, args.out, plots=not args.no_plots)
        print(f"wrote {files['json']}, {files['markdown']}" + "".join(f", {p}" for p in files["plots"]))
        return 0

    p.set_defaults(func=run)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job, offline: SmolLM2-135M patch check, every conversion, one "
                                    "perplexity / KV-cache / speed table on held-out text")
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens to evaluate (default 8192)")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--speed-contexts", type=_int_list, default=(128, 512),
                   help="context lengths for decode speed, comma-separated (default 128,512)")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens decoded per speed measurement")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared by the patch check")
    p.add_argument("--no-conversions", action="store_true", help="only the base model: patch check and baseline")
    p.add_argument("--out", default="hfa-demo", help="folder for report.json, report.md and plots (default hfa-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args):
        from .eval.report import run_demo
        res = run_demo(max_tokens=args.max_tokens, context_length=args.context, out_dir=args.out,
                       speed_contexts=args.speed_contexts, decode_tokens=args.decode_tokens,
                       patch_new_tokens=args.new_tokens, conversions=[] if args.no_conversions else None,
                       progress=not args.quiet)
        return 0 if res["ok"] else 1

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfa", description="Efficient attention for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_patch_check(sub)
    _add_eval(sub)
    _add_demo(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        # user-facing errors: one clear line, no traceback
        print(f"hfa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
