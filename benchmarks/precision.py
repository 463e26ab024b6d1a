"""Is bf16 on this CPU close enough to fp32 to be extraction's default precision? Numbers, side by side.

Three questions, each on what ``xfeat extract`` computes (``build_extractor`` -> ``prepare_model`` (BatchNorm folded,
channels-last) -> ``runner(model, device, "fp32" | "bf16")``, inputs resized with ``cv2.INTER_AREA`` as uint8):

1. Feature closeness, bf16 autocast vs fp32, per backbone and input size: the worst relative error over images
   (``||f_bf16 - f_fp32|| / ||f_fp32||``, and the largest element error over the largest fp32 element), the
   smallest and the median cosine. On real images: ELPV (2,624 electroluminescence solar-cell images, 8-bit
   300 x 300, ``pip install elpv-dataset``), and on synthetic 16-bit electrodes converted with m2 and m3.
   efficientnet_lite0 carries its real ImageNet weights; resnet34/resnet50 random ones (``none``) for reference.
2. Downstream accuracy: ELPV, efficientnet_lite0 ImageNet features, leave-one-module-out, balanced accuracy from
   TP/FP/TN/FN summed over the folds (positive = abnormal = defect probability >= 0.5), a linear SVM (SGD hinge
   loss) and a logistic regression (each with a StandardScaler, fitted inside the fold), and how many out-of-fold
   decisions differ between fp32 and bf16 features.
3. Speed: images/s of fp32 and bf16 at a large input size, batch 4, alternated in one run after a warm-up.
4. Where the error is born: efficientnet_lite0 on the ELPV images of question 1 at the first of ``--sizes``, with
   bf16 autocast in its stem alone (``conv_stem`` + ``bn1``, the rest fp32): the stem's own output and the pooled
   features against fp32, beside the whole network in bf16.

5. What ``--precision auto`` decides on ELPV: xfeat's own check on the first 4 images and on random draws of 4.

    python benchmarks/precision.py [--images 32] [--sizes 224x224,600x600] [--downstream-sizes 224x224,448x448]
                                   [--sections 1,2,3,4,5] [--auto-draws 4]

The CPU model and its vector ISA flags are printed first: bf16 is fast only with bf16 units (avx512_bf16, AMX);
elsewhere it is emulated. The defaults took about 10 minutes on a 2-core AMD EPYC with avx512_bf16. On an
AVX2-only one (torch 2.14.1), ``--sections 1,2 --images 8 --sizes 224x224 --backbones efficientnet_lite0
--synth-images 0`` took 23 minutes: logistic regression 177 decisions ``differ`` (71.81 vs 71.14 % BA), the SVM
266 (seed ref 169); ``--sections 5 --auto-draws 12`` took 24 s: ``fp32`` on every draw (worst cos 0.988-0.998).

Measured there (torch 2.14.1, AMD EPYC with avx512_bf16, no AMX), in the labels the script prints: bf16 autocast
is faster (section 3, ``bf16/fp32`` 1.6-2x) but NOT close on real weights: efficientnet_lite0 on all ELPV images at
224x224 (section 1) has ``relL2 max`` 0.31, ``relL2 med`` 0.066, ``cos min`` 0.957, and with the ``logistic``
classifier (section 2) 184 decisions ``differ`` of 2,624, ``fp32 BA`` 71.90 vs ``bf16 BA`` 71.88. The error is
born in the first layers (section 4, ``stem alone in bf16``: ``relL2 max`` 0.07): BatchNorm subtracts running means
several standard deviations large, so the rounding of dark, low-contrast inputs is amplified. Random-weight ResNets
stay within ``relL2 max`` 0.006 (section 1) and say nothing about pretrained ones. Hence fp32 is the CPU default
and bf16 an explicit, recorded choice.
"""

from __future__ import annotations

import argparse
import copy
import csv
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import LeaveOneGroupOut
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from machine import cpu_description  # this folder: run as python benchmarks/precision.py
from xfeat.features.extractor import build_extractor
from xfeat.convert.methods import convert
from xfeat.io.dataset import find_images
from xfeat.io.images import read_image
from xfeat.features.extract import CHECK_IMAGES
from xfeat.features.inference import prepare_model, runner
from xfeat.features.precision import COSINE_MIN, REL_L2_MAX, choose_precision
from xfeat.convert.scan import scan_dataset
from xfeat.synth import make_dataset

