"""The classifiers: scikit-learn API, learning toy problems, the fc head's flips / seeds / pretrained start,
fold-batched training against separate fits and against a plain PyTorch loop, one-class scores and thresholds.

scikit-learn's ``check_estimator`` passes for every classifier with no expected failures; it does not cover the
fc head's [N, F, D] input (flip variants), which the tests below do.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from xfeat.learn.classifiers import (CLASSIFIERS, FCHead, KNNNormal, LinearSVM, LogReg, Mahalanobis, abnormal_score,
                            balanced_threshold, make_classifier)
from xfeat.errors import XfeatError
from xfeat.learn.binary import ROW_BLOCK, by_row_blocks, row_sums
from xfeat.learn.fc_training import HeadConfig, class_weights, epoch_plan, forward, init_head, train_heads
from xfeat.learn.threads import one_thread


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fast_fc(**params) -> FCHead:
    return FCHead(**{"epochs": 6, "optimizer": "adam", "batch_size": 32, **params})


def fast(name: str, **params):
    return fast_fc(**params) if name == "fc" else make_classifier(name, **params)


def toy(n: int, d: int = 8, abnormal: float = 0.3, shift: float = 3.0, seed: int = 0):
    """Positive 'CNN-like' features; abnormal rows shifted on the first 3 dimensions."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < abnormal).astype(np.int64)
    X = rng.normal(5.0, 1.0, size=(n, d))
    X[y == 1, :3] += shift
    return X.astype(np.float32), y


