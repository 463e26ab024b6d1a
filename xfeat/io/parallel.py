"""Run a function over chunks of work items in worker processes, results in order as they finish."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from joblib import delayed

from xfeat.io.processes import tied_parallel, workers_ignore_ctrl_c

T = TypeVar("T")
R = TypeVar("R")


def resolve_jobs(jobs: int | None) -> int:
    """``None`` or 0 means one worker per CPU core; negative counts are refused."""
    if jobs is None or jobs == 0:
        return os.cpu_count() or 1
    if jobs < 0:
        raise ValueError(f"jobs must be positive, got {jobs}")
    return jobs


def map_chunks(func: Callable[[Sequence[T]], R], items: Sequence[T], *, jobs: int | None = None,
               chunk_size: int | None = None) -> Iterator[tuple[Sequence[T], R]]:
    """Yield ``(chunk, func(chunk))`` for consecutive chunks of ``items``, in order.

    Chunks amortise the cost of sending results between processes (a histogram is 512 KiB); a few
    chunks per worker keep both cores busy to the end. One job runs in this process, with no pool.
    """
    jobs = resolve_jobs(jobs)
    if chunk_size is None:
        chunk_size = max(1, min(32, math.ceil(len(items) / (4 * jobs))))
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    if jobs == 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield chunk, func(chunk)
        return
    # Workers die with this process and ignore Ctrl-C (see xfeat.io.processes), also while they start
    # (xfeat.io.processes): the call starts them and dispatches the first chunks, then returns.
    with workers_ignore_ctrl_c():
        results = tied_parallel(n_jobs=min(jobs, len(chunks)), return_as="generator")(
            delayed(func)(c) for c in chunks)
    try:
        yield from zip(chunks, results)
    finally:  # a caller that stops early (at the first bad file) cancels the rest, without joblib's remark on it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*You could benefit from adjusting the input task iterator")
            results.close()
