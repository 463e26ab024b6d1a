"""Tests for xfeat.synth: layout, counts, determinism, atomic writes, refusals, intensities, anomalies."""

from __future__ import annotations

import csv
import functools
import math
import os
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from xfeat.errors import XfeatError
from xfeat.synth import (
    ANOMALY_TYPES,
    SIZE_RANGE_H,
    SIZE_RANGE_W,
    SMALL_ANOMALIES,
    BundleStyle,
    SynthSummary,
    make_dataset,
    plan_dataset,
    render_electrode,
)

SMALL = (64, 48)


def read_manifest(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(root / "manifest.csv", newline="", encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split(",")
        fh.seek(0)
        rows = list(csv.DictReader(fh))
    return header, rows


def tif_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.tif")}


# --------------------------------------------------------------------------- layout and counts


def test_layout_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "data"
    summary = make_dataset(out, bundles=3, images=14, abnormal_fraction=0.3, size=SMALL, seed=1, jobs=1)

    assert isinstance(summary, SynthSummary)
    assert summary.root == out
    assert summary.manifest == out / "manifest.csv"
    assert summary.bundles == ("B01", "B02", "B03")
    assert (summary.n_images, summary.n_abnormal) == (14, round(14 * 0.3))

    header, rows = read_manifest(out)
    assert header == ["path", "bundle", "label", "anomaly"]
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths)
    assert set(paths) == tif_files(out)  # every file listed, nothing extra
    all_files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert all_files == tif_files(out) | {"manifest.csv"}  # no temporary files left behind
    for r in rows:
        m = re.fullmatch(r"(B0[1-3])/(normal|abnormal)/(B0[1-3])_(\d{4})\.tif", r["path"])
        assert m, r["path"]
        assert m.group(1) == m.group(3) == r["bundle"]
        assert m.group(2) == r["label"]
        if r["label"] == "normal":
            assert r["anomaly"] == ""
        else:
            assert r["anomaly"] in ANOMALY_TYPES
    # Image numbers are unique over the whole data set.
    assert len({p.rsplit("_", 1)[1] for p in paths}) == len(paths)


def test_empty_existing_folder_is_accepted(tmp_path: Path) -> None:
    summary = make_dataset(tmp_path, bundles=1, images=2, abnormal_fraction=0.5, size=SMALL, jobs=1)
    assert summary.n_images == 2 and len(tif_files(tmp_path)) == 2


def test_exact_counts(tmp_path: Path) -> None:
    summary = make_dataset(tmp_path / "d", bundles=5, images=40, abnormal_fraction=0.25, size=(32, 32),
                           seed=3, jobs=1)
    _, rows = read_manifest(tmp_path / "d")
    assert len(rows) == summary.n_images == 40
    assert sum(r["label"] == "abnormal" for r in rows) == summary.n_abnormal == 10
    per_bundle = Counter(r["bundle"] for r in rows)
    assert sorted(per_bundle) == ["B01", "B02", "B03", "B04", "B05"]
    assert min(per_bundle.values()) >= 1


def test_default_counts_spread_unevenly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's shape: 714 images, 152 abnormal, uneven bundles, 2-3 bundles without defects."""
    # Durability is not what this test is about, and 1430 fsyncs (each file and its folder) are most of its time.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    summary = make_dataset(tmp_path / "d", size=(32, 32), jobs=1)
    _, rows = read_manifest(tmp_path / "d")
    assert (summary.n_images, summary.n_abnormal, len(summary.bundles)) == (714, 152, 12)
    sizes = Counter(r["bundle"] for r in rows)
    abnormal = Counter(r["bundle"] for r in rows if r["label"] == "abnormal")
    assert len(sizes) == 12
    assert max(sizes.values()) - min(sizes.values()) >= 20  # bundles differ in size
    clean = [b for b in sizes if abnormal[b] == 0]
    assert 2 <= len(clean) <= 3
    rates = [abnormal[b] / sizes[b] for b in sizes if abnormal[b]]
    assert max(rates) > 2 * min(rates)  # defects concentrated in some bundles
    assert len({r["anomaly"] for r in rows if r["anomaly"]}) >= 6


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_plan_defaults_for_several_seeds(seed: int) -> None:
    plans, styles = plan_dataset(seed=seed)
    assert len(plans) == 714 and len(styles) == 12
    assert sum(p.label == "abnormal" for p in plans) == 152
    clean = set(styles) - {p.bundle for p in plans if p.label == "abnormal"}
    assert 2 <= len(clean) <= 3
    assert all(SIZE_RANGE_H[0] <= p.height <= SIZE_RANGE_H[1] for p in plans)
    assert all(SIZE_RANGE_W[0] <= p.width <= SIZE_RANGE_W[1] for p in plans)
    assert len({(p.height, p.width) for p in plans}) > 100  # sizes really vary per image
    # The bright tail (registration hole) exists, but only in some bundles.
    assert 0 < sum(s.hole_level > 0 for s in styles.values()) < 12


def test_anomalies_limit_the_types_and_change_nothing_else(tmp_path: Path) -> None:
    kwargs = dict(bundles=4, images=60, abnormal_fraction=0.5, size=(32, 32), seed=3)
    every, _ = plan_dataset(**kwargs)
    assert plan_dataset(**kwargs, anomalies=ANOMALY_TYPES)[0] == every
    small, _ = plan_dataset(**kwargs, anomalies=SMALL_ANOMALIES)
    assert 1 < len({p.anomaly for p in small if p.anomaly}) and {p.anomaly for p in small} <= {"", *SMALL_ANOMALIES}
    assert [(p.path, p.label) for p in small] == [(p.path, p.label) for p in every]  # only the types differ

    summary = make_dataset(tmp_path / "d", **kwargs, jobs=1, anomalies=["bubble"])
    _, rows = read_manifest(summary.root)
    assert {r["anomaly"] for r in rows} == {"", "bubble"}


@pytest.mark.parametrize("anomalies", [(), ["crack"], "bubble", None])
def test_bad_anomalies(tmp_path: Path, anomalies) -> None:
    with pytest.raises(XfeatError, match="anomalies must be"):
        make_dataset(tmp_path / "out", bundles=2, images=4, size=SMALL, jobs=1, anomalies=anomalies)
    assert not (tmp_path / "out").exists()


def test_all_abnormal_and_all_normal(tmp_path: Path) -> None:
    s1 = make_dataset(tmp_path / "a", bundles=4, images=8, abnormal_fraction=1.0, size=(32, 32), jobs=1)
    s0 = make_dataset(tmp_path / "n", bundles=4, images=8, abnormal_fraction=0.0, size=(32, 32), jobs=1)
    assert s1.n_abnormal == 8 and s0.n_abnormal == 0


# --------------------------------------------------------------------------- file format and determinism


def test_tiffs_are_single_page_uint16_of_requested_size(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", bundles=2, images=4, size=(70, 40), seed=5, jobs=1)
    files = sorted((tmp_path / "d").rglob("*.tif"))
    assert len(files) == 4
    for f in files:
        with tifffile.TiffFile(f) as tif:
            assert len(tif.pages) == 1
            page = tif.pages[0]
            assert page.compression == 1  # uncompressed
            image = page.asarray()
        assert image.dtype == np.uint16 and image.shape == (70, 40)


def test_same_seed_identical_across_jobs_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(bundles=3, images=12, size=SMALL, seed=11)
    calls: dict[int, list[int]] = {1: [], 2: []}
    make_dataset(tmp_path / "j1", jobs=1, progress=calls[1].append, **kwargs)
    make_dataset(tmp_path / "j2", jobs=2, progress=calls[2].append, **kwargs)
    make_dataset(tmp_path / "other", jobs=1, **{**kwargs, "seed": 12})

    assert sum(calls[1]) == sum(calls[2]) == 12
    files = tif_files(tmp_path / "j1") | {"manifest.csv"}
    assert files == tif_files(tmp_path / "j2") | {"manifest.csv"}
    for name in files:
        assert (tmp_path / "j1" / name).read_bytes() == (tmp_path / "j2" / name).read_bytes(), name

    first = lambda root: sorted(root.rglob("*.tif"))[0].read_bytes()  # noqa: E731
    assert first(tmp_path / "j1") != first(tmp_path / "other")


def test_file_number_redraws_the_file(tmp_path: Path) -> None:
    """Each file is render_electrode((seed, number), ...) with its bundle's style: a documented contract."""
    kwargs = dict(bundles=3, images=9, abnormal_fraction=0.5, size=(80, 48), seed=4)
    make_dataset(tmp_path / "d", jobs=1, **kwargs)
    plans, styles = plan_dataset(**kwargs)
    for p in plans:
        number = int(p.path.rsplit("_", 1)[1][:-4])
        expected = render_electrode((4, number), 80, 48, styles[p.bundle], p.anomaly or None)
        assert np.array_equal(tifffile.imread(tmp_path / "d" / p.path), expected), p.path


def test_failed_write_leaves_no_image_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while writing an image leaves neither a truncated .tif nor a hidden .NAME.xxxxxxxx.tmp."""
    def write_half_then_fail(fh, image, **kwargs) -> None:
        fh.write(b"II*\x00" + bytes(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path / "d", bundles=1, images=2, size=SMALL, jobs=1)
    assert not [p for p in (tmp_path / "d").rglob("*") if p.is_file()]


def test_render_is_pure() -> None:
    a = render_electrode((4, 2), 96, 64, BundleStyle(), "bubble")
    b = render_electrode((4, 2), 96, 64, BundleStyle(), "bubble")
    c = render_electrode((4, 3), 96, 64, BundleStyle(), "bubble")
    assert a.dtype == np.uint16 and a.shape == (96, 64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# --------------------------------------------------------------------------- refusals


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(XfeatError, match="output folder is not empty; choose a new folder"):
        make_dataset(tmp_path, bundles=1, images=2, size=SMALL, jobs=1)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_refuses_a_file_as_output(tmp_path: Path) -> None:
    target = tmp_path / "file.tif"
    target.write_bytes(b"x")
    with pytest.raises(XfeatError):
        make_dataset(target, bundles=1, images=2, size=SMALL, jobs=1)
    assert target.read_bytes() == b"x"


@pytest.mark.parametrize("kwargs", [
    dict(bundles=0),
    dict(bundles=2.5),
    dict(bundles=5, images=4),
    dict(abnormal_fraction=-0.1),
    dict(abnormal_fraction=1.5),
    dict(abnormal_fraction=float("nan")),
    dict(size=(31, 64)),
    dict(size=(64, 20)),
    dict(size=(64,)),
    dict(size=64),
    dict(jobs=0),
    dict(seed=-1),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = dict(bundles=2, images=4, size=SMALL, jobs=1) | kwargs
    with pytest.raises(XfeatError) as info:
        make_dataset(tmp_path / "out", **args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unknown_anomaly_refused() -> None:
    with pytest.raises(XfeatError, match="unknown anomaly"):
        render_electrode(0, 64, 48, None, "crack")


# --------------------------------------------------------------------------- intensities and anomalies


def test_intensity_distribution(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", bundles=6, images=18, size=(128, 64), seed=2, jobs=1)
    _, rows = read_manifest(tmp_path / "d")
    maxima: dict[str, list[int]] = {}
    total = bright = 0
    for r in rows:
        image = tifffile.imread(tmp_path / "d" / r["path"])
        assert 1700 <= np.median(image) <= 2800
        assert np.mean((image >= 1700) & (image <= 2800)) > 0.85  # most pixels: coated electrode
        maxima.setdefault(r["bundle"], []).append(int(image.max()))
        total += image.size
        bright += int(np.count_nonzero(image >= 20000))
    assert bright > 0 and bright / total < 0.01  # a sparse bright tail ...
    with_tail = [b for b, m in maxima.items() if max(m) > 20000]
    assert 0 < len(with_tail) < len(maxima)  # ... present in only some bundles
    assert all(max(m) < 5000 for b, m in maxima.items() if b not in with_tail)


def test_bundles_differ_in_level(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", bundles=4, images=8, abnormal_fraction=0.0, size=(128, 64), seed=0,
                 jobs=1)
    _, rows = read_manifest(tmp_path / "d")
    medians: dict[str, list[float]] = {}
    for r in rows:
        medians.setdefault(r["bundle"], []).append(float(np.median(tifffile.imread(tmp_path / "d" / r["path"]))))
    levels = sorted(np.mean(v) for v in medians.values())
    assert levels[-1] - levels[0] > 200


# Expected sign of the change: X-rays pass more easily through less ink (brighter), less through more.
BRIGHTER = {"scratch", "edge_cut", "missing_ink"}
DARKER = {"agglomerate", "edge_tension", "edge_ink_flow"}


ANOMALY_STYLE = BundleStyle(level=2100.0, noise=20.0, grain=12.0)


@functools.lru_cache(maxsize=None)
def _normal_electrode(size: tuple[int, int]) -> np.ndarray:
    """The defect-free electrode every anomaly of a size is drawn on: rendered once per size (pure function)."""
    normal = render_electrode((9, 1), *size, ANOMALY_STYLE, None).astype(np.int32)
    normal.flags.writeable = False
    return normal


@pytest.mark.parametrize("anomaly", ANOMALY_TYPES)
@pytest.mark.parametrize("size", [(256, 128), (2084, 1169)])
def test_anomaly_changes_only_its_neighbourhood(anomaly: str, size: tuple[int, int]) -> None:
    style = ANOMALY_STYLE
    normal = _normal_electrode(size)
    strong = render_electrode((9, 1), *size, style, anomaly, severity=1.0).astype(np.int32)
    subtle = render_electrode((9, 1), *size, style, anomaly, severity=0.0).astype(np.int32)
    diff = strong - normal

    changed = np.abs(diff) > 60  # about 2.5 times the pixel noise
    assert changed.any(), "the anomaly is not visible"
    assert np.mean(diff == 0) > 0.4, "the background changed away from the anomaly"
    assert np.abs(diff).max() > np.abs(subtle - normal).max()  # severity matters
    if anomaly in BRIGHTER:
        assert diff.sum() > 0
    if anomaly in DARKER:
        assert diff.sum() < 0
    # Changed pixels lie in one neighbourhood: their bounding box is a small part of the image, except
    # for defects that span the coating by nature.
    ys, xs = np.nonzero(changed)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) / normal.size
    if anomaly not in {"line", "edge_tension", "ink_fluctuation", "ink_entry_exit", "smudge"}:
        assert box < 0.25, box


@pytest.mark.parametrize("anomaly", ["agglomerate", "bubble"])
def test_small_defects_are_a_few_pixels_across_and_plainly_visible(anomaly: str) -> None:
    """At the real size, pores and clumps are spots of a few pixels that stand out from the noise even at the
    lowest severity: what a person labels, and what shrinking the image to 224 x 224 averages away."""
    size = (2084, 1169)
    normal = _normal_electrode(size)
    noise = math.hypot(ANOMALY_STYLE.noise, ANOMALY_STYLE.grain)
    for severity in (0.0, 1.0):
        diff = render_electrode((9, 1), *size, ANOMALY_STYLE, anomaly, severity=severity).astype(np.int32) - normal
        assert np.abs(diff).max() > 3.5 * noise, severity  # measured 4.0 (bubble) and 6.8 at severity 0
        count, _, stats, _ = cv2.connectedComponentsWithStats((np.abs(diff) > 2 * noise).astype(np.uint8))
        assert count > 1 and stats[1:, 2:4].max() <= 32, severity  # each spot at most ~30 px across