# --- scikit-learn API ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # its class-weight check caps SGD
@parametrize_with_checks([LinearSVM(), LogReg(), KNNNormal(), Mahalanobis(), Mahalanobis(n_components=3),
                          FCHead(epochs=4, optimizer="adam", batch_size=64)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


VECTORS = [name for name in CLASSIFIERS if name != "patchcore"]  # patch scorers take patch maps (test_patchcore)


@pytest.mark.parametrize("name", VECTORS)
def test_api_clone_params_pipeline(name):
    X, y = toy(120)
    est = fast(name)
    params = est.get_params()
    assert clone(est).get_params().keys() == params.keys()
    assert est.set_params(**params).get_params() == params
    with pytest.raises(NotFittedError):
        est.predict(X)
    with pytest.raises(NotFittedError):
        abnormal_score(est, X)
    assert est.fit(X, y) is est
    assert est.classes_.tolist() == [0, 1]
    score = abnormal_score(est, X)
    assert score.shape == (len(X),)
    pipe = make_pipeline(StandardScaler(), clone(est)).fit(X, y)
    assert pipe.predict(X).shape == (len(X),)
    assert abnormal_score(pipe, X).shape == (len(X),)


def test_make_classifier_unknown_name_lists_the_valid_ones():
    with pytest.raises(XfeatError) as error:
        make_classifier("forest")
    message = str(error.value)
    assert "forest" in message and "\n" not in message
    assert all(name in message for name in CLASSIFIERS)
    assert isinstance(make_classifier("svm", alpha=1e-3), LinearSVM)


# --- every classifier learns ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VECTORS)
def test_learns_a_separable_toy_problem(name):
    X, y = toy(400)
    est = fast(name).fit(X[:250], y[:250])
    assert balanced_accuracy_score(y[250:], est.predict(X[250:])) > 0.9
    score = abnormal_score(est, X[250:])
    assert score[y[250:] == 1].mean() > score[y[250:] == 0].mean()  # higher = more abnormal


@pytest.mark.parametrize("name", ["fc", "svm", "logreg"])
def test_balanced_class_weight_raises_abnormal_recall(name):
    X, y = toy(1200, abnormal=0.08, shift=1.0, seed=1)
    train, test = slice(0, 800), slice(800, None)
    recall = {}
    for weight in (None, "balanced"):
        est = fast(name, class_weight=weight).fit(X[train], y[train])
        recall[weight] = recall_score(y[test], est.predict(X[test]))
    assert recall["balanced"] > recall[None] + 0.2


# --- the fc head ----------------------------------------------------------------------------------------------

def test_fc_starts_from_the_pretrained_fc():
    X, y = toy(40, d=8)
    rng = np.random.default_rng(0)
    fc_weight, fc_bias = rng.normal(size=(1000, 8)).astype(np.float32), rng.normal(size=1000).astype(np.float32)
    head = FCHead(epochs=0, fc_weight=fc_weight, fc_bias=fc_bias, seed=3).fit(X, y)
    assert np.array_equal(head.coefs_[0], fc_weight.T) and np.array_equal(head.intercepts_[0], fc_bias)
    torch.manual_seed(3)  # the random layers are PyTorch's default initialisation drawn from the seed
    reference = torch.nn.Sequential(torch.nn.Linear(8, 1000), torch.nn.Linear(1000, 512))
    assert np.array_equal(head.coefs_[1], reference[1].weight.detach().numpy().T)
    random_start = FCHead(epochs=0, seed=3).fit(X, y)
    assert np.array_equal(random_start.coefs_[0], reference[0].weight.detach().numpy().T)
    assert np.array_equal(random_start.coefs_[1], head.coefs_[1])
    with pytest.raises(ValueError, match="fc_weight"):
        FCHead(epochs=0, fc_weight=fc_weight[:, :4]).fit(X, y)


def test_fc_draws_each_flip_with_probability_one_half():
    X, y = toy(200, d=4)
    X4 = np.repeat(X[:, None], 4, axis=1)
    counts = FCHead(epochs=10, batch_size=100).fit(X4, y).flip_counts_
    assert counts.sum() == 2000
    assert np.allclose(counts / 2000, 0.25, atol=0.04)  # none, h, v, hv: h and v independent, p = 0.5 each
    counts = FCHead(epochs=10, batch_size=100).fit(X4[:, :2], y).flip_counts_
    assert np.allclose(counts / 2000, 0.5, atol=0.04)  # none, h
    assert FCHead(epochs=10, batch_size=100, flips=False).fit(X4, y).flip_counts_.tolist() == [2000, 0, 0, 0]
    assert FCHead(epochs=10, batch_size=100).fit(X, y).flip_counts_.tolist() == [2000]


def test_fc_trains_on_the_flipped_variants_and_predicts_on_the_unflipped_one():
    """Only the flipped variants carry the signal: a head that never used them cannot separate the classes."""
    rng = np.random.default_rng(2)
    X, y = toy(400, d=8, shift=4.0)
    X4 = np.repeat(X[:, None], 4, axis=1)
    X4[:, 0] = rng.normal(5.0, 1.0, size=X.shape)  # the unflipped variant: noise, the same for both classes
    train, test = slice(0, 250), slice(250, None)
    with_flips = fast_fc().fit(X4[train], y[train])
    without = fast_fc(flips=False).fit(X4[train], y[train])
    assert balanced_accuracy_score(y[test], with_flips.predict(X4[test, 1])) > 0.9
    assert balanced_accuracy_score(y[test], without.predict(X4[test, 1])) < 0.7
    assert np.array_equal(with_flips.predict_proba(X4[test]), with_flips.predict_proba(X4[test, 0]))


def test_fc_same_seed_same_result_other_seed_other_result():
    X, y = toy(100)
    X4 = np.repeat(X[:, None], 4, axis=1) + np.random.default_rng(0).normal(0, 0.1, (100, 4, 8)).astype(np.float32)
    first, again = (FCHead(epochs=3, seed=7).fit(X4, y).predict_proba(X) for _ in range(2))
    other = FCHead(epochs=3, seed=8).fit(X4, y).predict_proba(X)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_fc_rejects_bad_shapes():
    X, y = toy(40)
    with pytest.raises(ValueError, match="flip variants"):
        FCHead(epochs=1).fit(np.repeat(X[:, None], 3, axis=1), y)
    head = FCHead(epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        head.predict(np.zeros((3, 4, 5), np.float32))


# --- fold-batched training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer,class_weight", [("sgd", None), ("adam", "balanced"), ("sgd", {0: 1, 1: 3})])
def test_fit_many_equals_separate_fits(optimizer, class_weight):
    X, y = toy(100, d=6)
    X4 = np.repeat(X[:, None], 4, axis=1) + np.random.default_rng(1).normal(0, 0.3, (100, 4, 6)).astype(np.float32)
    masks = np.zeros((3, 100), bool)
    masks[0], masks[1, :60], masks[2, 15:80] = True, True, True  # 7, 4 and 5 mini-batches of 16 per epoch
    template = FCHead(epochs=4, lr=1e-2, lr_step=2, batch_size=16, optimizer=optimizer, class_weight=class_weight)
    heads = template.fit_many(X4, y, masks, seeds=[0, 0, 5])
    assert not hasattr(template, "coefs_")
    for head, mask, seed in zip(heads, masks, [0, 0, 5]):
        alone = clone(template).set_params(seed=seed).fit(X4[mask], y[mask])
        assert np.abs(head.predict_proba(X) - alone.predict_proba(X)).max() < 1e-5
        assert np.array_equal(head.predict(X), alone.predict(X))
        assert np.allclose(head.loss_curve_, alone.loss_curve_, atol=1e-5)
    restored = pickle.loads(pickle.dumps(heads))
    assert np.array_equal(restored[1].predict_proba(X), heads[1].predict_proba(X))


def test_heads_do_not_depend_on_the_group_they_train_in():
    X, y = toy(90, d=5)
    masks = np.stack([np.arange(90) % 3 != k for k in range(3)])
    config = HeadConfig(epochs=2, batch_size=16, lr=1e-2)
    together, apart = (train_heads(X, y, masks, config, seeds=[1, 2, 3], group_size=g) for g in (3, 1))
    for a, b in zip(together, apart):
        assert max(np.abs(u - v).max() for u, v in zip(a.weights, b.weights)) < 1e-6
        assert np.array_equal(a.variant_counts, b.variant_counts)


def test_fit_many_refuses_a_single_class_fold():
    X, y = toy(60)
    with pytest.raises(ValueError, match="one class"):
        FCHead(epochs=1).fit_many(X, y, [y == 0])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_heads_matches_a_plain_pytorch_loop(optimizer):
    """The hand-written backward pass and optimiser step against autograd + torch.optim, same draws."""
    X, y = toy(70, d=5)
    X4 = np.repeat(X[:, None], 4, axis=1) + np.random.default_rng(3).normal(0, 0.3, (70, 4, 5)).astype(np.float32)
    config = HeadConfig(epochs=4, lr=1e-2, lr_step=2, batch_size=16, optimizer=optimizer, class_weight="balanced")
    head = train_heads(X4, y, np.ones((1, 70), bool), config, seeds=4)[0]

    net = init_head(5, seed=4)
    optim = (torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum) if optimizer == "sgd"
             else torch.optim.Adam(net.parameters(), lr=config.lr))
    schedule = torch.optim.lr_scheduler.StepLR(optim, config.lr_step, config.lr_gamma)
    loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(class_weights(y, "balanced"), dtype=torch.float32))
    rng, X4t, yt = np.random.default_rng(4), torch.from_numpy(X4), torch.from_numpy(y)
    for _ in range(config.epochs):
        order, variant = epoch_plan(rng, 70, 4, True)
        for start in range(0, 70, config.batch_size):
            rows = torch.from_numpy(order[start:start + config.batch_size])
            flips = torch.from_numpy(variant[start:start + config.batch_size])
            optim.zero_grad()
            loss(net(X4t[rows, flips]), yt[rows]).backward()
            optim.step()
        schedule.step()
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).double().numpy()
    assert np.abs(forward(head.weights, head.biases, X) - expected).max() < 1e-4


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_matmuls_train_the_same_head_up_to_bf16_rounding():
    """Mixed precision: matmul inputs rounded to bf16, float32 weights, optimiser state and accumulation."""
    X, y = toy(200, d=16, seed=6)
    X4 = np.repeat(X[:, None], 4, axis=1)
    masks = np.ones((2, 200), bool)
    masks[1, :40] = False
    heads = {p: train_heads(X4, y, masks, HeadConfig(epochs=6, lr=1e-2, precision=p), seeds=[1, 2])
             for p in ("fp32", "bf16")}
    for fp32, bf16 in zip(heads["fp32"], heads["bf16"]):
        assert all(w.dtype == np.float32 for w in bf16.weights)  # master weights stay float32
        assert not all(np.array_equal(a, b) for a, b in zip(fp32.weights, bf16.weights))
        drift = max(np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(fp32.weights, bf16.weights))
        assert drift < 0.1  # measured 0.05 at most (the last layer); fp32 itself differs by ~1e-7
        assert np.allclose(fp32.loss_curve, bf16.loss_curve, rtol=0.05, atol=0.01)
        agree = np.mean((forward(fp32.weights, fp32.biases, X)[:, 1] > forward(fp32.weights, fp32.biases, X)[:, 0])
                        == (forward(bf16.weights, bf16.biases, X)[:, 1] > forward(bf16.weights, bf16.biases, X)[:, 0]))
        assert agree >= 0.97
    assert torch.get_float32_matmul_precision() == "highest"  # the process-wide setting is restored
    with pytest.raises(ValueError, match="precision"):
        train_heads(X4, y, masks, HeadConfig(epochs=1, precision="fp8"))


