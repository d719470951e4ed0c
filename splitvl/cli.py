"""The `splitvl` console script: parse, then call into the packages.

Each subcommand lives in its own module under splitvl/commands/ and exposes
`register(subparsers)`, which adds its parser and sets `func` to the handler. Handlers import
heavy packages (torch, transformers) lazily so `splitvl --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under splitvl.commands, in the order `--help` lists them.
COMMAND_MODULES = ("up", "make_tiny", "generate", "bench", "encode", "language")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitvl",
        description="Serve Qwen3-VL-MoE with the vision encoder disaggregated from the language model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"splitvl.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
