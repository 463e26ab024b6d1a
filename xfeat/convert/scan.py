"""One pass over a dataset: the pixel histogram for the global statistics, and each file's identity.

Reading every image once gives what the conversions need (the summed 65,536-bin histogram, in constant
memory) and what caches and leak checks need (the SHA-256 of every file), in worker processes. A pass that
does not decode still reads each header: the pixel limit and the one-depth rule hold for every method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from xfeat.io.dataset import Dataset, ImageRecord, Skipped
from xfeat.errors import DataError
from xfeat.io.hashing import file_sha256
from xfeat.io.images import MAX_PIXELS, load_image, read_header
from xfeat.io.parallel import map_chunks
from xfeat.convert.stats import N_LEVELS, WindowStats, pixel_histogram, window_stats


@dataclass(frozen=True)
class ScannedImage:
    """What one pass learns of an image: identity, size and depth, or why it could not be read."""

    sha256: str = ""
    height: int = 0
    width: int = 0
    bit_depth: int = 0
    problem: str = ""


@dataclass(frozen=True)
class Scan:
    """A dataset's pixel histogram (readable images only) and what was learnt of each image."""

    records: tuple[ImageRecord, ...]  # the images that were read
    images: tuple[ScannedImage, ...]
    histogram: np.ndarray
    bit_depth: int
    skipped: tuple[Skipped, ...]

    def window_stats(self, *, low: float = 0.01, high: float = 99.99, round_to: int | None = 100) -> WindowStats:
        if not self.histogram.any():
            raise ValueError("a scan made with decode=False has no pixel histogram")
        return window_stats(self.histogram, n_images=len(self.records), bit_depth=self.bit_depth, low=low,
                            high=high, round_to=round_to)


def _hash_chunk(paths: Sequence[Path], *, hashes: bool = True, max_pixels: int = MAX_PIXELS
                ) -> tuple[np.ndarray, list[ScannedImage]]:
    scanned = []
    for path in paths:
        try:
            header = read_header(path, max_pixels=max_pixels)
            height, width, depth = header.height, header.width, header.bit_depth
            if not depth:  # a colour-typed file: only decoding tells gray (kept, at its depth) from colour (refused)
                pixels = load_image(path, max_pixels=max_pixels).pixels
                (height, width), depth = pixels.shape, pixels.dtype.itemsize * 8
            scanned.append(ScannedImage(file_sha256(path) if hashes else "", height, width, depth))
        except DataError as e:
            scanned.append(ScannedImage(problem=e.problem))
        except OSError as e:
            scanned.append(ScannedImage(problem=f"cannot read file ({e.strerror or e})"))
    return np.zeros(N_LEVELS, dtype=np.int64), scanned


def _scan_chunk(paths: Sequence[Path], *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, list[ScannedImage]]:
    hist = np.zeros(N_LEVELS, dtype=np.int64)
    scanned = []
    for path in paths:
        try:
            image = load_image(path, max_pixels=max_pixels)
        except DataError as e:
            scanned.append(ScannedImage(problem=e.problem))
            continue
        hist += pixel_histogram(image.pixels)
        h, w = image.pixels.shape
        scanned.append(ScannedImage(image.sha256, h, w, image.pixels.dtype.itemsize * 8))
    return hist, scanned


def scan_dataset(dataset: Dataset, *, jobs: int | None = None, skip_bad: bool = False, decode: bool = True,
                 hashes: bool = True, max_pixels: int = MAX_PIXELS,
                 progress: Callable[[int], None] | None = None) -> Scan:
    """Read every image once; raise on the first bad file unless ``skip_bad``.

    ``decode=False`` only hashes the files and reads their headers (sizes and depth, no histogram): enough to
    know what a cache already holds and to refuse mixed depths, at the cost of reading the bytes, not decoding
    them; with ``hashes=False`` too it reads the headers alone. Images declaring more than ``max_pixels``
    pixels are refused from their headers either way.
    """
    paths = [r.path for r in dataset.records]
    hist = np.zeros(N_LEVELS, dtype=np.int64)
    scanned: list[ScannedImage] = []
    chunk_func = partial(_scan_chunk, max_pixels=max_pixels) if decode else \
        partial(_hash_chunk, hashes=hashes, max_pixels=max_pixels)
    for chunk, (chunk_hist, chunk_scanned) in map_chunks(chunk_func, paths, jobs=jobs):
        for path, image in zip(chunk, chunk_scanned):
            if image.problem and not skip_bad:
                raise DataError(path, image.problem)
        hist += chunk_hist
        scanned.extend(chunk_scanned)
        if progress:
            progress(len(chunk))

    kept = [(r, s) for r, s in zip(dataset.records, scanned) if not s.problem]
    skipped = list(dataset.skipped) + [Skipped(str(r.path), s.problem) for r, s in zip(dataset.records, scanned)
                                       if s.problem]
    if not kept:
        raise DataError(dataset.source, "no readable images")
    depths = {s.bit_depth for _, s in kept}
    if len(depths) > 1:
        first = {s.bit_depth: r.path for r, s in reversed(kept)}
        raise DataError(dataset.source, f"mixes 8-bit and 16-bit images (e.g. {first[8]} and {first[16]}); "
                                        "convert them to one depth first")
    return Scan(records=tuple(r for r, _ in kept), images=tuple(s for _, s in kept), histogram=hist,
                bit_depth=depths.pop(), skipped=tuple(skipped))
