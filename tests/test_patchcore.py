"""PatchCore on patch maps: finds planted abnormal patches, does not depend on the order of the rows, keeps its
bank within bounds, fits its threshold by bundles, and takes [N, gh, gw, d] or [N, P, d] alike."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from xfeat.learn.classifiers import make_classifier
from xfeat.learn.metrics import auroc
from xfeat.learn.patchcore import PatchCore, k_center_greedy
from xfeat.learn.threads import one_thread

GRID, DIM = (6, 6), 16


@pytest.fixture(autouse=True)
def single_threaded():
    """As xfeat fits and scores (evaluation, train, predict); tiny products are also faster on one thread."""
    with one_thread():
        yield


def patch_maps(n: int, abnormal: float = 0.3, seed: int = 0):
    """Normal patches from a few clusters (like textures); abnormal images have a 2 x 2 block of patches far
    from all of them. Returns X [n, 6, 6, 16] float32, y, and the planted block's top-left corner per image."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, DIM))
    X = centres[rng.integers(0, 4, size=(n, *GRID))] + rng.normal(0, 0.5, size=(n, *GRID, DIM))
    y = (rng.random(n) < abnormal).astype(np.int64)
    corners = rng.integers(0, GRID[0] - 1, size=(n, 2))
    for i in np.flatnonzero(y):
        r, c = corners[i]
        X[i, r:r + 2, c:c + 2] += rng.normal(0, 0.5, size=(2, 2, DIM)) + 8.0 * rng.choice([-1, 1], size=DIM)
    return X.astype(np.float32), y, corners


def bundles(n: int) -> np.ndarray:
    return np.array([f"B{i % 7}" for i in range(n)])


def test_scores_planted_abnormal_patches_high_and_at_their_place():
    X, y, corners = patch_maps(160, seed=1)
    est = PatchCore().fit(X[:100], y[:100], groups=bundles(100))
    X_test, y_test, corners_test = X[100:], y[100:], corners[100:]
    assert auroc(y_test, est.anomaly_score(X_test)) > 0.99
    patch = est.patch_scores(X_test)
    assert patch.shape == (len(X_test), *GRID) and patch.dtype == np.float32
    assert np.array_equal(est.anomaly_score(X_test), patch.reshape(len(X_test), -1).max(axis=1))
    for i in np.flatnonzero(y_test):
        r, c = np.unravel_index(np.argmax(patch[i]), GRID)
        assert corners_test[i][0] <= r <= corners_test[i][0] + 1 and corners_test[i][1] <= c <= corners_test[i][1] + 1
    assert (est.predict(X_test) == y_test).mean() > 0.95


@pytest.mark.parametrize("with_groups", [True, False])
def test_does_not_depend_on_the_order_of_the_rows(with_groups):
    X, y, _ = patch_maps(90, seed=2)
    groups = bundles(len(X)) if with_groups else None
    params = {"max_candidates": 600, "coreset": 0.2}  # a random draw of candidates, then the coreset
    first = PatchCore(**params).fit(X, y, groups=groups)
    order = np.random.default_rng(0).permutation(len(X))
    second = PatchCore(**params).fit(X[order], y[order], groups=None if groups is None else groups[order])
    assert np.array_equal(first.bank_, second.bank_)
    assert first.threshold_ == second.threshold_
    assert np.array_equal(first.anomaly_score(X)[order], second.anomaly_score(X[order]))


def test_a_row_gets_the_same_score_alone_and_among_others():
    X, y, _ = patch_maps(60, seed=3)
    est = PatchCore().fit_normal(X, y)
    together = est.anomaly_score(X)
    assert all(est.anomaly_score(X[i:i + 1])[0] == together[i] for i in range(0, 60, 7))


def test_bank_size_follows_coreset_max_bank_and_max_candidates():
    X, y, _ = patch_maps(60, abnormal=0.0, seed=4)
    n_patches = len(X) * GRID[0] * GRID[1]  # 2160 normal patches, all candidates by default
    assert len(PatchCore().fit_normal(X, y).bank_) == int(np.ceil(0.1 * n_patches))
    assert len(PatchCore(coreset=0.5, max_bank=40).fit_normal(X, y).bank_) == 40
    assert len(PatchCore(max_candidates=500).fit_normal(X, y).bank_) == 50
    everything = PatchCore(coreset=1.0).fit_normal(X, y).bank_
    assert everything.shape == (n_patches, DIM) and everything.dtype == np.float32
    with pytest.raises(ValueError, match="coreset"):
        PatchCore(coreset=0).fit_normal(X, y)


