"""The ``xfeat`` command: subcommands, one-line errors, exit statuses (0 ok, 1 error, 2 usage, 130 Ctrl-C,
143 SIGTERM)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from xfeat import __version__
from xfeat.errors import XfeatError, XfeatWarning
from xfeat_cli import compact, convert, evaluate, extract, info, predict, synth, train

COMMANDS = (synth, convert, extract, info, compact, evaluate, train, predict)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler, a container stop) raised like Ctrl-C, so the paths that keep
    finished work on Ctrl-C (the cache commits its journal) run for it too."""


def _raise_terminated(signum, frame) -> None:
    if hasattr(signal, "SIGCHLD"):
        # Worker processes get the same SIGTERM (sent to the process group, or a container stop) and die, as
        # they should now; torch's DataLoader watches SIGCHLD and would raise a second error, with a traceback,
        # in the middle of the cleanup (the cache's commit). A Python handler that does nothing, not SIG_DFL:
        # a SIGCHLD already received but not yet handled would then be reported as "ignored due to race".
        signal.signal(signal.SIGCHLD, _child_ended)
    raise Terminated()


def _child_ended(signum, frame) -> None:
    pass


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM while a command runs; Python's default is to die at once, without cleaning up."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    child = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if child is not None:
            signal.signal(signal.SIGCHLD, child)


def _os_error_line(e: OSError) -> str:
    """``<file>: <reason>`` for an OSError the library did not turn into a message of its own."""
    reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename is not None else reason


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(), _sigterm_as_interrupt():
        warnings.simplefilter("always", XfeatWarning)
        warnings.showwarning = _show_warning
        try:
            return args.run(args) or 0
        except XfeatError as e:
            print(f"xfeat: error: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # stdout piped into a reader that stopped (xfeat info c.h5 | head): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
            return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
        except OSError as e:  # last resort: a file problem the library did not word (a folder it could not make)
            print(f"xfeat: error: {_os_error_line(e)}", file=sys.stderr)
            return 1
        except Terminated:
            print("xfeat: terminated", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print("xfeat: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
