"""Colour photos through the whole pipeline: the rgb method and luminance, the one-kind dataset rule, the
synthetic product photos, and the ResNet-50 paper's protocol (rgb at 224 x 224, linear SVM on fc1000) from
extract to predict, on tiny real files."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from xfeat import load_features
from xfeat.convert import convert, luminance, scan_dataset
from xfeat.convert.methods import gray_of, rgb
from xfeat.errors import DataError
from xfeat.io.dataset import find_images
from xfeat.io.images import load_native
from xfeat.synth import make_product_dataset, render_product
from xfeat.synth.products import plan_products
from xfeat_cli.main import main


def _photo(seed: int = 0, size: tuple[int, int] = (40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _write(path: Path, image: np.ndarray, ext: str = ".png") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = image[:, :, ::-1] if image.ndim == 3 else image
    ok, data = cv2.imencode(ext, np.ascontiguousarray(bgr))
    assert ok
    path.write_bytes(data.tobytes())
    return path


def test_rgb_keeps_the_channels_and_gray_methods_take_the_bt601_luminance():
    photo = _photo()
    np.testing.assert_array_equal(convert(photo, "rgb"), photo)
    y = luminance(photo)
    expected = 0.299 * photo[:, :, 0] + 0.587 * photo[:, :, 1] + 0.114 * photo[:, :, 2]
    assert np.abs(y.astype(float) - expected).max() <= 0.51  # rounded, not truncated
    np.testing.assert_array_equal(convert(photo, "m1"), y)
    np.testing.assert_array_equal(convert(photo, "m3"), convert(y, "m3"))


def test_gray_saved_as_colour_is_exact_and_rgb_of_gray_is_replicated():
    gray = _photo()[:, :, 0]
    np.testing.assert_array_equal(gray_of(np.dstack([gray] * 3)), gray)
    np.testing.assert_array_equal(rgb(gray), np.dstack([gray] * 3))
    deep = gray.astype(np.uint16) * 257  # 16 bits: its own window, as each channel of a 16-bit colour image
    np.testing.assert_array_equal(rgb(deep), np.dstack([convert(deep, "m3")] * 3))


def test_16_bit_colour_gets_a_window_per_channel():
    rng = np.random.default_rng(1)
    photo = np.dstack([rng.integers(1000 * (c + 1), 1000 * (c + 1) + 500, (30, 30)) for c in range(3)])
    photo = photo.astype(np.uint16)
    out = convert(photo, "rgb")
    assert out.dtype == np.uint8 and out.shape == photo.shape
    for c in range(3):  # each channel stretched over its own range, not the 16-bit scale
        assert out[:, :, c].min() == 0 and out[:, :, c].max() == 255


def test_a_colour_dataset_is_scanned_as_colour_and_its_histogram_is_the_luminance(tmp_path):
    for i in range(3):
        _write(tmp_path / "d" / "B1" / "normal" / f"{i}.png", _photo(i))
    _write(tmp_path / "d" / "B1" / "normal" / "gray_as_rgb.png", np.dstack([_photo(9)[:, :, 0]] * 3))
    scan = scan_dataset(find_images(tmp_path / "d"), jobs=1)
    assert scan.colour and scan.bit_depth == 8
    pixels = [load_native(r.path).pixels for r in scan.records]
    assert sum(p.ndim == 3 for p in pixels) == 3  # the gray one saved as RGB reads as gray
    lum = sum(np.bincount((luminance(p) if p.ndim == 3 else p).ravel(), minlength=65536) for p in pixels)
    np.testing.assert_array_equal(scan.histogram, lum)
    assert scan_dataset(find_images(tmp_path / "d"), jobs=1, decode=False).colour


@pytest.mark.parametrize("decode", [True, False])
def test_gray_and_colour_images_in_one_dataset_is_one_error_naming_both(tmp_path, decode):
    gray = _write(tmp_path / "d" / "B1" / "normal" / "xray.png", _photo()[:, :, 0])
    photo = _write(tmp_path / "d" / "B1" / "normal" / "photo.jpg", _photo(), ".jpg")
    with pytest.raises(DataError, match="mixes gray and colour images") as err:
        scan_dataset(find_images(tmp_path / "d"), jobs=1, decode=decode)
    assert str(gray) in str(err.value) and str(photo) in str(err.value) and "\n" not in str(err.value)


def test_synthetic_products_are_reproducible_colour_jpegs_in_the_usual_layout(tmp_path):
    a = make_product_dataset(tmp_path / "a", bundles=3, images=12, abnormal_fraction=0.25, size=(64, 64), seed=3)
    b = make_product_dataset(tmp_path / "b", bundles=3, images=12, abnormal_fraction=0.25, size=(64, 64), seed=3)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*.jpg"))
    assert len(files) == 12 and a.n_abnormal == 3 and a.bundles == ("B01", "B02", "B03")
    for f in files:
        assert (a.root / f).read_bytes() == (b.root / f).read_bytes()
        assert (a.root / f).read_bytes()[:3] == b"\xff\xd8\xff"
    rows = list(csv.DictReader(open(a.manifest)))
    assert {r["anomaly"] for r in rows if r["label"] == "abnormal"} <= {"stain", "scratch", "chip", "no_cap",
                                                                        "skewed_label"}
    pixels = load_native(a.root / files[0]).pixels
    assert pixels.shape == (64, 64, 3)
    plans, styles = plan_products(bundles=3, images=12, size=(64, 64), seed=3)
    style = styles[plans[0].bundle]
    clean = render_product((3, 0), 64, 64, style, None)
    for anomaly in ("stain", "scratch", "chip", "no_cap", "skewed_label"):  # every defect shows, far above the noise
        defect = render_product((3, 0), 64, 64, style, anomaly)
        assert np.abs(defect.astype(int) - clean).max() > 60, anomaly


def test_the_resnet50_paper_protocol_runs_end_to_end_on_colour_photos(tmp_path, capsys):
    data, cache, model = tmp_path / "photos", tmp_path / "c.h5", tmp_path / "m.xfeat"
    assert main(["synth", str(data), "--colour", "--bundles", "3", "--images", "18", "--size", "64x64", "-q"]) == 0
    (data / "manifest.csv").unlink()  # the folder layout, with a third of the photos as PNG and a third as BMP
    for i, jpg in enumerate(sorted(data.rglob("*.jpg"))):
        if i % 3:
            _write(jpg.with_suffix(".png" if i % 3 == 1 else ".bmp"), load_native(jpg).pixels,
                   ".png" if i % 3 == 1 else ".bmp")
            jpg.unlink()
    assert {p.suffix for p in data.rglob("*.*")} == {".jpg", ".png", ".bmp"}
    assert main(["extract", str(data), "--cache", str(cache), "--backbone", "resnet50", "--weights", "none",
                 "--methods", "rgb,m2", "--size", "64x64", "--flips", "1", "--jobs", "1", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "holds colour images: m2 converted each one's luminance" in out
    fs = load_features(cache, "resnet50", "rgb", layer="fc1000")
    assert fs.X.shape == (18, 1000) and np.isfinite(fs.X).all()
    assert main(["evaluate", str(cache), "--clf", "svm", "--layer", "fc1000", "--methods", "rgb", "-q",
                 "--report", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").exists()
    assert main(["train", str(cache), "--backbone", "resnet50", "--method", "rgb", "--clf", "svm", "--layer",
                 "fc1000", "--out", str(model), "-q", "--weights", "none"]) == 0
    assert main(["predict", str(model), str(data), "--out", str(tmp_path / "raw.csv"), "-q"]) == 0
    assert main(["predict", str(model), str(data), "--out", str(tmp_path / "cached.csv"), "--cache", str(cache),
                 "-q"]) == 0
    raw = {r["path"]: r for r in csv.DictReader(open(tmp_path / "raw.csv"))}
    cached = {r["path"]: r for r in csv.DictReader(open(tmp_path / "cached.csv"))}
    assert len(raw) == 18 and set(raw) == set(cached)
    for path, row in raw.items():
        assert row["error"] == "" and row["source"] == "computed"
        assert float(row["score"]) == pytest.approx(float(cached[path]["score"]), rel=1e-5, abs=1e-6)
