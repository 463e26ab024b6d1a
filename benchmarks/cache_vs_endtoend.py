"""Cache once, train many times: what caching saves and what inference tuning saves, measured apart, side by side.

Three paths run leave-one-bundle-out (one fold per bundle) on the same small synthetic dataset, one conversion
method (m2), the same backbone and input size, and train the same network the same way:

* **(a) end to end, naive trunk**: the fuel-cell paper's network, image in, class out: the frozen trunk as the
  plain module (eager, NCHW, BatchNorm not folded; eval mode, so BatchNorm uses its running statistics; no
  gradients) -> the trainable fc (from the backbone's own fc) -> 512 -> 256 -> 2, trained with
  ``torch.optim.SGD`` (momentum) + ``StepLR`` and ``CrossEntropyLoss``, one fold after the other. Each epoch the
  flips are applied to the images and the trunk runs on every training sample again, as in the paper.
* **(b) end to end, tuned trunk**: the same, with the trunk as the extractor runs it
  (``xfeat.features.inference``: ``prepare_model``, BatchNorm folded into the convolutions and channels-last
  memory; ``runner`` in fp32).
* **(c) cache**: ``xfeat.features.extract.extract`` computes the pooled trunk features of every image in its 4 flip
  variants (none, h, v, hv) once, into a temporary HDF5 cache, with the tuned trunk; then ``FCHead.fit_many``
  trains the fc head of every fold on the cache, replaying the flips from it. Timed: the whole extraction call
  (statistics pass, decoding, inference, cache writing), loading the cache, training the heads and predicting.

Timed for (a) and (b): the statistics pass, decoding and converting every image once (kept in memory: the end-to-end
paths are spared re-reading files each epoch; done once, counted in both), building the trunk (and folding it for
(b)), training and predicting. (a) and (b) alternate fold by fold, so that a change in the shared machine's load
falls on both. Ratios of wall time: a/b is what tuning the trunk saves, b/c what caching saves (both run the tuned
trunk), a/c the two together.

Same draws: each fold's head starts from ``init_head(D, seed, fc)`` and takes its sample order and flips from
``epoch_plan`` with ``default_rng(seed)``, exactly as ``xfeat.learn.fc_training`` does, so the mini-batches, the flip
variant of every sample and the initial weights are identical; only where the trunk's output comes from differs.
The extractor runs the tuned trunk at a different batch size from (b), and (a) also differs from it by folding and
memory layout. That changes float rounding only, and the table says by how much (trunk features, out-of-fold
probabilities and scores, decisions, final head weights). A control column trains the same torch loop on the
cached features instead of a trunk: it separates what the optimiser implementations contribute (torch's
autograd + SGD vs xfeat's hand-written batched one) from what the trunk's rounding contributes.

The last lines extrapolate the three wall times to the paper's setting (714 images, 12 bundles, 4 methods,
50 epochs, 2000 x 1000 input) from the measured cost of one trunk forward at that size, naive and tuned (one
image each, this CPU; ``--no-full-forward`` scales this run's per-forward costs by pixels instead) and the
measured per-sample cost of a head training step in each path (end to end: this run's torch steps; cache: two
epochs of ``fit_many`` on random features of the paper's shape, 12 folds x 714 images, since at this run's size
per-step overheads would dominate). It is an extrapolation, not a run.

All paths run in this process on equal terms: torch single-threaded (``--threads``; on this shared 2-core
machine a second thread made the trunk up to 10x slower), no worker processes (``--workers N`` gives the
extraction its decoding processes, whose start-up costs ~10 s here and pays off only on large images). The CPU
model and its vector ISA flags are printed beside the figures.

    python benchmarks/cache_vs_endtoend.py [--images 64] [--bundles 4] [--size 96x48] [--epochs 10]
                                           [--backbone resnet34] [--weights none] [--threads 1] [--quick]

The defaults took 2-5 minutes on this shared 2-core machine (less than 2 minutes of CPU time); ``--quick``
(``--images 32 --epochs 5 --no-full-forward``) checks that it runs, in about a minute.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from machine import cpu_description  # this folder: run as python benchmarks/cache_vs_endtoend.py
from xfeat.features.extractor import build_extractor
from xfeat.learn.classifiers import FCHead
from xfeat.convert.methods import convert
from xfeat.io.dataset import find_images
from xfeat.features.extract import ExtractConfig, extract
from xfeat.features.inference import prepare_model, runner
from xfeat.features.reading import load_features
from xfeat.learn.fc_training import HeadConfig, class_weights, epoch_plan, init_head
from xfeat.io.images import load_image
from xfeat.convert.scan import scan_dataset
from xfeat.synth import make_dataset

METHOD = "m2"
N_VARIANTS = 4  # none, h, v, hv: variant = h + 2 v
PAPER = {"images": 714, "bundles": 12, "methods": 4, "epochs": 50, "size": (2000, 1000)}
CPU = torch.device("cpu")
NAIVE, TUNED = "naive", "tuned"


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


# --- cache path -----------------------------------------------------------------------------------------------

@dataclass
class CacheRun:
    X: np.ndarray  # [N, 4, D] cached pooled features, row order of the cache
    y: np.ndarray
    groups: np.ndarray
    paths: np.ndarray
    fc: tuple[np.ndarray, np.ndarray]
    heads: list[FCHead]
    proba: np.ndarray  # out-of-fold P(abnormal)
    score: np.ndarray  # out-of-fold logit(abnormal) - logit(normal)
    decision: np.ndarray
    g_min_max: tuple[int, int]
    seconds: dict[str, float] = field(default_factory=dict)


def fold_masks(groups: np.ndarray) -> list[np.ndarray]:
    """Test mask of each leave-one-bundle-out fold, bundles in sorted order."""
    return [groups == b for b in sorted(set(groups))]


def run_cache_path(data: Path, cache: Path, args, config: HeadConfig) -> CacheRun:
    start = time.perf_counter()
    extract(data, cache, ExtractConfig(backbones=(args.backbone,), methods=(METHOD,), size=args.size,
                                       flips=N_VARIANTS, weights=args.weights, device="cpu", precision="fp32",
                                       workers=args.workers, jobs=1))
    extracted = time.perf_counter()
    fs = load_features(cache, args.backbone, METHOD, flips="all")
    loaded = time.perf_counter()
    tests = fold_masks(fs.groups)
    template = FCHead(epochs=config.epochs, lr=config.lr, lr_step=config.lr_step, lr_gamma=config.lr_gamma,
                      batch_size=config.batch_size, optimizer=config.optimizer, momentum=config.momentum,
                      class_weight=config.class_weight, seed=args.seed, fc_weight=fs.fc_weight, fc_bias=fs.fc_bias)
    heads = template.fit_many(fs.X, fs.y, [~m for m in tests])
    proba, score, decision = np.zeros(len(fs.y)), np.zeros(len(fs.y)), np.zeros(len(fs.y), np.int64)
    for head, mask in zip(heads, tests):
        proba[mask] = head.predict_proba(fs.X[mask])[:, 1]
        score[mask] = head.decision_function(fs.X[mask])
        decision[mask] = head.predict(fs.X[mask])
    done = time.perf_counter()
    stats = fs.window_stats
    return CacheRun(fs.X, fs.y, fs.groups, fs.paths, (fs.fc_weight, fs.fc_bias), heads, proba, score, decision,
                    (stats.g_min, stats.g_max),
                    {"extract": extracted - start, "load": loaded - extracted, "heads": done - loaded})


# --- end-to-end path ------------------------------------------------------------------------------------------

@dataclass
class TorchRun:
    """The paper's network trained with plain torch, fold after fold; features from the trunk or the cache."""

    nets: list[nn.Sequential]
    proba: np.ndarray
    score: np.ndarray
    decision: np.ndarray
    seen: np.ndarray  # [N, 4, D] features the head was fed (NaN where a variant was never drawn)
    g_min_max: tuple[int, int] = (0, 0)
    forwards: int = 0  # trunk forwards (one per image)
    sample_steps: int = 0  # training samples through the head, over all folds and epochs
    seconds: dict[str, float] = field(default_factory=lambda: {"prepare": 0.0, "trunk": 0.0, "head": 0.0})


