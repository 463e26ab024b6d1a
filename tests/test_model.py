"""xfeat train / predict: a model trained on a real cache, saved safely, screening raw images like the cache."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_dataset
from xfeat_cli.main import main
from xfeat.learn.evaluation import Configuration, evaluate_configuration
from xfeat.features.extract import ExtractConfig, extract
from xfeat.features.reading import load_features
from xfeat.learn.threads import one_thread
from xfeat.screening.model import load_model
from xfeat.screening.model_file import read_model_file
from xfeat.screening.predict import gather_inputs, predict
from xfeat.screening.threshold import recall_threshold, screening_outcome

LAYOUT = {f"B{k}": {"normal": 4, "abnormal": 2} for k in range(1, 5)}
# Extraction at its default batch size: what predict reproduces (see xfeat.screening.predict).
CONFIG = ExtractConfig(backbones=("resnet18",), methods=("m2",), size=(64, 32), flips=4, weights="none",
                       device="cpu", workers=0, jobs=1)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("screening")
    data = write_dataset(root / "data", LAYOUT, shape=(48, 32))
    extract(data, root / "cache.h5", CONFIG)
    return data, root / "cache.h5"


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def train(cache: Path, out: Path, *extra: str) -> Path:
    assert main(["train", str(cache), "--backbone", "resnet18", "--method", "m2", "--out", str(out), "-q",
                 *extra]) == 0
    return out


@pytest.mark.parametrize("clf, extra", [("logreg", []), ("fc", ["--epochs", "3", "--class-weight", "balanced"])])
def test_train_on_other_bundles_then_predict_raw_images_gives_the_out_of_fold_decisions(
        tmp_path, extracted, clf, extra):
    data, cache = extracted
    params = {"epochs": 3, "class_weight": "balanced", "seed": 0} if clf == "fc" else {}
    oof = evaluate_configuration(cache, Configuration("resnet18", "m2", clf, "pool", ""), params)
    model = train(cache, tmp_path / "m.xfeat", "--clf", clf, "--exclude-bundles", "B4", *extra)
    assert main(["predict", str(model), str(data / "B4"), "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    rows = read_rows(tmp_path / "p.csv")
    held_out = oof.features.groups == "B4"
    assert len(rows) == held_out.sum() == 6
    for path, score, decision in zip(oof.features.paths[held_out], oof.scores[held_out], oof.decisions[held_out]):
        row = rows[path]
        assert row["decision"] == ("abnormal" if decision else "normal")
        assert float(row["score"]) == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert row["source"] == "computed" and row["error"] == ""


def test_scores_from_raw_images_equal_scores_from_the_cache(tmp_path, extracted):
    data, cache = extracted
    model = train(cache, tmp_path / "m.xfeat", "--clf", "svm")
    assert main(["predict", str(model), str(data), "--out", str(tmp_path / "raw.csv"), "-q"]) == 0
    assert main(["predict", str(model), str(data), "--out", str(tmp_path / "cached.csv"), "--cache", str(cache),
                 "-q"]) == 0
    raw, cached = read_rows(tmp_path / "raw.csv"), read_rows(tmp_path / "cached.csv")
    assert len(raw) == 24 and raw.keys() == cached.keys()
    assert {r["source"] for r in raw.values()} == {"computed"} and {r["source"] for r in cached.values()} == {"cache"}
    for path in raw:
        assert raw[path]["score"] == cached[path]["score"]  # bitwise: the same text of the same float


@pytest.mark.parametrize("clf", ["logreg", "knn"])
def test_an_image_gets_the_same_score_bits_alone_and_among_others(tmp_path, extracted, clf):
    """Issue 12: predict scores whatever images it is given together, the cache path a fold's rows; a logistic
    regression's BLAS product used to round differently with the number of rows."""
    data, cache = extracted
    model = load_model(train(cache, tmp_path / "m.xfeat", "--clf", clf))
    images = gather_inputs([data])
    together = {p.path: p.score for p in predict(model, images, cache=cache)}
    assert len(together) == 24
    for image in images[::-1]:
        [alone] = predict(model, [image], cache=cache)
        assert alone.source == "cache" and alone.score == together[alone.path]
    with one_thread():
        fs = load_features(cache, backbone="resnet18", method="m2")
        scores = model.scores(fs.X)
    assert all(together[str(Path(p).resolve())] == s for p, s in zip(fs.paths, scores))


