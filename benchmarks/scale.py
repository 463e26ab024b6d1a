"""1 vs 2 processes: extraction under torchrun, an evaluation grid on a Dask LocalCluster.

Extraction: the real command on synthetic full-size electrodes, run three ways on the same 2 cores, each
into a fresh cache, decoding in-process (``--workers 0``) so every run uses exactly the cores it names:

* 1 process x 1 thread      (``OMP_NUM_THREADS=1 xfeat extract ... --jobs 1``): the per-core baseline;
* 1 process x 2 threads     (``OMP_NUM_THREADS=2 xfeat extract ... --jobs 2``): what one process gets from
  the second core through PyTorch's intra-op threads;
* 2 processes x 1 thread    (``OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m xfeat extract ... --jobs 2``):
  images split across 2 gloo ranks, merged by rank 0.

``wall`` is the whole command (interpreter and torch start-up, torchrun's rendezvous, the hash/statistics
pass, extraction, the merge); ``run`` is the time the command reports (after start-up). The three caches are
compared dataset by dataset.

Evaluation: leave-one-bundle-out over a (method, classifier) grid on a synthetic feature cache shaped like
the fuel-cell paper's (714 images, 12 bundles, 4 flips), locally with 1 job, locally with 2 joblib
processes, and on a Dask LocalCluster of 2 worker processes x 1 thread (cluster start-up timed apart).

    python benchmarks/scale.py [--images 32] [--backbone efficientnet_lite0] [--size 512x256] [--epochs 5]
                               [--parts extract,evaluate]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from xfeat.features.cache import GroupSettings, Rows
from xfeat.features.writer import CacheWriter
from xfeat.scale.dask import dask_executor
from xfeat.scale.torchrun import shard_of
from xfeat.learn.evaluation import configurations, evaluate
from xfeat.io.hashing import file_sha256
from xfeat.synth import make_dataset


def run_extract(data: Path, cache: Path, args, *, processes: int, threads: int) -> tuple[float, float]:
    """(wall seconds, seconds the command reports) of one extraction into a fresh cache."""
    launcher = [sys.executable, "-m", "xfeat"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
        "-m", "xfeat"]
    command = [*launcher, "extract", str(data), "--cache", str(cache), "--backbone", args.backbone,
               "--methods", args.methods, "--size", args.size, "--flips", "4", "--weights", args.weights,
               "--device", "cpu", "--workers", "0", "--jobs", str(processes * threads)]
    start = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                            text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(result.stderr)
    reported = float(re.search(r"extracted \d+ images .* in ([\d.]+) s", result.stderr).group(1))
    return wall, reported


def same_cache(a: Path, b: Path) -> bool:
    """Every dataset of every group equal, bitwise."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names = []
        fa.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return all(name in fb and np.array_equal(fa[name][()], fb[name][()]) for name in names)