Features = Callable[[np.ndarray, np.ndarray], torch.Tensor]  # (rows, flip variants) -> [B, D]


def load_images(data: Path, order: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Every image read, converted (m2, the dataset's window) and resized as the extractor does, in ``order``."""
    dataset = find_images(data)
    stats = scan_dataset(dataset, jobs=1).window_stats()
    by_path = {str(r.path): r for r in dataset.records}
    images = []
    for path in order:
        converted = convert(load_image(by_path[path].path).pixels, METHOD, stats)
        images.append(cv2.resize(converted, (size[1], size[0]), interpolation=cv2.INTER_AREA)[None])
    return torch.from_numpy(np.stack(images)), (stats.g_min, stats.g_max)


def flip(images: torch.Tensor, variant: np.ndarray) -> torch.Tensor:
    """Each image [C, H, W] in its flip variant h + 2 v: h flips the width, v the height, as the extractor does."""
    h = torch.from_numpy(variant & 1 > 0).view(-1, 1, 1, 1)
    v = torch.from_numpy(variant & 2 > 0).view(-1, 1, 1, 1)
    images = torch.where(h, images.flip(3), images)
    return torch.where(v, images.flip(2), images)


def trunk_features(trunk: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> Features:
    """End to end: the frozen trunk runs on the flipped images, every time."""
    def features(rows, variant):
        with torch.no_grad():
            x = trunk(flip(images[torch.from_numpy(rows)], variant))
        return x.clone() if x.is_inference() else x  # the tuned runner's inference-mode output, made fit for autograd
    return features


def cached_features(X: np.ndarray) -> Features:
    """The control: the same torch training loop, fed from the cache instead of the trunk."""
    return lambda rows, variant: torch.from_numpy(X[rows, variant])


def train_fold(features: Features, fc, y: torch.Tensor, train_rows: np.ndarray, config: HeadConfig, seed: int,
               run: TorchRun) -> nn.Sequential:
    """The paper's network on one fold: fresh features in every step, head trained with torch's SGD + StepLR."""
    net = init_head(fc[0].shape[1], seed, *fc)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma)
    weight = torch.tensor(class_weights(y[train_rows].numpy(), config.class_weight), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weight)  # the weighted mean, as xfeat.learn.fc_training computes it
    rng = np.random.default_rng(seed)
    for _ in range(config.epochs):
        order, variant = epoch_plan(rng, len(train_rows), N_VARIANTS, config.flips)
        rows = train_rows[order]
        for start in range(0, len(rows), config.batch_size):
            batch, flips = rows[start:start + config.batch_size], variant[start:start + config.batch_size]
            t0 = time.perf_counter()
            x = features(batch, flips)
            t1 = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(net(x), y[batch]).backward()
            optimizer.step()
            t2 = time.perf_counter()
            run.seconds["trunk"] += t1 - t0
            run.seconds["head"] += t2 - t1
            run.forwards += len(batch)
            run.sample_steps += len(batch)
            run.seen[batch, flips] = x.numpy()
        schedule.step()
    return net


def train_folds(paths: dict[str, tuple[Features, TorchRun]], fc, y: np.ndarray, groups: np.ndarray,
                config: HeadConfig, seed: int) -> None:
    """Leave-one-bundle-out: per fold, each path trains its network, then scores the held-out bundle (unflipped).
    The paths take turns fold by fold, so that a change in the machine's load falls on each of them alike."""
    targets = torch.from_numpy(y)
    for test in fold_masks(groups):
        rows = np.flatnonzero(test)
        for features, run in paths.values():
            net = train_fold(features, fc, targets, np.flatnonzero(~test), config, seed, run)
            t0 = time.perf_counter()
            x = features(rows, np.zeros(len(rows), np.int64))
            run.seconds["trunk"] += time.perf_counter() - t0
            run.forwards += len(rows)
            with torch.no_grad():
                logits = net(x).double()
            run.proba[test] = logits.softmax(1)[:, 1].numpy()
            run.score[test] = (logits[:, 1] - logits[:, 0]).numpy()
            run.decision[test] = (run.score[test] > 0).astype(np.int64)
            run.nets.append(net)


def empty_run(n: int, dim: int) -> TorchRun:
    seen = np.full((n, N_VARIANTS, dim), np.nan, np.float32)
    return TorchRun([], np.zeros(n), np.zeros(n), np.zeros(n, np.int64), seen)


def trunks(backbone: str, weights: str) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]]:
    """The naive trunk (eval mode, frozen: the plain module, eager, NCHW, nothing folded) and the tuned one (the
    extractor's: BatchNorm folded, channels-last, fp32), each with the seconds it took to build."""
    start = time.perf_counter()
    naive = build_extractor(backbone, weights)
    built = time.perf_counter()
    tuned = runner(prepare_model(build_extractor(backbone, weights), CPU), CPU, "fp32")
    return {NAIVE: (naive, built - start), TUNED: (tuned, time.perf_counter() - built)}


