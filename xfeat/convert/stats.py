"""Pixel statistics that the conversions need, computed from histograms in constant memory.

A 65,536-bin histogram summed over any number of 8- or 16-bit images holds every order statistic of
their pixels, so percentiles taken from it are exact: equal to ``numpy.percentile`` on all the pixels
at once, with the same interpolation method, without ever holding them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xfeat.errors import DataError
from xfeat.io.atomic import write_text

N_LEVELS = 65536
PERCENTILE_METHODS = ("linear", "lower", "higher", "midpoint", "nearest")
STATS_FORMAT = "xfeat.window-stats"
STATS_VERSION = 1


def pixel_histogram(image: np.ndarray) -> np.ndarray:
    """Counts of every pixel value 0..65535 (``int64``); histograms of many images add up."""
    return np.bincount(image.ravel(), minlength=N_LEVELS).astype(np.int64, copy=False)


def histogram_percentile(hist: np.ndarray, percentile: float, method: str = "linear") -> float:
    """The ``percentile`` (0..100) of the pixels counted in ``hist``, as ``numpy.percentile`` computes it."""
    if method not in PERCENTILE_METHODS:
        raise ValueError(f"unknown percentile method {method!r}; one of {', '.join(PERCENTILE_METHODS)}")
    cumulative = np.cumsum(hist)
    n = int(cumulative[-1])
    if n == 0:
        raise ValueError("percentile of an empty histogram")

    def value_at(index: int) -> float:  # the index-th smallest pixel
        return float(np.searchsorted(cumulative, min(max(index, 0), n - 1), side="right"))

    # Same index arithmetic and interpolation as numpy's quantile implementation, for bitwise equality.
    position = (n - 1) * (np.float64(percentile) / 100)
    if method == "lower":
        return value_at(int(np.floor(position)))
    if method == "higher":
        return value_at(int(np.ceil(position)))
    if method == "nearest":
        return value_at(int(np.around(position)))
    if method == "midpoint":
        below = int(np.floor(position))
        gamma = 0.0 if position % 1 == 0 else 0.5
    else:
        below = int(np.floor(position))
        gamma = float(position - below)
    a, b = value_at(below), value_at(below + 1)
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def round_to_multiple(value: float, step: int) -> int:
    """Round half up to the nearest multiple of ``step`` (the paper rounds G_min/G_max to hundreds)."""
    return int(math.floor(value / step + 0.5)) * step


@dataclass(frozen=True)
class WindowStats:
    """The dataset-wide intensity window (m2's G_min/G_max) and the equalisation curve inside it.

    Statistics are data: saved as JSON beside converted images and caches, and reused for new images so
    that they are converted exactly as the training images were.
    """

    g_min: int
    g_max: int
    raw_low: float  # the percentiles before rounding
    raw_high: float
    low_percentile: float = 0.01
    high_percentile: float = 99.99
    round_to: int | None = 100
    bit_depth: int = 16
    n_images: int = 0
    n_pixels: int = 0
    # Pixel value at which the equalised output first reaches 1, 2, ..., 255 (see convert.equalize).
    equalize_thresholds: tuple[int, ...] = field(default=(), repr=False)

    def describe(self) -> str:
        rounding = f"rounded to {self.round_to}" if self.round_to else "not rounded"
        return (f"global window G_min={self.g_min} G_max={self.g_max} ({self.low_percentile}th/"
                f"{self.high_percentile}th percentiles {self.raw_low:g}/{self.raw_high:g}, {rounding}; "
                f"{self.n_images} images, {self.bit_depth}-bit)")

    def to_dict(self) -> dict:
        return {"format": STATS_FORMAT, "version": STATS_VERSION, **asdict(self),
                "equalize_thresholds": list(self.equalize_thresholds)}

    @classmethod
    def from_dict(cls, data: dict) -> "WindowStats":
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        fields["equalize_thresholds"] = tuple(fields.get("equalize_thresholds", ()))
        return cls(**fields)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "WindowStats":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DataError(path, f"cannot read statistics ({e})") from None
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            raise DataError(path, "not an xfeat statistics file")
        if data.get("version", 0) > STATS_VERSION:
            raise DataError(path, f"statistics format version {data['version']} is newer than this xfeat reads")
        try:
            stats = cls.from_dict(data)
        except TypeError as e:
            raise DataError(path, f"malformed statistics ({e})") from None
        if stats.g_min >= stats.g_max:
            raise DataError(path, "malformed statistics (g_min must be below g_max)")
        return stats


def window_stats(hist: np.ndarray, *, n_images: int, bit_depth: int, low: float = 0.01, high: float = 99.99,
                 round_to: int | None = 100) -> WindowStats:
    """The global window from a dataset's summed histogram.

    ``round_to`` rounds G_min/G_max as the paper did (to hundreds); it is ignored for 8-bit data, where a
    hundred is 40 % of the range. G_max is kept above G_min so the window never collapses.
    """
    raw_low, raw_high = histogram_percentile(hist, low), histogram_percentile(hist, high)
    step = round_to if round_to and bit_depth > 8 else None
    if step:
        g_min, g_max = round_to_multiple(raw_low, step), round_to_multiple(raw_high, step)
    else:
        g_min, g_max = int(math.floor(raw_low + 0.5)), int(math.floor(raw_high + 0.5))
    g_max = max(g_max, g_min + 1)
    return WindowStats(g_min=g_min, g_max=g_max, raw_low=raw_low, raw_high=raw_high, low_percentile=low,
                       high_percentile=high, round_to=step, bit_depth=bit_depth, n_images=n_images,
                       n_pixels=int(hist.sum()), equalize_thresholds=equalize_thresholds(hist, g_min, g_max))


def equalize_thresholds(hist: np.ndarray, g_min: int, g_max: int) -> tuple[int, ...]:
    """Histogram equalisation inside [g_min, g_max] as 255 thresholds: output k starts at value t[k-1].

    Pixels outside the window are clipped to its bounds first, so they count at g_min / g_max. The output
    for value v in the window is round(255 * (cdf(v) - cdf(g_min)) / (N - cdf(g_min))), the textbook
    (OpenCV) formula; it is non-decreasing, so 255 thresholds describe it exactly and stay small in JSON.
    """
    window = hist[g_min:g_max + 1].astype(np.float64)
    window[0] += hist[:g_min].sum()
    window[-1] += hist[g_max + 1:].sum()
    cdf = np.cumsum(window)
    total, first = cdf[-1], cdf[0]
    if total <= first:  # everything at g_min: equalisation has nothing to spread
        levels = np.zeros_like(cdf)
        levels[-1] = 255
    else:
        levels = np.rint((cdf - first) / (total - first) * 255)
    starts = np.searchsorted(levels, np.arange(1, 256), side="left")  # first index reaching each level
    return tuple(int(g_min + s) if s < len(levels) else N_LEVELS for s in starts)