def test_the_threshold_and_its_figures_recount_from_the_reports_files(tmp_path, extracted, capsys):
    """Bookkeeping: the threshold flags the target share of the out-of-fold screening scores it was chosen on
    (true by construction, so not the promise; test_screening_honesty checks that), the model file, screening.json
    and the line printed agree, and the nested estimate for a new bundle is recorded with its interval."""
    _, cache = extracted
    model_path = train(cache, tmp_path / "m.xfeat", "--clf", "logreg", "--target-recall", "0.75",
                       "--report", str(tmp_path / "rep"))
    screening = json.loads((tmp_path / "rep" / "screening.json").read_text())
    rows = list(read_rows(tmp_path / "rep" / "predictions.csv").values())
    scores = np.array([float(r["screening_score"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    flagged = scores > screening["score_threshold"]  # the cut on the scores it was chosen on
    assert flagged[labels == 1].mean() >= 0.75
    assert screening["recall"] == flagged[labels == 1].mean()
    assert screening["cleared"] == pytest.approx(np.mean(~flagged[labels == 0]))
    assert screening["flagged"] == pytest.approx(flagged.mean())
    low, high = screening["cleared_interval"]
    assert low <= screening["cleared"] <= high
    heldout = screening["heldout"]
    assert heldout["target_recall"] == 0.75 and heldout["n_abnormal"] == 8
    recount = [int(r["flagged_75"]) for r in rows if r["label"] == "1"]
    assert heldout["recall"] == pytest.approx(np.mean(recount))
    assert heldout["recall_interval"][0] <= heldout["recall"] <= heldout["recall_interval"][1]
    model = load_model(model_path)
    assert model.threshold == screening["threshold"] and model.target_recall == 0.75
    assert model.validation["screening"]["cleared"] == screening["cleared"]
    assert model.validation["heldout"] == heldout
    err = capsys.readouterr().err
    assert "normal electrodes cleared without a look" in err and "on a new bundle expect" in err


def test_the_model_file_holds_all_that_scoring_needs(tmp_path, extracted):
    _, cache = extracted
    content = read_model_file(train(cache, tmp_path / "m.xfeat", "--clf", "logreg"))
    meta = content.metadata
    stats = meta["conversion"]["window_stats"]
    assert meta["conversion"]["method"] == "m2" and stats["g_min"] < stats["g_max"]
    assert (meta["features"]["input_height"], meta["features"]["input_width"]) == (64, 32)
    assert meta["features"]["backbone"] == "resnet18" and meta["weights"]["kind"] == "none"
    assert meta["threshold"]["value"] == 0.0 and meta["threshold"]["rule"] == "abnormal when score > threshold"
    assert meta["training"]["images"] == 24 and meta["training"]["bundles"]["B2"] == {"images": 6, "abnormal": 2}
    assert 0 <= meta["validation"]["balanced_accuracy"] <= 1 and "auroc" in meta["validation"]
    assert meta["xfeat_version"] and meta["format_version"] == 1
    assert any(k.startswith("classifier/") for k in content.arrays)


@pytest.mark.parametrize("damage", ["byte", "truncate", "future"])
def test_damaged_or_future_model_files_are_refused(tmp_path, extracted, capsys, damage):
    data, cache = extracted
    model = train(cache, tmp_path / "m.xfeat", "--clf", "logreg")
    raw = bytearray(model.read_bytes())
    if damage == "byte":
        raw[len(raw) // 3] ^= 0x01
        model.write_bytes(bytes(raw))
    elif damage == "truncate":
        model.write_bytes(bytes(raw[: len(raw) - 100]))
    else:
        import xfeat.screening.model_file as modelfile

        content = read_model_file(model)
        meta = {k: v for k, v in content.metadata.items() if k not in modelfile.RESERVED_KEYS}
        original = modelfile.FORMAT_VERSION
        modelfile.FORMAT_VERSION = original + 1
        try:
            modelfile.write_model_file(model, meta, content.arrays, content.files)
        finally:
            modelfile.FORMAT_VERSION = original
    capsys.readouterr()
    assert main(["predict", str(model), str(data / "B1"), "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"xfeat: error: {model}")
    assert ("newer" if damage == "future" else "checksum") in err
    assert not (tmp_path / "p.csv").exists()


def test_loading_and_predicting_never_unpickle(tmp_path, extracted, monkeypatch):
    data, cache = extracted
    model_path = train(cache, tmp_path / "m.xfeat", "--clf", "fc", "--epochs", "2")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    predictions = predict(load_model(model_path), gather_inputs([data / "B1"]), device="cpu", workers=0)
    assert len(predictions) == 6 and all(p.error == "" for p in predictions)


def test_bad_files_get_a_row_and_a_nonzero_exit(tmp_path, extracted, capsys):
    data, cache = extracted
    model = train(cache, tmp_path / "m.xfeat", "--clf", "logreg")
    folder = tmp_path / "new"
    shutil.copytree(data / "B1", folder)
    (folder / "normal" / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    capsys.readouterr()
    code = main(["predict", str(model), str(folder), str(tmp_path / "missing.tif"), "--out", str(tmp_path / "p.csv"),
                 "-q", "--workers", "0"])
    assert code == 1
    rows = read_rows(tmp_path / "p.csv")
    assert len(rows) == 8
    failed = {Path(p).name: r["error"] for p, r in rows.items() if r["error"]}
    assert set(failed) == {"broken.tif", "missing.tif"} and failed["missing.tif"] == "no such file"
    assert all(r["decision"] in ("normal", "abnormal") for r in rows.values() if not r["error"])
    err = capsys.readouterr().err
    assert "broken.tif" in err and "missing.tif" in err


def test_bundled_weights_make_a_self_contained_model(tmp_path):
    from xfeat.features.extractor import build_extractor

    weights = tmp_path / "resnet18-mine.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        import torchvision

        torch.save(torchvision.models.resnet18().state_dict(), weights)
    data = write_dataset(tmp_path / "data", {"B1": {"normal": 3, "abnormal": 2}, "B2": {"normal": 3, "abnormal": 2},
                                             "B3": {"normal": 2, "abnormal": 1}}, shape=(48, 32))
    cache = tmp_path / "c.h5"
    extract(data, cache, ExtractConfig(backbones=("resnet18",), methods=("m3",), size=(64, 32), flips=1,
                                       weights=str(weights), device="cpu", workers=0, jobs=1))
    common = ["--method", "m3", "--clf", "logreg", "--weights", str(weights)]
    bundled = train(cache, tmp_path / "bundled.xfeat", *common, "--bundle-weights")
    referenced = train(cache, tmp_path / "referenced.xfeat", *common)
    assert bundled.stat().st_size > referenced.stat().st_size + 10_000_000  # resnet18: 11.7 M parameters
    moved = weights.rename(tmp_path / "elsewhere.pth")
    assert main(["predict", str(bundled), str(data), "--out", str(tmp_path / "b.csv"), "--cache", str(cache)]) == 0
    assert main(["predict", str(bundled), str(data), "--out", str(tmp_path / "raw.csv")]) == 0
    raw, cached = read_rows(tmp_path / "raw.csv"), read_rows(tmp_path / "b.csv")
    assert all(raw[p]["score"] == cached[p]["score"] for p in raw)
    # referenced weights that moved: a clear error, then found with --weights
    assert main(["predict", str(referenced), str(data), "--out", str(tmp_path / "r.csv")]) == 1
    assert main(["predict", str(referenced), str(data), "--out", str(tmp_path / "r.csv"), "--weights", str(moved)]) == 0
    other = tmp_path / "other.pth"
    torch.save(build_extractor("resnet18", "none").trunk.state_dict(), other)
    assert main(["predict", str(referenced), str(data), "--out", str(tmp_path / "r.csv"), "--weights", str(other)]) == 1


def test_recall_threshold_flags_at_least_the_target_share():
    scores = np.array([0.1, 0.9, 0.5, 0.5, 0.3, 0.8, 0.2])
    y = np.array([0, 1, 1, 1, 0, 0, 1])
    for target, expected in [(0.25, 0.9), (0.5, 0.5), (0.75, 0.5), (1.0, 0.2)]:
        t = recall_threshold(scores, y, target)
        flagged = scores > t
        assert flagged[y == 1].mean() >= target
        assert np.nextafter(t, np.inf) == expected  # the highest such threshold: just below an abnormal score
    with pytest.raises(ValueError, match="target recall"):
        recall_threshold(scores, y, 0)
    with pytest.raises(ValueError, match="no abnormal"):
        recall_threshold(scores, np.zeros(7, int), 0.9)
    outcome = screening_outcome(scores, y, np.array(list("aabbbcc")), recall_threshold(scores, y, 0.75), 0.75)
    assert outcome.recall == 0.75 and outcome.cleared == pytest.approx(2 / 3) and outcome.n_abnormal == 4
