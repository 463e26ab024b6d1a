"""A cache that grows with a plant: what a commit costs as the cache grows, and what reading one method costs.

Synthetic feature rows (no CNN) of the pooled EfficientNet-Lite0 shape (4 flips x 1280 float32 = 20 KB per
image and method; one method by default, ``--methods`` more), committed through the real ``CacheWriter`` in
commits of ``--commit`` images (default 1,000) up to ``--rows`` (default 1,000,000: 20 GB per method). Printed at
each checkpoint: the median time of the commits around it, the bytes one commit writes (``/proc/self/io``,
write_bytes: what reaches the disk, fsyncs included), the index file's size and the cache's total size.

At each ``--reads`` size, ``load_features`` of one method's pooled features (flip none: X [N, 1280] float32)
runs in a fresh process: its time and peak resident memory (VmHWM), against the bytes of the array returned.

The single-file design of xfeat before segments (format 1 and 2) committed by copying the whole cache, merging
the journal into the copy and renaming it over the original. ``--old-upto`` (default 100,000) measures that
commit side by side: at each checkpoint up to it the cache is compacted into one file (``xfeat compact``) and
one commit of the same rows is timed the old way (copy, append, fsync, rename), on the same disk.

    python benchmarks/cache_scale.py [--rows 1000000] [--commit 1000] [--methods 1] [--reads 10000,100000,1000000]
                                     [--old-upto 100000] [--workdir DIR]

``--workdir`` must hold rows x methods x 20 KB (plus the single-file copies up to ``--old-upto``).

Measured (2-core AMD EPYC, AVX2, no AVX-512/AMX; local SSD; one run, 2026-12-03):

       images  commit s  written MB  index KB  cache GB  old design commit s  load_features of one method
        10000     0.125        21.0      30.5      0.21                 0.45  0.1 s
        20000     0.103        21.0      50.3      0.42                 0.87
        50000     0.111        21.0      77.3      1.05                 1.96
       100000     0.110        21.0      68.1      2.10                 3.64  1.3 s, peak 1.37 x the array (0.51 GB)
       200000     0.121        21.0      36.7      4.20                    -
       500000     0.142        21.1      99.6     10.49                    -
      1000000     0.122        21.1     107.3     20.97                    -  15.1 s, peak 1.34 x the array (5.12 GB)

The commit at a million images costs 0.98x the commit at 10,000 (the old design's grew 8x from 10,000 to
100,000 images, linearly with the file); the index stays near 100 KB because index blocks fold every 64
segments into one mapping. (At 10,000 rows the peak is 2.06x of a 0.05 GB array: fixed costs.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from machine import cpu_description  # this folder: run as python benchmarks/cache_scale.py
from xfeat.features.cache import GroupSettings, Rows, cache_bytes
from xfeat.features.writer import CacheWriter, compact, copy_cache

FLIPS, DIM = 4, 1280
CHECKPOINTS = (10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000)


def settings(method: str) -> GroupSettings:
    return GroupSettings(backbone="efficientnet_lite0", method=method, input_height=224, input_width=224,
                         flips="none,h,v,hv", feature_dim=DIM, weights_kind="imagenet",
                         weights_name="efficientnet-lite0-57934424.pth", weights_sha256="0" * 64,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="cv2.INTER_AREA", precision="fp32")


def batch_rows(start: int, n: int, rng: np.random.Generator) -> Rows:
    """``n`` images from ``start`` on: 12 bundles, 20 % abnormal, paths like a plant's archive."""
    index = np.arange(start, start + n)
    paths = [f"/plant/archive/2026/{i // 100_000:02d}/{i % 12:02d}/electrode_{i:09d}.tif" for i in index]
    return Rows(rng.standard_normal((n, FLIPS, DIM), dtype=np.float32), paths, [p[15:] for p in paths],
                [f"B{i % 12:02d}" for i in index], [int(i % 5 == 0) for i in index],
                [f"{i:064x}" for i in index], [1145] * n, [2070] * n)


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def read_in_fresh_process(cache: Path) -> dict:
    code = ("import json, time, sys; from pathlib import Path; from xfeat import load_features\n"
            "t = time.perf_counter(); fs = load_features(sys.argv[1], 'efficientnet_lite0', 'm0')\n"
            "seconds = time.perf_counter() - t\n"
            "hwm = [int(l.split()[1]) * 1024 for l in Path('/proc/self/status').read_text().splitlines() "
            "if l.startswith('VmHWM')][0]\n"
            "print(json.dumps({'seconds': seconds, 'peak': hwm, 'array': fs.X.nbytes, 'rows': len(fs.X)}))")
    base = subprocess.run([sys.executable, "-c", "from xfeat import load_features; from pathlib import Path; "
                           "print([int(l.split()[1]) * 1024 for l in Path('/proc/self/status').read_text()"
                           ".splitlines() if l.startswith('VmHWM')][0])"], capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout), "baseline": int(base.stdout)}


