"""Evaluation on a Dask cluster: ``xfeat evaluate ... --scheduler tcp://HOST:PORT`` (or a scheduler file).

``dask_executor`` hands ``xfeat.learn.evaluation.evaluate`` a ``concurrent.futures.Executor`` backed by the
cluster, so the evaluation itself knows nothing of Dask. Each (backbone, method, classifier) configuration is
one task; workers read the cache from its absolute path (a shared filesystem) and run each configuration
single-threaded, so the results equal a local run bitwise.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

from xfeat.errors import XfeatError


@contextmanager
def dask_executor(scheduler: str) -> Iterator[Executor]:
    """An executor on the Dask cluster at ``scheduler`` (``tcp://HOST:PORT`` or a scheduler file), closed on exit.

    xfeat must be installed where the workers run; a worker that cannot import it is a one-line error.
    """
    try:
        from distributed import Client
    except ImportError:
        raise XfeatError('--scheduler needs Dask: pip install "xfeat[dask]"') from None
    try:
        client = (Client(scheduler_file=scheduler, set_as_default=False) if os.path.isfile(scheduler)
                  else Client(scheduler, set_as_default=False))
    except (OSError, TimeoutError, ValueError) as e:
        problem = f"cannot reach the Dask scheduler at {scheduler}: {e}"
    else:
        problem = None
    if problem:
        # The half-built Client lives on in the caught exception's frames; left to the interpreter's exit, its
        # __del__ waits 60 s for a stopped event loop and prints a second traceback. Free it now instead.
        gc.collect()
        raise XfeatError(problem)
    with client:
        try:
            yield client.get_executor(pure=False)
        except ModuleNotFoundError as e:
            raise XfeatError(f"a Dask worker cannot import {e.name}: install xfeat where the workers run") from None
