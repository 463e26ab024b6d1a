"""Anomaly maps: gray stays the X-ray, colour only above the threshold, small spots stay findable, files round-trip."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from xfeat.errors import XfeatError
from xfeat.report.maps import (RED, SMALL_RING, YELLOW, legend, outline_width, overlay, thumbnail, upsample,
                               write_png)

GRAY = 100


def gray_image(h: int = 256, w: int = 256) -> np.ndarray:
    """A textured 8-bit X-ray stand-in (a flat one would hide a pixel that changed by being copied wrongly)."""
    y, x = np.mgrid[0:h, 0:w]
    return (GRAY + 40 * np.sin(x / 7.0) * np.cos(y / 11.0)).astype(np.uint8)


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def changed(out: np.ndarray, gray: np.ndarray) -> np.ndarray:
    return (out != as_rgb(gray)).any(axis=2)


def hot_cell_grid(value: float, cell: tuple[int, int] = (2, 5), size: int = 8) -> np.ndarray:
    evidence = np.zeros((size, size))
    evidence[cell] = value
    return evidence


@pytest.mark.parametrize("image", [gray_image(), as_rgb(gray_image())], ids=["gray", "rgb"])
def test_overlay_is_rgb_uint8_of_the_image_size(image):
    out = overlay(image, hot_cell_grid(3.0), threshold=1.0)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8


def test_all_below_threshold_is_the_plain_image():
    image = gray_image(90, 130)
    evidence = np.random.default_rng(0).uniform(0.0, 1.0, (6, 9))
    evidence[3, 4] = 1.0  # at the threshold: not flagged (the model's rule is score > threshold), so not coloured
    np.testing.assert_array_equal(overlay(image, evidence, threshold=1.0), as_rgb(image))
    rgb = as_rgb(image)
    out = overlay(rgb, evidence, threshold=1.0)
    np.testing.assert_array_equal(out, rgb)
    assert out is not rgb


def test_hot_cell_colours_its_region_outlines_it_and_leaves_the_rest_alone():
    image = gray_image()  # 256 x 256 with an 8 x 8 grid: cells of 32 pixels; cell (2, 5) is centred at (80, 176)
    out = overlay(image, hot_cell_grid(3.0), threshold=1.0)  # 3 >= default vmax 2: red
    hot = upsample(hot_cell_grid(3.0), (256, 256)) > 1.0
    assert hot[80, 176] and hot.sum() > 32 * 32 // 2  # a 32-pixel cell, spread by the bilinear upsampling
    ys, xs = np.nonzero(hot)
    assert ys.min() > 80 - 32 and ys.max() < 80 + 32 and xs.min() > 176 - 32 and xs.max() < 176 + 32

    # Inside: blended towards red, the X-ray still under it.
    r, g, b = (int(v) for v in out[80, 176])
    assert r > g and r > b and (r, g, b) != (image[80, 176],) * 3

    # The outline: the legend's red (the region's strongest evidence) on every side of the region, near its edge.
    width = outline_width(out.shape)
    line = (out == RED.astype(np.uint8)).all(axis=2)
    near_edge = cv2.dilate(hot.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)) & \
        ~cv2.erode(hot.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)).astype(bool)
    assert line.any() and not (line & ~near_edge.astype(bool)).any()
    assert line[:80, 176].any() and line[80:, 176].any() and line[80, :176].any() and line[80, 176:].any()

    # Everywhere beyond the outline: the gray image, exactly.
    around = cv2.dilate(hot.astype(np.uint8), np.ones((2 * width + 5,) * 2, np.uint8)).astype(bool)
    assert changed(out, image)[~around].sum() == 0
    assert changed(out, image)[around].any()


def test_a_tiny_weak_spot_is_circled_and_still_seen_in_a_thumbnail():
    image = gray_image(1024, 1024)
    evidence = np.zeros((32, 32))
    evidence[20, 9] = 1.05  # just above the threshold: a few pixels after upsampling
    out = overlay(image, evidence, threshold=1.0)
    cy, cx = 20 * 32 + 16, 9 * 32 + 16
    ring = SMALL_RING * outline_width(out.shape)
    for y, x in ((cy - ring, cx), (cy + ring, cx), (cy, cx - ring), (cy, cx + ring)):
        r, g, b = (int(v) for v in out[y, x])
        assert r > 200 and g > 180 and b < 60  # yellow: the weakest colour of the scale
    marked = changed(out, image)
    assert marked[cy - 2 * ring:cy + 2 * ring, cx - 2 * ring:cx + 2 * ring].sum() == marked.sum()

    small, plain = thumbnail(out).astype(int), thumbnail(as_rgb(image)).astype(int)
    assert small.shape == (256, 256, 3)
    assert np.abs(small - plain).max() > 80  # a clear mark, not a faint smudge


def test_one_cell_just_above_threshold_always_shows():
    """An image flagged by one cell must show colour even when no pixel centre falls on that cell's centre."""
    evidence = np.zeros((4, 4))
    evidence[1, 2] = 1.0 + 1e-9
    image = gray_image(10, 10)
    assert changed(overlay(image, evidence, threshold=1.0), image).any()
    assert upsample(evidence, (10, 10)).max() == evidence.max()


