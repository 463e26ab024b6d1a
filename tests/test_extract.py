"""The extractor and its cache: real models (random weights, small inputs), real HDF5 files, real processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import tifffile
import torch

from conftest import random_image, stored, write_dataset
from xfeat import load_features
from xfeat.features.extractor import build_extractor
from xfeat.features.cache import CacheError
from xfeat.features.writer import CacheWriter, copy_cache
from xfeat_cli.main import main
from xfeat.convert.methods import convert
from xfeat.features.extract import ExtractConfig, extract
from xfeat.features.reading import describe_cache
from xfeat.io.images import read_image

SMALL = ExtractConfig(backbones=("resnet18",), methods=("m1", "m2"), size=(64, 32), flips=4, weights="none",
                      device="cpu", workers=0, jobs=1, batch_size=3)
# Tiny networks: one thread is faster, much faster on shared cores, and gives the same bits.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same for the runs in a process of their own


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, one_torch_thread) -> tuple[Path, Path, object]:
    """(dataset laid out as ``small_dataset``, its cache extracted once with SMALL, that run's summary): tests that
    only read them share them; a test that changes the cache changes a copy (its rows still name these files)."""
    root = tmp_path_factory.mktemp("extracted")
    data = write_dataset(root / "data", {"B1": {"normal": 3, "abnormal": 1}, "B2": {"normal": 2, "abnormal": 2}})
    summary = extract(data, root / "c.h5", SMALL)
    return data, root / "c.h5", summary


def _copy(cache: Path, to: Path) -> Path:
    return copy_cache(cache, to)


def features_by_path(cache: Path, backbone="resnet18", method="m2") -> dict[str, np.ndarray]:
    fs = load_features(cache, backbone, method, flips="all")
    return dict(zip(fs.paths, fs.X))


def test_cache_is_plain_hdf5_with_documented_layout(extracted):
    _, cache, summary = extracted
    assert summary.computed == 8 and summary.cached == 0
    with h5py.File(cache, "r") as f:
        assert f.attrs["format"] == "xfeat.features" and f.attrs["format_version"] == 3
        assert f.attrs["layout"] == "segments" and f.attrs["segments"] == "c.h5.segments"
        assert f.attrs["g_max"] > f.attrs["g_min"] and "G_min" not in f.attrs and f.attrs["window_stats"]
        group = f["features/resnet18/m2/64x32"]
        assert group["pool"].shape == (8, 4, 512) and group["pool"].dtype == np.float32
        assert group["fc_weight"].shape == (1000, 512) and group["fc_bias"].shape == (1000,)
        assert sorted(group["bundle"].asstr()[:]) == ["B1"] * 4 + ["B2"] * 4
        assert group["label"][:].sum() == 3
        assert group.attrs["weights_kind"] == "none" and bool(group.attrs["random_weights"])
        assert group.attrs["flips"] == "none,h,v,hv" and group.attrs["precision"] == "fp32"
        assert group["sha256"][0].decode() and len(group["sha256"][0]) == 64
        assert set(group["height"][:]) == {40} and set(group["width"][:]) == {24}
        assert "features/resnet18/m1/64x32" in f and f["features/resnet18/m1/64x32"].attrs["g_min"] == -1
        # the index: every per-image dataset is a virtual one over the segments, listed in index_runs
        assert group["pool"].is_virtual and group["index_runs"][:].tolist() == [[1, 0, 8]]
        assert {s.file_name for s in group["pool"].virtual_sources()} == {"c.h5.segments/000001.h5"}
    assert sorted(p.name for p in Path(f"{cache}.segments").iterdir()) == ["000000.h5", "000001.h5"]


def test_features_equal_the_model_on_the_converted_image(extracted):
    _, cache, _ = extracted
    fs = load_features(cache, "resnet18", "m2", flips="all")
    model = build_extractor("resnet18", "none")
    path = fs.paths[0]
    converted = convert(read_image(path), "m2", fs.window_stats)
    x = torch.from_numpy(cv2.resize(converted, (32, 64), interpolation=cv2.INTER_AREA))[None, None]
    variants = torch.cat([x, x.flip(3), x.flip(2), x.flip(2, 3)])
    with torch.no_grad():
        expected = model(variants).numpy()
    np.testing.assert_allclose(fs.X[0], expected, rtol=1e-4, atol=1e-4)


def test_load_features_views(extracted):
    _, cache, _ = extracted
    pool = load_features(cache, backbone="resnet18", method="m2", layer="pool")
    every = load_features(cache, backbone="resnet18", method="m2", flips="all")
    logits = load_features(cache, backbone="resnet18", method="m2", layer="fc1000")
    assert pool.X.shape == (8, 512) and every.X.shape == (8, 4, 512)
    np.testing.assert_array_equal(pool.X, every.X[:, 0])
    np.testing.assert_allclose(logits.X, pool.X @ pool.fc_weight.T + pool.fc_bias, rtol=1e-5, atol=1e-5)
    assert pool.y.tolist().count(1) == 3 and set(pool.groups) == {"B1", "B2"} and pool.random_weights
    h = load_features(cache, backbone="resnet18", method="m2", flips="h")
    np.testing.assert_array_equal(h.X, every.X[:, 1])
    pytest.importorskip("pandas")
    frame = pool.to_frame()
    assert list(frame.columns[:3]) == ["path", "bundle", "label"] and frame.shape == (8, 3 + 512)


def test_load_features_errors_name_the_cache(tmp_path, extracted):
    _, cache, _ = extracted
    with pytest.raises(CacheError, match="no features for resnet50/m2; the cache holds resnet18/m1, resnet18/m2"):
        load_features(cache, "resnet50", "m2")
    with pytest.raises(CacheError, match="no such cache file"):
        load_features(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(CacheError, match="junk.h5: not a readable HDF5 file"):
        load_features(tmp_path / "junk.h5")


def test_flip_variants_are_the_flipped_images(tmp_path, small_dataset):
    source = small_dataset / "B1" / "normal" / "img0.tif"
    image = tifffile.imread(source)
    tifffile.imwrite(small_dataset / "B1" / "normal" / "flipped.tif", image[:, ::-1].copy())
    cache = tmp_path / "c.h5"
    extract(small_dataset, cache, SMALL)
    features = features_by_path(cache)
    original = features[str(source.resolve())]
    flipped = features[str((small_dataset / "B1" / "normal" / "flipped.tif").resolve())]
    np.testing.assert_allclose(flipped[0], original[1], rtol=1e-4, atol=1e-5)  # h of one = none of the other
    np.testing.assert_allclose(flipped[2], original[3], rtol=1e-4, atol=1e-5)  # v of one = hv of the other


def test_incremental_only_new_and_changed_images_are_computed(tmp_path, small_dataset):
    cache = tmp_path / "c.h5"
    extract(small_dataset, cache, SMALL)
    before = features_by_path(cache)
    assert extract(small_dataset, cache, SMALL).computed == 0

    tifffile.imwrite(small_dataset / "B2" / "normal" / "new.tif", random_image(99))
    changed = small_dataset / "B1" / "normal" / "img1.tif"
    tifffile.imwrite(changed, random_image(123))
    summary = extract(small_dataset, cache, SMALL)
    assert (summary.computed, summary.cached) == (2, 7)
    after = features_by_path(cache)
    assert len(after) == 9
    assert not np.array_equal(after[str(changed.resolve())], before[str(changed.resolve())])
    unchanged = str((small_dataset / "B1" / "normal" / "img0.tif").resolve())
    np.testing.assert_array_equal(after[unchanged], before[unchanged])


def test_relabelled_images_update_without_recomputing(tmp_path, small_dataset):
    cache = tmp_path / "c.h5"
    extract(small_dataset, cache, SMALL)
    manifest = small_dataset / "m.csv"
    manifest.write_text("path,bundle,label\n" + "".join(
        f"{p.relative_to(small_dataset)},{'B9' if i == 0 else p.parts[-3]},{'abnormal' if i == 0 else p.parts[-2]}\n"
        for i, p in enumerate(sorted(small_dataset.rglob("*.tif")))))
    assert extract(manifest, cache, SMALL).computed == 0
    fs = load_features(cache, "resnet18", "m1")
    first = str(sorted(small_dataset.rglob("*.tif"))[0].resolve())
    row = list(fs.paths).index(first)
    assert (fs.groups[row], fs.y[row]) == ("B9", 1)


def test_settings_that_differ_are_never_mixed_into_a_group(tmp_path, extracted):
    data, clean_cache, _ = extracted
    cache = _copy(clean_cache, tmp_path / "c.h5")
    with pytest.raises(CacheError, match="resnet18/m1/64x32 holds features computed with other settings: flips"):
        extract(data, cache, ExtractConfig(**{**SMALL.__dict__, "flips": 2}))
    weights = tmp_path / "w.pt"
    torch.save(_resnet18_state(), weights)
    with pytest.raises(CacheError, match="other settings: weights_kind"):
        extract(data, cache, ExtractConfig(**{**SMALL.__dict__, "weights": str(weights)}))
    other_size = ExtractConfig(**{**SMALL.__dict__, "size": (48, 32)})
    assert extract(data, cache, other_size).computed == 8  # another size is another group
    with pytest.raises(CacheError, match="several input sizes"):
        load_features(cache, "resnet18", "m2")
    assert load_features(cache, "resnet18", "m2", size="48x32").X.shape == (8, 512)


def _resnet18_state() -> dict:
    import torchvision
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


def test_results_do_not_depend_on_batching_or_workers(tmp_path, extracted):
    data, a, _ = extracted
    b = tmp_path / "b.h5"
    extract(data, b, ExtractConfig(**{**SMALL.__dict__, "workers": 2}))
    assert features_by_path(a).keys() == features_by_path(b).keys()
    for path, value in features_by_path(a).items():
        np.testing.assert_array_equal(value, features_by_path(b)[path])


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "xfeat", *map(str, args)]


EXTRACT_ARGS = ("--backbone", "resnet18", "--methods", "m1,m3", "--size", "96x48", "--weights", "none",
                "--device", "cpu", "--batch-size", "1", "--workers", "0", "--jobs", "1", "--quiet")


def _batch_numbers(journal: Path) -> list[int]:
    return [int(p.stem) for p in journal.glob("*.npz")] if journal.exists() else []


def _wait_for_batches(journal: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the process has written ``count`` new batches to the journal (or has ended)."""
    before = max(_batch_numbers(journal), default=-1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if sum(n > before for n in _batch_numbers(journal)) >= count:
            return
        time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_gives_the_same_cache(tmp_path):
    data = write_dataset(tmp_path / "data", {"B1": {"normal": 24, "abnormal": 6}, "B2": {"normal": 20}}, (60, 40))
    reference = tmp_path / "ref.h5"
    assert main(["extract", str(data), "--cache", str(reference), *EXTRACT_ARGS]) == 0  # the same bits in any process

    cache = tmp_path / "killed.h5"
    journal = Path(f"{cache}.journal")
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        process = subprocess.Popen(_cli("extract", data, "--cache", cache, *EXTRACT_ARGS), env=ONE_THREAD)
        _wait_for_batches(journal, 1, process)  # this run is computing and writing
        time.sleep(rng.uniform(0, 0.5))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if cache.exists():  # the file always opens, whatever the moment of the kill
            with h5py.File(cache, "r") as f:
                assert f.attrs["format"] == "xfeat.features"
    assert kills >= 3
    subprocess.run(_cli("extract", data, "--cache", cache, *EXTRACT_ARGS), check=True, env=ONE_THREAD)
    for method in ("m1", "m3"):
        expected, got = features_by_path(reference, method=method), features_by_path(cache, method=method)
        assert expected.keys() == got.keys()
        for path in expected:
            np.testing.assert_array_equal(got[path], expected[path])  # bitwise
    assert not list(journal.glob("*.npz"))


def test_ctrl_c_stops_cleanly_and_keeps_what_was_computed(tmp_path):
    data = write_dataset(tmp_path / "data", {"B1": {"normal": 30}, "B2": {"abnormal": 10}}, (60, 40))
    cache = tmp_path / "c.h5"
    process = subprocess.Popen(_cli("extract", data, "--cache", cache, *EXTRACT_ARGS), stderr=subprocess.PIPE,
                               text=True, env=ONE_THREAD)
    journal = Path(f"{cache}.journal")
    _wait_for_batches(journal, 3, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "xfeat: interrupted" in err
    with h5py.File(cache, "r") as f:
        kept = f["features/resnet18/m1/96x48/pool"].shape[0]
    assert 3 <= kept < 40
    assert not list(journal.glob("*.npz"))  # merged into the cache on the way out


def test_a_second_writer_gets_a_clear_error(tmp_path, small_dataset):
    cache = tmp_path / "c.h5"
    with CacheWriter(cache):
        result = subprocess.run(_cli("extract", small_dataset, "--cache", cache, *EXTRACT_ARGS),
                                capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"xfeat: error: {cache}: another xfeat process is writing this cache; "
                                     "wait for it to finish (or remove the stale lock file if none is running)")


def test_extract_cli_summary_and_info(tmp_path, small_dataset, capsys):
    cache = tmp_path / "c.h5"
    assert main(["extract", str(small_dataset), "--cache", str(cache), *EXTRACT_ARGS[:-1]]) == 0
    err = capsys.readouterr().err
    assert "extracted 8 images (0 cached, 0 skipped)" in err and "images/s" in err and "MB" in err
    assert "random weights" in err
    (small_dataset / "B2" / "normal" / "img1.tif").unlink()
    tifffile.imwrite(small_dataset / "B2" / "normal" / "new.tif", random_image(77))
    assert main(["info", str(cache), "--data", str(small_dataset)]) == 0
    out = capsys.readouterr().out
    assert "features/resnet18/m1/96x48: 8 images x 4 flips (none,h,v,hv) x 512-d; RANDOM weights" in out
    assert "B1 3/1, B2 2/2" in out
    assert "vs dataset: 1 missing, 0 stale (file changed), 1 cached rows whose file is gone from the dataset" in out
    info = describe_cache(cache)
    assert [g.n_images for g in info.groups] == [8, 8]


def test_bad_image_stops_extraction_naming_it_and_skip_bad_goes_on(tmp_path, small_dataset, capsys):
    bad = small_dataset / "B1" / "normal" / "bad.tif"
    bad.write_bytes(b"II*\x00broken")
    cache = tmp_path / "c.h5"
    assert main(["extract", str(small_dataset), "--cache", str(cache), *EXTRACT_ARGS]) == 1
    assert capsys.readouterr().err.startswith(f"xfeat: error: {bad}: unreadable or truncated TIFF")
    assert main(["extract", str(small_dataset), "--cache", str(cache), *EXTRACT_ARGS, "--skip-bad"]) == 0
    assert f"skipped {bad}" in capsys.readouterr().err
    assert load_features(cache, "resnet18", "m1", size="96x48").X.shape[0] == 8


def test_offline_efficientnet_lite0_with_real_imagenet_weights(tmp_path):
    data = tmp_path / "s"
    from xfeat.synth.writer import make_dataset
    make_dataset(data, bundles=2, images=4, size=(128, 64), seed=3, jobs=1)
    cache = tmp_path / "c.h5"
    config = ExtractConfig(backbones=("efficientnet_lite0",), methods=("m2",), size=(96, 64), flips=2,
                           weights="imagenet", device="cpu", workers=0, jobs=1)
    assert extract(data, cache, config).computed == 4
    fs = load_features(cache, "efficientnet_lite0", "m2", layer="fc1000")
    assert fs.X.shape == (4, 1000) and not fs.random_weights
    assert fs.settings.weights_name == "efficientnet-lite0-57934424.pth"
    assert fs.settings.weights_sha256.startswith("57934424")
    assert fs.settings.mean == (0.5, 0.5, 0.5)


def test_a_file_moved_to_another_label_counts_once_with_its_new_label(tmp_path, small_dataset):
    cache = tmp_path / "c.h5"
    extract(small_dataset, cache, SMALL)
    moved = small_dataset / "B1" / "abnormal" / "moved.tif"
    (small_dataset / "B1" / "normal" / "img0.tif").rename(moved)
    assert extract(small_dataset, cache, SMALL).computed == 1
    fs = load_features(cache, "resnet18", "m2")  # no warning: the older row left the index
    assert len(fs.y) == 8 and len(set(fs.sha256)) == 8
    assert fs.y[list(fs.paths).index(str(moved.resolve()))] == 1
    with h5py.File(cache, "r") as f:  # plain readers see one row per image too
        assert sorted(f["features/resnet18/m2/64x32/path"].asstr()[:]) == sorted(fs.paths)


def test_a_deleted_cache_with_a_leftover_journal_starts_afresh(tmp_path, extracted):
    data, clean_cache, _ = extracted
    cache = _copy(clean_cache, tmp_path / "c.h5")
    journal = Path(f"{cache}.journal")
    journal.mkdir()  # as a finished run leaves it
    np.savez(journal / "00000099.npz", keys=np.array(["features/gone/m2/8x8"]))
    cache.unlink()
    assert extract(data, cache, SMALL).computed == 8
    assert not list(journal.glob("*.npz"))


def test_decoding_runs_a_bounded_number_of_batches_ahead_of_inference(tmp_path):
    """Inference is often the slower side: the workers must not decode the whole dataset into memory ahead of
    it. Files removed while the caller holds its first batch show which batches had been decoded already."""
    import time

    from xfeat.io.dataset import find_images
    from xfeat.features.decoding import AHEAD, Work, image_batches

    dataset = find_images(write_dataset(tmp_path / "data", {"B1": {"normal": 20}}))
    batches = image_batches([Work(r, ("m1",)) for r in dataset.records], (16, 8), None, per_batch=1, workers=2)
    assert next(batches)[0]["problem"] == ""
    time.sleep(1.0)  # whatever was sent to the workers is decoded by now
    for record in dataset.records:
        record.path.unlink()
    decoded_ahead = sum(batch[0]["problem"] == "" for batch in batches)
    assert 1 <= decoded_ahead <= AHEAD * 2  # not all 19


def test_a_dead_decoding_worker_is_a_one_line_error(tmp_path):
    """A worker killed mid-run (OOM killer, a user's kill) ends the iteration with an XfeatError, not a hang
    and not a torch traceback."""
    import os

    import psutil

    from xfeat.io.dataset import find_images
    from xfeat.errors import XfeatError
    from xfeat.features.decoding import Work, image_batches

    dataset = find_images(write_dataset(tmp_path / "data", {"B1": {"normal": 24}}))
    work = [Work(r, ("m1",)) for r in dataset.records]
    before = {p.pid for p in psutil.Process(os.getpid()).children()}  # joblib's pool of earlier tests, if any
    batches = image_batches(work, (16, 8), None, per_batch=1, workers=2)
    assert next(batches)[0]["problem"] == ""
    workers = [p for p in psutil.Process(os.getpid()).children() if p.pid not in before
               and "loky" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[0].kill()
    with pytest.raises(XfeatError, match="worker process died"):
        for _ in batches:
            pass


def test_a_timm_backbone_runs_through_extract_info_and_evaluate(tmp_path, small_dataset, capsys):
    """``timm/NAME`` nests one group level deeper in the cache; every reader still finds it."""
    cache = tmp_path / "c.h5"
    assert main(["extract", str(small_dataset), "--cache", str(cache), "--backbone", "timm/resnet10t",
                 "--methods", "m2", "--size", "64x48", "--flips", "1", "--weights", "none", "--workers", "0",
                 "--quiet"]) == 0
    with h5py.File(cache, "r") as f:
        assert f["features/timm/resnet10t/m2/64x48"].attrs["backbone"] == "timm/resnet10t"
    assert main(["info", str(cache)]) == 0
    assert "features/timm/resnet10t/m2/64x48: 8 images x 1 flips" in capsys.readouterr().out
    assert main(["evaluate", str(cache), "--clf", "logreg", "--quiet"]) == 0
    assert "timm/resnet10t" in capsys.readouterr().out
    fs = load_features(cache, backbone="timm/resnet10t", method="m2")
    assert fs.X.shape == (8, 512)


def test_float16_storage_halves_the_features_and_reads_as_float32(tmp_path, extracted):
    data, cache32, _ = extracted
    cache16 = tmp_path / "c16.h5"
    extract(data, cache16, replace(SMALL, storage="float16"))
    full = load_features(cache32, "resnet18", "m2", flips="all")
    half = load_features(cache16, "resnet18", "m2", flips="all")
    assert half.X.dtype == np.float32 and half.settings.storage == "float16"
    np.testing.assert_array_equal(half.X, full.X.astype(np.float16).astype(np.float32))  # the same features, rounded
    with stored(cache16, "features/resnet18/m2/64x32/pool") as ds:
        assert ds.dtype == np.float16
    with pytest.raises(CacheError, match="storage 'float16' \\(this run: 'float32'\\)"):
        extract(data, cache16, SMALL)  # one group, one type
