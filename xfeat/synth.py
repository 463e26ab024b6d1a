"""Synthetic 16-bit electrode X-ray datasets for demos and tests.

The real fuel-cell data set (Jensen, Moeslund, Andreasen) is not public, so this module draws look-alikes
with the same *statistics that matter to the pipeline*:

- 16-bit grayscale images of ~2070 x 1145 px where most pixels lie between 1700 and 2800 (a coated
  electrode) and a sparse bright tail up to ~28,000 (a registration hole punched through the electrode,
  present in only some bundles and at a bundle-specific brightness).  That tail is what makes the paper's
  global window (m2) and per-image window (m3) give visibly different 8-bit images.
- Production *bundles* that differ in coating mixture and method: mean level, noise, texture amplitude and
  grain, slight gradient, margin width.  Leave-one-bundle-out evaluation only makes sense if bundles differ.
- Abnormal images spread unevenly over bundles (some bundles have none), eleven anomaly types with a random
  severity so that some defects sit near the noise level.

X-ray physics used throughout: the image is a transmission image, so *less* material (missing ink, a
scratch, a void) is *brighter* and *more* material (an agglomerate, a thick edge bead) is *darker*.

Everything is a pure function of its arguments: the whole data set is planned in the parent process from
``default_rng(seed)`` and each image is rendered from ``SeedSequence([seed, index])``, so the files are
byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import numbers
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from xfeat.errors import XfeatError

ANOMALY_TYPES: tuple[str, ...] = (
    "scratch",
    "line",
    "edge_cut",
    "edge_tension",
    "smudge",
    "edge_ink_flow",
    "bubble",
    "missing_ink",
    "agglomerate",
    "ink_fluctuation",
    "ink_entry_exit",
)
"""The anomaly types :func:`render_electrode` can draw: the paper's eleven."""

# The real images are W 1119-1219 x H 2053-2115 px; sizes in this module are given for a reference image
# of this size and scaled to the actual one, so that small test images still show every feature.
SIZE_RANGE_H = (2053, 2115)
SIZE_RANGE_W = (1119, 1219)
_REF_H, _REF_W = 2084, 1169

MANIFEST_HEADER = ("path", "bundle", "label", "anomaly")


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


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`make_dataset` wrote, for the CLI's one-line summary and for tests."""

    root: Path
    n_images: int
    n_abnormal: int
    bundles: tuple[str, ...]
    manifest: Path


# ----------------------------------------------------------------------------------------------------
# Planning (parent process)
# ----------------------------------------------------------------------------------------------------


def _validate(bundles: int, images: int, abnormal_fraction: float, size: object, seed: int,
              jobs: int | None) -> None:
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
                 size: tuple[int, int] | None = None,
                 seed: int = 0) -> tuple[list[ImagePlan], dict[str, BundleStyle]]:
    """Decide everything about a data set without drawing it, so workers only render.

    Returns the images in path order and the style of each bundle.
    """
    _validate(bundles, images, abnormal_fraction, size, seed, None)
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


# ----------------------------------------------------------------------------------------------------
# Rendering (pure functions, run in workers)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """What anomaly painters need to know about the background they draw on."""

    h: int
    w: int
    scale: float  # image size relative to the reference size
    x0: int  # first coated column
    x1: int  # one past the last coated column
    level: float  # this image's coating level
    margin_level: float  # this image's uncoated-substrate level
    noise: float  # pixel-level background std (detector noise and grain): the unit of anomaly contrast

    def contrast(self, severity: float) -> float:
        """Defect contrast in counts: from near the noise level (severity 0) to obvious (severity 1)."""
        return self.noise * (1.2 + 10.0 * severity)


