"""One pass over a dataset: the pixel histograms for the global statistics, and each file's identity.

Reading every image once gives what the conversions need (a 65,536-bin histogram per bundle, whose sum is the
dataset's, in memory that grows with the bundles, not the images) and what caches and leak checks need (the
SHA-256 of every file), in worker processes. Keeping one histogram per bundle costs 512 KiB a bundle and
tells what each leave-one-bundle-out fold's window would be without its held-out bundle (``convert.folds``).
A pass that does not decode still reads each header: the pixel limit, the one-depth rule and the one-kind rule
hold for every method. One kind: a dataset is gray or colour. A colour-typed file whose channels are equal
(gray saved as RGB) goes with either; true colour images beside gray-typed ones are one error, since a gray
image among colour photos (or a colour one among X-rays) is almost always a wrong file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from xfeat.io.dataset import Dataset, ImageRecord, Skipped
from xfeat.errors import DataError
from xfeat.io.hashing import FileSignature, hash_file
from xfeat.io.images import MAX_PIXELS, load_native, read_header
from xfeat.io.parallel import map_chunks
from xfeat.convert.folds import FoldWindows, fold_windows
from xfeat.convert.methods import gray_of
from xfeat.convert.stats import N_LEVELS, WindowStats, pixel_histogram, window_stats


@dataclass(frozen=True)
class ScannedImage:
    """What one pass learns of an image: identity, size and depth, or why it could not be read."""

    sha256: str = ""
    height: int = 0
    width: int = 0
    bit_depth: int = 0
    problem: str = ""
    kind: str = "gray"  # "gray" (a gray-typed file), "colour" (true colour), "gray-as-colour" (equal channels)
    signature: FileSignature | None = None  # the file's when it was hashed: a later read may reuse the hash


@dataclass(frozen=True)
class Scan:
    """A dataset's pixel histograms (readable images only) and what was learnt of each image."""

    records: tuple[ImageRecord, ...]  # the images that were read
    images: tuple[ScannedImage, ...]
    histogram: np.ndarray  # the sum of bundle_histograms
    bit_depth: int
    skipped: tuple[Skipped, ...]
    bundle_histograms: dict[str, np.ndarray] = field(default_factory=dict)  # bundle -> its images' histogram
    colour: bool = False  # true colour images: colour methods take their channels, gray ones their luminance

    def window_stats(self, *, low: float = 0.01, high: float = 99.99, round_to: int | None = 100) -> WindowStats:
        if not self.histogram.any():
            raise ValueError("a scan made with decode=False has no pixel histogram")
        return window_stats(self.histogram, n_images=len(self.records), bit_depth=self.bit_depth, low=low,
                            high=high, round_to=round_to)

    def images_per_bundle(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.bundle] = counts.get(record.bundle, 0) + 1
        return counts

    def fold_windows(self, global_window: WindowStats | None = None) -> FoldWindows:
        """Each bundle's fold window against ``global_window`` (default: ``self.window_stats()``)."""
        reference = self.window_stats() if global_window is None else global_window
        return fold_windows(self.bundle_histograms, reference, self.images_per_bundle())


def _hash_chunk(records: Sequence[ImageRecord], *, hashes: bool = True, max_pixels: int = MAX_PIXELS
                ) -> tuple[dict[str, np.ndarray], list[ScannedImage]]:
    scanned = []
    for path in (r.path for r in records):
        try:
            header = read_header(path, max_pixels=max_pixels)
            height, width, depth, kind = header.height, header.width, header.bit_depth, "gray"
            sha256, signature = "", None
            if header.channels > 1:  # a colour-typed file: only decoding tells gray saved as colour from colour
                image = load_native(path, max_pixels=max_pixels)
                height, width = image.pixels.shape[:2]
                depth, kind = image.pixels.dtype.itemsize * 8, _kind(image.pixels, header.channels)
                sha256, signature = image.sha256, image.signature  # read once: hashed while decoding
            elif hashes:
                sha256, signature = hash_file(path)
            scanned.append(ScannedImage(sha256 if hashes else "", height, width, depth, kind=kind,
                                        signature=signature if hashes else None))
        except DataError as e:
            scanned.append(ScannedImage(problem=e.problem))
        except OSError as e:
            scanned.append(ScannedImage(problem=f"cannot read file ({e.strerror or e})"))
    return {}, scanned


