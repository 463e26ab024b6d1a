"""The near-duplicate check across bundles: on feature arrays, and on features extracted from planted copies."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from xfeat.errors import XfeatError
from xfeat.learn.duplicates import CSV_COLUMNS, KEEP, near_duplicates


def bundles_of_parts(n_bundles=5, per_bundle=20, dim=64, seed=0):
    """Post-ReLU-like features: each bundle its own look, each part its own variation around it."""
    rng = np.random.default_rng(seed)
    looks = rng.normal(1.0, 0.3, (n_bundles, dim))
    X = np.concatenate([np.maximum(look + rng.normal(0, 0.15, (per_bundle, dim)), 0) for look in looks])
    groups = np.repeat([f"B{b}" for b in range(n_bundles)], per_bundle)
    paths = np.array([f"/data/{g}/img{i:03d}.tif" for i, g in enumerate(groups)])
    return X.astype(np.float32), groups, paths


def brute_force(X, groups, ratio=0.1, local=0.5):
    """The documented rule on the full distance matrix: {(i, j): distance}."""
    Z = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    D = np.sqrt(((Z[:, None] - Z[None]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    same = groups[:, None] == groups[None]
    typical = np.median(np.where(same, np.inf, D).min(1))
    own = np.where(same, D, np.inf).min(1)
    return {(i, j): D[i, j] for i in range(len(X)) for j in range(i + 1, len(X))
            if not same[i, j] and ((D[i, j] < ratio * typical and D[i, j] < local * min(own[i], own[j]))
                                   or D[i, j] == 0)}, typical


def test_planted_copies_are_found_with_paths_bundles_and_ratios():
    X, groups, paths = bundles_of_parts()
    rng = np.random.default_rng(1)
    X[25] = X[3] * 1.02 + rng.normal(0, 0.002, X.shape[1])  # part 3 of B0 again in B1: another exposure
    X[70] = X[41]  # part 41 of B2 again in B3, identical features
    result = near_duplicates(X, groups, paths)

    assert [(p.path_a, p.bundle_a, p.path_b, p.bundle_b) for p in result.pairs] == [
        (paths[41], "B2", paths[70], "B3"), (paths[3], "B0", paths[25], "B1")]  # closest first
    assert result.pairs[0].distance == 0 and result.pairs[0].ratio == 0
    assert 0 < result.pairs[1].ratio < result.ratio
    assert result.pairs[1].ratio == pytest.approx(result.pairs[1].distance / result.typical_distance)
    expected, typical = brute_force(X, groups)
    assert set(expected) == {(41, 70), (3, 25)} and result.typical_distance == pytest.approx(typical)
    assert result.pairs[1].distance == pytest.approx(expected[(3, 25)])

    line = result.warning()
    assert "2 near-duplicate pair(s)" in line and "near_duplicates.csv" in line and line.startswith("xfeat: warning:")
    rows = result.rows()
    assert [tuple(r) for r in rows] == [CSV_COLUMNS] * 2 and rows[1]["path_a"] == paths[3]
    assert "0.1" in result.rule and "0.5" in result.rule

    clean = near_duplicates(*bundles_of_parts())
    assert clean.pairs == [] and clean.warning() == "" and clean.rows() == []
    assert clean.nearest_distance.min() > 0.3 * clean.typical_distance  # lookalike parts stay well clear


def test_matches_the_rule_on_the_full_matrix_when_a_part_is_in_many_bundles():
    """A part imaged in 12 bundles has more candidates than the screen keeps per row (KEEP): all 66 pairs."""
    X, groups, paths = bundles_of_parts(n_bundles=14, per_bundle=6, dim=32, seed=2)
    rng = np.random.default_rng(3)
    twins = [6 * b + 1 for b in range(12)]
    for row in twins[1:]:
        X[row] = X[twins[0]] * rng.uniform(0.98, 1.02) + rng.normal(0, 1e-3, X.shape[1])
    assert len(twins) - 1 > KEEP
    result = near_duplicates(X, groups, paths, block=5)
    expected, _ = brute_force(X, groups)
    index = {p: i for i, p in enumerate(paths)}
    found = {tuple(sorted((index[p.path_a], index[p.path_b]))): p.distance for p in result.pairs}
    assert set(found) == set(expected) == {(a, b) for a in twins for b in twins if a < b}
    assert all(found[k] == pytest.approx(expected[k]) for k in found)


def test_independent_of_row_order_and_block_size():
    X, groups, paths = bundles_of_parts(seed=4)
    X[50] = X[7] + 0.004
    X[99] = X[12] * 0.97
    result = near_duplicates(X, groups, paths)
    assert len(result.pairs) == 2
    for seed, block in ((0, 256), (1, 7), (2, 1)):
        order = np.random.default_rng(seed).permutation(len(X))
        shuffled = near_duplicates(X[order], groups[order], paths[order], block=block)
        assert shuffled.pairs == result.pairs  # the same bits: distances are recomputed from the two rows alone
        assert shuffled.typical_distance == result.typical_distance
        assert np.array_equal(shuffled.nearest_distance, result.nearest_distance[order])


def test_close_pairs_inside_a_bundle_and_lookalike_parts_are_not_reported():
    X, groups, paths = bundles_of_parts(seed=5)
    X[11] = X[10] * 1.001  # the same part twice in B0: one fold, no leak
    X[30] = X[31]  # identical features in B1
    assert near_duplicates(X, groups, paths).pairs == []

    # B0's parts all look alike (as black m1 images do): much closer to each other than images usually are to
    # another bundle. A copy of one of them in B3 is a near-duplicate of that part, not of its lookalikes.
    rng = np.random.default_rng(6)
    X, groups, paths = bundles_of_parts(seed=6)
    X[:20] = X[0] + rng.normal(0, 0.01, (20, X.shape[1]))
    X[65] = X[4] + rng.normal(0, 0.0005, X.shape[1])
    result = near_duplicates(X, groups, paths)
    assert [(p.path_a, p.path_b) for p in result.pairs] == [(paths[4], paths[65])]
    without_local, _ = brute_force(X, groups, local=np.inf)
    assert len(without_local) > 1 and all(4 in pair or 65 in pair for pair in without_local)  # copy vs lookalikes


def test_inputs_that_cannot_be_checked():
    X, groups, paths = bundles_of_parts(n_bundles=1)
    one = near_duplicates(X, groups, paths)
    assert one.pairs == [] and np.isnan(one.typical_distance) and one.warning() == ""
    same = near_duplicates(np.ones((6, 3)), np.array(list("aabbcc")), np.array([f"p{i}" for i in range(6)]))
    assert same.typical_distance == 0 and len(same.pairs) == 12 and {p.ratio for p in same.pairs} == {0.0}
    with pytest.raises(XfeatError, match="one flip variant"):
        near_duplicates(np.zeros((4, 2, 3)), groups[:4], paths[:4])
    with pytest.raises(XfeatError, match="3 bundles"):
        near_duplicates(np.ones((4, 3)), groups[:3], paths[:4])
    with pytest.raises(XfeatError, match="NaN"):
        near_duplicates(np.full((2, 3), np.nan), np.array(["a", "b"]), np.array(["x", "y"]))


def test_planted_copies_in_extracted_features(tmp_path, one_torch_thread):
    """Real ImageNet features (efficientnet_lite0, m3) of synthetic electrodes, with two copies planted in other
    bundles: the same file with one pixel changed, and with another exposure (gain 3 %, offset 30)."""
    from xfeat import load_features
    from xfeat.features.extract import ExtractConfig, extract
    from xfeat.synth.writer import make_dataset

    data = tmp_path / "data"
    make_dataset(data, bundles=3, images=18, size=(128, 64), seed=0, jobs=1)
    first, second = sorted((data / "B01" / "normal").glob("*.tif"))[:2]
    pixel = tifffile.imread(first)
    pixel[0, 0] += 1
    exposure = np.clip(np.rint(tifffile.imread(second) * 1.03 + 30), 0, 65535).astype(np.uint16)
    for bundle, name, image in (("B02", "copy_pixel.tif", pixel), ("B03", "copy_exposure.tif", exposure)):
        (data / bundle / "normal").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(data / bundle / "normal" / name, image)
    cache = tmp_path / "c.h5"
    extract(data, cache, ExtractConfig(backbones=("efficientnet_lite0",), methods=("m3",), size=(96, 48), flips=1,
                                       weights="imagenet", device="cpu", workers=0, jobs=1))
    features = load_features(cache, "efficientnet_lite0", "m3")

    result = near_duplicates(features.X, features.groups, features.paths)

    found = [(p.path_a, p.bundle_a, p.path_b, p.bundle_b) for p in result.pairs]
    assert found == [(str(first), "B01", str(data / "B02" / "normal" / "copy_pixel.tif"), "B02"),
                     (str(second), "B01", str(data / "B03" / "normal" / "copy_exposure.tif"), "B03")]
    assert result.pairs[1].ratio < 0.08  # measured 0.038; different parts: 0.2 and up
    assert "2 near-duplicate pair(s)" in result.warning()
