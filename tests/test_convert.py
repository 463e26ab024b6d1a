"""Each conversion method against a plain numpy reference, edge values included."""

from dataclasses import replace

import cv2
import numpy as np
import pytest

from xfeat.convert.methods import METHODS, clahe, convert, equalize, global_window, local_window, mix, naive, to_rgb
from xfeat.errors import XfeatError
from xfeat.convert.stats import equalize_thresholds, pixel_histogram, window_stats

LO, HI = 1700, 28000


def reference_stretch(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.clip(x, lo, hi).astype(np.float64) - lo) / (hi - lo) * 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65536, (64, 48), dtype=np.uint16)
    x[0, :8] = [0, 65535, LO, HI, LO - 1, HI + 1, LO + 1, HI - 1]
    x[1:20] = rng.normal(2200, 300, (19, 48)).clip(0, 65535).astype(np.uint16)  # the usual range
    return x


@pytest.fixture
def stats(image):
    """The paper's window (1700, 28000) on this image's histogram."""
    hist = pixel_histogram(image)
    return replace(window_stats(hist, n_images=1, bit_depth=16), g_min=LO, g_max=HI,
                   equalize_thresholds=equalize_thresholds(hist, LO, HI))


def test_m1_is_the_linear_map_to_8_bits(image):
    expected = ((image.astype(np.int64) * 2 + 257) // 514).astype(np.uint8)  # round(x / 257), in integers
    assert np.array_equal(naive(image), expected)
    assert naive(np.array([[0, 65535, 128, 129, 2800]], np.uint16)).tolist() == [[0, 255, 0, 1, 11]]


def test_m1_passes_8bit_input_unchanged():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = naive(x)
    assert out.dtype == np.uint8 and np.array_equal(out, x)


def test_m2_global_window(image, stats):
    out = global_window(image, stats)
    assert np.array_equal(out, reference_stretch(image, LO, HI))
    assert out[0, :6].tolist() == [0, 255, 0, 255, 0, 255]


def test_m3_local_window_uses_the_image_percentiles_unrounded(image):
    lo, hi = np.percentile(image, [0.01, 99.99])
    assert np.array_equal(local_window(image), reference_stretch(image, lo, hi))


def test_m4_stacks_m1_m2_m3(image, stats):
    out = mix(image, stats)
    assert out.shape == image.shape + (3,) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 0], naive(image))
    assert np.array_equal(out[:, :, 1], reference_stretch(image, LO, HI))
    assert np.array_equal(out[:, :, 2], local_window(image))


def test_equalize_within_the_global_window():
    rng = np.random.default_rng(5)
    x = rng.normal(3000, 500, (80, 60)).clip(0, 65535).astype(np.uint16)
    x[0, :2] = [0, 65535]
    stats = window_stats(pixel_histogram(x), n_images=1, bit_depth=16, round_to=None)
    clipped = np.clip(x, stats.g_min, stats.g_max).ravel()
    below_or_equal = np.searchsorted(np.sort(clipped), clipped, side="right")
    first = np.count_nonzero(clipped == stats.g_min)
    expected = np.rint((below_or_equal - first) / (clipped.size - first) * 255).astype(np.uint8).reshape(x.shape)
    out = equalize(x, stats)
    assert np.array_equal(out, expected)
    assert out[0, 0] == 0 and out[0, 1] == 255
    counts = np.bincount(out.ravel(), minlength=256)
    assert counts.max() < 0.05 * x.size  # spread out, unlike the stretch of a peaked histogram


def test_clahe_is_opencv_clahe_on_the_windowed_image(image, stats):
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(reference_stretch(image, LO, HI))
    assert np.array_equal(clahe(image, stats), expected)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_uint8_of_the_image_size(image, stats, method):
    out = convert(image, method, stats)
    assert out.dtype == np.uint8 and out.shape[:2] == image.shape
    assert to_rgb(out).shape == image.shape + (3,)


def test_flat_image_does_not_divide_by_zero():
    flat = np.full((8, 8), 2000, np.uint16)
    assert np.array_equal(local_window(flat), np.zeros((8, 8), np.uint8))


def test_8bit_images_with_8bit_statistics():
    x = np.random.default_rng(2).integers(10, 240, (30, 30), dtype=np.uint8)
    stats = window_stats(pixel_histogram(x), n_images=1, bit_depth=8)
    assert np.array_equal(global_window(x, stats), reference_stretch(x, stats.g_min, stats.g_max))
    with pytest.raises(XfeatError, match="8-bit image cannot use statistics computed on 16-bit"):
        global_window(x, window_stats(pixel_histogram(x.astype(np.uint16) * 200), n_images=1, bit_depth=16))


def test_methods_needing_statistics_say_so(image):
    with pytest.raises(XfeatError, match="needs the dataset's window statistics"):
        convert(image, "m2")
    with pytest.raises(XfeatError, match="unknown conversion method 'm9'"):
        convert(image, "m9")
