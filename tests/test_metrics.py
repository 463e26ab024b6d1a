import math

import numpy as np
import pytest

from xfeat.learn.metrics import Counts, auroc, bundle_bootstrap


def test_counts_and_balanced_accuracy_on_a_hand_made_fold():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 0, 0, 0, 0, 1, 1])
    c = Counts.of(y, pred)
    assert (c.tp, c.fp, c.tn, c.fn, c.n) == (2, 2, 3, 1, 8)
    assert c.tpr == pytest.approx(2 / 3) and c.tnr == pytest.approx(3 / 5)
    assert c.balanced_accuracy == pytest.approx((2 / 3 + 3 / 5) / 2) and c.single_class == ""


def test_overall_comes_from_summed_counts_not_averaged_folds():
    folds = [Counts(tp=9, fp=0, tn=1, fn=1), Counts(tp=0, fp=5, tn=5, fn=9)]
    total = sum(folds, Counts())
    assert (total.tp, total.fp, total.tn, total.fn) == (9, 5, 6, 10)
    assert total.balanced_accuracy == pytest.approx((9 / 19 + 6 / 11) / 2)
    assert total.balanced_accuracy != pytest.approx(np.mean([f.balanced_accuracy for f in folds]))


def test_single_class_bundle_reports_its_one_rate_never_a_silent_50():
    normal_only = Counts.of(np.zeros(4), np.array([0, 0, 0, 1]))
    assert normal_only.single_class == "normal only" and math.isnan(normal_only.tpr)
    assert normal_only.balanced_accuracy == pytest.approx(0.75)
    abnormal_only = Counts.of(np.ones(2), np.array([1, 0]))
    assert abnormal_only.single_class == "abnormal only" and abnormal_only.balanced_accuracy == 0.5
    assert math.isnan(auroc(np.zeros(4), np.arange(4)))


def test_auroc_and_bundle_bootstrap():
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    perfect = [Counts(tp=3, tn=5)] * 6
    assert bundle_bootstrap(perfect) == (1.0, 1.0)
    mixed = [Counts(tp=3, tn=5), Counts(fn=3, fp=5), Counts(tp=1, fn=1, tn=2, fp=2)] * 3
    low, high = bundle_bootstrap(mixed, seed=1)
    point = sum(mixed, Counts()).balanced_accuracy
    assert low < point < high and bundle_bootstrap(mixed, seed=1) == (low, high)