Run = Callable[[torch.Tensor], torch.Tensor]
Size = tuple[int, int]
CPU = torch.device("cpu")
REAL_WEIGHTS = {"efficientnet_lite0": "imagenet"}  # the one real pretrained CNN installed here; others random
MODULES_CSV = "/work/shared/data/elpv_modules.csv"


# ---------------------------------------------------------------------------------------------- data


def load_elpv(modules_csv: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ELPV images [N, 300, 300] uint8, abnormal flags and module names, in the package's order."""
    try:
        from elpv_dataset.utils import load_dataset
        import elpv_dataset
    except ImportError:
        sys.exit("ELPV images are needed: pip install elpv-dataset")
    images, _, _ = load_dataset()
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    names = [Path(line.split()[0]).name for line in labels.read_text().splitlines() if line.strip()]
    with open(modules_csv, newline="") as f:
        rows = {row["image"]: row for row in csv.DictReader(f)}
    abnormal = np.array([float(rows[n]["defect_probability"]) >= 0.5 for n in names])
    modules = np.array([rows[n]["module"] for n in names])
    return images, abnormal, modules


def synthetic_electrodes(n: int, workdir: Path) -> dict[str, list[np.ndarray]]:
    """n synthetic 16-bit electrodes (the real data's sizes) converted to 8 bits with m2 and m3."""
    data = workdir / "synth"
    make_dataset(data, bundles=2, images=n, seed=0, jobs=1)
    dataset = find_images(data)
    stats = scan_dataset(dataset, jobs=1).window_stats()
    raw = [read_image(r.path) for r in dataset.records]
    return {method: [convert(image, method, stats) for image in raw] for method in ("m2", "m3")}


def to_input(images: Sequence[np.ndarray], size: Size) -> torch.Tensor:
    """Gray 8-bit images -> uint8 [B, 1, H, W], resized as the extractor does (cv2.INTER_AREA)."""
    height, width = size
    resized = [cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) for image in images]
    return torch.from_numpy(np.stack(resized))[:, None]


def parse_sizes(text: str) -> list[Size]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def batch_for(size: Size, batch_at_224: int) -> int:
    """Images per forward pass: ``batch_at_224`` at 224 x 224, fewer for larger inputs (the same pixels)."""
    return max(1, batch_at_224 * 224 * 224 // (size[0] * size[1]))


# ---------------------------------------------------------------------------------------------- features


def runners(backbone: str) -> tuple[Run, Run]:
    """fp32 and bf16 runners on one prepared model: the extractor's code path, with the same weights."""
    model = prepare_model(build_extractor(backbone, REAL_WEIGHTS.get(backbone, "none")), CPU)
    return runner(model, CPU, "fp32"), runner(model, CPU, "bf16")


def features(run: Run, images: Sequence[np.ndarray], size: Size, batch: int) -> np.ndarray:
    """Features [N, D] float32, resizing batch by batch so that large inputs never sit in memory at once."""
    return np.concatenate([run(to_input(images[i:i + batch], size)).numpy() for i in range(0, len(images), batch)])


def closeness(fp32: np.ndarray, bf16: np.ndarray) -> dict[str, float]:
    """Worst relative L2 and max-element errors over images, and the min and median cosine."""
    diff = bf16 - fp32
    rel_l2 = np.linalg.norm(diff, axis=1) / np.linalg.norm(fp32, axis=1)
    rel_max = np.abs(diff).max(axis=1) / np.abs(fp32).max(axis=1)
    cosine = (fp32 * bf16).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    return {"rel_l2": float(rel_l2.max()), "rel_l2_median": float(np.median(rel_l2)),
            "rel_max": float(rel_max.max()), "cos_min": float(cosine.min()), "cos_median": float(np.median(cosine))}


def closeness_row(label: str, backbone: str, size: Size, n: int, c: dict[str, float]) -> str:
    weights = REAL_WEIGHTS.get(backbone, "none")
    return (f"{label:10s} {backbone:18s} {weights:8s} {size[0]:>5d}x{size[1]:<5d} {n:5d} {c['rel_l2']:9.4f} "
            f"{c['rel_l2_median']:9.4f} {c['rel_max']:9.4f} {c['cos_min']:9.5f} {c['cos_median']:9.5f}")


CLOSENESS_HEADER = (f"{'images':10s} {'backbone':18s} {'weights':8s} {'size':>11s} {'n':>5s} {'relL2 max':>9s} "
                    f"{'relL2 med':>9s} {'relEl max':>9s} {'cos min':>9s} {'cos med':>9s}")


# ---------------------------------------------------------------------------------------------- downstream


def classifiers() -> dict[str, tuple[Callable[[int], object], bool]]:
    """Fresh, unfitted pipelines from a seed (each fold fits its own scaler), and whether the seed matters.

    The linear SVM is fitted by SGD as in the ResNet-50 paper (liblinear's LinearSVC needs minutes per fold on
    these nearly separable 1280-d features); its seed alone flips some decisions, the reference for bf16's flips.
    """
    return {"SVM (SGD)": (lambda seed: make_pipeline(StandardScaler(), SGDClassifier(loss="hinge", random_state=seed)),
                          True),
            "logistic": (lambda seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), False)}