def _px(full: float, scale: float, minimum: float) -> float:
    """A reference-size length scaled to this image, but never below what stays visible."""
    return max(minimum, full * scale)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell_h: float, cell_w: float) -> np.ndarray:
    """Unit-variance-ish smooth random field: a small random grid upsampled with bicubic interpolation."""
    gh = max(2, math.ceil(h / max(cell_h, 2.0)) + 1)
    gw = max(2, math.ceil(w / max(cell_w, 2.0)) + 1)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, h: int, w: int,
                style: BundleStyle) -> tuple[np.ndarray, np.ndarray, _Geometry]:
    """The normal electrode: mean signal (float32) and the noise field to add after the anomalies.

    All random numbers of the background are drawn here, before any anomaly, so that an image rendered with
    and without an anomaly shares the same background exactly.
    """
    scale = math.sqrt(h * w / (_REF_H * _REF_W))
    level = style.level * (1.0 + 0.012 * float(rng.standard_normal()))
    tex_amp = style.texture_amp * float(rng.uniform(0.85, 1.15))
    # Two octaves of smooth "clouds" (coating thickness), stretched along the coating direction.
    cell = _px(style.texture_cell, scale, 4.0)
    signal = _smooth_field(rng, h, w, cell * style.texture_aspect, cell)
    fine = _smooth_field(rng, h, w, cell * style.texture_aspect / 3.5, cell / 3.5)
    signal += fine * 0.6
    signal *= tex_amp * 0.85  # the two octaves together have a std of about 1.2
    signal += level
    # Heel effect: a slight ramp along the image height.
    grad = style.gradient * level * float(rng.uniform(0.7, 1.3))
    signal += np.linspace(-grad / 2, grad / 2, h, dtype=np.float32)[:, None]

    # Uncoated substrate strips on both sides, with a soft 1-2 px coating edge.
    margin = max(2, int(round(style.margin_frac * w * float(rng.uniform(0.85, 1.15)))))
    x0, x1 = margin, w - margin
    margin_level = level + style.margin_offset
    edge = min(margin, max(1, int(round(2 * scale))) + 1)
    for lo, hi, flip in ((0, x0 + edge, False), (x1 - edge, w, True)):
        cols = np.arange(lo, hi, dtype=np.float32) + 0.5
        dist = (x0 - cols) if not flip else (cols - x1)  # > 0 inside the margin
        alpha = np.clip(0.5 + dist / (2 * edge), 0.0, 1.0)[None, :]
        roi = signal[:, lo:hi]
        # The substrate keeps a little of the texture (it is a sheet too), scaled down.
        roi += alpha * (margin_level - level - 0.7 * (roi - level))

    if style.hole_level > 0:
        _draw_hole(rng, signal, style, scale, margin)

    # Detector noise plus the coating's fine grain (noise at half resolution, upsampled: ~2 px grains).
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= style.noise * float(rng.uniform(0.9, 1.1))
    grain = rng.standard_normal(((h + 1) // 2, (w + 1) // 2), dtype=np.float32)
    noise += cv2.resize(grain, (w, h), interpolation=cv2.INTER_LINEAR) * (style.grain * 1.5)
    total_noise = math.sqrt(style.noise ** 2 + style.grain ** 2)
    geom = _Geometry(h, w, scale, x0, x1, level, margin_level, total_noise)
    return signal, noise, geom


def _draw_hole(rng: np.random.Generator, signal: np.ndarray, style: BundleStyle, scale: float,
               margin: int) -> None:
    """A registration hole punched through the electrode: nearly free-beam intensity, the bright tail."""
    h, w = signal.shape
    r = _px(style.hole_radius, scale, 1.5)
    corner = style.hole_corner
    cx = margin / 2 + r * 0.5 + float(rng.uniform(-1, 1)) * scale * 3
    cy = 0.04 * h + float(rng.uniform(-1, 1)) * scale * 3
    cx = w - cx if corner in (1, 3) else cx
    cy = h - cy if corner in (2, 3) else cy
    plateau = style.hole_level * float(rng.uniform(0.97, 1.03))
    pad = int(math.ceil(r + 3))
    ys, xs = max(0, int(cy) - pad), max(0, int(cx) - pad)
    ye, xe = min(h, int(cy) + pad + 1), min(w, int(cx) + pad + 1)
    yy, xx = np.mgrid[ys:ye, xs:xe].astype(np.float32)
    dist = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)
    alpha = np.clip(r - dist + 0.5, 0.0, 1.0)  # anti-aliased disc edge
    roi = signal[ys:ye, xs:xe]
    roi += alpha * (plateau - roi)


def _add_patch(img: np.ndarray, patch: np.ndarray, y0: int, x0: int) -> None:
    """``img[y0:, x0:] += patch``, clipped to the image (patches may hang over the border)."""
    h, w = img.shape
    ph, pw = patch.shape
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + ph), min(w, x0 + pw)
    if ye > ys and xe > xs:
        img[ys:ye, xs:xe] += patch[ys - y0:ye - y0, xs - x0:xe - x0]


