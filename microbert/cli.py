"""The `microbert` command: one sub-command per module in `microbert.commands`.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning an exit code. User mistakes are raised as
`MicroBertError` and printed as one `error:` message with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from microbert import __version__
from microbert.errors import MicroBertError

COMMAND_MODULES = ("configs", "predict", "eval", "data", "cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microbert",
        description="MicroBERT: pre-train small BERT masked-language models and serve fill-mask.",
    )
    parser.add_argument("--version", action="version", version=f"microbert {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"microbert.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"microbert.commands.{name}":
                continue  # a command that is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MicroBertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `microbert ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
