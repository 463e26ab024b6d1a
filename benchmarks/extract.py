"""Images/s of a naive per-image loop beside ``xfeat extract``, side by side in one run, as ratios.

Naive loop, per image: read the TIFF, convert (m2), resize, normalise, run the model at batch 1 in fp32
under no_grad. ``xfeat extract``: the real command's code path (decoding workers, batching, channels-last,
folded BatchNorm), on the CPU, at each precision of ``--precisions``, one flip variant so both do the same number
of forward passes. Random weights (``--weights none``): the same FLOPs as the pretrained models.

The requested precisions are resolved first, as ``xfeat extract`` resolves them (``auto`` is fp32 on a CPU), and
each distinct setting is timed once: the default ``auto,fp32`` is one configuration, and the output says which
requested names each column stands for. The CPU model and its vector ISA flags are printed beside the figures.

    python benchmarks/extract.py [--images 6] [--backbones resnet34,resnet50] [--sizes 2000x1000,224x224]
                                 [--precisions auto,fp32,bf16] [--engines torch,openvino]

Each precision runs on each engine of ``--engines`` (``xfeat extract --engine``). OpenVINO converts a model once
per input shape and keeps it (docs/extract.md): the conversion is done before the timed run and its time printed
apart, as a second run of a user would find it.

Sizes of 500x500 pixels or fewer get ten times more images, so that the fixed costs of a run (starting the
decoding workers, hashing, building the model) weigh as they would on a real dataset.
"""

from __future__ import annotations

import argparse
import shutil
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
from xfeat.features.extract import ExtractConfig, extract, tap_runner
from xfeat.io.images import read_image
from xfeat.convert.scan import scan_dataset
from xfeat.errors import XfeatError
from xfeat.features.inference import resolve_precision
from xfeat.synth import make_dataset

CPU = torch.device("cpu")


def distinct_precisions(requested: list[str], device: torch.device) -> dict[str, list[str]]:
    """Each precision the requested ones resolve to on ``device`` (in first-seen order), with the requested names
    that resolve to it. Precision is the only setting this benchmark varies for ``xfeat extract``: the rest
    (device, BatchNorm folding, channels-last, batch size, workers) is the same for every column."""
    found: dict[str, list[str]] = {}
    for name in requested:
        try:
            found.setdefault(resolve_precision(name, device), []).append(name)
        except XfeatError as e:
            print(f"--precision {name} skipped: {e}")
    return found


def naive_loop(paths, backbone: str, size: tuple[int, int], stats) -> float:
    model = build_extractor(backbone, "none")
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    start = time.perf_counter()
    for path in paths:
        image = convert(read_image(path), "m2", stats)
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(np.repeat(image[None, None], 3, axis=1)).float() / 255
        with torch.no_grad():
            model.trunk((x - mean) / std)
    return len(paths) / (time.perf_counter() - start)


def convert_once(backbone: str, size: tuple[int, int], precision: str) -> float:
    """Convert the model for OpenVINO (or find it converted): seconds taken."""
    start = time.perf_counter()
    run = tap_runner(build_extractor(backbone, "none"), ("pool",), CPU, precision, "openvino")
    run(torch.zeros((1, 1, *size), dtype=torch.uint8))  # m2 is gray: one channel
    return time.perf_counter() - start


def xfeat_extract(data: Path, backbone: str, size: tuple[int, int], precision: str, engine: str,
                  workdir: Path) -> float:
    cache = workdir / f"{backbone}-{size[0]}x{size[1]}-{precision}-{engine}.h5"
    config = ExtractConfig(backbones=(backbone,), methods=("m2",), size=size, flips=1, weights="none",
                           device="cpu", precision=precision, engine=engine)
    summary = extract(data, cache, config)
    # The time of the whole command, statistics pass and cache writing included.
    return summary.computed / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="images at large sizes (x10 at small sizes), >= 2")
    parser.add_argument("--backbones", default="resnet34,resnet50")
    parser.add_argument("--sizes", default="2000x1000,224x224")
    parser.add_argument("--precisions", default="auto,fp32",
                        help="xfeat precisions to time (resolved first: each distinct one once)")
    parser.add_argument("--engines", default="torch,openvino", help="xfeat engines to time")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="xfeat-bench-"))
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        counts = {size: args.images if size[0] * size[1] > 250_000 else 10 * args.images for size in sizes}
        datasets = {}
        for count in sorted(set(counts.values())):
            data = workdir / f"data{count}"
            make_dataset(data, bundles=2, images=count, seed=0, jobs=2)
            dataset = find_images(data)
            datasets[count] = (data, [r.path for r in dataset.records], scan_dataset(dataset).window_stats())
        columns = distinct_precisions(args.precisions.split(","), CPU)
        runs = [(e, p) for e in args.engines.split(",") for p in columns]
        header = f"{'backbone':10s} {'size':>10s} {'naive img/s':>12s}" + "".join(
            f" {e[:2] + ' ' + p:>12s} {'ratio':>6s}" for e, p in runs)
        print(f"{args.images} (large sizes) / {10 * args.images} (small sizes) synthetic electrode images, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(cpu_description())
        print("xfeat extract on the CPU (to: torch, op: OpenVINO), each configuration timed once: " + "; ".join(
            f"{p} <- --precision {', '.join(names)}" for p, names in columns.items()))
        print(header)
        for backbone in args.backbones.split(","):
            for size in sizes:
                data, paths, stats = datasets[counts[size]]
                naive = naive_loop(paths, backbone, size, stats)
                row = f"{backbone:10s} {size[0]:>5d}x{size[1]:<4d} {naive:12.2f}"
                converting = []
                for engine, precision in runs:
                    if engine == "openvino":
                        converting.append(f"{convert_once(backbone, size, precision):.1f} s")
                    rate = xfeat_extract(data, backbone, size, precision, engine, workdir)
                    row += f" {rate:12.2f} {rate / naive:5.2f}x"
                print(row + (f"   (OpenVINO model converted or loaded: {', '.join(converting)})" if converting else ""),
                      flush=True)
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
