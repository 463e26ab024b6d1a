"""Leave-one-bundle-out on real caches: known answers, no leakage, determinism, the command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import write_feature_cache
from xfeat import load_features
from xfeat.learn.classifiers import FCHead, abnormal_score, make_classifier
from xfeat_cli.main import main
from xfeat.learn.binary import fit_on
from xfeat.learn.evaluation import Configuration, configurations, evaluate, leave_one_bundle_out
from xfeat.errors import XfeatError

FAST_FC = {"epochs": 3, "batch_size": 16}


def toy_features(seed=0, n_bundles=4, per_bundle=12, flips=4, dim=16, shift=1.5):
    """Separable-ish features: abnormal rows are shifted along a few dimensions; bundle 0 holds no abnormal."""
    rng = np.random.default_rng(seed)
    bundles, labels = [], []
    for b in range(n_bundles):
        n_abnormal = 0 if b == 0 else 3 + b % 2
        labels += [1] * n_abnormal + [0] * (per_bundle - n_abnormal)
        bundles += [f"B{b}"] * per_bundle
    y = np.array(labels)
    X = rng.normal(size=(len(y), flips, dim))
    X[y == 1, :, :4] += shift
    return X.astype(np.float32), y, bundles


@pytest.fixture
def toy_cache(tmp_path):
    X, y, bundles = toy_features()
    return write_feature_cache(tmp_path / "toy.h5", X, y, bundles)


@pytest.mark.parametrize("clf", ["svm", "logreg", "knn", "mahalanobis"])
def test_nothing_is_fitted_on_the_held_out_bundle(toy_cache, clf):
    """Changing the held-out bundle's features changes its scores only through the features themselves."""
    fs = load_features(toy_cache, "toy", "m2")
    held_out = fs.groups == "B2"
    altered = fs.X.copy()
    altered[held_out] = np.random.default_rng(5).normal(3, 4, size=altered[held_out].shape)
    fs_altered = type(fs)(**{**fs.__dict__, "X": altered})
    scores = leave_one_bundle_out(fs_altered, clf).scores
    model = fit_on(make_classifier(clf), fs.X[~held_out], fs.y[~held_out], fs.groups[~held_out])  # without B2
    np.testing.assert_allclose(scores[held_out], abnormal_score(model, altered[held_out]), rtol=1e-6, atol=1e-8)


def test_fc_heads_see_no_held_out_rows(toy_cache):
    fs = load_features(toy_cache, "toy", "m2", flips="all")
    held_out = fs.groups == "B1"
    altered = fs.X.copy()
    altered[held_out] += 7.0
    fs_altered = type(fs)(**{**fs.__dict__, "X": altered})
    scores = leave_one_bundle_out(fs_altered, "fc", FAST_FC).scores
    head = FCHead(fc_weight=fs.fc_weight, fc_bias=fs.fc_bias, **FAST_FC).fit(fs.X[~held_out], fs.y[~held_out])
    np.testing.assert_allclose(scores[held_out], abnormal_score(head, altered[held_out]), atol=1e-5)


def test_counts_per_bundle_and_overall(toy_cache):
    (result,) = evaluate(toy_cache, configurations(["toy"], ["m2"], ["logreg"]))
    fs = result.features
    assert result.bundles == ["B0", "B1", "B2", "B3"]
    for bundle in result.bundles:
        mask = fs.groups == bundle
        c = result.counts[bundle]
        assert c.tp == np.sum((fs.y[mask] == 1) & (result.decisions[mask] == 1))
        assert c.n == mask.sum()
    assert result.counts["B0"].single_class == "normal only"
    records = result.records()
    overall = records[-1]
    assert overall["bundle"] == "overall"
    assert overall["tp"] == sum(r["tp"] for r in records[:-1]) and overall["n"] == 48
    assert overall["ci_low"] <= overall["balanced_accuracy"] <= overall["ci_high"]
    b0 = records[0]
    assert b0["single_class"] == "normal only" and b0["balanced_accuracy"] == b0["tnr"] and np.isnan(b0["auroc"])


