"""Planning a synthetic data set: every image's bundle, label, anomaly and size, decided before drawing.

The real fuel-cell data set (Jensen, Moeslund, Andreasen) is not public; the plan copies the statistics
that matter to the pipeline: production bundles that differ in coating and imaging (leave-one-bundle-out
evaluation only makes sense if they do), uneven bundle sizes, and abnormal images spread unevenly over the
bundles, with some bundles having none.  The whole plan comes from ``default_rng(seed)`` in one process, so
it does not depend on how many workers render it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xfeat.errors import XfeatError
from xfeat.synth.anomalies import ANOMALY_TYPES

# The real images are W 1119-1219 x H 2053-2115 px; plan_dataset draws each image's size in this range.
SIZE_RANGE_H = (2053, 2115)
SIZE_RANGE_W = (1119, 1219)


@dataclass(frozen=True)
class BundleStyle:
    """How one production bundle looks: its coating mixture and method, and its imaging set-up.

    Sizes are in pixels of a reference ~2084 x 1169 image and are scaled to the image being drawn.
    """

    level: float = 2200.0  # mean transmitted intensity of the coated area
    noise: float = 20.0  # per-pixel detector noise (std) at ``level``
    grain: float = 15.0  # fine 2-px grain of the coating (std)
    texture_amp: float = 20.0  # low-frequency coating thickness variation (std, roughly)
    texture_cell: float = 80.0  # size of one texture "cloud" across the coating direction
    texture_aspect: float = 2.0  # clouds are stretched along the coating direction (image height)
    gradient: float = 0.02  # top-to-bottom intensity change as a fraction of ``level`` (heel effect)
    margin_frac: float = 0.025  # uncoated strip on the left and right, as a fraction of the width
    margin_offset: float = 500.0  # the uncoated substrate is this much brighter than the coating
    hole_level: float = 0.0  # plateau of the registration hole; 0 = this bundle has no hole
    hole_radius: float = 14.0  # radius of the registration hole
    hole_corner: int = 0  # 0..3: top-left, top-right, bottom-left, bottom-right


@dataclass(frozen=True)
class ImagePlan:
    """One image of a planned data set: where it goes and what is drawn in it."""

    index: int  # global image index, also the number in the file name; with the seed it seeds the RNG
    bundle: str
    label: str  # "normal" or "abnormal"
    anomaly: str  # "" for normal images
    height: int
    width: int
    path: str  # relative to the data set root, forward slashes


def _validate(bundles: int, images: int, abnormal_fraction: float, size: object, seed: int,
              jobs: int | None, anomalies: object = ANOMALY_TYPES) -> None:
    """Reject bad arguments with one-line messages before anything touches the disk."""
    def is_int(v: object) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(bundles) or bundles < 1:
        raise XfeatError(f"bundles must be an integer >= 1, got {bundles!r}")
    if not is_int(images) or images < bundles:
        raise XfeatError(f"images must be an integer >= bundles ({bundles}), got {images!r}")
    if (not isinstance(abnormal_fraction, numbers.Real) or isinstance(abnormal_fraction, bool)
            or not 0.0 <= abnormal_fraction <= 1.0):
        raise XfeatError(f"abnormal_fraction must be between 0 and 1, got {abnormal_fraction!r}")
    if size is not None:
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(is_int(v) and v >= 32 for v in size)):
            raise XfeatError(f"size must be (height, width) with both >= 32, got {size!r}")
    if not is_int(seed) or seed < 0:
        raise XfeatError(f"seed must be an integer >= 0, got {seed!r}")
    if jobs is not None and (not is_int(jobs) or jobs < 1):
        raise XfeatError(f"jobs must be an integer >= 1, got {jobs!r}")
    if not isinstance(anomalies, (list, tuple)) or not anomalies or any(a not in ANOMALY_TYPES for a in anomalies):
        raise XfeatError(f"anomalies must be a non-empty list of {', '.join(ANOMALY_TYPES)}, got {anomalies!r}")


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` that sum exactly to ``total``."""
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    short = total - int(counts.sum())
    # Stable sort so that ties resolve the same way on every platform.
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def _bundle_styles(rng: np.random.Generator, n: int) -> list[BundleStyle]:
    """Draw one style per bundle.

    Level and hole brightness are *stratified* (a shuffled even spread plus jitter) rather than independent
    draws, so the data set's darkest level and its bright tail - hence the global window the m2 conversion
    computes - barely depend on the seed.
    """
    levels = np.linspace(1860.0, 2450.0, n) if n > 1 else np.array([2200.0])
    levels = rng.permutation(levels) + rng.uniform(-15, 15, n)
    # About half of the bundles were imaged with the registration hole in the field of view.
    n_hole = max(1, int(round(n * rng.uniform(0.4, 0.6))))
    has_hole = np.zeros(n, dtype=bool)
    has_hole[rng.choice(n, n_hole, replace=False)] = True
    hole_levels = np.linspace(22000.0, 33000.0, n_hole) if n_hole > 1 else np.array([28000.0])
    hole_levels = rng.permutation(hole_levels)
    styles = []
    k = 0
    for b in range(n):
        hole = 0.0
        if has_hole[b]:
            hole, k = float(hole_levels[k]), k + 1
        styles.append(BundleStyle(
            level=float(levels[b]),
            noise=float(rng.uniform(14, 30)),
            grain=float(rng.uniform(8, 24)),
            texture_amp=float(rng.uniform(8, 32)),
            texture_cell=float(rng.uniform(25, 160)),
            texture_aspect=float(rng.uniform(1.0, 3.0)),
            gradient=float(rng.uniform(-0.03, 0.03)),
            margin_frac=float(rng.uniform(0.012, 0.035)),
            margin_offset=float(rng.uniform(350, 700)),
            hole_level=hole,
            hole_radius=float(rng.uniform(16, 21)),
            hole_corner=int(rng.integers(0, 4)),
        ))
    return styles


