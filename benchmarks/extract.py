"""Images/s of a naive per-image loop beside ``xfeat extract``, side by side in one run, as ratios.

Naive loop, per image: read the TIFF, convert (m2), resize, normalise, run the model at batch 1 in fp32
under no_grad. ``xfeat extract``: the whole command (hashing pass, building the model, decoding workers,
batching, channels-last, folded BatchNorm, cache writes), on the CPU, at each precision of ``--precisions``, one
flip variant so both do the same number of forward passes. Random weights (``--weights none``): the same FLOPs as
the pretrained models. Both are given the dataset's m2 window: fitting it (a first run's extra pass, which
decodes every image once more) is timed apart and printed, since the naive loop does not fit it either.

The requested precisions are resolved first, as ``xfeat extract`` resolves them, and each distinct setting is
timed once: on a CPU without bf16 units ``auto`` is fp32 by the flags alone, so the default ``auto,fp32`` is one
configuration there; with bf16 units ``auto`` runs its check and is a column of its own, and what it chose is
printed after the row. The CPU model and its vector ISA flags are printed beside the figures.

    python benchmarks/extract.py [--images 6] [--small-images 500] [--backbones resnet34,resnet50]
                                 [--sizes 2000x1000,224x224] [--repeats 1]
                                 [--precisions auto,fp32,bf16] [--engines torch,openvino]

Each precision runs on each engine of ``--engines`` (``xfeat extract --engine``). OpenVINO converts a model once
per input shape and keeps it (docs/extract.md): the conversion is done before the timed run and its time printed
apart, as a second run of a user would find it.

Sizes of 500x500 pixels or fewer get ``--small-images`` (default 500), so that the fixed costs of a run
(building the model, hashing, starting the decoding workers) weigh as they would on a real dataset.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from machine import cpu_description  # this folder: run as python benchmarks/extract.py
from xfeat.features.extractor import build_extractor
from xfeat.convert.methods import convert
from xfeat.io.dataset import find_images
from xfeat.features.extract import ExtractConfig, ExtractSummary, extract, tap_runner
from xfeat.io.images import read_image
from xfeat.convert.scan import scan_dataset
from xfeat.errors import XfeatError
from xfeat.features.inference import resolve_precision
from xfeat.features.precision import BF16_FLAGS, cpu_flags
from xfeat.synth import make_dataset

CPU = torch.device("cpu")


def distinct_precisions(requested: list[str], device: torch.device) -> dict[str, list[str]]:
    """Each precision the requested ones resolve to on ``device`` (in first-seen order), with the requested names
    that resolve to it. Precision is the only setting this benchmark varies for ``xfeat extract``: the rest
    (device, BatchNorm folding, channels-last, batch size, workers) is the same for every column."""
    found: dict[str, list[str]] = {}
    checks = device.type == "cpu" and any(f in cpu_flags() for f in BF16_FLAGS)  # auto compares fp32 and bf16
    for name in requested:
        try:
            resolved = "auto" if name == "auto" and checks else resolve_precision(name, device)
        except XfeatError as e:
            print(f"--precision {name} skipped: {e}")
            continue
        found.setdefault(resolved, []).append(name)
    return found


@dataclass(frozen=True)
class Rate:
    """Images/s over the whole run, and in steady state: after its first batch (warm-up, start-up) is done."""

    whole: float
    steady: float


def rate(seconds: float, images: int, finished: list[tuple[float, int]]) -> Rate:
    """``finished``: (seconds since the start, images done) after each batch."""
    (first_t, first_n), (last_t, last_n) = finished[0], finished[-1]
    steady = (last_n - first_n) / (last_t - first_t) if last_n > first_n else float("nan")
    return Rate(images / seconds, steady)


def median_rate(rates: list[Rate]) -> Rate:
    return Rate(float(np.median([r.whole for r in rates])), float(np.median([r.steady for r in rates])))


def naive_loop(paths, backbone: str, size: tuple[int, int], stats) -> Rate:
    model = build_extractor(backbone, "none")
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    start = time.perf_counter()
    finished = []
    for path in paths:
        image = convert(read_image(path), "m2", stats)
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.repeat(image[None, None], 3, axis=1)).float() / 255
        with torch.no_grad():
            model.trunk((x - mean) / std)
        finished.append((time.perf_counter() - start, len(finished) + 1))
    return rate(finished[-1][0], len(paths), finished)


def convert_once(backbone: str, size: tuple[int, int]) -> float:
    """Convert the model for OpenVINO (or find it converted; one model serves every precision): seconds taken."""
    start = time.perf_counter()
    run = tap_runner(build_extractor(backbone, "none"), ("pool",), CPU, "fp32", "openvino")
    run(torch.zeros((1, 1, *size), dtype=torch.uint8))  # m2 is gray: one channel
    return time.perf_counter() - start


def xfeat_extract(data: Path, backbone: str, size: tuple[int, int], precision: str, engine: str,
                  workdir: Path, stats) -> tuple[Rate, ExtractSummary]:
    cache = workdir / f"{backbone}-{size[0]}x{size[1]}-{precision}-{engine}.h5"
    config = ExtractConfig(backbones=(backbone,), methods=("m2",), size=size, flips=1, weights="none",
                           device="cpu", precision=precision, engine=engine, stats=stats)
    start, finished = time.perf_counter(), []

    for old in (cache, Path(f"{cache}.segments")):  # a repeat computes everything again
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)

    def progress(n: int) -> None:
        finished.append((time.perf_counter() - start, (finished[-1][1] if finished else 0) + n))

    summary = extract(data, cache, config, progress=progress)  # the whole command: hashing, cache writes...
    return rate(summary.seconds, summary.computed, finished), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="images at large sizes, >= 2")
    parser.add_argument("--small-images", type=int, default=500, help="images at sizes of 500x500 or fewer")
    parser.add_argument("--backbones", default="resnet34,resnet50")
    parser.add_argument("--sizes", default="2000x1000,224x224")
    parser.add_argument("--precisions", default="auto,fp32",
                        help="xfeat precisions to time (resolved first: each distinct one once)")
    parser.add_argument("--engines", default="torch,openvino", help="xfeat engines to time")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every path, alternated; medians shown")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="xfeat-bench-"))
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        counts = {size: args.images if size[0] * size[1] > 250_000 else args.small_images for size in sizes}
        datasets, fitting = {}, []
        for count in sorted(set(counts.values())):
            data = workdir / f"data{count}"
            make_dataset(data, bundles=2, images=count, seed=0, jobs=2)
            dataset = find_images(data)
            start = time.perf_counter()
            stats = scan_dataset(dataset).window_stats()  # what xfeat extract's first run does before extracting
            fitting.append(f"{count} images {time.perf_counter() - start:.1f} s")
            datasets[count] = (data, [r.path for r in dataset.records], stats)
        columns = distinct_precisions(args.precisions.split(","), CPU)
        runs = [(e, p) for e in args.engines.split(",") for p in columns]
        print(f"{args.images} (large sizes) / {args.small_images} (small sizes) synthetic electrode images "
              f"(16-bit, about 2070 x 1145), torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"fitting the m2 window (hash and decode every image; a first run's extra pass, not timed below): "
              f"{', '.join(fitting)}")
        print(cpu_description())
        print("xfeat extract on the CPU, each configuration timed once: " + "; ".join(
            f"{p} <- --precision {', '.join(names)}" for p, names in columns.items()))
        print("whole: images / seconds of the whole run (xfeat: the command, start-up included); steady: after "
              f"the first batch; ratio: to the naive loop's; medians of {args.repeats} alternated run(s)")
        print(f"{'backbone':18s} {'size':>9s} {'path':18s} {'whole img/s':>11s} {'ratio':>6s} "
              f"{'steady img/s':>12s} {'ratio':>6s}")
        for backbone in args.backbones.split(","):
            for size in sizes:
                data, paths, stats = datasets[counts[size]]
                measured: dict[str, list[Rate]] = {}
                remarks: dict[str, str] = {}
                for _ in range(args.repeats):  # alternated: the machine's drift falls on every path alike
                    measured.setdefault("naive loop", []).append(naive_loop(paths, backbone, size, stats))
                    for engine, precision in runs:
                        path = f"{engine} {precision}"
                        if engine == "openvino" and path not in remarks:
                            remarks[path] = f"  (converted or loaded first: {convert_once(backbone, size):.1f} s)"
                        rate_, summary = xfeat_extract(data, backbone, size, precision, engine, workdir, stats)
                        measured.setdefault(path, []).append(rate_)
                        if precision == "auto" and summary.precision_check:
                            remarks[path] = (remarks.get(path, "") + f"  (auto chose {summary.precision}: "
                                             f"{summary.precision_check.reason})")
                naive = median_rate(measured["naive loop"])
                for path, rates in measured.items():
                    m = median_rate(rates)
                    print(f"{backbone:18s} {size[0]:>4d}x{size[1]:<4d} {path:18s} {m.whole:11.2f} "
                          f"{m.whole / naive.whole:5.2f}x {m.steady:12.2f} {m.steady / naive.steady:5.2f}x"
                          f"{remarks.get(path, '')}", flush=True)
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