def test_k_center_greedy_is_the_plain_greedy():
    """Each centre the farthest point from those before, checked against one full pass per centre."""
    points = np.random.default_rng(5).normal(size=(500, 8)).astype(np.float32)
    chosen = k_center_greedy(points, 100, start=3)
    distance = np.linalg.norm(points - points[3], axis=1)
    expected = [3]
    for _ in range(99):
        expected.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[expected[-1]], axis=1))
    assert chosen.tolist() == expected
    assert len(set(k_center_greedy(np.zeros((10, 2), np.float32), 10).tolist())) == 10  # no point twice


def test_fit_with_groups_sets_the_threshold_and_fit_normal_does_not():
    X, y, _ = patch_maps(80, seed=6)
    est = PatchCore().fit(X, y, groups=bundles(len(X)))
    assert np.isfinite(est.threshold_) and est.classes_.tolist() == [0, 1]
    assert np.array_equal(est.decision_function(X), est.anomaly_score(X) - est.threshold_)
    assert set(est.predict(X)) <= {0, 1}
    normal_only = PatchCore().fit(X[y == 0], y[y == 0])
    assert normal_only.threshold_ > np.median(normal_only.anomaly_score(X[y == 0]))  # a high quantile
    bank_only = PatchCore().fit_normal(X, y)
    assert not hasattr(bank_only, "threshold_") and bank_only.anomaly_score(X).shape == (len(X),)
    assert np.array_equal(bank_only.bank_, est.bank_)  # the same bank: the threshold is fitted on top of it


def test_flat_and_grid_patch_maps_give_the_same_scores():
    X, y, _ = patch_maps(50, seed=7)
    flat = X.reshape(len(X), -1, DIM)
    grid_est, flat_est = PatchCore().fit(X, y), PatchCore().fit(flat, y)
    assert np.array_equal(grid_est.bank_, flat_est.bank_) and grid_est.threshold_ == flat_est.threshold_
    assert np.array_equal(grid_est.anomaly_score(X), flat_est.anomaly_score(flat))
    assert np.array_equal(grid_est.anomaly_score(flat), grid_est.anomaly_score(X))
    assert flat_est.patch_scores(flat).shape == (len(X), GRID[0] * GRID[1])
    assert grid_est.n_features_in_ == DIM
    half = PatchCore().fit(X.astype(np.float16), y)  # float16 patch maps are taken as they are
    assert half.bank_.dtype == np.float32 and half.anomaly_score(X.astype(np.float16)).shape == (len(X),)


def test_refuses_feature_vectors_and_other_widths():
    X, y, _ = patch_maps(30, seed=8)
    with pytest.raises(ValueError, match=r"patch maps.*2-D"):
        PatchCore().fit(X.reshape(len(X), -1), y)
    est = PatchCore().fit_normal(X, y)
    with pytest.raises(ValueError, match="patch maps"):
        est.anomaly_score(X[:, 0, 0])
    with pytest.raises(ValueError, match="16 features"):
        est.anomaly_score(X[..., :8])


def test_make_classifier_builds_it():
    est = make_classifier("patchcore", coreset=0.2, max_bank=100)
    assert isinstance(est, PatchCore) and est.coreset == 0.2 and est.max_bank == 100
    assert clone(est).get_params() == est.get_params()


def test_pool_averages_blocks_of_cells_before_searching():
    from xfeat.learn.patchcore import _block_means

    maps = np.arange(2 * 5 * 4 * 3, dtype=np.float16).reshape(2, 5, 4, 3)
    pooled = _block_means(maps, 2)
    assert pooled.shape == (2, 3, 2, 3)  # partial blocks at the edges are kept: a defect there still counts
    assert np.allclose(pooled[1, 2, 1], maps[1, 4:, 2:].astype(np.float32).mean(axis=(0, 1)))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 6, 6, 8)).astype(np.float16)
    y = np.r_[np.zeros(15, int), np.ones(5, int)]
    model = PatchCore(pool=2).fit(X, y)
    assert model.patch_scores(X).shape == (20, 3, 3)
    assert np.array_equal(model.anomaly_score(X), PatchCore().fit(_block_means(X, 2), y).anomaly_score(
        _block_means(X, 2)))
