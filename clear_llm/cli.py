"""``clear-llm``: one command line for the offline bench, the threshold predictor and the real engine's model."""

from __future__ import annotations

import argparse
import sys

from clear_core.errors import ClearError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clear-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from clear_bench.cli import add_subcommands as add_bench

    add_bench(sub)
    try:
        from clear_predictor.cli import add_subcommands as add_predictor
    except ImportError as exc:  # the predictor extra (torch, transformers) is not installed
        missing = str(exc)
        p = sub.add_parser("predictor", help="threshold predictor (needs the 'predictor' extra)")
        p.set_defaults(func=lambda _args: sys.exit(f"clear-llm predictor needs the predictor extra: {missing}"))
    else:
        add_predictor(sub)
    from clear_llm.tiny_model import add_subcommands as add_engine

    add_engine(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed its one-line error (or the help)
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except ClearError as exc:  # typed errors name the bad value: print, don't trace back
        print(f"clear-llm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