def run_end_to_end(data: Path, cache: CacheRun, args, config: HeadConfig) -> dict[str, TorchRun]:
    """(a) and (b): the images read and converted once for both, then the folds of the two taking turns."""
    start = time.perf_counter()
    images, g_min_max = load_images(data, cache.paths, args.size)  # rows in the cache's order: same folds, draws
    loaded = time.perf_counter() - start
    built = trunks(args.backbone, args.weights)
    naive = built[NAIVE][0]
    paths = {}
    for name, (trunk, seconds) in built.items():
        run = empty_run(len(cache.y), naive.feature_dim)
        run.g_min_max = g_min_max
        run.seconds["prepare"] = loaded + seconds  # each end-to-end path would have to read the images itself
        paths[name] = (trunk_features(trunk, images), run)
    train_folds(paths, (naive.fc_weight.numpy(), naive.fc_bias.numpy()), cache.y, cache.groups, config, args.seed)
    return {name: run for name, (_, run) in paths.items()}


def run_control(cache: CacheRun, args, config: HeadConfig) -> TorchRun:
    run = empty_run(*cache.X.shape[::2])
    train_folds({"control": (cached_features(cache.X), run)}, cache.fc, cache.y, cache.groups, config, args.seed)
    return run


# --- comparison and extrapolation --------------------------------------------------------------------------