# --- one-class scores and thresholds ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_one_class_score_depends_on_the_normal_rows_only(name):
    X, y = toy(300, seed=4)
    normal, abnormal = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    fits = [make_classifier(name).fit(X[rows], y[rows]) for rows in
            (np.r_[normal, abnormal[:20]], np.r_[abnormal[20:], normal], normal)]
    scores = [est.anomaly_score(X) for est in fits]
    assert np.allclose(scores[0], scores[1]) and np.allclose(scores[0], scores[2])
    only_normal = fits[2]
    assert only_normal.classes_.tolist() == [0, 1]
    assert only_normal.threshold_ > np.median(scores[2][normal])  # a high quantile of the normal scores


@pytest.mark.parametrize("name", VECTORS)
def test_model_and_threshold_do_not_depend_on_the_test_data(name):
    X, y = toy(300, seed=5)
    train, test_a, test_b = slice(0, 150), slice(150, 225), slice(225, 300)
    first = fast(name).fit(X[train], y[train])
    decisions_a = abnormal_score(first, X[test_a])
    second = fast(name).fit(X[train], y[train])
    abnormal_score(second, X[test_b])
    assert np.array_equal(abnormal_score(second, X[test_a]), decisions_a)
    assert np.array_equal(abnormal_score(first, X[test_a]), decisions_a)


