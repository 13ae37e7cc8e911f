"""``clear-llm``: one command line for the offline bench, the threshold predictor and the real engine's model."""

from __future__ import annotations

import argparse
import sys

from clear_core.cli_args import HelpFormatter, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clear-llm", description=__doc__, formatter_class=HelpFormatter)
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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its one-line error (or the help)
        return int(exc.code or 0)
    # A missing file, an unwritable --out or a value the command refuses: one line and exit 2.
    return run_command(parser.prog, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
