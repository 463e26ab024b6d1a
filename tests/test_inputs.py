"""Every kind of bad input gets a one-line error naming the file, and a non-zero exit status."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from conftest import random_image
from xfeat_cli.main import main
from xfeat.io.dataset import find_images
from xfeat.errors import DataError, XfeatWarning
from xfeat.io.images import read_image


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def convert_m1(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run(capsys, "convert", data, "--method", "m1", "--out", out, "--quiet", "--jobs", "1", *extra)


def assert_one_line_error(code: int, err: str, path: Path | str, problem: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xfeat: error: ") and str(path) in lines[0] and problem in lines[0], lines[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tiff(path: Path, array: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, array)


def _png(path: Path, array: np.ndarray) -> None:
    path.write_bytes(cv2.imencode(".png", array)[1].tobytes())


BAD_FILES = {
    "truncated TIFF": ("bad.tif", lambda p: (_tiff(p, random_image(1, (64, 64))), _truncate(p)),
                       "unreadable or truncated TIFF"),
    "truncated PNG": ("bad.png", lambda p: (_png(p, random_image(1, (64, 64))), _truncate(p)),
                      "unreadable or truncated PNG"),
    "text named .png": ("bad.png", lambda p: p.write_text("hello"), "not a TIFF or PNG image"),
    "empty file": ("bad.tif", lambda p: p.write_bytes(b""), "empty file"),
    "float TIFF": ("bad.tif", lambda p: _tiff(p, np.ones((8, 8), np.float32)), "unsupported pixel type float32"),
    "int32 TIFF": ("bad.tif", lambda p: _tiff(p, np.ones((8, 8), np.int32)), "unsupported pixel type int32"),
    "multi-page TIFF": ("bad.tif", lambda p: _tiff(p, np.ones((2, 8, 8), np.uint16)), "multi-page TIFF (2 pages)"),
    "colour PNG": ("bad.png", lambda p: _png(p, np.dstack([np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8),
                                                        np.ones((8, 8), np.uint8)])), "colour image (8 x 8 x 3)"),
    "empty image": ("bad.tif", lambda p: _tiff(p, np.zeros((0, 5), np.uint16)), "empty image (no pixels)"),
    "non-image file": ("notes.txt", lambda p: p.write_text("x"), "not an image file"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_image_file_stops_the_run_naming_it(tmp_path, small_dataset, capsys, kind):
    name, make, problem = BAD_FILES[kind]
    bad = small_dataset / "B2" / "abnormal" / name
    make(bad)
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out")
    assert_one_line_error(code, err, bad, problem)


@pytest.mark.parametrize("kind", BAD_FILES)
def test_skip_bad_lists_the_file_in_a_report_and_goes_on(tmp_path, small_dataset, capsys, kind):
    name, make, problem = BAD_FILES[kind]
    bad = small_dataset / "B2" / "abnormal" / name
    make(bad)
    out = tmp_path / "out"
    code, err = convert_m1(capsys, small_dataset, out, "--skip-bad")
    assert code == 0
    assert "skipped 1 bad file(s)" in err
    report = (out / "skipped.csv").read_text().splitlines()
    assert report[0] == "path,problem" and len(report) == 2
    assert str(bad) in report[1] and problem in report[1]
    assert len(list(out.rglob("*.png"))) == 8  # every good image converted


def test_gray_stored_as_rgb_is_read_as_gray(tmp_path):
    gray = random_image(3, (16, 12), np.uint8)
    _png(tmp_path / "g.png", np.dstack([gray] * 3))
    _tiff(tmp_path / "g16.tif", np.dstack([random_image(4, (16, 12))] * 3))
    assert np.array_equal(read_image(tmp_path / "g.png"), gray)
    assert read_image(tmp_path / "g16.tif").shape == (16, 12)


def test_16bit_png_and_tiff_are_read_at_true_depth(tmp_path):
    image = random_image(5, (20, 10))
    _png(tmp_path / "a.png", image)
    _tiff(tmp_path / "a.tif", image)
    for path in (tmp_path / "a.png", tmp_path / "a.tif"):
        pixels = read_image(path)
        assert pixels.dtype == np.uint16 and np.array_equal(pixels, image)
    _png(tmp_path / "b.png", image.astype(np.uint8))
    assert read_image(tmp_path / "b.png").dtype == np.uint8


def test_unknown_label_folder(tmp_path, small_dataset, capsys):
    folder = small_dataset / "B1" / "maybe"
    folder.mkdir()
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out")
    assert_one_line_error(code, err, folder, "unknown label folder 'maybe'")


def test_bundle_with_no_images(tmp_path, small_dataset, capsys):
    (small_dataset / "B3" / "normal").mkdir(parents=True)
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out")
    assert_one_line_error(code, err, small_dataset / "B3", "bundle has no images")


def test_file_outside_label_folder(tmp_path, small_dataset, capsys):
    stray = small_dataset / "B1" / "stray.tif"
    _tiff(stray, random_image(9))
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out")
    assert_one_line_error(code, err, stray, "file outside a label folder")


def test_missing_dataset(tmp_path, capsys):
    code, err = convert_m1(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert_one_line_error(code, err, tmp_path / "nowhere", "no such file or folder")


def _manifest(small_dataset: Path, text: str) -> Path:
    path = small_dataset / "manifest.csv"
    path.write_text(text)
    return path


def test_manifest_labels_in_every_spelling(small_dataset):
    manifest = _manifest(small_dataset, "path,bundle,label,anomaly\n"
                                        "B1/normal/img0.tif,B1,Normal,\nB1/abnormal/img0.tif,B1,DEFECT,scratch\n"
                                        "B2/normal/img0.tif,B2,good,\nB2/normal/img1.tif,B2, 0 ,\n"
                                        f"{small_dataset / 'B2/abnormal/img0.tif'},B2,1,bubble\n")
    dataset = find_images(manifest)
    assert [(r.bundle, r.label) for r in dataset] == [("B1", 1), ("B1", 0), ("B2", 1), ("B2", 0), ("B2", 0)]
    assert dataset.records[0].extra == {"anomaly": "scratch"}
    assert dataset.root == small_dataset.resolve()


def test_manifest_row_pointing_at_a_missing_file(tmp_path, small_dataset, capsys):
    manifest = _manifest(small_dataset, "path,bundle,label\nB1/normal/img0.tif,B1,normal\nB1/normal/gone.tif,B1,normal\n")
    code, err = convert_m1(capsys, manifest, tmp_path / "out")
    assert_one_line_error(code, err, small_dataset / "B1/normal/gone.tif", f"image not found (listed in {manifest}, "
                                                                           "line 3)")


@pytest.mark.parametrize("text, problem", [
    ("path,bundle,label,path\nB1/normal/img0.tif,B1,normal,x\n", "duplicated column 'path' in the header"),
    ("path,bundle,label\nB1/normal/img0.tif,B1,normal\npath,bundle,label\nB1/normal/img1.tif,B1,normal\n",
     "line 3: the header is repeated as a data row"),
    ("path,bundle\nB1/normal/img0.tif,B1\n", "header lacks column(s) label"),
    ("path,bundle,label\nB1/normal/img0.tif,B1,broken\n", "line 2: unknown label 'broken'"),
    ("path,bundle,label\nB1/normal/img0.tif,B1\n", "line 2: 2 fields where the header has 3"),
    ("path,bundle,label\nB1/normal/img0.tif,B1,normal\nB1/normal/img0.tif,B1,normal\n", "listed twice (lines 2 and 3)"),
    ("", "empty manifest"),
])
def test_bad_manifest(tmp_path, small_dataset, capsys, text, problem):
    manifest = _manifest(small_dataset, text)
    code, err = convert_m1(capsys, manifest, tmp_path / "out")
    assert_one_line_error(code, err, manifest, problem)


def test_same_image_in_two_bundles_warns_naming_both(tmp_path, small_dataset, capsys):
    original = small_dataset / "B1" / "normal" / "img0.tif"
    copy = small_dataset / "B2" / "normal" / "copy.tif"
    copy.write_bytes(original.read_bytes())
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out")
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("xfeat: warning:")]
    assert len(warning) == 1 and str(original) in warning[0] and str(copy) in warning[0] and "leak" in warning[0]


def test_leak_warning_from_the_library(small_dataset):
    from xfeat.io.dataset import warn_leaks
    dataset = find_images(small_dataset)
    with pytest.warns(XfeatWarning, match="bundles B1 and B2"):
        warn_leaks(dataset.records[:2] + dataset.records[4:5], ["a", "b", "a"])


def test_hidden_files_and_root_files_are_ignored(small_dataset):
    (small_dataset / "README.txt").write_text("about")
    (small_dataset / "B1" / "normal" / ".DS_Store").write_text("x")
    (small_dataset / "B1" / "normal" / "Thumbs.db").write_text("x")
    assert len(find_images(small_dataset)) == 8


def test_data_error_survives_a_trip_through_worker_processes():
    import pickle
    error = pickle.loads(pickle.dumps(DataError("a.tif", "broken")))
    assert (error.path, error.problem, str(error)) == ("a.tif", "broken", "a.tif: broken")
