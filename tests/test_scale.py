"""Scale-out on real engines: torchrun with 2 gloo ranks on loopback, a Dask LocalCluster of 2 processes."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from conftest import random_image, write_dataset, write_feature_cache
from xfeat_cli.main import main
from xfeat.scale.torchrun import TorchrunWorld, rank_cache_path, rank_device, shard_of, torchrun_world
from xfeat.errors import XfeatError
from xfeat.learn.evaluation import configurations, evaluate
from xfeat.scale.dask import dask_executor
from xfeat.features.extract import ExtractConfig, extract
from xfeat.io.hashing import file_sha256

SMALL = ExtractConfig(backbones=("resnet18",), methods=("m1", "m2"), size=(64, 32), flips=4, weights="none",
                      device="cpu", workers=0, jobs=1, batch_size=3)
CLI_ARGS = ("--backbone", "resnet18", "--methods", "m1,m2", "--size", "64x32", "--flips", "4", "--weights", "none",
            "--device", "cpu", "--batch-size", "3", "--workers", "0", "--jobs", "1")
LAYOUT = {"B1": {"normal": 5, "abnormal": 2}, "B2": {"normal": 4, "abnormal": 1}, "B3": {"normal": 3}}
# In this process too: tiny networks are faster on one thread (the ranks run with OMP_NUM_THREADS=1), same bits.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun(data: Path, cache: Path, *args: str, nproc: int = 2, wait: bool = True):
    """``python -m torch.distributed.run --nproc-per-node N -m xfeat extract ...``: the real launcher."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "xfeat", "extract", str(data), "--cache", str(cache), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def cache_contents(path: Path) -> dict:
    """Every dataset (dtype and bytes) and every attribute of a cache, less the times of writing."""
    out = {}
    with h5py.File(path, "r") as f:
        # "segments" names the cache's own segment folder (after its file name)
        out["/"] = {k: str(v) for k, v in f.attrs.items() if k not in ("created", "updated", "segments")}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                values = obj[()]
                out[name] = (str(obj.dtype), obj.shape,
                             [bytes(v) if isinstance(v, bytes) else v for v in values.tolist()]
                             if values.dtype.kind == "O" else values.tobytes())
            else:
                out[name + "/"] = {k: str(v) for k, v in obj.attrs.items() if k != "created"}

        f.visititems(visit)
    return out


def assert_same_cache(expected: Path, got: Path) -> None:
    a, b = cache_contents(expected), cache_contents(got)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name  # bitwise: features, rows in the same order, attributes


def summary_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("extracted ")]
    assert len(lines) == 1, stderr  # rank 0 reports, the other rank is silent
    return lines[0]


def test_two_gloo_ranks_write_the_cache_one_process_writes(tmp_path):
    data = write_dataset(tmp_path / "data", LAYOUT)
    assert {shard_of(file_sha256(p), 2) for p in data.rglob("*.tif")} == {0, 1}  # both ranks have work
    single, multi = tmp_path / "single.h5", tmp_path / "multi.h5"
    extract(data, single, SMALL)
    result = torchrun(data, multi, *CLI_ARGS)
    assert result.returncode == 0, result.stderr
    assert "extracted 15 images (0 cached, 0 skipped)" in summary_line(result.stderr)
    assert "x 2 processes" in result.stderr
    assert_same_cache(single, multi)
    assert not list(tmp_path.glob("multi.h5.rank*")) and not list(Path(f"{multi}.journal").glob("*.npz"))

    # incremental: a new image, a changed one and one moved to another label are computed, in place or appended
    tifffile.imwrite(data / "B2" / "normal" / "new.tif", random_image(99))
    tifffile.imwrite(data / "B1" / "normal" / "img1.tif", random_image(123))
    (data / "B3" / "normal" / "img0.tif").rename(data / "B1" / "abnormal" / "moved.tif")
    assert extract(data, single, SMALL).computed == 3
    result = torchrun(data, multi, *CLI_ARGS)
    assert result.returncode == 0, result.stderr
    assert "extracted 3 images (13 cached, 0 skipped)" in summary_line(result.stderr)
    assert_same_cache(single, multi)


