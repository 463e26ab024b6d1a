"""Errors and warnings that name the file and the problem in one line."""

from __future__ import annotations

from os import PathLike


class XfeatError(Exception):
    """Any problem xfeat reports to the user; the CLI prints it as one line and exits non-zero."""


class DataError(XfeatError):
    """A problem with one input file: its message is ``<file>: <problem>``."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # rebuild from (path, problem) when sent between processes
        return type(self), (self.path, self.problem)


class XfeatWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. a leak between bundles)."""