def feature_cache(path: Path, images: int, dim: int, methods: tuple[str, ...]) -> Path:
    """Synthetic pooled features: 12 bundles, about a fifth abnormal, abnormal rows shifted a little."""
    rng = np.random.default_rng(0)
    bundles = [f"B{i % 12:02d}" for i in range(images)]
    y = (rng.random(images) < 0.213).astype(int)
    y[:24] = [0] * 12 + [1] * 12  # every bundle holds both classes
    fc = (rng.normal(0, 0.03, (1000, dim)).astype(np.float32), np.zeros(1000, np.float32))
    with CacheWriter(path) as writer:
        groups = [GroupSettings(backbone="synthetic", method=m, input_height=512, input_width=256,
                                flips="none,h,v,hv", feature_dim=dim, weights_kind="none", weights_name="none",
                                weights_sha256="", mean=(0.5,) * 3, std=(0.5,) * 3, resize="cv2.INTER_AREA",
                                precision="fp32") for m in methods]
        writer.prepare(groups, {"synthetic": fc}, None)
        paths = [f"/synthetic/{b}/img{i}.tif" for i, b in enumerate(bundles)]
        for g in groups:
            X = np.abs(rng.normal(size=(images, 4, dim))).astype(np.float32)
            X[y == 1, :, : dim // 8] += 0.4
            writer.add({g.key: Rows(X, paths, paths, bundles, y.tolist(), [f"{i:064x}" for i in range(images)],
                                    [1145] * images, [2070] * images)})
    return path


def timed_evaluate(cache: Path, configs, params, **how) -> tuple[float, list]:
    start = time.perf_counter()
    results = evaluate(cache, configs, params=params, **how)
    return time.perf_counter() - start, results


def same_results(a: list, b: list) -> bool:
    return all(np.array_equal(x.scores, y.scores) and np.array_equal(x.decisions, y.decisions)
               and json.dumps(x.records()) == json.dumps(y.records()) for x, y in zip(a, b))


def evaluation_rows(tmp: Path, args, rows: list) -> tuple[bool, list]:
    """Time the evaluation grid locally (1 job, 2 joblib processes) and on a Dask LocalCluster."""
    cache = feature_cache(tmp / "features.h5", args.eval_images, args.dim, ("m1", "m2", "m3", "m4"))
    clfs = tuple(args.clf.split(","))
    configs = configurations(["synthetic"], ["m1", "m2", "m3", "m4"], clfs)
    params = {"fc": {"epochs": args.epochs}}
    one, local = timed_evaluate(cache, configs, params, jobs=1)
    rows.append(("evaluate", "local, 1 job", one, one, os.getloadavg()[0]))
    print(f"  evaluate local 1 job: {one:.1f} s", flush=True)
    # Cold: the first call, worker processes starting and importing torch/scikit-learn; warm: the second,
    # as on a Dask cluster that stays up between commands.
    for when in ("cold", "warm"):
        two, joblib_results = timed_evaluate(cache, configs, params, jobs=2)
        rows.append(("evaluate", f"local, 2 joblib processes ({when})", two, two, os.getloadavg()[0]))
        print(f"  evaluate local 2 jobs ({when}): {two:.1f} s", flush=True)
    from distributed import LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        startup = time.perf_counter() - start
        for when in ("cold", "warm"):
            with dask_executor(cluster.scheduler_address) as executor:
                dask, dask_results = timed_evaluate(cache, configs, params, executor=executor)
            rows.append(("evaluate", f"Dask LocalCluster, 2 workers x 1 thread ({when})", dask, dask,
                         os.getloadavg()[0]))
            print(f"  evaluate Dask ({when}): {dask:.1f} s", flush=True)
    print(f"  Dask LocalCluster start-up: {startup:.1f} s", flush=True)
    equal = same_results(local, dask_results) and same_results(local, joblib_results)
    return equal, configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic full-size electrodes to extract")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet (efficientnet_lite0 works offline) or none")
    parser.add_argument("--methods", default="m2,m3")
    parser.add_argument("--size", default="512x256")
    parser.add_argument("--eval-images", type=int, default=714)
    parser.add_argument("--dim", type=int, default=1280, help="feature dimension of the evaluation cache")
    parser.add_argument("--clf", default="fc,svm,logreg,knn,mahalanobis")
    parser.add_argument("--epochs", type=int, default=5, help="fc epochs in the evaluation grid")
    parser.add_argument("--parts", default="extract,evaluate", help="what to measure: extract, evaluate or both")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1, 5, 15 min) on {os.cpu_count()} cores", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        identical = equal = configs = None
        if "extract" in parts:
            make_dataset(tmp / "data", bundles=4, images=args.images, seed=1)
            shards = Counter(shard_of(file_sha256(p), 2) for p in (tmp / "data").rglob("*.tif"))
            print(f"  images per rank with 2 processes: {shards[0]} and {shards[1]}", flush=True)
            caches = {}
            for processes, threads in ((1, 1), (1, 2), (2, 1)):
                name = (f"{processes} process{'es' if processes > 1 else ''} x "
                        f"{threads} thread{'s' if threads > 1 else ''}")
                caches[name] = tmp / f"{processes}x{threads}.h5"
                wall, reported = run_extract(tmp / "data", caches[name], args, processes=processes, threads=threads)
                rows.append(("extract", name, wall, reported, os.getloadavg()[0]))
                print(f"  extract {name}: {wall:.1f} s wall, {reported:.1f} s run", flush=True)
            first = next(iter(caches.values()))
            identical = all(same_cache(first, c) for c in caches.values())
        if "evaluate" in parts:
            equal, configs = evaluation_rows(tmp, args, rows)
    print()
    if "extract" in parts:
        print(f"extraction: {args.images} synthetic electrodes (about 2070x1145, 16-bit), {args.backbone} "
              f"({args.weights}), methods {args.methods}, {args.size}, 4 flips, --workers 0")
    if "evaluate" in parts:
        print(f"evaluation: {len(configs)} configurations (4 methods x {args.clf}; fc {args.epochs} epochs), "
              f"{args.eval_images} images, 12 bundles, {args.dim}-d, leave-one-bundle-out")
    # Speedups of the run times against the task's first row: 1 process x 1 thread, or 1 job (one core).
    # "load": the 1-minute load average as the run ended (2 = both cores busy); other jobs share this machine.
    print("\n| task | how | wall s | run s | speedup vs the first row | load |")
    print("|---|---|---|---|---|---|")
    first: dict[str, float] = {}
    for task, how, wall, reported, load in rows:
        first.setdefault(task, reported)
        print(f"| {task} | {how} | {wall:.1f} | {reported:.1f} | {first[task] / reported:.2f}x | {load:.1f} |")
    seconds = {how: reported for _, how, _, reported, _ in rows}
    print()
    if "extract" in parts:
        print(f"2 processes x 1 thread vs 1 process x 2 threads (the same 2 cores): "
              f"{seconds['1 process x 2 threads'] / seconds['2 processes x 1 thread']:.2f}x; "
              f"caches identical (every dataset, bitwise): {identical}")
    if "evaluate" in parts:
        dask_warm = seconds["Dask LocalCluster, 2 workers x 1 thread (warm)"]
        print(f"Dask 2 workers vs 2 local joblib processes, warm: "
              f"{seconds['local, 2 joblib processes (warm)'] / dask_warm:.2f}x; "
              f"results identical (scores, decisions, records): {equal}")
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")

if __name__ == "__main__":
    main()
