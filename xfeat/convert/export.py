"""Write converted 8-bit images to disk so a person sees what the network sees.

``write_converted`` mirrors the dataset's tree as PNGs; ``preview_panel`` puts every method side by side
for one image (the paper's Figure 4). Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written PNG under its final name.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from xfeat.convert.methods import METHODS, convert, to_rgb
from xfeat.io.dataset import Dataset, ImageRecord, Skipped, warn_leaks
from xfeat.errors import DataError, XfeatError
from xfeat.io.images import MAX_PIXELS, load_native
from xfeat.io.atomic import atomic_write, write_bytes
from xfeat.io.parallel import map_chunks
from xfeat.convert.scan import scan_dataset
from xfeat.convert.stats import WindowStats

PREVIEW_HEIGHT = 512
TITLE_HEIGHT = 32
GAP = 8


def output_path(out: str | os.PathLike[str], record: ImageRecord) -> Path:
    """Where a record's converted image goes: its path relative to the dataset root, as ``.png``."""
    return Path(out, record.relpath).with_suffix(".png")


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a gray or RGB ``uint8`` image as PNG, atomically (temporary name, then rename)."""
    bgr = image[:, :, ::-1] if image.ndim == 3 else image  # OpenCV stores colour as BGR
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise XfeatError(f"{path}: PNG encoding failed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, encoded.tobytes())


def _convert_chunk(work: Sequence[tuple[Path, Path, str, WindowStats | None]], *, max_pixels: int = MAX_PIXELS
                   ) -> list[tuple[str, str]]:
    results = []  # (sha256, problem) per image
    for source, target, method, stats in work:
        try:
            image = load_native(source, max_pixels=max_pixels)
            try:
                converted = convert(image.pixels, method, stats)
            except XfeatError as e:
                raise DataError(source, str(e)) from None
            write_png(target, converted)
            results.append((image.sha256, ""))
        except DataError as e:
            results.append(("", e.problem))
    return results


def write_converted(dataset: Dataset, method: str, out: str | os.PathLike[str], *, stats: WindowStats | None = None,
                    jobs: int | None = None, skip_bad: bool = False, max_pixels: int = MAX_PIXELS,
                    progress: Callable[[int], None] | None = None) -> list[Skipped]:
    """Convert every image with ``method`` and write it under ``out``, mirroring the input tree.

    Warns about identical files in two bundles. Returns the files skipped (with ``skip_bad``; otherwise
    the first bad file raises ``DataError``). Every header is read first, so a dataset mixing 8-bit and
    16-bit images, or an image over ``max_pixels``, stops the run before anything is written.
    """
    headers = scan_dataset(dataset, jobs=jobs, skip_bad=skip_bad, decode=False, hashes=False, max_pixels=max_pixels)
    refused = list(headers.skipped[len(dataset.skipped):])
    dataset = replace(dataset, records=headers.records)
    targets = [output_path(out, r) for r in dataset.records]
    if len(set(targets)) != len(targets):
        seen: dict[Path, ImageRecord] = {}
        for record, target in zip(dataset.records, targets):
            if target in seen:
                raise DataError(record.path, f"would overwrite the output of {seen[target].path} ({target})")
            seen[target] = record
    work = [(r.path, t, method, stats) for r, t in zip(dataset.records, targets)]
    skipped: list[Skipped] = refused
    hashes: list[str] = []
    for chunk, results in map_chunks(partial(_convert_chunk, max_pixels=max_pixels), work, jobs=jobs):
        for (source, *_), (sha256, problem) in zip(chunk, results):
            if problem and not skip_bad:
                raise DataError(source, problem)
            if problem:
                skipped.append(Skipped(str(source), problem))
            hashes.append(sha256)
        if progress:
            progress(len(chunk))
    converted = [(r, h) for r, h in zip(dataset.records, hashes) if h]
    warn_leaks([r for r, _ in converted], [h for _, h in converted])
    return skipped


def write_skipped_report(path: str | os.PathLike[str], skipped: Sequence[Skipped]) -> None:
    """A CSV ``path,problem`` of the files a run left out, so none is dropped silently."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "problem"])
        writer.writerows((s.path, s.problem) for s in skipped)


def preview_panel(image: np.ndarray, stats: WindowStats, methods: Sequence[str] = METHODS) -> np.ndarray:
    """Every method's output for one image side by side under its name, as one RGB ``uint8`` image."""
    tiles = []
    for method in methods:
        rgb = to_rgb(convert(image, method, stats))
        width = max(1, round(rgb.shape[1] * PREVIEW_HEIGHT / rgb.shape[0]))
        tile = cv2.resize(rgb, (width, PREVIEW_HEIGHT), interpolation=cv2.INTER_AREA)
        title = np.full((TITLE_HEIGHT, width, 3), 255, dtype=np.uint8)
        cv2.putText(title, method, (6, TITLE_HEIGHT - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
        tiles.append(np.vstack([title, tile]))
        tiles.append(np.full((PREVIEW_HEIGHT + TITLE_HEIGHT, GAP, 3), 255, dtype=np.uint8))
    return np.hstack(tiles[:-1])