def test_colour_depends_on_the_evidence_not_on_the_image_maximum():
    """One legend for the whole report: the same evidence gets the same colour whatever else is in the image."""
    weak = np.zeros((8, 8))
    weak[2, 1] = 1.5
    both = weak.copy()
    both[6, 6] = 9.0
    image = gray_image()
    a, b = overlay(image, weak, threshold=1.0), overlay(image, both, threshold=1.0)
    np.testing.assert_array_equal(a[:128, :128], b[:128, :128])


def test_constant_evidence():
    image = gray_image(40, 60)
    np.testing.assert_array_equal(overlay(image, np.full((3, 4), 0.5), threshold=1.0), as_rgb(image))
    out = overlay(image, np.full((3, 4), 1.5), threshold=1.0)
    assert changed(out, image).all()  # the whole image is above the threshold


def test_scale_arguments():
    image, evidence = gray_image(20, 20), hot_cell_grid(1.0, (1, 1), 4)
    with pytest.raises(XfeatError, match="give vmax"):
        overlay(image, evidence, threshold=-0.5)
    overlay(image, evidence, threshold=-0.5, vmax=0.5)  # a signed score works once the top of the scale is given
    with pytest.raises(XfeatError, match="above the threshold"):
        overlay(image, evidence, threshold=1.0, vmax=1.0)
    with pytest.raises(XfeatError, match="alpha"):
        overlay(image, evidence, threshold=0.5, alpha=1.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_evidence_is_an_error(bad):
    evidence = hot_cell_grid(3.0)
    evidence[0, 0] = bad
    with pytest.raises(XfeatError, match="NaN or infinite"):
        overlay(gray_image(), evidence, threshold=1.0)


@pytest.mark.parametrize("evidence", [np.zeros(8), np.zeros((0, 3)), np.zeros((2, 2, 2))])
def test_evidence_must_be_a_grid(evidence):
    with pytest.raises(XfeatError, match="2-D grid"):
        overlay(gray_image(), evidence, threshold=1.0)


def test_image_must_be_the_8_bit_conversion():
    with pytest.raises(XfeatError, match="uint8"):
        overlay(gray_image().astype(np.uint16), hot_cell_grid(3.0), threshold=1.0)


def test_thumbnail_keeps_aspect_and_never_enlarges():
    wide = np.zeros((500, 1000, 3), np.uint8)
    assert thumbnail(wide).shape == (128, 256, 3)
    assert thumbnail(np.zeros((1000, 300, 3), np.uint8), max_side=100).shape == (100, 30, 3)
    small = np.arange(100 * 50 * 3, dtype=np.uint8).reshape(100, 50, 3)
    np.testing.assert_array_equal(thumbnail(small), small)
    assert thumbnail(np.zeros((3, 5000, 3), np.uint8)).shape == (1, 256, 3)


def test_write_png_round_trips(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (31, 47, 3), dtype=np.uint8)
    path = tmp_path / "maps" / "a.png"
    write_png(path, rgb)
    np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1], rgb)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # no temporary left behind


def test_write_png_failure_names_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = blocker / "map.png"
    with pytest.raises(XfeatError) as e:
        write_png(path, np.zeros((4, 4, 3), np.uint8))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_legend_runs_from_gray_through_yellow_to_red():
    bar = legend(1.0, 2.0, width=256)
    assert bar.dtype == np.uint8 and bar.ndim == 3 and bar.shape[1] == 256 and bar.shape[0] < 64
    assert tuple(bar[5, 5]) == (128, 128, 128)
    left = bar[5, 256 // 8 + 4].astype(int)
    assert np.abs(left - YELLOW).max() < 10
    np.testing.assert_array_equal(bar[5, -1], RED.astype(np.uint8))