def old_design_commit(cache: Path, work: Path, rows: Rows, methods: list[str]) -> float:
    """One commit the way xfeat committed before segments: copy the single file, append, sync, rename."""
    single = work / "single.h5"
    if single.exists():
        single.unlink()
    copy_cache(cache, single)
    compact(single)
    tmp = work / ".single.h5.tmp"
    start = time.perf_counter()
    shutil.copyfile(single, tmp)
    with h5py.File(tmp, "a") as f:
        for m in methods:
            g = f[settings(m).key]
            n, k = g["pool"].shape[0], len(rows.path)
            for name, values in (("pool", rows.features), ("label", np.array(rows.label, np.int8)),
                                 ("sha256", np.array(rows.sha256, "S64")), ("height", np.array(rows.height)),
                                 ("width", np.array(rows.width))):
                g[name].resize(n + k, axis=0)
                g[name][n:] = values
            for name in ("path", "relpath", "bundle"):
                g[name].resize(n + k, axis=0)
                g[name][n:] = np.char.encode(np.array(getattr(rows, name)), "utf-8").astype(g[name].dtype)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, single)
    seconds = time.perf_counter() - start
    shutil.rmtree(work / "single.h5.segments", ignore_errors=True)
    single.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--commit", type=int, default=1000)
    parser.add_argument("--methods", type=int, default=1)
    parser.add_argument("--reads", default="10000,100000,1000000")
    parser.add_argument("--old-upto", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    reads = {int(r) for r in args.reads.split(",") if r}
    methods = [f"m{i}" for i in range(args.methods)]
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="cache_scale-"))
    cache = work / "c.h5"
    print(cpu_description())
    print(f"{args.rows} images in commits of {args.commit}, {args.methods} method(s) x {FLIPS} flips x {DIM}-d "
          f"float32 ({FLIPS * DIM * 4 * args.methods / 1e3:.0f} KB per image); {work}")
    print(f"{'images':>9s} {'commit s':>9s} {'written MB':>11s} {'index KB':>9s} {'cache GB':>9s}   "
          f"{'old design commit s':>20s}   load_features of one method")
    rng = np.random.default_rng(0)
    fc = {"efficientnet_lite0": (np.zeros((1000, DIM), np.float32), np.zeros(1000, np.float32))}
    recent: list[tuple[float, int]] = []
    try:
        with CacheWriter(cache) as writer:
            writer.prepare([settings(m) for m in methods], fc, None)
        done = 0
        with CacheWriter(cache) as writer:
            while done < args.rows:
                rows = batch_rows(done, args.commit, rng)
                for m in methods:
                    writer.add({settings(m).key: rows})
                before, start = written_bytes(), time.perf_counter()
                writer.commit()
                recent = (recent + [(time.perf_counter() - start, written_bytes() - before)])[-5:]
                done += args.commit
                if done in CHECKPOINTS or done == args.rows:
                    seconds = statistics.median(s for s, _ in recent)
                    mb = statistics.median(b for _, b in recent) / 1e6
                    old = (f"{old_design_commit(cache, work, batch_rows(done, args.commit, rng), methods):20.2f}"
                           if done <= args.old_upto else f"{'-':>20s}")
                    read = ""
                    if done in reads:
                        r = read_in_fresh_process(cache)
                        read = (f"{r['seconds']:.1f} s, peak {r['peak'] / 1e9:.2f} GB = "
                                f"{(r['peak'] - r['baseline']) / r['array']:.2f} x the array "
                                f"({r['array'] / 1e9:.2f} GB) over the interpreter's {r['baseline'] / 1e6:.0f} MB")
                    print(f"{done:9d} {seconds:9.3f} {mb:11.1f} {cache.stat().st_size / 1e3:9.1f} "
                          f"{cache_bytes(cache) / 1e9:9.2f}   {old}   {read}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
