"""--precision auto on a CPU: bf16 only where it proves itself, decided from the CPU's flags and the run's own
images, recorded in the cache; real torch runs (bf16 emulated where the CPU has no bf16 units)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_dataset
from xfeat import load_features
from xfeat.features.extract import ExtractConfig, extract, tap_runner
from xfeat.features.extractor import build_extractor
from xfeat.features.precision import COSINE_MIN, agreement, choose_precision, cpu_flags
from xfeat_cli.main import main

CPU = torch.device("cpu")
LAYOUT = {"B1": {"normal": 2, "abnormal": 1}, "B2": {"normal": 2, "abnormal": 1}}


def _never(_):
    raise AssertionError("the network ran although the flags decide")


def test_flags_come_from_cpuinfo():
    text = "processor : 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\nbugs : x\n"
    assert cpu_flags(text) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags("no flags here") == set()


def test_a_cpu_without_bf16_units_stays_fp32_without_running_anything():
    check = choose_precision(_never, _never, torch.zeros((2, 3, 8, 8), dtype=torch.uint8), {"avx2", "fma"})
    assert check.precision == "fp32" and check.images == 0 and "no bf16 units" in check.reason
    assert check.isa == "avx2"


@pytest.fixture(scope="module")
def runners():
    extractor = build_extractor("resnet18", "none")
    taps = ("pool", "local")
    return tap_runner(extractor, taps, CPU, "fp32"), tap_runner(extractor, taps, CPU, "bf16")


def test_bf16_is_kept_when_every_image_and_tap_agrees(runners):
    fp32, bf16 = runners
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    check = choose_precision(fp32, bf16, batch, {"avx512_bf16"})
    cos, rel = agreement(fp32(batch), bf16(batch))
    assert check.images == 2 and check.worst_cosine == pytest.approx(cos) and check.worst_rel_l2 == pytest.approx(rel)
    assert check.precision == ("bf16" if cos >= COSINE_MIN and rel <= 0.03 else "fp32")
    assert json.loads(check.to_json())["precision"] == check.precision


def test_one_image_moved_on_one_tap_keeps_fp32(runners):
    fp32, _ = runners
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))

    def moved(b):  # the local map of the last image off by 5 %: the pooled tap alone would pass
        pooled, local = fp32(b)
        local = local.clone()
        local[-1] *= 1.05
        return pooled, local

    check = choose_precision(fp32, moved, batch, {"amx_bf16", "amx_tile"})
    assert check.precision == "fp32" and "bf16 moved the features" in check.reason
    assert check.worst_rel_l2 == pytest.approx(0.05, rel=1e-3) and check.worst_cosine == pytest.approx(1.0)


def test_auto_records_its_decision_and_a_cache_keeps_its_precision(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", LAYOUT, shape=(48, 32))
    cache = tmp_path / "c.h5"
    config = ExtractConfig(backbones=("resnet18",), methods=("m3",), size=(32, 32), flips=1, weights="none",
                           device="cpu", jobs=1, workers=0)
    forced = extract(data, cache, ExtractConfig(**{**config.__dict__, "precision": "bf16"}))
    assert forced.precision == "bf16" and forced.precision_check is None
    assert extract(data, cache, config).precision == "bf16"  # auto keeps what the cache holds, unchecked
    other_size = extract(data, cache, ExtractConfig(**{**config.__dict__, "size": (48, 32)}))
    assert other_size.precision_check is not None  # new groups of another size: decided afresh, not inherited
    fresh = extract(data, tmp_path / "d.h5", config)
    assert fresh.precision_check is not None and fresh.precision == fresh.precision_check.precision
    settings = load_features(tmp_path / "d.h5", "resnet18", "m3").settings
    assert json.loads(settings.precision_check)["reason"] == fresh.precision_check.reason
    assert main(["info", str(tmp_path / "d.h5")]) == 0
    assert "chosen by --precision auto: " in capsys.readouterr().out
