"""The report's thumbnails: the right images (caught, missed, false alarms), small files, maps where the classifier
has local evidence, and an image that cannot be read listed with a note instead of failing the report."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import write_dataset
from xfeat.report.gallery import MAX_SIDE, THUMBNAILS, choose, gallery_section, stretch, write_gallery

LAYOUT = {"B1": {"normal": 3, "abnormal": 2}, "B2": {"normal": 3, "abnormal": 2}, "B3": {"normal": 3, "abnormal": 2}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_torch_thread):
    from xfeat.features.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("gallery")
    data = write_dataset(root / "data", LAYOUT, shape=(300, 160))
    extract(data, root / "cache.h5", ExtractConfig(backbones=("resnet18",), methods=("m2",), size=(64, 64), flips=1,
                                                   weights="none", workers=0, jobs=1,
                                                   taps=("pool", "local", "patches")))
    return root / "cache.h5"


@pytest.fixture(scope="module")
def evaluated(cache):
    """One real logreg result on a tiny extracted dataset (random weights: the decisions are set by hand below)."""
    from xfeat.learn.evaluation import Configuration, evaluate_configuration

    return evaluate_configuration(cache, Configuration("resnet18", "m2", "logreg", "local", ""), recalls=())


def staged(result, scores, decisions):
    """``result`` with chosen out-of-fold scores and decisions, so which image is which kind is known."""
    return replace(result, scores=np.asarray(scores, np.float64), decisions=np.asarray(decisions, np.int64))


def arrangement(result):
    """Abnormal rows (y = 1) and normal rows in row order, with scores and decisions making every kind appear,
    ties included: 6 abnormal (4 flagged, one tie), 9 normal (3 flagged)."""
    y = result.features.y
    abnormal, normal = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    scores, decisions = np.zeros(len(y)), np.zeros(len(y), np.int64)
    scores[abnormal] = [0.9, 0.7, 0.9, 0.6, 0.2, 0.1]
    decisions[abnormal] = [1, 1, 1, 1, 0, 0]
    scores[normal] = [0.8, 0.3, 0.55, 0.95, 0.1, 0.2, 0.0, 0.4, 0.05]
    decisions[normal] = [1, 0, 1, 1, 0, 0, 0, 0, 0]
    return staged(result, scores, decisions), abnormal, normal


def test_choose_caught_missed_and_false_alarms_in_order(evaluated):
    result, abnormal, normal = arrangement(evaluated)
    chosen = choose(result)
    caught, n_caught = chosen["caught"]
    # highest score first; the two 0.9s by path; 4 of 4 fit
    assert n_caught == 4
    assert list(caught) == [abnormal[0], abnormal[2], abnormal[1], abnormal[3]]
    assert result.features.paths[abnormal[0]] < result.features.paths[abnormal[2]]
    missed, n_missed = chosen["missed"]
    assert n_missed == 2 and list(missed) == [abnormal[5], abnormal[4]]  # lowest score first: most confidently missed
    alarms, n_alarms = chosen["false_alarms"]
    assert n_alarms == 3 and list(alarms) == [normal[3], normal[0], normal[2]]
    limited = choose(result, {"caught": 2, "missed": 1, "false_alarms": 0})
    assert list(limited["caught"][0]) == list(caught[:2]) and limited["caught"][1] == 4
    assert list(limited["missed"][0]) == [abnormal[5]] and len(limited["false_alarms"][0]) == 0


def test_stretch_spreads_a_narrow_window_for_the_eye():
    narrow = np.repeat(np.arange(4, 12, dtype=np.uint8), 100).reshape(40, 20)  # 8 gray levels, as m2 can leave
    shown = stretch(narrow)
    assert shown.min() == 0 and shown.max() == 255 and np.all(np.diff(shown.ravel().astype(int)) >= 0)
    flat = np.full((5, 5), 7, np.uint8)
    assert np.array_equal(stretch(flat), flat)


def test_thumbnails_are_small_files_the_page_shows(evaluated, tmp_path):
    from xfeat.report import write_results

    result, abnormal, normal = arrangement(evaluated)
    write_results([result], tmp_path / "report", near_duplicates=[])
    folder = tmp_path / "report" / THUMBNAILS
    files = sorted(folder.glob("*.png"))
    assert len(files) == 4 + 2 + 3  # caught, missed, false alarms: each a different image, no legend (no maps)
    for f in files:
        image = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        assert max(image.shape[:2]) == MAX_SIDE and f.stat().st_size < 60_000
    page = (tmp_path / "report" / "report.html").read_text()
    shown = re.findall(r'<img src="(thumbnails/[0-9a-f]{16}\.png)"', page)
    assert sorted(set(shown)) == sorted(f"{THUMBNAILS}/{f.name}" for f in files)
    assert "Missed: abnormal images it cleared" in page and "(all 2)" in page
    assert "How to read the maps" not in page  # no local evidence: plain images, said so
    assert "shown without a map" in page
    caught_at = page.index("Caught:")
    first = Path(result.features.paths[abnormal[0]]).name
    assert page.index(first, caught_at) < page.index("Missed:")


def test_a_missing_or_changed_image_is_listed_with_a_note(evaluated, tmp_path):
    result, abnormal, normal = arrangement(evaluated)
    fs = result.features
    gone = tmp_path / "moved" / "gone.tif"  # the first missed image moved away: its path now names nothing
    paths = fs.paths.astype(object)
    paths[abnormal[5]] = str(gone)
    sha = fs.sha256.copy()
    sha[normal[3]] = "0" * 64  # the top false alarm: the file on disk is no longer what was scored
    result = replace(result, features=replace(fs, paths=paths, sha256=sha))
    gallery = write_gallery([result], tmp_path / "report")
    rows = gallery.rows[result.config]
    missed = rows["missed"][0][0]
    assert missed.src == "" and "no such file" in missed.note.lower()
    alarm = rows["false_alarms"][0][0]
    assert alarm.src == "" and "changed" in alarm.note
    assert all(s.src for s in rows["caught"][0])
    page = gallery_section([result], gallery)
    assert "gone.tif" in page and "no such file" in page.lower()
    assert len(list((tmp_path / "report" / THUMBNAILS).glob("*.png"))) == 4 + 1 + 2
    # a cache evaluated where none of its images are (another machine): one line, not a box per image
    elsewhere = replace(result, features=replace(fs, paths=np.array([str(tmp_path / "moved" / f"{i}.tif")
                                                                      for i in range(len(paths))])))
    page = gallery_section([elsewhere], write_gallery([elsewhere], tmp_path / "other"))
    assert page.count("None of its 9 images could be shown") == 1 and "<figure" not in page


def test_evidence_is_drawn_on_the_threshold_scale(evaluated, tmp_path):
    result, abnormal, normal = arrangement(evaluated)
    n = len(result.features.y)
    evidence = np.full((n, 4, 4), 0.5, np.float32)  # below every threshold: no colour
    evidence[abnormal[0], 1, 2] = 3.0  # caught: one hot cell, red (3 >= 2 x 1)
    with_maps = replace(result, evidence=evidence, evidence_thresholds=np.ones(n))
    gallery = write_gallery([with_maps], tmp_path)
    caught = gallery.rows[with_maps.config]["caught"][0]
    hot = cv2.imread(str(tmp_path / caught[0].src))[:, :, ::-1]
    cold = cv2.imread(str(tmp_path / caught[1].src))[:, :, ::-1]
    colour = lambda rgb: int(np.sum(np.ptp(rgb.astype(int), axis=2) > 40))  # noqa: E731  pixels far from gray
    assert colour(hot) > 20 and colour(cold) == 0
    assert gallery.legend and (tmp_path / gallery.legend).is_file()
    page = gallery_section([with_maps], gallery)
    assert "How to read the maps" in page and gallery.legend in page
    # a rerun that shows other images leaves only its own thumbnails
    write_gallery([result], tmp_path)
    assert len(list((tmp_path / THUMBNAILS).glob("*.png"))) == 4 + 2 + 3


def test_no_thumbnails_beside_the_images(evaluated):
    result, _, _ = arrangement(evaluated)
    label_folder = Path(result.features.paths[0]).parent
    gallery = write_gallery([result], label_folder)
    assert "No thumbnails" in gallery.note and not (label_folder / THUMBNAILS).exists()
    assert "No thumbnails" in gallery_section([result], gallery)


def test_patchcore_maps_colour_exactly_the_flagged_images(cache, tmp_path):
    """Real out-of-fold patch scores; each image's threshold moved so some are flagged (random weights flag none):
    by PatchCore's rule (flagged when its largest patch score is above the threshold) a flagged image's thumbnail
    shows colour and a cleared one's does not."""
    from xfeat.learn.evaluation import Configuration, evaluate_configuration

    result = evaluate_configuration(cache, Configuration("resnet18", "m2", "patchcore", "patches", ""), recalls=())
    assert result.evidence is not None and result.evidence.shape[1:] != (1, 1)
    y, peak = result.features.y, result.evidence.reshape(len(result.evidence), -1).max(axis=1).astype(np.float64)
    thresholds = peak * 1.05  # every image cleared ...
    flagged = np.r_[np.flatnonzero(y == 1)[:3], np.flatnonzero(y == 0)[:2]]
    thresholds[flagged] = peak[flagged] * 0.8  # ... but 3 abnormal and 2 normal ones
    staged_result = replace(result, evidence_thresholds=thresholds, scores=peak - thresholds,
                            decisions=(peak > thresholds).astype(np.int64))
    gallery = write_gallery([staged_result], tmp_path)
    rows = gallery.rows[staged_result.config]
    assert [len(rows[k][0]) for k in ("caught", "missed", "false_alarms")] == [3, 3, 2]
    for kind, coloured in (("caught", True), ("missed", False), ("false_alarms", True)):
        for shown in rows[kind][0]:
            rgb = cv2.imread(str(tmp_path / shown.src))
            assert (np.ptp(rgb.astype(int), axis=2) > 40).any() == coloured, (kind, shown.path)