def test_torchrun_is_recognised_by_its_variables_only(monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    assert torchrun_world() == TorchrunWorld(rank=1, size=2, local_rank=1)
    monkeypatch.delenv("MASTER_ADDR")
    assert torchrun_world() is None  # a stray RANK is not enough
    with pytest.raises(XfeatError, match="each process uses cuda:LOCAL_RANK; give --device cuda"):
        rank_device("cuda:1", 0)
    assert str(rank_device("cpu", 1)) == "cpu"


def test_torchrun_refuses_to_mix_settings_like_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", {"B1": {"normal": 2, "abnormal": 1}, "B2": {"normal": 2}})
    cache = tmp_path / "c.h5"
    extract(data, cache, SMALL)
    before = cache_contents(cache)
    flips2 = [*CLI_ARGS]
    flips2[flips2.index("--flips") + 1] = "2"
    result = torchrun(data, cache, *flips2)
    assert result.returncode != 0
    assert "xfeat: error: " in result.stderr and "holds features computed with other settings: flips" in result.stderr
    assert "rank 0 stopped the run" in result.stderr  # the other rank stops instead of waiting
    assert cache_contents(cache) == before and not list(tmp_path.glob("c.h5.rank*"))


def _rank_process(launcher: subprocess.Popen, rank: int):
    import psutil  # installed with dask[distributed]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children():
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process")


@pytest.mark.slow
def test_a_rank_killed_mid_run_resumes_and_gives_the_same_cache(tmp_path):
    data = write_dataset(tmp_path / "data", {"B1": {"normal": 16, "abnormal": 6}, "B2": {"normal": 14, "abnormal": 4}},
                         (60, 40))
    args = [*CLI_ARGS]
    args[args.index("--batch-size") + 1] = "1"
    reference, cache = tmp_path / "ref.h5", tmp_path / "c.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # only for speed on a busy machine: features do not depend on the thread count
    try:
        extract(data, reference, ExtractConfig(**{**SMALL.__dict__, "batch_size": 1}))
    finally:
        torch.set_num_threads(threads)

    launcher = torchrun(data, cache, *args, wait=False)
    rank1 = _rank_process(launcher, 1)
    journal = Path(f"{rank_cache_path(cache, 1)}.journal")
    deadline = time.monotonic() + 120
    while len(list(journal.glob("*.npz"))) < 3 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.005)
    rank1.send_signal(signal.SIGKILL)  # mid-run: rank 1 has written batches of its shard, not all of them
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    with h5py.File(cache, "r") as f:  # the cache opens, and holds nothing of the interrupted run yet
        assert f["features/resnet18/m2/64x32/pool"].shape[0] == 0
    assert list(journal.glob("*.npz"))  # the batches rank 1 finished are kept

    result = torchrun(data, cache, *args)  # the same command again
    assert result.returncode == 0, result.stderr
    computed = int(re.search(r"extracted (\d+) images", summary_line(result.stderr)).group(1))
    assert computed < 40  # resumed: finished batches are not computed again
    assert_same_cache(reference, cache)
    assert not list(tmp_path.glob("c.h5.rank*"))


# -- evaluation on Dask -----------------------------------------------------------------------------------
FAST_FC = {"epochs": 3, "batch_size": 16}


@pytest.fixture(scope="module")
def dask_scheduler():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def toy_cache(tmp_path):
    rng = np.random.default_rng(0)
    bundles = [f"B{b}" for b in range(4) for _ in range(12)]
    y = np.array([int(b > 0 and i < 3 + b % 2) for b in range(4) for i in range(12)])
    X = rng.normal(size=(48, 4, 16)).astype(np.float32)
    X[y == 1, :, :4] += 1.5
    return write_feature_cache(tmp_path / "toy.h5", X, y, bundles)


def test_dask_results_equal_the_local_ones(toy_cache, dask_scheduler):
    configs = configurations(["toy"], ["m2"], ["fc", "svm", "logreg", "knn", "mahalanobis"])
    params = {"fc": FAST_FC}
    local = evaluate(toy_cache, configs, params=params, jobs=1)
    with dask_executor(dask_scheduler) as executor:
        remote = evaluate(toy_cache, configs, params=params, executor=executor)
    assert [r.config for r in remote] == configs
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a.scores, b.scores)  # bitwise
        np.testing.assert_array_equal(a.decisions, b.decisions)
        assert json.dumps(a.records()) == json.dumps(b.records())  # NaN-safe equality of every field
        assert a.predictions() == b.predictions()


def test_evaluate_command_on_a_dask_cluster(toy_cache, dask_scheduler, tmp_path, capsys, monkeypatch):
    import xfeat.report.html

    # Drawing the report's figures is most of each run's time; they are tested in test_report.py and do not
    # enter the files compared here, so both runs get the same blank ones.
    monkeypatch.setattr(xfeat.report.html, "png_base64", lambda figure: "")
    args = ["evaluate", str(toy_cache), "--clf", "fc,logreg,knn", "--epochs", "3", "--quiet"]
    # in this process: no pool of local workers to start (the results do not depend on --jobs: test_evaluate.py)
    assert main([*args, "--jobs", "1", "--report", str(tmp_path / "local")]) == 0
    local_out = capsys.readouterr().out
    assert main([*args, "--report", str(tmp_path / "dask"), "--scheduler", dask_scheduler]) == 0
    assert capsys.readouterr().out == local_out
    for name in ("results.csv", "predictions.csv"):
        with open(tmp_path / "local" / name) as a, open(tmp_path / "dask" / name) as b:
            assert list(csv.reader(a)) == list(csv.reader(b))


def test_dask_errors_are_one_line(toy_cache, monkeypatch, capsys):
    dask = pytest.importorskip("dask")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["evaluate", str(toy_cache), "--clf", "logreg", "--scheduler", "tcp://127.0.0.1:9"]) == 1
    assert re.fullmatch(r"xfeat: error: cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9: .*\n",
                        capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    with pytest.raises(XfeatError, match=r'^--scheduler needs Dask: pip install "xfeat\[dask\]"$'):
        with dask_executor("tcp://127.0.0.1:9"):
            pass
