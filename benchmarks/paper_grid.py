"""Time of the fuel-cell paper's whole grid on a cache: 4 methods x 12 folds x 50 epochs of ``fc``, plus ``svm``.

The cache holds 714 images in 12 bundles (152 abnormal, some bundles without any) with ResNet-34-shaped
features (4 flips x 512, and its 1000 x 512 fc): random numbers, since timing depends on shapes only. The
paper recomputed the trunk in every epoch on a GPU; here the heads of all folds train together on the cache.

    python benchmarks/paper_grid.py [--jobs 2]

Measured on this project's 2-core CPU, quiet, --jobs 2: svm 3.5 s; fc + svm 64.5 s in fp32 (the default) and
50.2 s with bf16 matmuls, the same decision for all 2,856 out-of-fold predictions (docs/evaluate.md, Speed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from xfeat.features.cache import GroupSettings, Rows
from xfeat.features.writer import CacheWriter
from machine import cpu_description  # this folder: run as python benchmarks/paper_grid.py
from xfeat.learn.evaluation import PAPER, configurations, evaluate
from xfeat.learn.operating import DEFAULT_RECALLS
from xfeat.synth import plan_dataset

N_IMAGES, N_BUNDLES, N_ABNORMAL, FLIPS, DIM = 714, 12, 152, 4, 512


def write_cache(path: Path, methods: tuple[str, ...]) -> None:
    """A real cache with the paper's dataset shape; the bundle/label plan is xfeat synth's default one."""
    plans, _ = plan_dataset(bundles=N_BUNDLES, images=N_IMAGES, abnormal_fraction=N_ABNORMAL / N_IMAGES, seed=0)
    bundles = [p.bundle for p in plans]
    labels = [int(p.label == "abnormal") for p in plans]
    rng = np.random.default_rng(0)
    fc = (rng.normal(0, 0.03, (1000, DIM)).astype(np.float32), np.zeros(1000, np.float32))
    groups = [GroupSettings(backbone="resnet34", method=m, input_height=2000, input_width=1000,
                            flips="none,h,v,hv", feature_dim=DIM, weights_kind="none", weights_name="none",
                            weights_sha256="", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                            resize="cv2.INTER_AREA", precision="fp32") for m in methods]
    with CacheWriter(path) as writer:
        writer.prepare(groups, {"resnet34": fc}, None)
        for g in groups:
            X = np.abs(rng.normal(0, 1, (N_IMAGES, FLIPS, DIM))).astype(np.float32)
            X[np.array(labels) == 1, :, :32] += 0.5
            paths = [f"/bench/{b}/{i}.tif" for i, b in enumerate(bundles)]
            writer.add({g.key: Rows(X, paths, paths, bundles, labels, [f"{i:064x}" for i in range(N_IMAGES)],
                                    [2084] * N_IMAGES, [1169] * N_IMAGES)})


def run_grid(cache: Path, clfs: tuple[str, ...], epochs: int, precision: str, jobs: int, recalls: tuple[float, ...]):
    configs = configurations(PAPER["backbones"], PAPER["methods"], clfs)
    params = {"fc": {**PAPER["params"]["fc"], "epochs": epochs, "precision": precision}}
    start = time.perf_counter()
    results = evaluate(cache, configs, params=params, jobs=jobs, recalls=recalls)
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--bf16", action="store_true", help="also fc with bf16 matmuls (fast only with AMX or "
                                                            "AVX512-BF16; emulated, and slow, elsewhere)")
    args = parser.parse_args()
    print(cpu_description())
    runs = [(("svm",), "fp32", ()), (("svm",), "fp32", DEFAULT_RECALLS),
            (("fc", "svm"), "fp32", ()), (("fc", "svm"), "fp32", DEFAULT_RECALLS)]
    if args.bf16:
        runs.append((("fc", "svm"), "bf16", ()))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp, "grid.h5")
        write_cache(cache, PAPER["methods"])
        rows, decisions = [], {}
        for clfs, precision, recalls in runs:
            results, seconds = run_grid(cache, clfs, args.epochs, precision, args.jobs, recalls)
            folds = sum(len(r.bundles) for r in results)
            name = " + ".join(f"fc ({precision})" if c == "fc" else c for c in clfs)
            nested = "nested 0.95,0.99" if recalls else "plain"
            rows.append((name, nested, len(results), folds, seconds))
            if "fc" in clfs and not recalls:
                decisions[precision] = np.concatenate([r.decisions for r in results if r.config.clf == "fc"])
            if "fc" in clfs and recalls:
                cleared = [f"{r.config.method} {100 * r.operating[0].cleared:.1f}" for r in results
                           if r.config.clf == "fc"]
                print(f"fc cleared@95 (random features, a sanity check only): {', '.join(cleared)}")
    print(f"paper grid on a {N_IMAGES}-image cache ({N_BUNDLES} bundles, {FLIPS} flips x {DIM}-d), "
          f"{args.epochs} epochs, jobs={args.jobs}; nested = the operating points at 95 and 99 % recall "
          f"(each fold's threshold from the other bundles' own leave-one-bundle-out: {N_BUNDLES * (N_BUNDLES - 1) // 2} "
          "inner fits shared by the outer folds)")
    print(f"{'classifiers':18s} {'evaluation':>17s} {'configs':>8s} {'folds':>6s} {'seconds':>8s}")
    for name, nested, n_configs, folds, seconds in rows:
        print(f"{name:18s} {nested:>17s} {n_configs:8d} {folds:6d} {seconds:8.1f}")
    for name in dict.fromkeys(r[0] for r in rows):
        times = [r[4] for r in rows if r[0] == name]
        if len(times) == 2:
            print(f"{name}: nested / plain {times[1] / times[0]:.1f}x")
    if "bf16" in decisions:
        same = np.mean(decisions["fp32"] == decisions["bf16"])
        print(f"fc out-of-fold decisions equal in fp32 and bf16: {same:.1%} of {len(decisions['fp32'])}")


if __name__ == "__main__":
    main()