def test_balanced_threshold_known_answers():
    assert balanced_threshold(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])) == pytest.approx(0.55)
    # 0.5 and 2.5 both give balanced accuracy 0.75: the lower cut, catching more abnormal images, wins
    assert balanced_threshold(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 1, 0, 1])) == pytest.approx(0.5)


# --- row independence (issue 12) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [("fc", {}), ("svm", {}), ("logreg", {}), ("knn", {}), ("knn", {"scaling": "l2"}),
                                          ("mahalanobis", {}), ("mahalanobis", {"n_components": 6})])
def test_a_row_gets_the_same_score_bits_alone_among_others_and_in_any_order(name, params):
    """docs/screening.md's promise: a row's score does not depend on which rows, how many or in which order are
    scored with it (a BLAS product's rounding does), so predict reproduces the cache path's scores bitwise.
    On one BLAS thread, as evaluation and predict score; more rows than one block of ``by_row_blocks``."""
    X, y = toy(ROW_BLOCK + 60, d=32, seed=8)
    rng = np.random.default_rng(8)
    with one_thread():
        est = fast(name, **params).fit(X[:200], y[:200])
        together = abnormal_score(est, X)
        each = np.arange(0, len(X), 7 if name == "fc" else 1)  # the fc head: 7x fewer, each alone costs a block
        alone = np.concatenate([abnormal_score(est, X[i:i + 1]) for i in each])
        np.testing.assert_array_equal(alone, together[each])
        for size in (2, 7, ROW_BLOCK - 1, ROW_BLOCK, ROW_BLOCK + 1, len(X)):
            rows = rng.permutation(len(X))[:size]
            np.testing.assert_array_equal(abnormal_score(est, X[rows]), together[rows])
        if name == "fc":  # flip variants [N, F, D]: scored on the unflipped one, a strided view
            variants = np.stack([X, X[:, ::-1]], axis=1)
            np.testing.assert_array_equal(abnormal_score(est, variants), together)
            np.testing.assert_array_equal(abnormal_score(est, variants[5:6]), together[5:6])
        if name == "logreg":
            np.testing.assert_array_equal(est.predict_proba(X[3:4]), est.predict_proba(X)[3:4])


def test_row_sums_and_row_blocks_do_not_mix_rows():
    rng = np.random.default_rng(9)
    for d in (1, 7, 9, 130, 1000, 9000):  # numpy's pairwise sum: 8 accumulators, halves above 128 terms
        A = rng.normal(size=(40, d)) * rng.lognormal(0, 3, size=(40, d))
        sums = row_sums(A)
        assert all(row_sums(A[i:i + 1])[0] == sums[i] for i in range(len(A)))
        np.testing.assert_array_equal(row_sums(A[::-1]), sums[::-1])
    X = rng.normal(size=(2 * ROW_BLOCK + 3, 5))
    shapes = []
    result = by_row_blocks(lambda rows: shapes.append(rows.shape) or rows.sum(axis=1), X)
    np.testing.assert_array_equal(result, X.sum(axis=1))
    assert set(shapes) == {(ROW_BLOCK, 5)} and len(shapes) == 3
    assert by_row_blocks(lambda rows: rows[:, 0], X[:0]).shape == (0,)
