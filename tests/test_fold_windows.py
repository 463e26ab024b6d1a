"""Per-bundle histograms and the window each held-out bundle would get from the other bundles alone."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from conftest import random_image, stored, write_dataset
from xfeat.convert.folds import fold_windows
from xfeat.convert.scan import scan_dataset
from xfeat.convert.stats import pixel_histogram, window_stats
from xfeat.features.cache import (FOLD_WINDOWS_UNAVAILABLE, CacheError, fold_windows_of_cache,
                                  stored_window_histograms)
from xfeat.features.writer import CacheWriter
from xfeat.features.extract import ExtractConfig, extract
from xfeat.io.dataset import find_images
from xfeat_cli.main import main

LAYOUT = {"B1": {"normal": 3, "abnormal": 1}, "B2": {"normal": 2, "abnormal": 2}, "B3": {"normal": 3}}
RELEASE = Path(__file__).parent / "fixtures" / "release-0.1.0.zip"


@pytest.fixture
def three_bundles(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", LAYOUT)


def plant_bright_bundle(root: Path, n: int = 3) -> None:
    """A bundle exposed much brighter than the others: its pixels alone push the global G_max up."""
    folder = root / "BRIGHT" / "normal"
    folder.mkdir(parents=True)
    for k in range(n):
        tifffile.imwrite(folder / f"img{k}.tif", (random_image(100 + k).astype(np.uint32) * 8).clip(0, 65535)
                         .astype(np.uint16))


def manifest_without(root: Path, bundle: str, out: Path) -> Path:
    """A CSV manifest of the same files, one bundle left out: a dataset the fold's training bundles alone make."""
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "bundle", "label"))
        for r in find_images(root).records:
            if r.bundle != bundle:
                writer.writerow((str(r.path), r.bundle, r.label))
    return out


def test_bundle_histograms_add_up_to_the_global_one(three_bundles):
    scan = scan_dataset(find_images(three_bundles), jobs=2)
    assert list(scan.bundle_histograms) == ["B1", "B2", "B3"]
    np.testing.assert_array_equal(sum(scan.bundle_histograms.values()), scan.histogram)
    for bundle, hist in scan.bundle_histograms.items():
        own = [pixel_histogram(tifffile.imread(r.path)) for r in scan.records if r.bundle == bundle]
        np.testing.assert_array_equal(hist, sum(own))
    assert scan.images_per_bundle() == {"B1": 4, "B2": 4, "B3": 3}
    assert scan_dataset(find_images(three_bundles), decode=False).bundle_histograms == {}


def test_a_fold_window_is_the_window_of_a_scan_without_its_bundle(three_bundles, tmp_path):
    scan = scan_dataset(find_images(three_bundles), jobs=1)
    folds = scan.fold_windows()
    assert [f.bundle for f in folds] == ["B1", "B2", "B3"] and folds.global_window == scan.window_stats()
    for fold in folds:
        alone = scan_dataset(find_images(manifest_without(three_bundles, fold.bundle, tmp_path / "m.csv")), jobs=1)
        assert fold.window == alone.window_stats()  # every field: raw percentiles, counts, equalisation curve
        assert fold.g_max_shift == fold.window.g_max - scan.window_stats().g_max
        assert fold.n_images == scan.images_per_bundle()[fold.bundle]
    assert fold_windows(scan.bundle_histograms).global_window.g_max == scan.window_stats().g_max


def test_unrounded_windows_and_8bit_data_keep_the_global_settings(three_bundles):
    scan = scan_dataset(find_images(three_bundles), jobs=1)
    folds = scan.fold_windows(scan.window_stats(round_to=None))
    assert all(f.window.round_to is None for f in folds)
    assert all(f.g_max_shift == round(f.window.raw_high) - round(folds.global_window.raw_high) for f in folds)
    eight = {b: np.bincount(np.arange(256) % (60 + 10 * i), minlength=65536).astype(np.int64)
             for i, b in enumerate("ABC")}
    global_8bit = window_stats(sum(eight.values()), n_images=3, bit_depth=8)
    assert all(f.window.bit_depth == 8 and f.window.round_to is None for f in fold_windows(eight, global_8bit))


def test_a_much_brighter_bundle_gets_another_window_and_is_flagged(three_bundles):
    plant_bright_bundle(three_bundles)
    scan = scan_dataset(find_images(three_bundles), jobs=1)
    folds = scan.fold_windows()
    bright = next(f for f in folds if f.bundle == "BRIGHT")
    assert bright.differs and bright in folds.differing
    assert bright.g_max_shift <= -10000 and bright.curve_shift > 1000
    text = folds.describe()
    assert text.startswith(f"conversion windows: {len(folds.differing)} of 4 held-out bundles would get another "
                           "rounded window from the other bundles alone (max shift G_min ")
    assert f"G_max {bright.g_max_shift:+d} gray levels); see xfeat info" in text
    assert "DIFFERS" in bright.describe()


def test_one_bundle_has_no_fold(tmp_path):
    root = write_dataset(tmp_path / "one", {"B1": {"normal": 2}})
    folds = scan_dataset(find_images(root), jobs=1).fold_windows()
    assert len(folds) == 0 and not folds.differing


def extract_m2(data: Path, cache: Path, **kw) -> None:
    config = ExtractConfig(backbones=("resnet18",), methods=("m2",), size=(16, 16), flips=1, weights="none",
                           device="cpu", workers=0, jobs=1, **kw)
    extract(data, cache, config)


