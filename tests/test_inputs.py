"""Every kind of bad input gets a one-line error naming the file, and a non-zero exit status."""

from __future__ import annotations

import os
import re
import struct
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from conftest import random_image, write_dataset
from xfeat_cli.main import main
from xfeat import load_features
from xfeat.io.dataset import find_images
from xfeat.errors import DataError, XfeatWarning
from xfeat.io.images import read_header, read_image


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
    "text named .png": ("bad.png", lambda p: p.write_text("hello"), "not a TIFF, PNG, JPEG or BMP image"),
    "empty file": ("bad.tif", lambda p: p.write_bytes(b""), "empty file"),
    "float TIFF": ("bad.tif", lambda p: _tiff(p, np.ones((8, 8), np.float32)), "unsupported pixel type float32"),
    "int32 TIFF": ("bad.tif", lambda p: _tiff(p, np.ones((8, 8), np.int32)), "unsupported pixel type int32"),
    "multi-page TIFF": ("bad.tif", lambda p: _tiff(p, np.ones((2, 8, 8), np.uint16)), "multi-page TIFF (2 pages)"),
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
    ("path,bundle,label\nB1/normal/img0.tif,B1,normal\nB1/normal/img0.tif,B1,abnormal\n",
     "line 3 (B1/normal/img0.tif): the same file as line 2 (B1/normal/img0.tif), labelled normal there and abnormal"),
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


# -- one file is one image: symbolic and hard links, repeated manifest rows ------------------------------------

def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(os.path.relpath(target, link.parent))  # relative, as `ln -s ../../...` makes them
    return link


def _xfeat_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("xfeat: warning:")]


@pytest.mark.parametrize("make_link, kept", [
    (_symlink, "img0.tif"),  # the file's own name wins over a symbolic link, even one sorting first
    (lambda link, target: os.link(target, link) or link, "a-link.tif"),  # two equal names: the first wins
], ids=["symlink", "hard link"])
def test_a_second_name_in_one_bundle_is_the_same_image(small_dataset, make_link, kept):
    original = small_dataset / "B1" / "normal" / "img0.tif"
    link = make_link(small_dataset / "B1" / "normal" / "a-link.tif", original)
    with pytest.warns(XfeatWarning) as caught:
        dataset = find_images(small_dataset)
    assert len(dataset) == 8 and len({r.path for r in dataset}) == 8
    assert f"B1/normal/{kept}" in {r.relpath for r in dataset}
    [message] = [str(w.message) for w in caught]
    assert str(link) in message and str(original) in message and "counted once" in message
    assert "leak" not in message


def test_a_symlink_across_bundles_is_one_row_with_a_leak_warning_and_reruns_after_removal(
        tmp_path, small_dataset, capsys, one_torch_thread):
    original = small_dataset / "B1" / "normal" / "img0.tif"
    link = _symlink(small_dataset / "B2" / "normal" / "link.tif", original)
    cache = tmp_path / "c.h5"
    argv = ("extract", small_dataset, "--cache", cache, "--backbone", "resnet18", "--weights", "none", "--methods",
            "m1", "--size", "32x16", "--flips", "1", "--device", "cpu", "--workers", "0", "--jobs", "1", "--quiet")
    code, err = run(capsys, *argv)
    assert code == 0, err
    [leak] = [w for w in _xfeat_warnings(err) if "random weights" not in w]
    assert str(link) in leak and str(original) in leak and "bundles B1 and B2: a leak between folds" in leak
    fs = load_features(cache, "resnet18", "m1")
    assert len(fs.paths) == len(set(fs.paths)) == 8
    assert fs.groups[list(fs.paths).index(str(original.resolve()))] == "B1"
    link.unlink()
    code, err = run(capsys, *argv)
    assert code == 0, err
    assert len(load_features(cache, "resnet18", "m1").paths) == 8


def test_copies_with_two_labels_warn_of_a_labelling_conflict(small_dataset):
    from xfeat.io.dataset import warn_leaks
    records = find_images(small_dataset).records  # B1/abnormal/img0.tif, then B1/normal/img0.tif
    with pytest.warns(XfeatWarning, match="labelled abnormal there and normal here: a labelling conflict"):
        assert warn_leaks(records[:2], ["a", "a"]) == []  # one bundle: no leak, but a conflict


def test_one_file_with_two_labels_stops_the_run(small_dataset):
    original = small_dataset / "B1" / "normal" / "img0.tif"
    link = _symlink(small_dataset / "B1" / "abnormal" / "link.tif", original)
    with pytest.raises(DataError, match="labelled normal there and abnormal here") as caught:
        find_images(small_dataset)
    assert caught.value.path == str(link) and str(original) in caught.value.problem


def test_manifest_rows_naming_one_file_are_one_image(small_dataset):
    _symlink(small_dataset / "B2" / "normal" / "link.tif", small_dataset / "B1" / "normal" / "img0.tif")
    manifest = _manifest(small_dataset, "path,bundle,label\nB1/normal/img0.tif,B1,normal\nB1/normal/img1.tif,B1,normal\n"
                                        "B2/normal/link.tif,B2,normal\nB1/normal/img1.tif,B1,normal\n")
    with pytest.warns(XfeatWarning) as caught:
        dataset = find_images(manifest)
    assert [r.relpath for r in dataset] == ["B1/normal/img0.tif", "B1/normal/img1.tif"]
    repeat_warning, link_warning = sorted((str(w.message) for w in caught), key=lambda m: "link" in m)
    assert "line 4 (B2/normal/link.tif): the same file as line 2 (B1/normal/img0.tif)" in link_warning
    assert "bundles B1 and B2: a leak between folds" in link_warning
    assert "line 5 (B1/normal/img1.tif): the same file as line 3 (B1/normal/img1.tif); counted once" in repeat_warning


