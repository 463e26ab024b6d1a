import numpy as np
import pytest

from xfeat.errors import DataError
from xfeat.convert.stats import (PERCENTILE_METHODS, WindowStats, equalize_thresholds, histogram_percentile,
                         pixel_histogram, round_to_multiple, window_stats)

PERCENTILES = [0, 0.01, 0.5, 1, 25, 50, 73.3, 99, 99.99, 100]


@pytest.mark.parametrize("method", PERCENTILE_METHODS)
def test_streaming_percentiles_equal_numpy_on_many_images(method):
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 65536, size=rng.integers(1, 60, 2), dtype=np.uint16) for _ in range(25)]
    images += [np.array([[0, 65535]], dtype=np.uint16), rng.normal(2000, 300, (50, 40)).astype(np.uint16)]
    hist = sum(pixel_histogram(im) for im in images)
    everything = np.concatenate([im.ravel() for im in images])
    for q in PERCENTILES:
        assert histogram_percentile(hist, q, method) == np.percentile(everything, q, method=method), (q, method)


def test_percentiles_of_8bit_and_single_pixel_images():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (33, 17), dtype=np.uint8)
    for q in PERCENTILES:
        assert histogram_percentile(pixel_histogram(image), q) == np.percentile(image, q)
    assert histogram_percentile(pixel_histogram(np.array([[5]], np.uint16)), 99.99) == 5.0


def test_histogram_sums_over_images_in_constant_memory():
    hist = pixel_histogram(np.array([[0, 65535, 3]], np.uint16))
    assert hist.shape == (65536,) and hist.dtype == np.int64
    assert hist[0] == hist[3] == hist[65535] == 1 and hist.sum() == 3


def test_rounding_to_hundreds_as_the_paper():
    assert [round_to_multiple(v, 100) for v in (1649.9, 1650, 1734.2, 27950, 28049.9)] == [1600, 1700, 1700, 28000,
                                                                                              28000]


def _hist_with_percentiles(low_value: int, high_value: int, fill: int = 2200) -> np.ndarray:
    values = np.full(100_000, fill, dtype=np.uint16)
    values[:20] = low_value
    values[-20:] = high_value
    return pixel_histogram(values)


def test_window_stats_rounds_16bit_and_not_8bit():
    hist = _hist_with_percentiles(1734, 27961)
    stats = window_stats(hist, n_images=1, bit_depth=16)
    assert (stats.g_min, stats.g_max) == (1700, 28000)
    assert [stats.raw_low, stats.raw_high] == np.percentile(np.repeat(np.arange(65536), hist), [0.01, 99.99]).tolist()
    unrounded = window_stats(hist, n_images=1, bit_depth=16, round_to=None)
    assert (unrounded.g_min, unrounded.g_max) == (1734, 27961) and unrounded.round_to is None
    eight = window_stats(_hist_with_percentiles(3, 250, fill=100), n_images=1, bit_depth=8)
    assert (eight.g_min, eight.g_max, eight.round_to) == (3, 250, None)


def test_window_never_collapses():
    stats = window_stats(pixel_histogram(np.full((4, 4), 2220, np.uint16)), n_images=1, bit_depth=16)
    assert stats.g_max > stats.g_min


def test_stats_save_load_round_trip(tmp_path):
    stats = window_stats(_hist_with_percentiles(1734, 27961), n_images=3, bit_depth=16)
    stats.save(tmp_path / "s.json")
    assert WindowStats.load(tmp_path / "s.json") == stats
    assert len(stats.equalize_thresholds) == 255


@pytest.mark.parametrize("content, problem", [
    ("{not json", "cannot read statistics"),
    ('{"format": "other"}', "not an xfeat statistics file"),
    ('{"format": "xfeat.window-stats", "version": 99}', "newer than this xfeat reads"),
    ('{"format": "xfeat.window-stats", "version": 1, "g_min": 5}', "malformed statistics"),
])
def test_bad_stats_files_are_refused(tmp_path, content, problem):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(DataError, match=problem) as info:
        WindowStats.load(path)
    assert str(path) in str(info.value)


def test_equalize_thresholds_describe_the_textbook_curve():
    rng = np.random.default_rng(3)
    pixels = rng.normal(3000, 400, 20_000).astype(np.uint16)
    lo, hi = 2000, 4000
    thresholds = np.array(equalize_thresholds(pixel_histogram(pixels), lo, hi))
    clipped = np.sort(np.clip(pixels, lo, hi))
    values = np.arange(lo, hi + 1)
    cdf = np.searchsorted(clipped, values, side="right")
    expected = np.rint((cdf - cdf[0]) / (len(clipped) - cdf[0]) * 255)
    assert np.array_equal(np.searchsorted(thresholds, values, side="right"), expected)
    assert np.all(np.diff(thresholds) >= 0)
