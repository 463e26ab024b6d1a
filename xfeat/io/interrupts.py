"""Ctrl-C and worker processes: one line from the command, not a traceback from every worker.

A terminal sends SIGINT to the whole process group, so worker processes get it too. A worker's initialiser
can ignore it (``xfeat.io.processes.init_worker``), but it runs only once the worker has started: a spawned
worker spends its first seconds importing Python, numpy and torch, and a Ctrl-C then prints a
``KeyboardInterrupt`` traceback from each worker (measured: several seconds on 2 busy cores). The one thing a
spawned child inherits from its parent across ``exec`` is an *ignored* signal (not a Python handler, not a
blocked mask: the child starts with none), and Python keeps an inherited SIG_IGN for SIGINT. So the parent
ignores SIGINT for the moment it creates workers (milliseconds; about 50 ms for two loky workers); the workers
never see Ctrl-C, the parent alone handles it and stops them.

The price: a Ctrl-C in those milliseconds may be lost (press it again). SIGINT is blocked in the calling thread
meanwhile, so it waits for the end of the block, unless another thread of the process (BLAS, OpenCV pools)
takes it while it is ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def workers_ignore_ctrl_c() -> Iterator[None]:
    """Worker processes started inside this block ignore SIGINT for their whole life.

    Meanwhile SIGINT is blocked in this thread, so a Ctrl-C pressed while the workers are created is delivered
    when the block ends (a blocked signal stays pending even while its action is "ignore"), unless another
    thread takes it (see the module docstring). Keep the block to the creation of the workers: a Ctrl-C
    cannot interrupt it. Does nothing outside the main thread (signals belong to it) or where signals cannot
    be blocked (Windows, which has no process groups).
    """
    handler = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread() or handler is None
            or not hasattr(signal, "pthread_sigmask")):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)  # first the handler, then unblock: a pending Ctrl-C reaches it
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


__all__ = ["workers_ignore_ctrl_c"]