def test_linked_folders_are_walked_once_and_a_broken_link_is_named(tmp_path, small_dataset):
    more = write_dataset(tmp_path / "more", {"X": {"normal": 2}})
    _symlink(small_dataset / "B1" / "normal" / "more", more / "X" / "normal")
    _symlink(small_dataset / "B1" / "normal" / "loop", small_dataset / "B1" / "normal")  # never entered again
    assert len(find_images(small_dataset)) == 10
    broken = _symlink(small_dataset / "B2" / "normal" / "gone.tif", tmp_path / "nothing.tif")
    with pytest.raises(DataError, match="cannot read file") as caught:
        find_images(small_dataset)
    assert caught.value.path == str(broken)
    assert len(find_images(small_dataset, skip_bad=True).skipped) == 1


# -- pixel limits: refused from the header, before decoding -------------------------------------------------

GIANT = "declares 60000 x 60000 pixels (3600 MP), over the limit of 100 MP; raise it with --max-pixels"


def _giant_tiff(path: Path) -> Path:
    """A 400-byte tiled, compressed TIFF whose header declares 60000 x 60000 pixels (7.2 GB of uint16)."""
    tifffile.imwrite(path, np.zeros((256, 256), np.uint16), tile=(256, 256), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(60000)
        tif.pages[0].tags["ImageLength"].overwrite(60000)
    return path


def _giant_png(path: Path) -> Path:
    """The 33 bytes a PNG starts with (signature and IHDR), declaring 60000 x 60000 16-bit gray pixels."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)))
    return path


@pytest.mark.parametrize("make", [_giant_tiff, _giant_png], ids=["TIFF", "PNG"])
def test_a_giant_image_is_refused_from_its_header(tmp_path, small_dataset, capsys, make):
    giant = make(small_dataset / "B2" / "abnormal" / f"giant{'.tif' if make is _giant_tiff else '.png'}")
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=re.escape(GIANT)):
            read_image(giant)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000 and time.perf_counter() - start < 1
    assert read_header(giant, max_pixels=4_000_000_000).height == 60000  # --max-pixels raises the limit
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out")
    assert_one_line_error(code, err, giant, GIANT)


def test_max_pixels_option_sets_the_limit(tmp_path, small_dataset, capsys):
    image = small_dataset / "B1" / "abnormal" / "img0.tif"  # the first image: 40 x 24 = 960 pixels
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out", "--max-pixels", "500")
    assert_one_line_error(code, err, image, "declares 40 x 24 pixels (0.00096 MP), over the limit of 0.0005 MP")
    assert convert_m1(capsys, small_dataset, tmp_path / "out")[0] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_max_pixels_reaches_the_decoding_workers(small_dataset, workers):
    """Worker processes get the limit with their work, never from a global."""
    from xfeat.features.decoding import Work, image_batches

    work = [Work(r, ("m1",)) for r in find_images(small_dataset).records[:4]]
    batches = list(image_batches(work, (32, 16), None, 2, workers, max_pixels=500))
    assert [item["index"] for batch in batches for item in batch] == [0, 1, 2, 3]
    assert all(item["problem"].startswith("declares 40 x 24 pixels") for batch in batches for item in batch)


@pytest.mark.parametrize("extra, problem", [
    (("--size", "40000x40000"), "argument --size: 40000x40000 is 1600 MP, over the limit of 100 MP"),
    (("--max-pixels", "1000", "--size", "64x32"), "argument --size: 64x32 is 0.00205 MP, over the limit of 0.001"),
    (("--size", "8x4000"), "argument --size: each side must be at least 16 pixels"),
    (("--max-pixels", "0"), "argument --max-pixels: must be at least 1"),
])
def test_input_size_over_the_limit_is_a_usage_error(tmp_path, small_dataset, capsys, extra, problem):
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in ("extract", small_dataset, "--cache", tmp_path / "c.h5", *extra)])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"xfeat extract: error: {problem}")
    assert not (tmp_path / "c.h5").exists()


# -- one bit depth per dataset, whatever the method -------------------------------------------------------

def test_mixed_depth_is_refused_for_every_method(tmp_path, small_dataset, capsys, one_torch_thread):
    eight = small_dataset / "B2" / "normal" / "eight.tif"
    _tiff(eight, random_image(7, dtype=np.uint8))
    code, err = convert_m1(capsys, small_dataset, tmp_path / "out")
    assert_one_line_error(code, err, eight, "mixes 8-bit and 16-bit images")
    code, err = run(capsys, "extract", small_dataset, "--cache", tmp_path / "c.h5", "--backbone", "resnet18",
                    "--weights", "none", "--methods", "m1", "--size", "32x16", "--device", "cpu", "--workers", "0",
                    "--jobs", "1", "--quiet")
    assert_one_line_error(code, err, eight, "mixes 8-bit and 16-bit images")