def max_weight_difference(heads: list[FCHead], nets: list[nn.Sequential]) -> float:
    worst = 0.0
    for head, net in zip(heads, nets):
        linears = [m for m in net if isinstance(m, nn.Linear)]
        for coef, intercept, lin in zip(head.coefs_, head.intercepts_, linears):
            worst = max(worst, np.abs(coef - lin.weight.detach().numpy().T).max(),
                        np.abs(intercept - lin.bias.detach().numpy()).max())
    return float(worst)


def full_size_forward_seconds(backbone: str, weights: str, size: tuple[int, int]) -> dict[str, float]:
    """Seconds of one trunk forward of one image at ``size`` (the paper's 2000 x 1000), naive then tuned."""
    image = torch.randint(0, 256, (1, 1, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seconds = {}
    for name, (trunk, _) in trunks(backbone, weights).items():
        start = time.perf_counter()
        with torch.no_grad():
            trunk(image)
        seconds[name] = time.perf_counter() - start
    return seconds


def paper_head_step_seconds(dim: int, config: HeadConfig, epochs: int = 2) -> float:
    """Seconds per training sample of ``FCHead.fit_many`` at the paper's shape: 714 images, 12 folds trained
    together, 4 flip variants of ``dim`` features (random numbers: the cost depends on shapes only)."""
    rng = np.random.default_rng(0)
    n, k = PAPER["images"], PAPER["bundles"]
    X = np.abs(rng.normal(0, 1, (n, N_VARIANTS, dim))).astype(np.float32)
    y = (rng.random(n) < 152 / 714).astype(np.int64)
    groups = np.arange(n) % k
    fc = rng.normal(0, dim ** -0.5, (1000, dim)).astype(np.float32), np.zeros(1000, np.float32)
    head = FCHead(epochs=epochs, lr=config.lr, batch_size=config.batch_size, momentum=config.momentum,
                  class_weight=config.class_weight, fc_weight=fc[0], fc_bias=fc[1])
    start = time.perf_counter()
    head.fit_many(X, y, [groups != b for b in range(k)])
    return (time.perf_counter() - start) / (epochs * (k - 1) * n)


def extrapolate(t_forward: dict[str, float], head_e2e: dict[str, float], head_cache: float) -> dict[str, float]:
    """Seconds of the paper's grid (all methods, folds, epochs): (a) and (b) end to end, (c) on the cache.

    Each image is a training sample in (bundles - 1) folds, so one method costs epochs x (bundles - 1) x images
    head steps in every path; end to end adds a trunk forward to each, plus one per test image; the cache
    computes images x 4 trunk forwards (tuned) once per method.
    """
    n, k, m, e = PAPER["images"], PAPER["bundles"], PAPER["methods"], PAPER["epochs"]
    sample_steps = e * (k - 1) * n
    times = {path: m * ((sample_steps + n) * t_forward[trunk] + sample_steps * head_e2e[trunk])
             for path, trunk in (("a", NAIVE), ("b", TUNED))}
    times["c"] = m * (N_VARIANTS * n * t_forward[TUNED] + sample_steps * head_cache)
    return times


def ratios(t: dict[str, float]) -> str:
    """What tuning saves (a/b), what caching saves (b/c), and the two together (a/c)."""
    return f"tuning a/b {t['a'] / t['b']:.2f}x, caching b/c {t['b'] / t['c']:.2f}x, both a/c {t['a'] / t['c']:.2f}x"


def print_times(cache: CacheRun, e2e: dict[str, TorchRun]) -> None:
    c = cache.seconds
    cache_forwards = len(cache.y) * N_VARIANTS
    total = {"a": sum(e2e[NAIVE].seconds.values()), "b": sum(e2e[TUNED].seconds.values()), "c": sum(c.values())}
    print(f"{'path':30s} {'trunk fwd':>10s} {'extract/prep s':>15s} {'trunk s':>8s} {'head s':>8s} {'total s':>8s}")
    for path, name, label in (("a", NAIVE, "(a) end to end, naive trunk"), ("b", TUNED, "(b) end to end, tuned trunk")):
        run = e2e[name]
        s = run.seconds
        print(f"{label:30s} {run.forwards:10d} {s['prepare']:15.2f} {s['trunk']:8.2f} {s['head']:8.2f} "
              f"{total[path]:8.2f}")
    print(f"{'(c) cache':30s} {cache_forwards:10d} {c['extract']:15.2f} {'(extr.)':>8s} "
          f"{c['load'] + c['heads']:8.2f} {total['c']:8.2f}")
    trunk = e2e[NAIVE].seconds["trunk"] / e2e[TUNED].seconds["trunk"]
    print(f"wall-time ratios: {ratios(total)} "
          f"(trunk seconds alone a/b {trunk:.2f}x; trunk forwards b/c {e2e[TUNED].forwards / cache_forwards:.1f}x)")


def closeness(cache: CacheRun, run: TorchRun) -> list[str]:
    """One column of the closeness table: how far ``run`` is from the cache path."""
    seen = ~np.isnan(run.seen[..., 0])
    feature_diff = np.abs(run.seen[seen] - cache.X[seen]).max()
    relative = feature_diff / np.abs(cache.X[seen]).max()
    agree = int((run.decision == cache.decision).sum())
    return [f"{feature_diff:.3g} ({relative:.2g} rel.)",
            f"{np.abs(run.proba - cache.proba).max():.3g}",
            f"{np.abs(run.score - cache.score).max():.3g}",
            f"{agree}/{len(cache.y)}" + ("" if agree == len(cache.y) else " DIFFER"),
            f"{max_weight_difference(cache.heads, run.nets):.3g}"]


def print_closeness(cache: CacheRun, e2e: dict[str, TorchRun], control: TorchRun) -> None:
    rows = ["features fed to the head, max |diff|", "out-of-fold P(abnormal), max |diff|",
            "out-of-fold score (logit diff), max |diff|", "decisions agree",
            "final head weights (all layers, folds), max |diff|"]
    print(f"{'closeness to the cache path (c)':52s} {'(a) naive e2e':>22s} {'(b) tuned e2e':>22s} "
          f"{'torch head on the cache':>24s}")
    for name, a, b, control_cell in zip(rows, closeness(cache, e2e[NAIVE]), closeness(cache, e2e[TUNED]),
                                        closeness(cache, control)):
        print(f"{name:52s} {a:>22s} {b:>22s} {control_cell:>24s}")
    print(f"(scores span {cache.score.min():.3g} .. {cache.score.max():.3g}, nearest to the decision boundary 0: "
          f"{np.abs(cache.score).min():.3g}; {int(cache.decision.sum())} of {len(cache.y)} decided abnormal; "
          f"the control feeds torch's loop from the cache, isolating the optimiser from trunk rounding)")


def print_extrapolation(args, config: HeadConfig, cache: CacheRun, e2e: dict[str, TorchRun]) -> None:
    if args.full_forward:
        t_forward = full_size_forward_seconds(args.backbone, args.weights, PAPER["size"])
        how = "measured, 1 image each"
    else:
        scale = np.prod(PAPER["size"]) / np.prod(args.size)
        t_forward = {name: run.seconds["trunk"] / run.forwards * scale for name, run in e2e.items()}
        how = "this run's, scaled by pixels"
    head_e2e = {name: run.seconds["head"] / run.sample_steps for name, run in e2e.items()}
    head_cache = paper_head_step_seconds(cache.X.shape[2], config)
    t = extrapolate(t_forward, head_e2e, head_cache)
    extraction = PAPER["methods"] * N_VARIANTS * PAPER["images"] * t_forward[TUNED]
    height, width = PAPER["size"]
    print(f"EXTRAPOLATION to the paper's setting ({PAPER['images']} images, {PAPER['bundles']} folds x "
          f"{PAPER['methods']} methods, {PAPER['epochs']} epochs, {height}x{width}), this CPU, not a run:")
    print(f"  trunk forward at {height}x{width}: naive {t_forward[NAIVE]:.2f} s/image, tuned {t_forward[TUNED]:.2f} "
          f"s/image ({how}); head step: {head_e2e[NAIVE] * 1e3:.3f} / {head_e2e[TUNED] * 1e3:.3f} ms/sample end to "
          f"end (a / b, this run), {head_cache * 1e3:.3f} ms/sample on the cache (fit_many, 12 folds x 714 images, "
          "measured)")
    print(f"  (a) end to end, naive {t['a'] / 3600:.0f} h; (b) end to end, tuned {t['b'] / 3600:.0f} h; (c) cache "
          f"{t['c'] / 3600:.1f} h (extraction {extraction / 3600:.1f} h + heads {(t['c'] - extraction) / 3600:.2f} h)")
    print(f"  {ratios(t)} (trunk forwards alone b/c: "
          f"{(PAPER['epochs'] * (PAPER['bundles'] - 1) + 1) / N_VARIANTS:.1f}x)")


def report(args, config: HeadConfig, cache: CacheRun, e2e: dict[str, TorchRun], control: TorchRun) -> None:
    n, folds = len(cache.y), len(set(cache.groups))
    print(f"{n} synthetic images ({int(cache.y.sum())} abnormal), {folds} bundles = {folds} folds, {METHOD}, "
          f"{args.backbone} ({args.weights}), input {args.size[0]}x{args.size[1]}, {args.epochs} epochs, "
          f"class weights {args.class_weight}, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(cpu_description())
    if cache.g_min_max != e2e[NAIVE].g_min_max:
        print(f"WARNING: m2 window differs: cache {cache.g_min_max}, end to end {e2e[NAIVE].g_min_max}")
    print()
    print_times(cache, e2e)
    print()
    print_closeness(cache, e2e, control)
    print()
    print_extrapolation(args, config, cache, e2e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--bundles", type=int, default=4)
    parser.add_argument("--image-size", type=parse_size, default=(128, 64), help="synthetic images, HxW")
    parser.add_argument("--size", type=parse_size, default=(96, 48), help="network input, HxW")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--weights", default="none", help="none, imagenet or a file")
    parser.add_argument("--class-weight", choices=("none", "balanced"), default="none",
                        help="loss weights (none: the paper's plain cross-entropy)")
    parser.add_argument("--seed", type=int, default=0, help="the heads' initial weights, sample order and flips")
    parser.add_argument("--data-seed", type=int, default=3,
                        help="synthetic dataset (3: every fold's training bundles hold abnormal images)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both paths")
    parser.add_argument("--workers", type=int, default=0,
                        help="extraction's decoding processes (default 0: decode in-process, like the other path)")
    parser.add_argument("--no-full-forward", dest="full_forward", action="store_false",
                        help="extrapolate the 2000x1000 trunk cost by pixels instead of timing one forward")
    parser.add_argument("--quick", action="store_true",
                        help="a check that it runs: --images 32 --epochs 5 --no-full-forward")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.full_forward = 32, 5, False
    torch.set_num_threads(args.threads)
    config = HeadConfig(epochs=args.epochs, class_weight=None if args.class_weight == "none" else "balanced")
    with tempfile.TemporaryDirectory(prefix="xfeat-e2e-") as tmp:
        data = Path(tmp, "data")
        make_dataset(data, bundles=args.bundles, images=args.images, size=args.image_size,
                     seed=args.data_seed, jobs=1)
        cache = run_cache_path(data, Path(tmp, "cache.h5"), args, config)
        e2e = run_end_to_end(data, cache, args, config)
        control = run_control(cache, args, config)
        report(args, config, cache, e2e, control)


if __name__ == "__main__":
    main()
