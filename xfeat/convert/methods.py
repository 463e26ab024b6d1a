"""The 16-bit to 8-bit conversion methods of the fuel-cell paper, and two it names as future work.

* ``m1`` naive: ``round(x / 257)``, the exact linear map of 0..65535 onto 0..255; 8-bit input is unchanged.
* ``m2`` global window: clip to the dataset's [G_min, G_max] and stretch to 0..255.
* ``m3`` local window: the same stretch with the image's own 0.01th / 99.99th percentiles (not rounded).
* ``m4`` mix: three channels (m1, m2, m3).
* ``equalize``: histogram equalisation inside the global window, with the dataset's histogram, so one
  pixel value maps to one output value in every image (as in m2).
* ``clahe``: OpenCV's contrast-limited adaptive equalisation of the m2 image.
* ``rgb``: the colour method, for colour photos (the ResNet-50 + SVM paper's): the 8-bit R, G, B channels as
  they are, the ImageNet way. A 16-bit colour image gets a window per channel (each channel stretched by its
  own 0.01th..99.99th percentiles, m3 per channel); a gray image is replicated to three channels (at 16 bits
  with its own window, like each channel of a colour image).

Colour images under a gray method are converted to their luminance first, ITU-R BT.601
``Y = 0.299 R + 0.587 G + 0.114 B`` rounded to the image's depth (OpenCV's ``COLOR_RGB2GRAY``), so the windows
and the dataset's histogram are those of the luminance.

The stretch is ``round((clip(x, lo, hi) - lo) / (hi - lo) * 255)``. The paper prints it without
subtracting the minimum and with a factor 256, which overflows ``uint8``; this is the intended stretch.

Every method returns ``uint8``: 2-D for the gray methods (the network sees it replicated to three equal
channels) and ``H x W x 3`` for ``m4`` and ``rgb``.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from xfeat.errors import XfeatError
from xfeat.convert.stats import N_LEVELS, WindowStats, histogram_percentile, pixel_histogram

METHODS = ("m1", "m2", "m3", "m4", "equalize", "clahe", "rgb")
COLOUR_METHODS = frozenset({"rgb"})  # take a colour image's channels; the others its luminance
NEEDS_STATS = frozenset({"m2", "m4", "equalize", "clahe"})
LOCAL_PERCENTILES = (0.01, 99.99)
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)

_LEVELS = np.arange(N_LEVELS, dtype=np.float64)
_NAIVE_LUT = np.rint(_LEVELS / 257).astype(np.uint8)


def stretch_lut(lo: float, hi: float) -> np.ndarray:
    """The window stretch for every 16-bit value; indexing it with an image applies the stretch."""
    if hi <= lo:  # a flat image: a step at lo rather than a division by zero
        return np.where(_LEVELS > lo, 255, 0).astype(np.uint8)
    return np.rint((np.clip(_LEVELS, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def apply_lut(lut: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``lut[image]``: np.take is a third faster than fancy indexing on a 16-bit image, with the same result."""
    return np.take(lut, image)


def naive(image: np.ndarray) -> np.ndarray:
    """m1: scale 16-bit values down to 8 bits; 8-bit images pass unchanged."""
    return image.copy() if image.dtype == np.uint8 else apply_lut(_NAIVE_LUT, image)


def global_window(image: np.ndarray, stats: WindowStats) -> np.ndarray:
    """m2: stretch the dataset-wide window [G_min, G_max] to 0..255."""
    _check_depth(image, stats)
    return apply_lut(stretch_lut(stats.g_min, stats.g_max), image)


def local_window(image: np.ndarray) -> np.ndarray:
    """m3: stretch the image's own 0.01th..99.99th percentile window to 0..255."""
    hist = pixel_histogram(image)
    lo, hi = (histogram_percentile(hist, p) for p in LOCAL_PERCENTILES)
    return apply_lut(stretch_lut(lo, hi), image)


def mix(image: np.ndarray, stats: WindowStats) -> np.ndarray:
    """m4: an H x W x 3 image whose channels are m1, m2 and m3."""
    return np.dstack([naive(image), global_window(image, stats), local_window(image)])


def equalize(image: np.ndarray, stats: WindowStats) -> np.ndarray:
    """Histogram equalisation inside the global window, using the dataset's histogram."""
    _check_depth(image, stats)
    if len(stats.equalize_thresholds) != 255:
        raise XfeatError("these statistics hold no equalisation curve; recompute them from the dataset")
    lut = np.searchsorted(np.asarray(stats.equalize_thresholds), np.arange(N_LEVELS), side="right")
    return apply_lut(lut.astype(np.uint8), image)


def clahe(image: np.ndarray, stats: WindowStats) -> np.ndarray:
    """OpenCV CLAHE (clip limit 2, 8 x 8 tiles) on the globally windowed image."""
    return cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES).apply(global_window(image, stats))


def rgb(image: np.ndarray) -> np.ndarray:
    """rgb: an H x W x 3 uint8 image of a colour image's channels (a window per channel at 16 bits); a gray
    image replicated (at 16 bits with its window, as each channel of a colour one)."""
    if image.ndim == 2:
        return to_rgb(image.copy() if image.dtype == np.uint8 else local_window(image))
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    return np.dstack([local_window(image[:, :, c]) for c in range(3)])


def luminance(image: np.ndarray) -> np.ndarray:
    """The BT.601 luminance of an H x W x 3 RGB image, at its depth (uint8 or uint16)."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def gray_of(image: np.ndarray) -> np.ndarray:
    """What a gray method converts: the image itself, or a colour image's luminance (exact for equal channels:
    OpenCV's fixed-point weights sum to one)."""
    return image if image.ndim == 2 else luminance(image)


_CONVERTERS: dict[str, Callable[..., np.ndarray]] = {
    "m1": naive, "m2": global_window, "m3": local_window, "m4": mix, "equalize": equalize, "clahe": clahe,
    "rgb": rgb,
}


def convert(image: np.ndarray, method: str, stats: WindowStats | None = None) -> np.ndarray:
    """Convert an 8/16-bit image (2-D gray, or H x W x 3 RGB) with a method of ``METHODS``; m2, m4, equalize and
    clahe need ``stats``; a gray method converts a colour image's luminance."""
    check_method(method)
    if method not in COLOUR_METHODS:
        image = gray_of(image)
    if method in NEEDS_STATS:
        if stats is None:
            raise XfeatError(f"method {method} needs the dataset's window statistics")
        return _CONVERTERS[method](image, stats)
    return _CONVERTERS[method](image)


def to_rgb(converted: np.ndarray) -> np.ndarray:
    """Replicate a gray conversion to three channels (what the network sees); m4 is already three."""
    return converted if converted.ndim == 3 else np.repeat(converted[:, :, None], 3, axis=2)


def check_method(method: str) -> None:
    if method not in _CONVERTERS:
        raise XfeatError(f"unknown conversion method {method!r}; one of {', '.join(METHODS)}")


def _check_depth(image: np.ndarray, stats: WindowStats) -> None:
    depth = image.dtype.itemsize * 8
    if depth != stats.bit_depth:
        raise XfeatError(f"a {depth}-bit image cannot use statistics computed on {stats.bit_depth}-bit images")
