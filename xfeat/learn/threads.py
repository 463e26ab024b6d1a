"""Numerical work that gives the same bits however it is spread over processes, threads and machines."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

_ONE_AT_A_TIME = threading.Lock()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run single-threaded: a sum split over 2 threads rounds differently than over 1, and results must not
    depend on ``jobs`` or on the executor (parallelism comes from running configurations side by side).

    The thread count is process-wide, so blocks in one process run one at a time: two threads of an executor
    (a Dask worker, a ThreadPoolExecutor) would otherwise reset each other's count.
    """
    with _ONE_AT_A_TIME:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(limits=1):
                yield
        finally:
            torch.set_num_threads(threads)