def _abnormal_counts(rng: np.random.Generator, sizes: np.ndarray, n_abnormal: int) -> np.ndarray:
    """How many abnormal images each bundle gets: concentrated in some bundles, none in 2-3 of them.

    Real defects come in runs (one bad mixture, one worn blade), so per-bundle rates vary a lot.
    """
    n = len(sizes)
    n_clean = int(rng.integers(2, 4)) if n >= 4 else 0
    clean = rng.permutation(n)[:n_clean]
    # Let clean bundles go if the others cannot hold all abnormal images (high abnormal_fraction).
    while n_clean and sizes.sum() - sizes[clean[:n_clean]].sum() < n_abnormal:
        n_clean -= 1
    weights = rng.lognormal(0.0, 0.9, n)
    weights[clean[:n_clean]] = 0.0
    # Weighted sampling of images without replacement (Efraimidis-Spirakis keys): bundle capacity is
    # respected automatically and heavier bundles get proportionally more of the abnormal images.
    bundle_of = np.repeat(np.arange(n), sizes)
    keys = rng.exponential(size=len(bundle_of))
    with np.errstate(divide="ignore"):
        keys = keys / weights[bundle_of]
    chosen = np.argsort(keys, kind="stable")[:n_abnormal]
    return np.bincount(bundle_of[chosen], minlength=n)


def plan_dataset(*, bundles: int = 12, images: int = 714, abnormal_fraction: float = 152 / 714,
                 size: tuple[int, int] | None = None, seed: int = 0,
                 anomalies: Sequence[str] = ANOMALY_TYPES) -> tuple[list[ImagePlan], dict[str, BundleStyle]]:
    """Decide everything about a data set without drawing it, so workers only render.

    ``anomalies``: the types abnormal images are drawn from (default all eleven), e.g. only the small ones
    (``SMALL_ANOMALIES``); everything else (bundles, labels, sizes) is planned as with all eleven. Returns the
    images in path order and the style of each bundle.
    """
    _validate(bundles, images, abnormal_fraction, size, seed, None, anomalies)
    allowed = np.isin(ANOMALY_TYPES, list(anomalies))
    rng = np.random.default_rng(seed)
    names = [f"B{b + 1:0{max(2, len(str(bundles)))}d}" for b in range(bundles)]
    styles = _bundle_styles(rng, bundles)
    # Uneven bundle sizes (the paper's range is roughly 35-90 for 12 bundles); every bundle gets >= 1.
    sizes = 1 + _largest_remainder(images - bundles, rng.uniform(0.55, 1.5, bundles))
    n_abnormal = int(round(images * abnormal_fraction))
    n_abn = _abnormal_counts(rng, sizes, n_abnormal)
    # The number in a file name is the image index that seeds its RNG (see render_electrode).
    digits = max(4, len(str(images - 1)))
    plans: list[ImagePlan] = []
    index = 0
    for b, name in enumerate(names):
        # Each bundle favours a few defect types, as a real production problem would.
        type_p = rng.dirichlet(np.full(len(ANOMALY_TYPES), 0.8))
        if not allowed.all():  # the same draws either way: only the abnormal images' types change
            type_p = np.where(allowed, type_p, 0.0) / type_p[allowed].sum()
        abnormal = np.zeros(sizes[b], dtype=bool)
        abnormal[rng.choice(sizes[b], n_abn[b], replace=False)] = True
        for is_abn in abnormal:
            if size is None:
                h = int(rng.integers(SIZE_RANGE_H[0], SIZE_RANGE_H[1] + 1))
                w = int(rng.integers(SIZE_RANGE_W[0], SIZE_RANGE_W[1] + 1))
            else:
                h, w = int(size[0]), int(size[1])
            anomaly = str(ANOMALY_TYPES[rng.choice(len(ANOMALY_TYPES), p=type_p)]) if is_abn else ""
            label = "abnormal" if is_abn else "normal"
            path = f"{name}/{label}/{name}_{index:0{digits}d}.tif"
            plans.append(ImagePlan(index, name, label, anomaly, h, w, path))
            index += 1
    plans.sort(key=lambda p: p.path)
    return plans, dict(zip(names, styles))