def test_results_do_not_depend_on_jobs(toy_cache):
    configs = configurations(["toy"], ["m2"], ["fc", "svm", "knn"])
    params = {"fc": FAST_FC}
    one = evaluate(toy_cache, configs, params=params, jobs=1)
    two = evaluate(toy_cache, configs, params=params, jobs=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.scores, b.scores)
        assert json.dumps(a.records()) == json.dumps(b.records())  # NaN-safe equality of every field


def test_layer_defaults_and_refusals():
    configs = configurations(["resnet50"], ["m2"], ["svm", "fc", "logreg"])
    assert [(c.clf, c.layer) for c in configs] == [("svm", "fc1000"), ("fc", "pool"), ("logreg", "pool")]
    with pytest.raises(XfeatError, match="unknown classifier 'tree'"):
        configurations(["resnet50"], ["m2"], ["tree"])
    with pytest.raises(XfeatError, match="fc head starts from the pooled features"):
        configurations(["resnet50"], ["m2"], ["fc"], layer="fc1000")
    assert configurations(["a"], ["b"], ["svm"], layer="pool") == [Configuration("a", "b", "svm", "pool", "")]


def test_evaluate_command_prints_table_and_writes_report(toy_cache, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", str(toy_cache), "--clf", "fc,svm,logreg,knn", "--epochs", "3", "--report", str(out),
                 "--jobs", "2"]) == 0
    captured = capsys.readouterr()
    assert "toy / fc" in captured.out and "Overall" in captured.out and "B0" in captured.out
    assert "random weights" in captured.err.lower()
    assert "learned a constant" not in captured.err
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5  # 4 classifiers x (4 bundles + overall)
    assert {"backbone", "method", "clf", "layer", "bundle", "n", "tp", "fp", "tn", "fn", "balanced_accuracy",
            "auroc", "weights"} <= set(rows[0])
    with open(out / "predictions.csv") as f:
        assert sum(1 for _ in f) == 1 + 4 * 48
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 4
    assert json.loads((out / "results.json").read_text())


def test_a_classifier_that_learned_a_constant_is_pointed_out(tmp_path, capsys):
    """Featureless input: each fold scores all its held-out images alike, so the pooled AUROC only compares the
    folds' constants; the console says so instead of leaving a below-chance AUROC unexplained."""
    X, y, bundles = toy_features()
    cache = write_feature_cache(tmp_path / "flat.h5", np.zeros_like(X), y, bundles)
    assert main(["evaluate", str(cache), "--clf", "logreg", "--quiet", "--report", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "toy m2 logreg: the classifier scored every image of 4 of 4 held-out bundles alike" in err
    assert "learned a constant" in (tmp_path / "r" / "report.html").read_text()


def test_evaluate_command_errors_in_one_line(tmp_path, capsys, toy_cache):
    assert main(["evaluate", str(tmp_path / "missing.h5")]) == 1
    assert capsys.readouterr().err.strip() == f"xfeat: error: {tmp_path / 'missing.h5'}: no such cache file"
    assert main(["evaluate", str(toy_cache), "--clf", "tree"]) == 1
    assert "unknown classifier 'tree'" in capsys.readouterr().err


def test_a_fold_left_with_one_class_is_a_clear_error(tmp_path):
    X, y, bundles = toy_features(n_bundles=2)  # B0 holds no abnormal image: holding out B1 leaves only normals
    cache = write_feature_cache(tmp_path / "one.h5", X, y, bundles)
    with pytest.raises(XfeatError, match="holding out bundle B1 leaves only one class"):
        evaluate(cache, configurations(["toy"], ["m2"], ["logreg"]))


def test_nothing_to_evaluate_is_a_clear_error(toy_cache, capsys):
    assert main(["evaluate", str(toy_cache), "--backbone", "resnet50"]) == 1
    assert "nothing to evaluate for backbone(s) resnet50" in capsys.readouterr().err
