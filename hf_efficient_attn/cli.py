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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfa", description="Efficient attention for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_patch_check(sub)
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