def _blend_patch(img: np.ndarray, alpha: np.ndarray, target: float, y0: int, x0: int) -> None:
    """Pull ``img`` towards ``target`` with weight ``alpha`` (0..1), e.g. ink replaced by bare substrate."""
    h, w = img.shape
    ph, pw = alpha.shape
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + ph), min(w, x0 + pw)
    if ye > ys and xe > xs:
        roi = img[ys:ye, xs:xe]
        roi += alpha[ys - y0:ye - y0, xs - x0:xe - x0] * (target - roi)


def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 drawing -> float32 0..1 with soft edges; X-ray defects never have pixel-sharp borders."""
    out = mask.astype(np.float32) * (1.0 / 255.0)
    if sigma >= 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """``rng.uniform`` that tolerates an empty range (a feature as big as a tiny image): the middle."""
    return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2


def _random_point(rng: np.random.Generator, g: _Geometry, border: float = 0.0) -> tuple[float, float]:
    """A point (y, x) in the coated area, at least ``border`` px from its edges when it fits."""
    bx = min(border, (g.x1 - g.x0) / 2 - 1)
    by = min(border, g.h / 2 - 1)
    return _uniform(rng, by, g.h - by), _uniform(rng, g.x0 + bx, g.x1 - bx)


def _scratch(rng, img, g, severity):
    """Thin short bright lines at random angles: a tool scraped ink off."""
    contrast = g.contrast(severity)
    for _ in range(int(rng.integers(1, 4))):
        length = _px(rng.uniform(60, 400), g.scale, 10)
        thick = max(1, int(round(rng.uniform(1, 3.5) * g.scale)))
        cy, cx = _random_point(rng, g, length / 2)
        ang = rng.uniform(0, math.pi)
        dy, dx = math.sin(ang) * length / 2, math.cos(ang) * length / 2
        pad = int(length / 2 + thick + 4)
        mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        p1 = (int(round(pad - dx)), int(round(pad - dy)))
        p2 = (int(round(pad + dx)), int(round(pad + dy)))
        cv2.line(mask, p1, p2, 255, thick, cv2.LINE_AA)
        _add_patch(img, _blur(mask, 0.4 * thick) * (contrast * rng.uniform(0.7, 1.3)),
                   int(cy) - pad, int(cx) - pad)


def _line(rng, img, g, severity):
    """A long straight streak along the coating direction (a nick in the coating blade)."""
    contrast = g.contrast(severity)
    width = _px(rng.uniform(2, 9), g.scale, 1)
    length = g.h * rng.uniform(0.35, 1.0)
    y_start = _uniform(rng, 0, g.h - length)
    x = _uniform(rng, g.x0 + 2 * width, g.x1 - 2 * width)
    drift = rng.uniform(-4, 4) * g.scale  # the blade is not perfectly aligned
    pad = int(2 * width + abs(drift) + 4)
    mask = np.zeros((int(length) + 2 * pad, 2 * pad + 1), np.uint8)
    cv2.line(mask, (pad, pad), (int(round(pad + drift)), pad + int(length)), 255,
             max(1, int(round(width))), cv2.LINE_AA)
    sign = 1.0 if rng.random() < 0.75 else -1.0  # mostly less ink (bright), sometimes a ridge (dark)
    _add_patch(img, _blur(mask, width / 3) * (sign * 0.8 * contrast), int(y_start) - pad, int(x) - pad)


def _edge_cut(rng, img, g, severity):
    """A notch cut into the coated edge: the ink is gone there, showing bare substrate.

    Severity sets how deep the notch is and how much ink is gone: a shallow nick up to a clean cut.
    """
    depth = _px(rng.uniform(15, 90) * (0.3 + 0.7 * severity), g.scale, 3)
    along = _px(rng.uniform(20, 160), g.scale, 4)
    cy = _uniform(rng, along, g.h - along)
    left = rng.random() < 0.5
    pad = int(along + depth + 4)
    mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
    tip = rng.uniform(-0.3, 0.3) * along
    inward = depth if left else -depth
    back = -3 if left else 3  # start just outside the edge so the notch opens cleanly into the margin
    pts = np.array([[pad + back, pad - along / 2], [pad + inward, pad + tip],
                    [pad + back, pad + along / 2]])
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
    alpha = _blur(mask, 0.7 * max(g.scale, 0.5)) * (0.25 + 0.75 * severity)
    edge_x = g.x0 if left else g.x1
    _blend_patch(img, alpha, g.margin_level, int(cy) - pad, edge_x - pad)


def _edge_tension(rng, img, g, severity):
    """Surface tension piled the ink up along an edge: a dark, wavy bead inside the coating edge."""
    contrast = g.contrast(severity)
    length = g.h * rng.uniform(0.2, 0.8)
    width = _px(rng.uniform(12, 45), g.scale, 2)
    y0 = int(_uniform(rng, 0, g.h - length))
    n = int(length)
    ys = np.arange(n, dtype=np.float32)
    phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * g.h
    wave = width * (1.0 + 0.4 * np.sin(2 * math.pi * ys / period + phase))
    cols = np.arange(int(2.5 * width) + 2, dtype=np.float32)[None, :]
    # Thickest at the edge, fading inward; the bead also fades in and out along its length.
    profile = np.exp(-cols / wave[:, None]) * np.sin(np.pi * (ys[:, None] + 0.5) / n)
    left = rng.random() < 0.5
    patch = (-contrast * rng.uniform(0.8, 1.5)) * profile
    if left:
        _add_patch(img, patch.astype(np.float32), y0, g.x0)
    else:
        _add_patch(img, patch[:, ::-1].astype(np.float32), y0, g.x1 - patch.shape[1])


def _smudge(rng, img, g, severity):
    """Soft low-contrast blobs: something touched the wet coating."""
    contrast = g.contrast(severity)
    for _ in range(int(rng.integers(1, 3))):
        ax = (_px(rng.uniform(30, 220), g.scale, 3), _px(rng.uniform(30, 220), g.scale, 3))
        cy, cx = _random_point(rng, g, max(ax))
        sigma = 0.35 * min(ax)
        pad = int(max(ax) + 3 * sigma + 2)
        mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        cv2.ellipse(mask, (pad, pad), (int(ax[0]), int(ax[1])), rng.uniform(0, 180), 0, 360, 255, -1)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        _add_patch(img, _blur(mask, sigma) * (sign * 0.7 * contrast), int(cy) - pad, int(cx) - pad)


def _edge_ink_flow(rng, img, g, severity):
    """Ink ran over the coating edge: darker lobes that reach into the bare margin."""
    contrast = g.contrast(severity)
    left = rng.random() < 0.5
    edge_x = g.x0 if left else g.x1
    margin = g.x0 if left else g.w - g.x1
    cy = rng.uniform(0.1, 0.9) * g.h
    span = _px(rng.uniform(60, 400), g.scale, 6)
    reach = max(margin * rng.uniform(0.6, 1.2) * (0.4 + 0.6 * severity), 2.0)
    pad = int(span + reach + 6)
    mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        y = pad + rng.uniform(-span / 2, span / 2)
        ax_x = max(1, int(reach * rng.uniform(0.5, 1.0)))
        ax_y = max(1, int(_px(rng.uniform(10, 60), g.scale, 2)))
        cv2.ellipse(mask, (pad, int(y)), (ax_x, ax_y), 0, 0, 360, 255, -1)
    alpha = _blur(mask, max(0.6, 0.8 * g.scale))
    target = g.level - 0.6 * contrast  # the run-off is a little thicker than the coating
    _blend_patch(img, alpha * (0.4 + 0.6 * severity), target, int(cy) - pad, edge_x - pad)


def _bubble(rng, img, g, severity):
    """Small rings: a gas bubble left a void (bright) with a thicker rim (dark)."""
    contrast = g.contrast(severity)
    cy, cx = _random_point(rng, g, 0)
    cluster = _px(80, g.scale, 6)
    for _ in range(int(rng.integers(1, 7))):
        r = _px(rng.uniform(4, 22), g.scale, 2.5)
        y = cy + rng.uniform(-cluster, cluster)
        x = float(np.clip(cx + rng.uniform(-cluster, cluster), g.x0 + r, g.x1 - r))
        pad = int(r + 4)
        inner = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        rim = np.zeros_like(inner)
        cv2.circle(inner, (pad, pad), max(1, int(round(r * 0.8))), 255, -1, cv2.LINE_AA)
        cv2.circle(rim, (pad, pad), int(round(r)), 255, max(1, int(round(r / 4))), cv2.LINE_AA)
        patch = _blur(inner, 0.15 * r) * contrast - _blur(rim, 0.1 * r) * (0.7 * contrast)
        _add_patch(img, patch, int(y) - pad, int(x) - pad)


def _missing_ink(rng, img, g, severity):
    """A patch with little or no ink: bright, towards the bare-substrate level."""
    contrast = g.contrast(severity)
    radius = _px(rng.uniform(20, 140), g.scale, 3)
    cy, cx = _random_point(rng, g, radius)
    # An irregular outline: a polygon with random radii around the centre.
    n = int(rng.integers(10, 19))
    ang = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = radius * rng.uniform(0.45, 1.0, n)
    pad = int(radius + 4)
    pts = np.stack([pad + rad * np.cos(ang), pad + rad * np.sin(ang)], axis=1)
    mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
    # Severity-driven depth: barely thinner up to fully bare.
    depth = min(1.0, contrast / max(g.margin_level - g.level, 1.0))
    _blend_patch(img, _blur(mask, max(0.5, 0.08 * radius)) * depth, g.margin_level,
                 int(cy) - pad, int(cx) - pad)


def _agglomerate(rng, img, g, severity):
    """Small dense spots of clumped material: dark."""
    contrast = g.contrast(severity)
    cy, cx = _random_point(rng, g, 0)
    cluster = _px(150, g.scale, 6)
    for _ in range(int(rng.integers(1, 6))):
        r = _px(rng.uniform(2, 11), g.scale, 1.5)
        y = cy + rng.uniform(-cluster, cluster)
        x = float(np.clip(cx + rng.uniform(-cluster, cluster), g.x0 + r, g.x1 - r))
        pad = int(2 * r + 4)
        mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        cv2.circle(mask, (pad, pad), max(1, int(round(r))), 255, -1, cv2.LINE_AA)
        patch = _blur(mask, 0.4 * r) * (-contrast * rng.uniform(1.0, 2.0))
        _add_patch(img, patch, int(y) - pad, int(x) - pad)


def _ink_fluctuation(rng, img, g, severity):
    """A broad band across the coating where the film got thicker or thinner (pump pulsation)."""
    contrast = g.contrast(severity)
    half = _px(rng.uniform(40, 300), g.scale, 4)
    cy = _uniform(rng, half, g.h - half)
    ys = np.arange(int(cy - 2 * half), int(cy + 2 * half) + 1)
    ys = ys[(ys >= 0) & (ys < g.h)]
    profile = np.exp(-0.5 * ((ys + 0.5 - cy) / (half / 1.5)) ** 2).astype(np.float32)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    # The band is not perfectly uniform across the width.
    across = 1.0 + 0.3 * _smooth_field(rng, 1, g.x1 - g.x0, 1, (g.x1 - g.x0) / 3)
    band = (sign * 0.6 * contrast) * profile[:, None] * across
    img[ys[0]:ys[-1] + 1, g.x0:g.x1] += band


def _ink_entry_exit(rng, img, g, severity):
    """Where the coater started or stopped: a film-thickness change decaying from the top or bottom."""
    contrast = g.contrast(severity)
    depth = _px(rng.uniform(50, 300), g.scale, 5)
    n = min(g.h, int(4 * depth))
    ys = np.arange(n, dtype=np.float32)
    profile = np.exp(-ys / depth)
    across = 1.0 + 0.4 * _smooth_field(rng, 1, g.x1 - g.x0, 1, (g.x1 - g.x0) / 4)
    sign = -1.0 if rng.random() < 0.6 else 1.0  # usually excess ink at the start (dark)
    band = (sign * contrast * rng.uniform(0.8, 1.4)) * profile[:, None] * across
    if rng.random() < 0.5:
        img[:n, g.x0:g.x1] += band
    else:
        img[g.h - n:, g.x0:g.x1] += band[::-1]


_PAINTERS: dict[str, Callable[..., None]] = {
    "scratch": _scratch,
    "line": _line,
    "edge_cut": _edge_cut,
    "edge_tension": _edge_tension,
    "smudge": _smudge,
    "edge_ink_flow": _edge_ink_flow,
    "bubble": _bubble,
    "missing_ink": _missing_ink,
    "agglomerate": _agglomerate,
    "ink_fluctuation": _ink_fluctuation,
    "ink_entry_exit": _ink_entry_exit,
}
assert tuple(_PAINTERS) == ANOMALY_TYPES


def render_electrode(seed: int | Sequence[int], height: int, width: int, style: BundleStyle | None = None,
                     anomaly: str | None = None, severity: float | None = None) -> np.ndarray:
    """Draw one electrode X-ray as a 2-D uint16 array; a pure function of its arguments.

    ``seed`` seeds the background and the anomaly separately, so the same seed with ``anomaly=None``
    gives exactly the defect-free version of the same electrode (useful as ground truth).
    ``severity`` in [0, 1] sets the defect contrast from near the noise level (0) to obvious (1);
    ``None`` draws it at random, skewed towards subtle defects so the task is not trivial.
    """
    if anomaly is not None and anomaly not in _PAINTERS:
        raise XfeatError(f"unknown anomaly type {anomaly!r}; choose one of {', '.join(ANOMALY_TYPES)}")
    if height < 32 or width < 32:
        raise XfeatError(f"image size must be at least 32 x 32, got {height} x {width}")
    style = style or BundleStyle()
    bg_seq, anomaly_seq = np.random.SeedSequence(seed).spawn(2)
    signal, noise, geom = _background(np.random.default_rng(bg_seq), height, width, style)
    if anomaly:
        rng = np.random.default_rng(anomaly_seq)
        s = float(rng.random() ** 1.3) if severity is None else float(np.clip(severity, 0.0, 1.0))
        _PAINTERS[anomaly](rng, signal, geom, s)
    # Quantum noise grows with the square root of the transmitted intensity (e.g. in the hole).
    noise *= np.sqrt(np.maximum(signal, 1.0) * (1.0 / geom.level))
    signal += noise
    np.clip(signal, 0.0, 65535.0, out=signal)
    signal += 0.5  # round to nearest on the truncating cast
    return signal.astype(np.uint16)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _write_tiff(path: Path, image: np.ndarray) -> None:
    """Write atomically: a killed run leaves at most a ``.part`` file, never a truncated ``.tif``."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        # No metadata: nothing time-dependent, and a plain TIFF any reader (MATLAB, ImageJ) opens.
        tifffile.imwrite(fh, image, photometric="minisblack", metadata=None)
    os.replace(tmp, path)


