"""The OpenVINO engine: features equal to torch's at fp32 for every backbone family, conversions kept per user,
the engine recorded in the cache and used again by auto and by predict; real models, real OpenVINO."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import write_dataset
from xfeat import load_features
from xfeat.errors import XfeatError
from xfeat.features.engines import converted_model, model_digest, openvino_runner, resolve_engine
from xfeat.features.extract import ExtractConfig, extract, tap_runner
from xfeat.features.extractor import build_extractor
from xfeat.features.cache import CacheError
from xfeat_cli.main import main

pytest.importorskip("openvino")
TOLERANCE = 1e-5  # max |openvino - torch| relative to max |torch|, at fp32 (docs/extract.md)
LAYOUT = {"B1": {"normal": 3, "abnormal": 1}, "B2": {"normal": 3, "abnormal": 1}, "B3": {"normal": 2, "abnormal": 2}}


@pytest.fixture(autouse=True)
def own_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XFEAT_CACHE_DIR", str(tmp_path / "xfeat-cache"))


def _close(got, expected) -> float:
    return float(np.abs(got.numpy() - expected.numpy()).max() / np.abs(expected.numpy()).max())


@pytest.mark.parametrize("backbone, weights", [("resnet18", "none"), ("efficientnet_lite0", "imagenet"),
                                               ("timm/mobilenetv3_small_050", "none")])
def test_openvino_gives_torchs_features_at_fp32(backbone, weights):
    extractor = build_extractor(backbone, weights)
    cpu = torch.device("cpu")
    taps = ("pool", "local")  # the pooled vector and the stage maps, from one pass
    reference, engine = tap_runner(extractor, taps, cpu, "fp32"), tap_runner(extractor, taps, cpu, "fp32", "openvino")
    rng = np.random.default_rng(0)
    for channels in (3,) if backbone != "resnet18" else (1, 3):  # gray methods feed one channel, m4 and rgb three
        batch = torch.from_numpy(rng.integers(0, 256, (3, channels, 64, 96), dtype=np.uint8))
        expected, got = reference(batch), engine(batch)
        pairs = zip(expected, got) if isinstance(expected, tuple) else [(expected, got)]
        for e, g in pairs:
            assert g.dtype == torch.float32 and g.shape == e.shape
            assert _close(g, e) <= TOLERANCE


def test_a_conversion_is_kept_and_found_again(tmp_path):
    model = build_extractor("resnet18", "none").eval()
    digest = model_digest(model)
    first = converted_model(model, (3, 32, 32), digest, tmp_path / "ir")
    stamp = first.stat().st_mtime_ns
    assert converted_model(model, (3, 32, 32), digest, tmp_path / "ir") == first and first.stat().st_mtime_ns == stamp
    other = converted_model(model, (1, 32, 32), digest, tmp_path / "ir")  # another input shape: another model
    assert other != first and len(list((tmp_path / "ir").iterdir())) == 2
    assert not list((tmp_path / "ir").glob(".converting-*"))
    retrained = build_extractor("resnet18", "none")
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    assert model_digest(retrained) != digest


def test_engine_choice_is_checked():
    with pytest.raises(XfeatError, match="unknown engine 'tensorrt'"):
        resolve_engine("tensorrt", torch.device("cpu"))
    with pytest.raises(XfeatError, match="runs on the CPU; on cuda use --engine torch"):
        resolve_engine("openvino", torch.device("cuda"))
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("auto", torch.device("cpu")) == "openvino"
    assert resolve_engine("auto", torch.device("cpu"), recorded="torch") == "torch"


def test_the_engine_is_recorded_auto_keeps_it_and_predict_scores_as_the_cache(tmp_path):
    data = write_dataset(tmp_path / "data", LAYOUT, shape=(48, 32))
    config = ExtractConfig(backbones=("resnet18",), methods=("m2",), size=(64, 64), flips=1, weights="none",
                           device="cpu", jobs=1, workers=0, engine="torch")
    torch_cache, ov_cache = tmp_path / "t.h5", tmp_path / "o.h5"
    extract(data, torch_cache, config)
    summary = extract(data, ov_cache, ExtractConfig(**{**config.__dict__, "engine": "auto"}))  # the default
    assert summary.engine == "openvino"  # on a CPU with OpenVINO installed
    t, o = load_features(torch_cache, "resnet18", "m2"), load_features(ov_cache, "resnet18", "m2")
    assert o.settings.engine == "openvino" and t.settings.engine == "torch"
    np.testing.assert_array_equal(o.paths, t.paths)
    assert np.abs(o.X - t.X).max() <= TOLERANCE * np.abs(t.X).max()
    with pytest.raises(CacheError, match="other settings: engine 'openvino'"):
        extract(data, ov_cache, config)  # torch rows would join openvino ones: refused
    assert extract(data, ov_cache, ExtractConfig(**{**config.__dict__, "engine": "auto"})).engine == "openvino"
    assert extract(data, torch_cache, ExtractConfig(**{**config.__dict__, "engine": "auto"})).engine == "torch"
    model = tmp_path / "m.xfeat"
    assert main(["train", str(ov_cache), "--backbone", "resnet18", "--method", "m2", "--clf", "logreg",
                 "--out", str(model), "-q"]) == 0
    assert main(["predict", str(model), str(data), "--out", str(tmp_path / "raw.csv"), "-q"]) == 0
    assert main(["predict", str(model), str(data), "--out", str(tmp_path / "cached.csv"), "--cache", str(ov_cache),
                 "-q"]) == 0
    raw = {r["path"]: r for r in csv.DictReader(open(tmp_path / "raw.csv"))}
    cached = {r["path"]: r for r in csv.DictReader(open(tmp_path / "cached.csv"))}
    assert raw.keys() == cached.keys() and len(raw) == 12
    for path, row in raw.items():
        assert row["source"] == "computed" and cached[path]["source"] == "cache"
        assert float(row["score"]) == pytest.approx(float(cached[path]["score"]), rel=1e-5, abs=1e-6)


def test_a_model_openvino_cannot_convert_is_one_line_naming_the_way_out(tmp_path):
    """An operation OpenVINO's frontend lacks (here an SVD) is an XfeatError saying which, not a traceback."""
    class Unconvertible(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x.float().flatten(2))[1].flatten(1)

    run = openvino_runner(Unconvertible(), "fp32", tmp_path)
    with pytest.raises(XfeatError, match=r"^OpenVINO cannot convert Unconvertible \(No conversion rule found for "
                                         r"operations: aten::linalg_svd\); use --engine torch$"):
        run(torch.zeros((1, 1, 8, 8), dtype=torch.uint8))
    assert not list(tmp_path.iterdir())  # nothing half-converted left behind
