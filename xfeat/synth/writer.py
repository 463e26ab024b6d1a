"""Writing a synthetic data set: 16-bit TIFFs rendered in worker processes, then the manifest.

Each image is rendered from ``SeedSequence([seed, index])``, so the files are byte-identical whatever the
number of workers.  Every file is written atomically: a killed run never leaves a truncated image.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from xfeat.errors import XfeatError
from xfeat.io.atomic import atomic_write
from xfeat.io.processes import init_worker, parent_tie, workers_ignore_ctrl_c
from xfeat.synth.anomalies import ANOMALY_TYPES
from xfeat.synth.electrode import render_electrode
from xfeat.synth.plan import BundleStyle, ImagePlan, _validate, plan_dataset

MANIFEST_HEADER = ("path", "bundle", "label", "anomaly")


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`make_dataset` wrote, for the CLI's one-line summary and for tests."""

    root: Path
    n_images: int
    n_abnormal: int
    bundles: tuple[str, ...]
    manifest: Path


def _write_tiff(path: Path, image: np.ndarray) -> None:
    """Write atomically: a killed run never leaves a truncated ``.tif`` under the final name."""
    with atomic_write(path, "wb") as fh:
        # No metadata: nothing time-dependent, and a plain TIFF any reader (MATLAB, ImageJ) opens.
        tifffile.imwrite(fh, image, photometric="minisblack", metadata=None)


def _render_chunk(root: str, seed: int, items: list[tuple[ImagePlan, BundleStyle]]) -> int:
    """Worker: render and write a few images; returns how many were written."""
    for plan, style in items:
        image = render_electrode((seed, plan.index), plan.height, plan.width, style, plan.anomaly or None)
        _write_tiff(Path(root) / plan.path, image)
    return len(items)


def _init_worker(tie: tuple[int, bool]) -> None:
    init_worker(*tie)  # die with the parent, leave Ctrl-C to it
    # One process per core already: stop OpenCV from also spawning a thread per core in each of them.
    cv2.setNumThreads(1)


def _check_output_folder(out: Path) -> None:
    """Never write into a folder with someone's data in it."""
    if out.exists():
        if not out.is_dir():
            raise XfeatError(f"{out}: exists and is not a folder; choose a new folder")
        if any(out.iterdir()):
            raise XfeatError(f"{out}: output folder is not empty; choose a new folder")


def _write_manifest(root: Path, plans: list[ImagePlan]) -> Path:
    manifest = root / "manifest.csv"
    with atomic_write(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        for p in plans:
            writer.writerow((p.path, p.bundle, p.label, p.anomaly))
    return manifest


def make_dataset(out: str | os.PathLike, *, bundles: int = 12, images: int = 714,
                 abnormal_fraction: float = 152 / 714, size: tuple[int, int] | None = None,
                 seed: int = 0, jobs: int | None = None, anomalies: Sequence[str] = ANOMALY_TYPES,
                 progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Write a synthetic data set shaped like the fuel-cell paper's, for demos and tests.

    Layout: ``OUT/<bundle>/<normal|abnormal>/<bundle>_<NNNN>.tif`` (16-bit grayscale TIFF; NNNN is the
    image's index over the whole data set, from 0, and ``render_electrode((seed, NNNN), ...)`` redraws it) plus
    ``OUT/manifest.csv`` (``path,bundle,label,anomaly``).  ``out`` must be new or empty.  ``size=None``
    draws each image's size in the real data's range; ``size=(H, W)`` fixes it (small images for tests).
    ``anomalies`` limits the defect types drawn (default: all eleven).
    Same arguments give byte-identical files whatever ``jobs`` is.  ``progress(n)`` is called in this
    process with the number of images just written.
    """
    _validate(bundles, images, abnormal_fraction, size, seed, jobs, anomalies)
    root = Path(out)
    _check_output_folder(root)
    plans, styles = plan_dataset(bundles=bundles, images=images, abnormal_fraction=abnormal_fraction,
                                 size=size, seed=seed, anomalies=anomalies)
    root.mkdir(parents=True, exist_ok=True)
    for folder in sorted({p.path.rsplit("/", 1)[0] for p in plans}):
        (root / folder).mkdir(parents=True, exist_ok=True)

    items = [(p, styles[p.bundle]) for p in plans]
    jobs = min(jobs or os.cpu_count() or 1, len(items))
    if jobs == 1:
        for item in items:
            _render_chunk(str(root), seed, [item])
            if progress:
                progress(1)
    else:
        # Small chunks keep the progress bar smooth and the workers evenly loaded.
        step = max(1, min(8, len(items) // (jobs * 8)))
        chunks = [items[i:i + step] for i in range(0, len(items), step)]
        # "spawn" is safe even if the caller has threads (torch, a GUI) and behaves the same on every OS.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(parent_tie(),)) as pool:
            try:
                with workers_ignore_ctrl_c():  # submitting starts the workers: Ctrl-C is for this process alone
                    futures = [pool.submit(_render_chunk, str(root), seed, c) for c in chunks]
                for fut in as_completed(futures):
                    done = fut.result()
                    if progress:
                        progress(done)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    manifest = _write_manifest(root, plans)
    return SynthSummary(root=root, n_images=len(plans), n_abnormal=sum(p.label == "abnormal" for p in plans),
                        bundles=tuple(styles), manifest=manifest)