def _render_chunk(root: str, seed: int, items: list[tuple[ImagePlan, BundleStyle]]) -> int:
    """Worker: render and write a few images; returns how many were written."""
    for plan, style in items:
        image = render_electrode((seed, plan.index), plan.height, plan.width, style, plan.anomaly or None)
        _write_tiff(Path(root) / plan.path, image)
    return len(items)


def _init_worker() -> None:
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
    tmp = root / "manifest.csv.part"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        for p in plans:
            writer.writerow((p.path, p.bundle, p.label, p.anomaly))
    os.replace(tmp, manifest)
    return manifest


def make_dataset(out: str | os.PathLike, *, bundles: int = 12, images: int = 714,
                 abnormal_fraction: float = 152 / 714, size: tuple[int, int] | None = None,
                 seed: int = 0, jobs: int | None = None,
                 progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Write a synthetic data set shaped like the fuel-cell paper's, for demos and tests.

    Layout: ``OUT/<bundle>/<normal|abnormal>/<bundle>_<NNNN>.tif`` (16-bit grayscale TIFF; NNNN is the
    image's index over the whole data set, from 0, and ``render_electrode((seed, NNNN), ...)`` redraws it) plus
    ``OUT/manifest.csv`` (``path,bundle,label,anomaly``).  ``out`` must be new or empty.  ``size=None``
    draws each image's size in the real data's range; ``size=(H, W)`` fixes it (small images for tests).
    Same arguments give byte-identical files whatever ``jobs`` is.  ``progress(n)`` is called in this
    process with the number of images just written.
    """
    _validate(bundles, images, abnormal_fraction, size, seed, jobs)
    root = Path(out)
    _check_output_folder(root)
    plans, styles = plan_dataset(bundles=bundles, images=images, abnormal_fraction=abnormal_fraction,
                                 size=size, seed=seed)
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
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
            futures = [pool.submit(_render_chunk, str(root), seed, c) for c in chunks]
            try:
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
