"""Worker processes that die with the process that started them.

A killed parent (``kill -9``, SIGTERM, the OOM killer) does not take its children with it: decoding and joblib
workers would live on for minutes, holding their memory and the parent's stderr (a wrapper reading it to the
end hangs). Every worker therefore calls ``init_worker`` first:

- On Linux it asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks
  that the parent is still there (it may have died before the request). The signal is tied to the parent
  *thread* that created the worker, not to the parent process: a worker started from a thread that ends
  before the process would be killed with that thread. ``parent_tie`` therefore asks for it only when
  workers are started from the main thread (which lives as long as the process); other threads get the
  watchdog below.
- Elsewhere (and for workers started from other threads) a daemon thread in the worker checks every
  half second whether the parent is gone (the worker was re-parented) and ends the worker.

It also makes the worker ignore Ctrl-C: a terminal sends SIGINT to the whole process group, and the parent
alone should handle it (one message, then it stops its workers) instead of every worker printing a traceback.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from joblib import Parallel, parallel_config
from joblib.parallel import LokyBackend, get_active_backend

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_EVERY_S = 0.5
PARENT_GONE_EXIT = 1


def parent_tie() -> tuple[int, bool]:
    """Arguments for ``init_worker``, taken in the parent right before it starts workers: its pid, and whether
    the kernel's parent-death signal is safe (workers started from the main thread, see the module docstring)."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def init_worker(parent_pid: int, pdeathsig: bool = True) -> None:
    """First thing in a worker process: ignore Ctrl-C and die with the parent ``parent_pid``.

    Exits at once if the parent is already gone (killed while this worker was starting)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tie_to_parent(parent_pid, pdeathsig)


def tie_to_parent(parent_pid: int, pdeathsig: bool = True) -> None:
    """Make this process end when ``parent_pid`` (its parent) ends: the kernel's parent-death signal when
    ``pdeathsig`` and on Linux, otherwise a watchdog thread."""
    if not (pdeathsig and _set_parent_death_signal()):
        threading.Thread(target=_watch, args=(parent_pid,), name="xfeat-parent-watchdog", daemon=True).start()
    if _parent_gone(parent_pid):  # died before the signal was armed: nobody will send it now
        os._exit(PARENT_GONE_EXIT)


def tied_parallel(**kwargs: Any) -> Parallel:
    """``joblib.Parallel(**kwargs)`` whose loky worker processes run ``init_worker``.

    Loky's reusable workers otherwise stay up to 300 s idle after the work, and forever blocked on a dead
    parent's queue. Any other active backend (a ``parallel_config`` of the caller's: threads, Dask) is left
    alone, and so is a joblib older than 1.5, which cannot pass an initializer to loky."""
    backend, _ = get_active_backend()
    if kwargs.get("backend") is None and isinstance(backend, LokyBackend):
        try:
            config = parallel_config(backend="loky", initializer=init_worker, initargs=parent_tie())
        except TypeError:  # joblib < 1.5
            return Parallel(**kwargs)
        with config:  # read once, by the constructor: the config does not stay active while results stream
            return Parallel(**kwargs)
    return Parallel(**kwargs)


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):  # no libc symbols to call (a static build): use the watchdog
        return False


def _parent_gone(parent_pid: int) -> bool:
    if os.name == "nt":  # a Windows child keeps its dead parent's pid; multiprocessing workers can ask
        parent = multiprocessing.parent_process()
        return parent is not None and parent.pid == parent_pid and not parent.is_alive()
    return os.getppid() != parent_pid  # POSIX: an orphan is re-parented (to init or a subreaper)


def _watch(parent_pid: int) -> None:
    while not _parent_gone(parent_pid):
        time.sleep(WATCH_EVERY_S)
    os._exit(PARENT_GONE_EXIT)  # no cleanup: the work belongs to the parent, and it is gone


# Ctrl-C and worker processes: one line from the command, not a traceback from every worker.
#
# A terminal sends SIGINT to the whole process group, so worker processes get it too. A worker's initialiser
# can ignore it (``xfeat.io.processes.init_worker``), but it runs only once the worker has started: a spawned
# worker spends its first seconds importing Python, numpy and torch, and a Ctrl-C then prints a
# ``KeyboardInterrupt`` traceback from each worker (measured: several seconds on 2 busy cores). The one thing a
# spawned child inherits from its parent across ``exec`` is an *ignored* signal (not a Python handler, not a
# blocked mask: the child starts with none), and Python keeps an inherited SIG_IGN for SIGINT. So the parent
# ignores SIGINT for the moment it creates workers (milliseconds; about 50 ms for two loky workers); the workers
# never see Ctrl-C, the parent alone handles it and stops them.
#
# The price: a Ctrl-C in those milliseconds may be lost (press it again). SIGINT is blocked in the calling thread
# meanwhile, so it waits for the end of the block, unless another thread of the process (BLAS, OpenCV pools)
# takes it while it is ignored.

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