def test_extract_stores_the_histograms_and_the_cache_gives_the_fold_windows(three_bundles, tmp_path, capsys):
    plant_bright_bundle(three_bundles)
    cache = tmp_path / "c.h5"
    extract_m2(three_bundles, cache)
    scan = scan_dataset(find_images(three_bundles), jobs=1)
    with h5py.File(cache, "r") as f:  # plain HDF5: any reader can redo the analysis
        ds = f["window_histograms"]
        assert ds.shape == (4, 65536) and ds.dtype == np.int64
        assert [b.decode() for b in ds.attrs["bundles"]] == ["B1", "B2", "B3", "BRIGHT"]
        assert ds.attrs["n_images"].tolist() == [4, 4, 3, 3]
        np.testing.assert_array_equal(ds[...].sum(axis=0), scan.histogram)
        assert json.loads(f.attrs["window_stats"])["g_max"] == scan.window_stats().g_max
    with stored(cache, "window_histograms") as ds:  # its segment's dataset: compressed and checksummed
        assert ds.compression == "gzip" and ds.fletcher32
    folds = fold_windows_of_cache(cache)
    assert folds.to_dict() == scan.fold_windows().to_dict()
    assert [f.bundle for f in folds.differing] == [f.bundle for f in scan.fold_windows().differing]
    # held-out bundles added after the window was fitted never entered it: their fold window is the global one
    later = fold_windows_of_cache(cache, bundles=["B1", "NEW"])
    assert [f.bundle for f in later] == ["B1", "NEW"] and later[1].n_images == 0 and not later[1].differs
    assert later[1].curve_shift == 0

    # a second run reuses the stored window and leaves the histograms as they were
    tifffile.imwrite(three_bundles / "B1" / "normal" / "late.tif", random_image(999))
    extract_m2(three_bundles, cache)
    assert fold_windows_of_cache(cache).to_dict() == folds.to_dict()

    assert main(["info", str(cache)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("  held-out bundle windows, fitted on the other bundles alone")
    assert out[3].startswith("    B1 (4 images): G_min ") and "DIFFERS" in out[6]
    assert out[7] == "  " + folds.describe("")
    assert main(["info", str(cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [f["bundle"] for f in info["fold_windows"]] == ["B1", "B2", "B3", "BRIGHT"]
    assert info["fold_windows"][3]["differs"] and info["fold_windows_source"] == "cache"


def test_a_cache_without_histograms_says_unavailable_and_info_data_rescans(three_bundles, tmp_path, capsys):
    scan = scan_dataset(find_images(three_bundles), jobs=1)
    cache = tmp_path / "c.h5"
    with CacheWriter(cache) as writer:  # as xfeat 0.1.0, or a run given --stats, wrote them: the window alone
        writer.prepare([], {}, scan.window_stats())
    with h5py.File(cache, "r") as f:
        assert stored_window_histograms(f) is None
    assert fold_windows_of_cache(cache) is None
    assert main(["info", str(cache)]) == 0
    assert f"  {FOLD_WINDOWS_UNAVAILABLE}" in capsys.readouterr().out.splitlines()
    assert main(["info", str(cache), "--data", str(three_bundles), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fold_windows"] == scan.fold_windows().to_dict() and info["fold_windows_source"] == "data"
    tifffile.imwrite(three_bundles / "B1" / "normal" / "late.tif", random_image(999) * 3)
    assert main(["info", str(cache), "--data", str(three_bundles)]) == 0
    assert "not the images it was fitted on" in capsys.readouterr().out


def test_the_0_1_0_cache_says_unavailable_without_error(tmp_path, capsys):
    with zipfile.ZipFile(RELEASE) as z:
        z.extract("cache.h5", tmp_path)
    cache = tmp_path / "cache.h5"
    assert fold_windows_of_cache(cache) is None
    assert main(["info", str(cache)]) == 0
    assert f"  {FOLD_WINDOWS_UNAVAILABLE}" in capsys.readouterr().out.splitlines()
    assert main(["info", str(cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fold_windows"] is None and info["fold_windows_note"] == FOLD_WINDOWS_UNAVAILABLE


def test_damaged_or_mismatched_histograms_are_an_error_not_a_result(three_bundles, tmp_path, capsys):
    cache = tmp_path / "c.h5"
    extract_m2(three_bundles, cache)
    with h5py.File(cache, "a") as f:
        f["window_histograms"][0, 2000] += 10 ** 9  # edited: the rows no longer add up to the stored window
    with pytest.raises(CacheError, match="do not add up to the stored window_stats"):
        fold_windows_of_cache(cache)
    assert main(["info", str(cache)]) == 0
    assert "conversion windows: " in capsys.readouterr().out


def test_info_counts_cached_rows_whose_file_is_gone(three_bundles, tmp_path, capsys):
    cache = tmp_path / "c.h5"
    extract_m2(three_bundles, cache)
    (three_bundles / "B3" / "normal" / "img0.tif").unlink()
    (three_bundles / "B2" / "abnormal" / "img1.tif").rename(three_bundles / "B2" / "normal" / "moved.tif")
    assert main(["info", str(cache), "--data", str(three_bundles)]) == 0
    out = capsys.readouterr().out
    assert "vs dataset: 1 missing, 0 stale (file changed), 2 cached rows whose file is gone from the dataset" in out
