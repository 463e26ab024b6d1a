"""The window each leave-one-bundle-out fold would get if the held-out bundle had not helped fit it.

The global window (m2, m4, clahe) and the equalisation curve (equalize) are fitted by one scan over every
image, the held-out bundle's included, as in the paper. The scan uses no labels, but a held-out bundle's
pixels do move the window its own test images are converted with. Histograms add up, so the window of the
other bundles alone is the window of the global histogram minus the bundle's: exact, without a rescan.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from xfeat.convert.stats import WindowStats, window_stats

CURVE_LEVELS = 255  # an equalisation curve is 255 thresholds


@dataclass(frozen=True)
class FoldWindow:
    """One held-out bundle: the window the other bundles alone give, and its shift from the global window.

    Shifts are in gray levels of the images (16-bit values for 16-bit data), fold minus global.
    """

    bundle: str
    n_images: int  # the bundle's images that entered the global window (0: it did not enter it)
    window: WindowStats  # fitted on the other bundles alone, with the global window's percentiles and rounding
    g_min_shift: int
    g_max_shift: int
    raw_low_shift: float  # the same before rounding
    raw_high_shift: float
    curve_shift: int | None  # equalize: the largest difference between the two curves' thresholds (None: no curve)

    @property
    def differs(self) -> bool:
        """True when the rounded window (what m2, m4 and clahe use) is not the global one."""
        return bool(self.g_min_shift or self.g_max_shift)

    def describe(self) -> str:
        curve = "" if self.curve_shift is None else f"; equalize curve up to {self.curve_shift}"
        flag = "  DIFFERS" if self.differs else ""
        return (f"{self.bundle} ({self.n_images} images): G_min {self.window.g_min} ({self.g_min_shift:+d}), "
                f"G_max {self.window.g_max} ({self.g_max_shift:+d}), unrounded {self.raw_low_shift:+.1f} / "
                f"{self.raw_high_shift:+.1f}{curve}{flag}")

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "n_images": self.n_images, "g_min": self.window.g_min,
                "g_max": self.window.g_max, "raw_low": self.window.raw_low, "raw_high": self.window.raw_high,
                "g_min_shift": self.g_min_shift, "g_max_shift": self.g_max_shift,
                "raw_low_shift": self.raw_low_shift, "raw_high_shift": self.raw_high_shift,
                "curve_shift": self.curve_shift, "differs": self.differs,
                "equalize_thresholds": list(self.window.equalize_thresholds)}


@dataclass(frozen=True)
class FoldWindows:
    """The fold window of every held-out bundle, against the global window they are compared with."""

    global_window: WindowStats
    folds: tuple[FoldWindow, ...]

    def __iter__(self) -> Iterator[FoldWindow]:
        return iter(self.folds)

    def __len__(self) -> int:
        return len(self.folds)

    def __getitem__(self, i: int) -> FoldWindow:
        return self.folds[i]

    @property
    def differing(self) -> tuple[FoldWindow, ...]:
        """The folds whose rounded window differs from the global one: the ones to warn about."""
        return tuple(f for f in self.folds if f.differs)

    def largest(self, name: str) -> float:
        """The shift ``name`` (e.g. ``g_max_shift``) of largest magnitude over the folds, with its sign."""
        return max((getattr(f, name) or 0 for f in self.folds), key=abs, default=0)

    def describe(self, hint: str = "; see xfeat info") -> str:
        """One line for a person: a warning when a fold's rounded window differs (print it after
        ``xfeat: warning: ``), otherwise that none does. ``hint`` ends the warning."""
        n = len(self.folds)
        if self.differing:
            return (f"conversion windows: {len(self.differing)} of {n} held-out bundles would get another rounded "
                    f"window from the other bundles alone (max shift G_min {self.largest('g_min_shift'):+d}, "
                    f"G_max {self.largest('g_max_shift'):+d} gray levels){hint}")
        return (f"conversion windows: each of {n} held-out bundles would get the same rounded window "
                f"{self.global_window.g_min}..{self.global_window.g_max} from the other bundles alone (unrounded "
                f"shifts up to {self.largest('raw_low_shift'):+.1f} / {self.largest('raw_high_shift'):+.1f} gray "
                "levels)")

    def to_dict(self) -> list[dict]:
        return [f.to_dict() for f in self.folds]


def window_like(hist: np.ndarray, like: WindowStats, n_images: int) -> WindowStats:
    """The window of ``hist`` with the percentiles, rounding and depth of ``like``."""
    return window_stats(hist, n_images=n_images, bit_depth=like.bit_depth, low=like.low_percentile,
                        high=like.high_percentile, round_to=like.round_to)


def fold_windows(histograms: Mapping[str, np.ndarray], global_window: WindowStats | None = None,
                 n_images: Mapping[str, int] | None = None, bundles: Sequence[str] | None = None) -> FoldWindows:
    """For each bundle of ``histograms`` (bundle -> its 65,536-bin pixel histogram, from one scan), the window
    the other bundles alone give, compared with ``global_window`` (default: the window of their sum, as
    ``window_stats`` gives it for 16-bit images; a given one lends its percentiles, rounding and depth to the
    folds, and should be the window of the same sum).

    ``n_images`` (bundle -> images) fills in the image counts. ``bundles`` are the held-out bundles to report
    (default: every bundle of ``histograms``); one without a histogram did not enter the window and gets the
    global window itself. A dataset of one bundle has no fold: ``folds`` is empty.
    """
    counts = {b: int(n_images.get(b, 0)) if n_images else 0 for b in histograms}
    total = np.zeros_like(next(iter(histograms.values()))) if histograms else None
    for hist in histograms.values():
        total = total + hist
    if global_window is None:
        if total is None:
            raise ValueError("no histograms to fit a window on")
        global_window = window_stats(total, n_images=sum(counts.values()), bit_depth=16)
    if total is None:
        return FoldWindows(global_window, ())
    folds = []
    for bundle in (histograms if bundles is None else bundles):
        rest = total - histograms[bundle] if bundle in histograms else total
        if not rest.any():  # the only bundle: nothing else to fit a window on
            continue
        window = window_like(rest, global_window, sum(counts.values()) - counts.get(bundle, 0))
        folds.append(FoldWindow(
            bundle=bundle, n_images=counts.get(bundle, 0), window=window,
            g_min_shift=window.g_min - global_window.g_min, g_max_shift=window.g_max - global_window.g_max,
            raw_low_shift=window.raw_low - global_window.raw_low,
            raw_high_shift=window.raw_high - global_window.raw_high,
            curve_shift=_curve_shift(window, global_window)))
    return FoldWindows(global_window, tuple(folds))


def _curve_shift(a: WindowStats, b: WindowStats) -> int | None:
    if len(a.equalize_thresholds) != CURVE_LEVELS or len(b.equalize_thresholds) != CURVE_LEVELS:
        return None
    return int(np.abs(np.subtract(a.equalize_thresholds, b.equalize_thresholds)).max())
