"""Decoding for extraction and prediction: each image read once, converted with every method the run needs,
resized to the network's input, in worker processes that never import torch.

The workers are loky processes (joblib's executor) that import numpy and OpenCV only: they start in a fraction
of a second, where a torch DataLoader worker took about 2.5 s on 2 cores. They die with this process and leave
Ctrl-C to it (``xfeat.io.processes``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np
from joblib.externals.loky import ProcessPoolExecutor

from xfeat.convert.methods import convert
from xfeat.convert.stats import WindowStats
from xfeat.errors import DataError, XfeatError
from xfeat.io.dataset import ImageRecord
from xfeat.io.hashing import FileSignature
from xfeat.io.images import MAX_PIXELS, load_native
from xfeat.io.processes import init_worker, parent_tie, workers_ignore_ctrl_c

AHEAD = 2  # batches per worker decoded ahead of the one inference is running on


@dataclass(frozen=True)
class Work:
    """One image to decode, and the methods to convert it with."""

    record: ImageRecord
    methods: tuple[str, ...]
    known: tuple[FileSignature, str] | None = None  # the scan's (signature, sha256): not hashed again if unchanged


def decode_work(item: Work, size: tuple[int, int], stats: WindowStats | None, *,
                max_pixels: int = MAX_PIXELS) -> dict:
    """One image as the network takes it: ``problem`` ("" when fine), ``sha256``, ``height``, ``width`` and
    ``pixels`` {method: [C, H, W] uint8}. A file that cannot be used is a ``problem``, not an exception."""
    try:
        image = load_native(item.record.path, max_pixels=max_pixels, known=item.known)
        pixels = {m: to_input(convert(image.pixels, m, stats), size) for m in item.methods}
    except XfeatError as e:
        return {"problem": e.problem if isinstance(e, DataError) else str(e)}
    h, w = image.pixels.shape[:2]
    return {"problem": "", "sha256": image.sha256, "height": h, "width": w, "pixels": pixels}


def to_input(converted: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (H, W) and lay out as [C, H, W] uint8 (C = 1 for gray methods, 3 for m4 and rgb)."""
    height, width = size
    resized = cv2.resize(converted, (width, height), interpolation=cv2.INTER_AREA)
    return resized[None] if resized.ndim == 2 else np.ascontiguousarray(resized.transpose(2, 0, 1))


def _decode_batch(batch: Sequence[tuple[int, Work]], size: tuple[int, int], stats: WindowStats | None,
                  max_pixels: int, in_worker: bool) -> list[dict]:
    if in_worker:
        cv2.setNumThreads(1)  # the cores belong to inference; one image is light
    return [{"index": i, **decode_work(item, size, stats, max_pixels=max_pixels)} for i, item in batch]


def image_batches(work: Sequence[Work], size: tuple[int, int], stats: WindowStats | None, per_batch: int,
                  workers: int | None = None, *, max_pixels: int = MAX_PIXELS) -> Iterator[list[dict]]:
    """Batches of ``per_batch`` decoded images, in order (dicts of ``decode_work`` plus ``index`` into
    ``work``), decoded ahead in ``workers`` processes (default: up to 2; 0 or 1 decode here) while the caller
    runs inference. At most ``AHEAD`` batches per worker are decoded and not yet taken, so memory stays bounded
    when inference is the slower side. An image declaring more than ``max_pixels`` pixels is a ``problem``,
    found from its header.

    A worker process that dies (killed, out of memory) ends the iteration with a one-line XfeatError; what
    the caller has committed stays committed."""
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    indexed = list(enumerate(work))
    batches = [indexed[i:i + per_batch] for i in range(0, len(indexed), per_batch)]
    in_process = workers <= 1 or len(batches) <= 1
    decode = partial(_decode_batch, size=size, stats=stats, max_pixels=max_pixels, in_worker=not in_process)
    if in_process:
        yield from map(decode, batches)
        return
    pending: deque[Future] = deque()
    with workers_ignore_ctrl_c():  # the workers start here: Ctrl-C is for this process alone
        # A pool of its own: loky's reusable one is joblib's, which expects its own settings on it.
        executor = ProcessPoolExecutor(max_workers=workers, initializer=init_worker, initargs=parent_tie())
    try:
        with workers_ignore_ctrl_c():
            pending.extend(executor.submit(decode, b) for b in batches[:AHEAD * workers])
        for following in [*batches[AHEAD * workers:], *[None] * len(pending)]:
            done = pending.popleft().result()
            if following is not None:
                pending.append(executor.submit(decode, following))
            yield done
    except BrokenProcessPool as e:  # loky's TerminatedWorkerError is one
        raise XfeatError(f"an image-decoding worker process died ({str(e).splitlines()[0]}); run the command "
                         "again to resume, or use --workers 0 to decode in this process") from e
    finally:  # a caller that stops early (a bad file, Ctrl-C) leaves nothing queued and no worker running
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, kill_workers=True)
