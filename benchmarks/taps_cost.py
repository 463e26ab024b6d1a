"""What local taps and patch maps cost on top of the pooled-only extraction, side by side in one run, as ratios.

Two measurements, both interleaved (pool, local, patches, pool, ...) so that the shared machine's noise hits
every column alike, the median of ``--repeats`` taken:

* forward: one batch through ``batch_taps`` (the forward pass plus what each tap computes from it), per
  backbone and input size;
* command: ``xfeat extract`` on a small synthetic set (decoding, conversion, cache writing included),
  ``--taps pool`` against ``--taps pool,local`` and ``--taps pool,local --patch-maps``.

Random weights (the same FLOPs as the pretrained models). The CPU model and its vector ISA flags are printed
beside the figures.

    python benchmarks/taps_cost.py [--backbones resnet34,efficientnet_lite0] [--sizes 224x224,1024x512]
                                   [--repeats 5] [--images 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_description  # this folder: run as python benchmarks/taps_cost.py
from xfeat.features.extract import ExtractConfig, batch_taps, extract, tap_layout, tap_runner
from xfeat.features.extractor import build_extractor
from xfeat.synth import make_dataset

CPU = torch.device("cpu")
TAPS = {"pool": ("pool",), "local": ("pool", "local"), "patches": ("pool", "local", "patches")}


def forward_seconds(backbone: str, size: tuple[int, int], repeats: int) -> dict[str, float]:
    config = ExtractConfig(backbones=(backbone,), size=size, flips=1)
    per_batch = config.images_per_batch()
    x = torch.randint(0, 256, (per_batch, 1, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runs, params = {}, None
    for name, taps in TAPS.items():
        extractor = build_extractor(backbone, "none")
        runs[name] = tap_runner(extractor, taps, CPU, "fp32")
        if name == "patches":
            params = tap_layout(backbone, "patches", config, extractor.feature_dim)[0]
    times: dict[str, list[float]] = {name: [] for name in TAPS}
    for name, taps in TAPS.items():  # warm-up
        batch_taps(runs[name], x, ("none",), per_batch, None, taps, params)
    for _ in range(repeats):
        for name, taps in TAPS.items():
            start = time.perf_counter()
            batch_taps(runs[name], x, ("none",), per_batch, None, taps, params)
            times[name].append((time.perf_counter() - start) / per_batch)
    return {name: statistics.median(t) for name, t in times.items()}


def command_seconds(data: Path, workdir: Path, backbone: str, size: tuple[int, int], repeats: int
                    ) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in TAPS}
    for r in range(repeats):
        for name, taps in TAPS.items():
            cache = workdir / f"{name}-{r}.h5"
            config = ExtractConfig(backbones=(backbone,), methods=("m2",), size=size, flips=1, weights="none",
                                   device="cpu", taps=taps)
            times[name].append(extract(data, cache, config).seconds)
            cache.unlink()
    return {name: statistics.median(t) for name, t in times.items()}


def ratios(seconds: dict[str, float]) -> str:
    return "  ".join(f"{name} {seconds[name] / seconds['pool']:.2f}x" for name in ("local", "patches"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet34,efficientnet_lite0")
    parser.add_argument("--sizes", default="224x224,1024x512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=12, help="images of the command measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(cpu_description())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}, interleaved")
    figures = []
    print(f"{'backbone':18s} {'size':>9s} {'pool ms/img':>12s} {'local':>8s} {'patches':>8s}   ratios to pool")
    for backbone in args.backbones.split(","):
        for size in sizes:
            s = forward_seconds(backbone, size, args.repeats)
            figures.append({"what": "forward", "backbone": backbone, "size": size, "seconds_per_image": s})
            print(f"{backbone:18s} {size[0]:>4d}x{size[1]:<4d} {1e3 * s['pool']:12.1f} {1e3 * s['local']:8.1f} "
                  f"{1e3 * s['patches']:8.1f}   {ratios(s)}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="xfeat-taps-"))
    try:
        data = workdir / "data"
        make_dataset(data, bundles=2, images=args.images, seed=0, jobs=2)
        backbone, size = args.backbones.split(",")[0], sizes[-1]
        s = command_seconds(data, workdir, backbone, size, max(1, args.repeats // 2))
        figures.append({"what": "command", "backbone": backbone, "size": size, "seconds": s})
        print(f"xfeat extract, {args.images} images, {backbone} {size[0]}x{size[1]}: pool {s['pool']:.1f} s, "
              f"local {s['local']:.1f} s, patches {s['patches']:.1f} s   {ratios(s)}")
    finally:
        shutil.rmtree(workdir)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
