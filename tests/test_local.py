"""Local taps, patch maps and tiles: what they compute, how the cache stores them, how they are read back."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import stored, write_dataset
from xfeat.errors import XfeatError
from xfeat.features.cache import CacheError
from xfeat.features.extract import ExtractConfig, extract
from xfeat.features.local import (GEM_P, PATCH_BYTES, joined_map, local_statistics, patch_block, patch_maps,
                                  projection)
from xfeat.features.reading import list_groups, load_features
from xfeat.features.tiles import Tiling, parse_tiles


def test_statistics_are_mean_max_and_gem_per_channel():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[-1.0, -1.0], [-1.0, 0.0]]]])  # [1, 2, 2, 2]
    stats = local_statistics(x)[0].numpy()
    assert stats[:2] == pytest.approx([3.0, -0.75])
    assert stats[2:4] == pytest.approx([6.0, 0.0])
    gem = np.mean(np.array([1.0, 2.0, 3.0, 6.0]) ** GEM_P) ** (1 / GEM_P)
    assert stats[4] == pytest.approx(gem, rel=1e-6)
    assert 3.0 < stats[4] < 6.0  # between the mean and the max
    assert stats[5] == pytest.approx(1e-6, rel=1e-3)  # negative values clamp to the floor, GeM stays finite


def test_joined_map_averages_neighbourhoods_and_lands_on_the_finer_grid():
    fine = torch.zeros(1, 2, 8, 8)
    fine[0, 0, 4, 4] = 9.0
    coarse = torch.ones(1, 3, 4, 4)
    joined = joined_map([fine, coarse])
    assert joined.shape == (1, 5, 8, 8)
    assert joined[0, 0, 3:6, 3:6].numpy() == pytest.approx(np.ones((3, 3)))  # 9 spread over its 3 x 3 neighbours
    assert joined[0, 0, 0, 0] == 0
    assert torch.allclose(joined[0, 2:], torch.ones(3, 8, 8))


def test_patch_maps_fit_the_budget_with_a_fixed_projection():
    assert patch_block((28, 28), 128) == 1
    k = patch_block((250, 125), 128)
    assert np.ceil(250 / k) * np.ceil(125 / k) * 128 * 2 <= PATCH_BYTES
    assert np.ceil(250 / (k - 1)) * np.ceil(125 / (k - 1)) * 128 * 2 > PATCH_BYTES
    p = projection(384, 128)
    assert p.shape == (384, 128) and np.allclose(p.T @ p, np.eye(128), atol=1e-5)
    assert np.array_equal(p, projection.__wrapped__(384, 128))  # the same matrix every time, not a cached accident
    m = torch.randn(2, 384, 10, 6)
    maps = patch_maps(m, {"block": 2, "dim": 128})
    assert maps.shape == (2, 5, 3, 128) and maps.dtype == np.float16


def test_tiling_geometry_split_and_stitch():
    tiling = Tiling(2, 3, (64, 96), overlap=0.25)
    assert tiling.steps == (64, 64)  # 48 and 72 rounded to multiples of 32
    assert tiling.image_size == (128, 224)
    images = torch.arange(2 * 128 * 224, dtype=torch.float32).reshape(2, 1, 128, 224)
    tiles = tiling.split(images)
    assert tiles.shape == (12, 1, 64, 96)
    assert torch.equal(tiles[4], images[0, :, 64:128, 64:160])  # image 0, row 1, column 1
    stitched = tiling.stitch(tiles, 1)  # stride 1: the tiles themselves, overlaps averaged of equal values
    assert torch.equal(stitched, images)
    pooled = torch.arange(12.0).reshape(12, 1)
    assert Tiling(2, 3, (64, 96), combine="both").combine_pooled(pooled).tolist() == [[2.5, 5.0], [8.5, 11.0]]
    with pytest.raises(XfeatError, match="multiple of 32"):
        Tiling(2, 2, (50, 64))
    with pytest.raises(XfeatError, match="look like 4x2"):
        parse_tiles("4by2", (64, 64))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("local") / "data"
    return write_dataset(root, {"B1": {"normal": 3, "abnormal": 1}, "B2": {"normal": 2, "abnormal": 2}},
                         shape=(72, 56))


def _config(**kw) -> ExtractConfig:
    base = dict(backbones=("resnet18",), methods=("m2",), size=(64, 64), flips=2, weights="none", workers=0, jobs=1)
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tapped(data, tmp_path_factory, one_torch_thread):
    """One cache with every tap (read-only in the tests using it)."""
    cache = tmp_path_factory.mktemp("tapped") / "c.h5"
    extract(data, cache, _config(taps=("pool", "local", "patches")))
    return cache


def test_taps_are_groups_beside_the_pooled_one(tapped, data, tmp_path):
    with h5py.File(tapped) as f:
        assert f.attrs["format_version"] == 3
        local, patches = f["features/resnet18/m2/64x64.local"], f["features/resnet18/m2/64x64.patches"]
        assert local["local"].shape == (8, 2, 3 * (128 + 256))
        assert patches["patches"].shape == (8, 8, 8, 128) and patches["patches"].dtype == np.float16
        assert "pool" not in local and "pool" not in patches
    with stored(tapped, "features/resnet18/m2/64x64.patches/patches") as ds:
        assert ds.chunks == (1, 8, 8, 128)  # one image's map is one read
    assert {g.tap for g in list_groups(tapped)} == {"pool", "local", "patches"}
    # the pooled rows are the same bits as a pooled-only run's: one forward pass gives every tap
    plain = tmp_path / "plain.h5"
    extract(data, plain, _config())
    with h5py.File(plain) as f:
        assert f.attrs["format_version"] == 3  # every cache written now is an index over segments
    a = load_features(plain, "resnet18", "m2", flips="all")
    b = load_features(tapped, "resnet18", "m2", flips="all")
    assert np.array_equal(a.X, b.X) and np.array_equal(a.paths, b.paths)


def test_layers_read_alone_and_joined(tapped):
    pool = load_features(tapped, "resnet18", "m2", layer="pool")
    local = load_features(tapped, "resnet18", "m2", layer="local")
    joined = load_features(tapped, "resnet18", "m2", layer="pool+local")
    assert local.X.shape == (8, 1152) and local.settings.tap == "local"
    assert np.array_equal(joined.X, np.hstack([pool.X, local.X])) and joined.layer == "pool+local"
    assert np.array_equal(joined.paths, pool.paths)
    patches = load_features(tapped, "resnet18", "m2", layer="patches")
    assert patches.X.shape == (8, 8, 8, 128)
    with pytest.raises(CacheError, match="unflipped"):
        load_features(tapped, "resnet18", "m2", layer="patches", flips="all")
    with pytest.raises(CacheError, match="unknown layer"):
        load_features(tapped, "resnet18", "m2", layer="pool+patches")


def test_a_missing_tap_is_named_with_the_command_that_adds_it(data, tmp_path, one_torch_thread):
    cache = tmp_path / "c.h5"
    extract(data, cache, _config(flips=1))
    with pytest.raises(CacheError, match="--taps pool,local"):
        load_features(cache, "resnet18", "m2", layer="local")
    pool = load_features(cache, "resnet18", "m2").X
    summary = extract(data, cache, _config(flips=1, taps=("pool", "local")))  # adds the tap: images computed again
    assert summary.computed == 8
    assert np.array_equal(load_features(cache, "resnet18", "m2").X, pool)
    assert load_features(cache, "resnet18", "m2", layer="pool+local").X.shape == (8, 512 + 1152)
    assert extract(data, cache, _config(flips=1, taps=("pool", "local"))).computed == 0  # then all cached


def test_tiles_run_the_backbone_on_each_tile(data, tmp_path, one_torch_thread):
    cache = tmp_path / "c.h5"
    tiles = Tiling(2, 1, (32, 64), overlap=0.0, combine="both")
    extract(data, cache, _config(size=(32, 64), flips=1, tiles=tiles, taps=("pool", "local")))
    fs = load_features(cache, "resnet18", "m2", size="32x64_t2x1")
    assert fs.X.shape == (8, 1024)  # mean and max of the tiles' vectors side by side
    assert fs.settings.tiles == "2x1" and fs.settings.tile_combine == "both"
    assert load_features(cache, "resnet18", "m2", layer="local").X.shape == (8, 1152)
    with pytest.raises(CacheError, match="fc layer does not take"):
        load_features(cache, "resnet18", "m2", layer="fc1000")
    with pytest.raises(XfeatError, match="same"):
        _config(size=(64, 64), tiles=tiles).validate()


def test_patch_scorer_from_the_cli_to_anomaly_maps(tapped, data, tmp_path):
    """evaluate --clf patchcore, train it, predict with --maps: every image gets a readable map; a model
    without local evidence refuses --maps in one line."""
    import csv

    import cv2

    from xfeat_cli.main import main

    report = tmp_path / "report"
    assert main(["evaluate", str(tapped), "--clf", "patchcore,logreg", "--layer", "local,pool+local",
                 "--recall", "none", "--report", str(report), "-q"]) == 0
    with open(report / "results.csv", newline="") as f:
        layers = {(r["clf"], r["layer"]) for r in csv.DictReader(f)}
    assert {("patchcore", "patches"), ("logreg", "local"), ("logreg", "pool+local")} <= layers
    model = tmp_path / "pc.xfeat"
    assert main(["train", str(tapped), "--out", str(model), "--clf", "patchcore", "-q"]) == 0
    maps = tmp_path / "maps"
    assert main(["predict", str(model), str(data / "B1"), "--out", str(tmp_path / "p.csv"), "--maps", str(maps),
                 "-q", "--workers", "0"]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["map"] for r in rows)
    for r in rows:
        image = cv2.imread(r["map"])
        assert image.shape == (64, 64, 3)  # the model's input, what the backbone saw
    plain = tmp_path / "lr.xfeat"
    assert main(["train", str(tapped), "--out", str(plain), "--clf", "logreg", "--layer", "pool+local", "-q"]) == 0
    assert main(["predict", str(plain), str(data / "B1"), "--out", str(tmp_path / "q.csv"), "--maps",
                 str(tmp_path / "m2"), "-q"]) == 1
    assert not (tmp_path / "m2").exists()


def test_local_layers_score_new_images_as_the_cache_does(tapped, data):
    """A model on pool+local scores a raw image with the bits its cached features give (one forward pass)."""
    from xfeat.learn.evaluation import Configuration, evaluate_configuration
    from xfeat.screening.model import fit_model
    from xfeat.screening.predict import gather_inputs, predict

    for clf, layer in (("logreg", "pool+local"), ("patchcore", "patches")):
        validated = evaluate_configuration(tapped, Configuration("resnet18", "m2", clf, layer, ""), recalls=())
        model = fit_model(validated)
        images = gather_inputs([data / "B2"])
        computed = predict(model, images, device="cpu", workers=0)
        cached = predict(model, images, cache=tapped, device="cpu", workers=0)
        assert {p.source for p in computed} == {"computed"} and {p.source for p in cached} == {"cache"}
        assert [p.score for p in computed] == [p.score for p in cached]


def test_one_search_gives_the_patch_scorer_every_score(tapped):
    """Leave-one-bundle-out scores a patch scorer's held-out images with one search; the result is what the
    estimator's own methods say, bit for bit."""
    from xfeat.learn.binary import abnormal_score, screening_score
    from xfeat.learn.classifiers import make_classifier
    from xfeat.learn.evaluation import Configuration, evaluate_configuration

    result = evaluate_configuration(tapped, Configuration("resnet18", "m2", "patchcore", "patches", ""), recalls=())
    fs = result.features
    held_out = fs.groups == "B1"
    model = make_classifier("patchcore").fit(fs.X[~held_out], fs.y[~held_out], fs.groups[~held_out])
    X = fs.X[held_out]
    assert np.array_equal(result.scores[held_out], abnormal_score(model, X))
    assert np.array_equal(result.decisions[held_out], model.predict(X))
    assert np.array_equal(result.screening_scores[held_out], screening_score(model, X))
    assert np.array_equal(result.evidence[held_out], model.patch_scores(X))
    assert np.all(result.evidence_thresholds[held_out] == model.threshold_)
