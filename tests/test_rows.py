"""Which cached rows count, and in which order: results never depend on the order images were extracted in, and
rows of images that left the dataset stay out of evaluation and training (``--data``)."""

from __future__ import annotations

import json

import numpy as np
import tifffile

from conftest import random_image, write_feature_cache
from xfeat.features.extract import ExtractConfig, extract
from xfeat.features.reading import load_features
from xfeat.learn.evaluation import configurations, evaluate
from xfeat_cli.main import main


def test_rows_come_in_bundle_then_path_order_and_results_do_not_depend_on_extraction_order(tmp_path):
    rng = np.random.default_rng(0)
    n = 36
    X = rng.normal(size=(n, 4, 6)).astype(np.float32)
    y = (np.arange(n) % 3 == 0).astype(int)
    bundles = [f"B{i % 4}" for i in range(n)]
    X[y == 1] += 0.7
    order = rng.permutation(n)
    first = write_feature_cache(tmp_path / "a.h5", X, y, bundles)
    # The same rows (same paths and hashes), written in another order: as if extracted in another order.
    second = write_feature_cache(tmp_path / "b.h5", X, y, bundles, order=order)
    fs = load_features(first, "toy", "m2")
    assert list(fs.groups) == sorted(fs.groups)
    for bundle in set(fs.groups):
        paths = list(fs.paths[fs.groups == bundle])
        assert paths == sorted(paths)
    configs = configurations(["toy"], ["m2"], ["logreg", "knn", "fc"])
    params = {"fc": {"epochs": 2}}
    a = evaluate(first, configs, params=params)
    b = evaluate(second, configs, params=params)
    for ra, rb in zip(a, b):
        assert json.dumps(ra.records(), default=str) == json.dumps(rb.records(), default=str)
        assert [p["path"] for p in ra.predictions()] == [p["path"] for p in rb.predictions()]
        np.testing.assert_array_equal(ra.scores, rb.scores)
        np.testing.assert_array_equal(ra.screening_scores, rb.screening_scores)


LAYOUT = {"B1": {"normal": 4, "abnormal": 2}, "B2": {"normal": 4, "abnormal": 2}, "B3": {"normal": 4, "abnormal": 2}}


def test_data_leaves_out_rows_of_images_that_left_the_dataset(tmp_path, capsys):
    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", LAYOUT)
    cache = tmp_path / "c.h5"
    extract(data, cache, ExtractConfig(backbones=("resnet18",), methods=("m1",), size=(32, 32), flips=1,
                                       weights="none", device="cpu", workers=0, jobs=1))
    (data / "B1" / "normal" / "img0.tif").unlink()  # gone
    tifffile.imwrite(data / "B2" / "normal" / "img1.tif", random_image(999, (40, 24)))  # changed content
    tifffile.imwrite(data / "B3" / "normal" / "new.tif", random_image(998, (40, 24)))  # not extracted yet
    args = ["evaluate", str(cache), "--clf", "logreg", "--backbone", "resnet18", "--recall", "none", "--json"]
    assert main([*args, "-q"]) == 0
    everything = json.loads(capsys.readouterr().out)[0]
    assert everything["n"] == 18
    assert main([*args, "--data", str(data)]) == 0
    captured = capsys.readouterr()
    current = json.loads(captured.out)[0]
    assert current["n"] == 16
    assert ("left out 1 cached row(s) whose file is gone from the dataset; left out 1 row(s) of an older "
            "content of a file; 2 dataset image(s) have no features of their current content (run xfeat extract)"
            ) in captured.err
    assert main(["train", str(cache), "--clf", "logreg", "--backbone", "resnet18", "--method", "m1", "--data",
                 str(data), "--out", str(tmp_path / "m.xfeat")]) == 0
    assert "cached row(s) whose file is gone" in capsys.readouterr().err
    assert main(["info", str(cache), "--data", str(data)]) == 0
    assert "1 cached rows whose file is gone from the dataset" in capsys.readouterr().out