def _scan_chunk(records: Sequence[ImageRecord], *, max_pixels: int = MAX_PIXELS
                ) -> tuple[dict[str, np.ndarray], list[ScannedImage]]:
    """The chunk's histogram per bundle (a chunk of a sorted dataset spans one or two bundles)."""
    hists: dict[str, np.ndarray] = {}
    scanned = []
    for record in records:
        try:
            image = load_native(record.path, max_pixels=max_pixels)
        except DataError as e:
            scanned.append(ScannedImage(problem=e.problem))
            continue
        if record.bundle not in hists:
            hists[record.bundle] = np.zeros(N_LEVELS, dtype=np.int64)
        hists[record.bundle] += pixel_histogram(gray_of(image.pixels))  # what the gray methods window
        h, w = image.pixels.shape[:2]
        scanned.append(ScannedImage(image.sha256, h, w, image.pixels.dtype.itemsize * 8,
                                    kind=_kind(image.pixels, image.channels), signature=image.signature))
    return hists, scanned


def _kind(pixels: np.ndarray, channels: int) -> str:
    return "colour" if pixels.ndim == 3 else "gray-as-colour" if channels > 1 else "gray"


def scan_dataset(dataset: Dataset, *, jobs: int | None = None, skip_bad: bool = False, decode: bool = True,
                 hashes: bool = True, max_pixels: int = MAX_PIXELS,
                 progress: Callable[[int], None] | None = None) -> Scan:
    """Read every image once; raise on the first bad file unless ``skip_bad``.

    ``decode=False`` only hashes the files and reads their headers (sizes and depth, no histogram): enough to
    know what a cache already holds and to refuse mixed depths, at the cost of reading the bytes, not decoding
    them; with ``hashes=False`` too it reads the headers alone. Images declaring more than ``max_pixels``
    pixels are refused from their headers either way.

    A decoding scan keeps one histogram per bundle (``Scan.bundle_histograms``, in dataset order; bundles
    without a readable image are left out) and their sum (``Scan.histogram``).
    """
    bundle_hists: dict[str, np.ndarray] = {}
    scanned: list[ScannedImage] = []
    chunk_func = partial(_scan_chunk, max_pixels=max_pixels) if decode else \
        partial(_hash_chunk, hashes=hashes, max_pixels=max_pixels)
    for chunk, (chunk_hists, chunk_scanned) in map_chunks(chunk_func, dataset.records, jobs=jobs):
        for record, image in zip(chunk, chunk_scanned):
            if image.problem and not skip_bad:
                raise DataError(record.path, image.problem)
        for bundle, chunk_hist in chunk_hists.items():
            if bundle in bundle_hists:
                bundle_hists[bundle] += chunk_hist
            else:
                bundle_hists[bundle] = chunk_hist
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
    kinds = {s.kind: r.path for r, s in reversed(kept)}
    if "colour" in kinds and "gray" in kinds:
        raise DataError(dataset.source, f"mixes gray and colour images (e.g. {kinds['gray']} and {kinds['colour']}); "
                                        "a dataset is read as all gray or all colour: move the odd ones out")
    hist = np.zeros(N_LEVELS, dtype=np.int64)
    for bundle_hist in bundle_hists.values():
        hist += bundle_hist
    return Scan(records=tuple(r for r, _ in kept), images=tuple(s for _, s in kept), histogram=hist,
                bit_depth=depths.pop(), skipped=tuple(skipped), bundle_histograms=bundle_hists,
                colour="colour" in kinds)
