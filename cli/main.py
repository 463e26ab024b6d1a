"""The ``xfeat`` command: subcommands, one-line errors, exit statuses (0 ok, 1 error, 2 usage, 130 Ctrl-C)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from xfeat import __version__
from xfeat.errors import XfeatError, XfeatWarning
from xfeat_cli import convert, evaluate, extract, info, predict, synth, train

COMMANDS = (synth, convert, extract, info, evaluate, train, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xfeat", description="Visual quality control with pretrained CNN features.")
    parser.add_argument("--version", action="version", version=f"xfeat {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"xfeat: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", XfeatWarning)
        warnings.showwarning = _show_warning
        try:
            return args.run(args) or 0
        except XfeatError as e:
            print(f"xfeat: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("xfeat: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