def out_of_fold(make: Callable[[], object], X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Leave-one-group-out predictions: every image predicted by a model that never saw its module."""
    predicted = np.zeros_like(y)
    for train, test in LeaveOneGroupOut().split(X, y, groups):
        predicted[test] = make().fit(X[train], y[train]).predict(X[test])
    return predicted


def pooled_balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """(TPR + TNR) / 2 from the confusion counts summed over all folds, positive = abnormal."""
    tp = np.sum(predicted & y)
    tn = np.sum(~predicted & ~y)
    return 0.5 * (tp / y.sum() + tn / (~y).sum())


# ---------------------------------------------------------------------------------------------- speed


def throughput(runs: dict[str, Run], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """images/s per precision: one warm-up each, then the precisions alternated, best of ``repeats``
    (the least disturbed by other work on the machine)."""
    for run in runs.values():
        run(x)
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(x)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(x) / seconds for name, seconds in best.items()}


# ---------------------------------------------------------------------------------------------- origin


class InBF16(nn.Module):
    """Its modules under bf16 autocast, float32 handed on: bf16 in one part of a network only."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return self.body(x).float()


def tapped(run: Run, tap: nn.Module, images: Sequence[np.ndarray], size: Size, batch: int) -> tuple[np.ndarray, ...]:
    """Pooled features and ``tap``'s output (flattened per image), from the same forward passes."""
    outputs = []
    hook = tap.register_forward_hook(lambda module, inputs, output: outputs.append(output.float().flatten(1).numpy()))
    try:
        pooled = features(run, images, size, batch)
    finally:
        hook.remove()
    return pooled, np.concatenate(outputs)


def origin_section(args, elpv: np.ndarray) -> None:
    size = parse_sizes(args.sizes)[0]
    subset = elpv[np.linspace(0, len(elpv) - 1, args.images).astype(int)]
    print(f"\n4. Where the error is born: efficientnet_lite0 (imagenet), {len(subset)} ELPV images at "
          f"{size[0]}x{size[1]}, bf16 autocast in part of the network, vs all of it in fp32")
    print(f"{'bf16 in':22s} {'compared':16s} {'relL2 max':>9s} {'relL2 med':>9s} {'cos min':>9s} {'cos med':>9s}")
    model = prepare_model(build_extractor("efficientnet_lite0", REAL_WEIGHTS["efficientnet_lite0"]), CPU)
    stem_only = copy.deepcopy(model)  # BatchNorm is folded into conv_stem; bn1 is left with the activation
    stem_only.trunk.conv_stem = InBF16(stem_only.trunk.conv_stem, stem_only.trunk.bn1)
    stem_only.trunk.bn1 = nn.Identity()
    batch = batch_for(size, args.batch)
    pooled, stem = tapped(runner(model, CPU, "fp32"), model.trunk.bn1, subset, size, batch)
    stem_pooled, stem_bf16 = tapped(runner(stem_only, CPU, "fp32"), stem_only.trunk.conv_stem, subset, size, batch)
    rows = [("stem alone in bf16", "stem output", closeness(stem, stem_bf16)),
            ("stem alone in bf16", "pooled features", closeness(pooled, stem_pooled)),
            ("the whole network", "pooled features", closeness(pooled, features(runner(model, CPU, "bf16"), subset,
                                                                                size, batch)))]
    for where, compared, c in rows:
        print(f"{where:22s} {compared:16s} {c['rel_l2']:9.4f} {c['rel_l2_median']:9.4f} {c['cos_min']:9.5f} "
              f"{c['cos_median']:9.5f}", flush=True)


# ---------------------------------------------------------------------------------------------- main


@dataclass
class Extracted:
    """Features of every ELPV image at one size in both precisions."""

    fp32: np.ndarray
    bf16: np.ndarray


def elpv_features(args, elpv: np.ndarray) -> dict[Size, Extracted]:
    """efficientnet_lite0 features of every ELPV image per downstream size: for accuracy and closeness alike."""
    fp32, bf16 = runners("efficientnet_lite0")
    sizes = parse_sizes(args.downstream_sizes)
    return {size: Extracted(features(fp32, elpv, size, batch_for(size, args.batch)),
                            features(bf16, elpv, size, batch_for(size, args.batch))) for size in sizes}


def closeness_section(args, elpv: np.ndarray, synth: dict[str, list[np.ndarray]],
                      full: dict[Size, Extracted]) -> None:
    print("\n1. Feature closeness, bf16 autocast vs fp32 (pooled features; relEl = max |diff| / max |f_fp32|)")
    print(CLOSENESS_HEADER)
    subset = elpv[np.linspace(0, len(elpv) - 1, args.images).astype(int)]
    for backbone in args.backbones.split(","):
        fp32, bf16 = runners(backbone)
        for size in parse_sizes(args.sizes):
            if backbone == "efficientnet_lite0" and size in full:  # every image, from the downstream features
                c, n = closeness(full[size].fp32, full[size].bf16), len(elpv)
            else:
                batch = batch_for(size, args.batch)
                c, n = closeness(features(fp32, subset, size, batch), features(bf16, subset, size, batch)), len(subset)
            print(closeness_row("ELPV", backbone, size, n, c), flush=True)
        for method, images in synth.items():
            size = parse_sizes(args.synth_size)[0]
            batch = batch_for(size, args.batch)
            c = closeness(features(fp32, images, size, batch), features(bf16, images, size, batch))
            print(closeness_row(f"synth {method}", backbone, size, len(images), c), flush=True)


def downstream_section(abnormal: np.ndarray, modules: np.ndarray, full: dict[Size, Extracted]) -> None:
    print(f"\n2. Downstream: ELPV, efficientnet_lite0 ImageNet features, leave-one-module-out "
          f"({len(np.unique(modules))} modules, {len(modules)} images, {abnormal.sum()} abnormal), "
          "pooled balanced accuracy (%)")
    print("differ: out-of-fold decisions that differ between fp32 and bf16 features; seed ref: between two seeds "
          "of the SGD fit on the same fp32 features (its own noise)")
    print(f"{'size':>11s} {'classifier':10s} {'fp32 BA':>8s} {'bf16 BA':>8s} {'differ':>7s} {'seed ref':>8s}")
    for size, found in full.items():
        X = {"fp32": found.fp32, "bf16": found.bf16}
        for name, (make, stochastic) in classifiers().items():
            predicted = {p: out_of_fold(lambda: make(0), X[p], abnormal, modules) for p in X}
            differ = int(np.sum(predicted["fp32"] != predicted["bf16"]))
            reference = "-"
            if stochastic:
                reseeded = out_of_fold(lambda: make(1), X["fp32"], abnormal, modules)
                reference = str(int(np.sum(predicted["fp32"] != reseeded)))
            ba = {p: 100 * pooled_balanced_accuracy(abnormal, predicted[p]) for p in predicted}
            print(f"{size[0]:>5d}x{size[1]:<5d} {name:10s} {ba['fp32']:8.2f} {ba['bf16']:8.2f} {differ:7d} "
                  f"{reference:>8s}", flush=True)


def speed_section(args, elpv: np.ndarray) -> None:
    size = parse_sizes(args.speed_size)[0]
    print(f"\n3. Speed at {size[0]}x{size[1]}, batch 4 (BatchNorm folded, channels-last), best of {args.repeats}")
    print(f"{'backbone':18s} {'fp32 img/s':>10s} {'bf16 img/s':>10s} {'bf16/fp32':>9s}")
    x = to_input(elpv[:4], size)
    for backbone in ("efficientnet_lite0", "resnet34"):
        fp32, bf16 = runners(backbone)
        rate = throughput({"fp32": fp32, "bf16": bf16}, x, args.repeats)
        print(f"{backbone:18s} {rate['fp32']:10.2f} {rate['bf16']:10.2f} {rate['bf16'] / rate['fp32']:8.2f}x", flush=True)


def auto_section(args, elpv: np.ndarray) -> None:
    """What ``--precision auto`` decides on ELPV: xfeat's own check (``choose_precision``: every image of the run's
    first batch of CHECK_IMAGES must reach the thresholds) on the first images in the package's order, as a run
    would start, and on random draws of as many images, told that the CPU has bf16 units so that it runs here."""
    size = parse_sizes(args.auto_size)[0]
    fp32, bf16 = runners("efficientnet_lite0")
    rng = np.random.default_rng(0)
    draws = [np.arange(CHECK_IMAGES)] + [rng.choice(len(elpv), CHECK_IMAGES, replace=False)
                                        for _ in range(args.auto_draws)]
    print(f"\n5. --precision auto on ELPV, efficientnet_lite0 (ImageNet), {size[0]}x{size[1]}: the check on "
          f"{CHECK_IMAGES} images (cosine >= {COSINE_MIN}, relative L2 <= {REL_L2_MAX}), torch bf16 autocast")
    print(f"{'images':24s} {'worst cos':>9s} {'worst relL2':>11s} decision")
    for images in draws:
        check = choose_precision(fp32, bf16, to_input(elpv[images], size), flags={"amx_bf16"})
        print(f"{','.join(map(str, images)):24s} {check.worst_cosine:9.5f} {check.worst_rel_l2:11.4f} "
              f"{check.precision}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="ELPV images for the closeness table")
    parser.add_argument("--sizes", default="224x224,600x600", help="ELPV input sizes for the closeness table")
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet34,resnet50")
    parser.add_argument("--synth-images", type=int, default=4, help="synthetic electrodes (0: none)")
    parser.add_argument("--synth-size", default="1024x512")
    parser.add_argument("--downstream-sizes", default="224x224", help="e.g. 224x224,448x448; empty: skip")
    parser.add_argument("--speed-size", default="1024x512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass at 224x224 (fewer if larger)")
    parser.add_argument("--auto-size", default="224x224", help="input size of section 5")
    parser.add_argument("--auto-draws", type=int, default=4, help="random image draws of section 5")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which to run (1 feeds 2)")
    parser.add_argument("--modules-csv", default=MODULES_CSV)
    args = parser.parse_args()
    sections = set(args.sections.split(","))

    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"oneDNN bf16 {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(cpu_description())
    elpv, abnormal, modules = load_elpv(args.modules_csv)
    workdir = Path(tempfile.mkdtemp(prefix="xfeat-precision-"))
    try:
        if sections & {"1", "2"}:
            synth = synthetic_electrodes(args.synth_images, workdir) if args.synth_images else {}
            full = elpv_features(args, elpv)
            closeness_section(args, elpv, synth, full)
            if full and "2" in sections:
                downstream_section(abnormal, modules, full)
        if "3" in sections:
            speed_section(args, elpv)
        if "4" in sections:
            origin_section(args, elpv)
        if "5" in sections:
            auto_section(args, elpv)
    finally:
        shutil.rmtree(workdir)
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
