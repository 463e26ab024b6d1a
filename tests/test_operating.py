"""Operating points measured on bundles the model never saw: nested leave-one-bundle-out, its reuse of inner
fits, and one-class thresholds cross-fitted by bundle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xfeat.features.reading import FeatureSet
from xfeat.learn.binary import screening_scale, screening_score
from xfeat.learn.classifiers import KNNNormal, Mahalanobis, make_classifier
from xfeat.learn.evaluation import leave_one_bundle_out
from xfeat.learn.metrics import Counts
from xfeat.learn.operating import (OperatingPoint, nested_plan, nested_thresholds, operating_point, recall_key,
                                   recall_threshold)


def feature_set(n_bundles: int = 6, per_bundle: int = 20, seed: int = 1) -> FeatureSet:
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"b{i}" for i in range(n_bundles)], per_bundle)
    y = (rng.random(len(groups)) < 0.3).astype(int)
    X = rng.normal(size=(len(groups), 5)).astype(np.float32)
    X[y == 1] += 0.8
    paths = np.array([f"{g}/img{i}.tif" for i, g in enumerate(groups)])
    return FeatureSet(X, y, groups, paths, paths, "pool", ("none",), None, None, None)


def brute_force_threshold(fs: FeatureSet, clf: str, outer: str, target: float, inner_folds=None) -> float:
    """The nested threshold of one held-out bundle, computed the slow, obvious way: no reuse of inner fits."""
    plan = nested_plan(sorted(set(fs.groups)), inner_folds)
    training = fs.groups != outer
    inner = np.full(len(fs.y), np.nan)
    for fold in plan.inner[outer]:
        fit_rows = training & ~np.isin(fs.groups, fold)
        model = make_classifier(clf)
        model = model.fit_normal(fs.X[fit_rows], fs.y[fit_rows]) if clf == "knn" else \
            model.fit(fs.X[fit_rows], fs.y[fit_rows])
        in_fold = np.isin(fs.groups, fold)
        scale = screening_scale(model, fs.X[fit_rows], fs.y[fit_rows])
        inner[in_fold] = screening_score(model, fs.X[in_fold], scale)
    return recall_threshold(inner[training], fs.y[training], target)


@pytest.mark.parametrize("clf", ["logreg", "knn"])
@pytest.mark.parametrize("inner_folds", [None, 3])
def test_nested_thresholds_equal_the_obvious_computation_bitwise(clf, inner_folds):
    fs = feature_set()
    fit = leave_one_bundle_out(fs, clf, nested=True, inner_folds=inner_folds)
    thresholds = nested_thresholds(fit.plan, fit.excluded_scores, fs.y, fs.groups, 0.9)
    for outer in sorted(set(fs.groups)):
        assert thresholds[outer] == brute_force_threshold(fs, clf, outer, 0.9, inner_folds)


def test_inner_fits_are_shared_between_outer_folds():
    plan = nested_plan([f"b{i}" for i in range(12)])
    assert len(plan.excluded_sets) == 12 * 11 // 2  # {b, c} serves outer b and outer c
    grouped = nested_plan([f"b{i}" for i in range(12)], inner_folds=4)
    assert len(grouped.excluded_sets) == 12 * 3 + 4
    for outer, folds in grouped.inner.items():
        covered = sorted(b for fold in folds for b in fold)
        assert covered == sorted(set(plan.bundles) - {outer})  # the other bundles, each in one inner fold
    with pytest.raises(ValueError, match="2 or more"):
        nested_plan(["a", "b", "c"], inner_folds=1)


def test_a_held_out_bundle_never_moves_its_own_threshold():
    fs = feature_set()
    fit = leave_one_bundle_out(fs, "logreg", nested=True)
    before = nested_thresholds(fit.plan, fit.excluded_scores, fs.y, fs.groups, 0.95)
    X = fs.X.copy()
    X[fs.groups == "b2"] = np.random.default_rng(9).normal(4, 3, size=X[fs.groups == "b2"].shape)
    altered = FeatureSet(X, *(getattr(fs, k) for k in ("y", "groups", "paths", "sha256", "layer", "flips",
                                                        "settings", "fc_weight", "fc_bias")))
    refit = leave_one_bundle_out(altered, "logreg", nested=True)
    after = nested_thresholds(refit.plan, refit.excluded_scores, fs.y, fs.groups, 0.95)
    assert after["b2"] == before["b2"]
    assert any(after[b] != before[b] for b in before if b != "b2")  # b2's rows did train the others' models


def test_operating_point_pools_held_out_bundles_and_names_its_fields():
    scores = np.array([0.1, 0.9, 0.4, 0.2, 0.8, 0.7])
    y = np.array([0, 1, 1, 0, 1, 0])
    groups = np.array(["a", "a", "a", "b", "b", "b"])
    point = operating_point(scores, y, groups, {"a": 0.3, "b": 0.75}, 0.95)
    assert point.counts == {"a": Counts(tp=2, fp=0, tn=1, fn=0), "b": Counts(tp=1, fp=0, tn=2, fn=0)}
    assert point.recall == 1.0 and point.cleared == 1.0
    fields = point.fields()
    assert set(fields) == {f"heldout_{n}_95{s}" for n in ("recall", "cleared") for s in ("", "_ci_low", "_ci_high")}
    undefined = OperatingPoint(0.99, {"a": math.nan, "b": 0.5}, point.counts)
    assert all(math.isnan(v) for v in undefined.fields().values())
    assert recall_key(0.95) == "95" and recall_key(0.995) == "99_5"


def test_no_threshold_where_an_inner_model_cannot_be_fitted():
    """Abnormal images in two bundles only: holding out one of them leaves inner folds with one class."""
    fs = feature_set(n_bundles=4)
    y = np.where(np.isin(fs.groups, ["b0", "b1"]), np.arange(len(fs.y)) % 2, 0)
    fs = FeatureSet(fs.X, y, *(getattr(fs, k) for k in (
        "groups", "paths", "sha256", "layer", "flips", "settings", "fc_weight", "fc_bias")))
    fit = leave_one_bundle_out(fs, "logreg", nested=True)
    thresholds = nested_thresholds(fit.plan, fit.excluded_scores, y, fs.groups, 0.95)
    assert math.isnan(thresholds["b0"]) and math.isnan(thresholds["b1"]) and not math.isnan(thresholds["b2"])
    point = operating_point(fit.screening_scores, y, fs.groups, thresholds, 0.95)
    assert not point.defined and math.isnan(point.recall)


@pytest.mark.parametrize("cls", [KNNNormal, Mahalanobis])
def test_one_class_thresholds_do_not_depend_on_row_order(cls):
    """Issue 13: contiguous KFold folds of the row order used to move threshold_ (1.9294 -> 1.9321)."""
    fs = feature_set(n_bundles=8)
    X, y, groups = fs.X.astype(np.float64), fs.y, fs.groups
    order = np.random.default_rng(3).permutation(len(y))
    for kwargs in ({"groups": groups}, {}):
        a = cls().fit(X, y, **kwargs).threshold_
        b = cls().fit(X[order], y[order], **({"groups": groups[order]} if kwargs else {})).threshold_
        assert b == pytest.approx(a, rel=1e-12)


def test_one_class_threshold_scores_each_bundle_with_a_model_that_never_saw_it():
    """Cross-fitted by bundle for both classes: changing one bundle's normal rows moves the scores of the other
    bundles of its fold only through the models that trained on it, never its own rows' scores."""
    fs = feature_set(n_bundles=5)
    X, y, groups = fs.X.astype(np.float64), fs.y, fs.groups
    model = KNNNormal(cv=5).fit(X, y, groups=groups)  # 5 bundles, 5 folds: one bundle per fold
    scores = model._cross_fitted_scores(X, y, groups)
    in_b3 = groups == "b3"
    alone = KNNNormal(cv=5).fit_normal(X[~in_b3], y[~in_b3])
    np.testing.assert_array_equal(scores[in_b3], alone.anomaly_score(X[in_b3]))
