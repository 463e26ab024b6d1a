"""Real data: every xfeat classifier on ELPV, leave-one-module-out, ImageNet features beside random ones.

ELPV (``pip install elpv-dataset``) holds 2,624 electroluminescence images of solar cells, 8-bit 300 x 300, cut
from 44 modules; ``../shared/data/elpv_modules.csv`` gives each image's (inferred) module, and an image is
abnormal when its defect probability is >= 0.5 (821 abnormal). Everything goes through xfeat's own pipeline:
the images are written as PNGs with a CSV manifest (bundle = module) into a temporary folder, ``xfeat.features.extract``
caches efficientnet_lite0 features (method m1, 4 flips), once with ``--weights imagenet`` and once with
``--weights none``, and ``xfeat.learn.evaluation`` runs every classifier of ``xfeat.learn.classifiers.CLASSIFIERS``
leave-one-module-out, exactly as ``xfeat evaluate CACHE --clf ... --class-weight balanced --jobs 2`` would.

Choices: method m1, because it leaves 8-bit images unchanged (``convert.naive`` returns a copy of uint8 input;
m2/m3 would re-stretch ELPV's already processed contrast). ``class_weight="balanced"`` for fc, svm and logreg,
passed as ``xfeat evaluate --class-weight balanced`` passes it (its ``classifier_params``; knn and mahalanobis
learn from normal images only); fc seed 0. 4 flips are extracted: fc replays them as in the fuel-cell paper
(the others use the unflipped features). svm reads the fc1000 layer, xfeat's default (the ResNet-50 paper's).
Balanced accuracy is pooled from the counts summed over the 44 folds, its 95 % interval resamples whole
modules, AUROC is over the pooled out-of-fold scores.

    python benchmarks/elpv.py [--size 224x224] [--flips 4] [--epochs 50] [--jobs 2] [--report DIR] [--workdir DIR]

The last run: 36 minutes on this 2-core CPU (shared with other jobs, and before the fc speed-ups of
docs/evaluate.md's Speed section): 482 s extracting per weights (2,624 images x 4 flips at 224 x 224, ~5
images/s), 1,682 s evaluating, nearly all of it fc: 44 heads x ~2,570 rows, once per weights, the two fc
runs side by side in one pool. ``--flips 1`` cuts extraction by ~4x (fc then trains without flips);
``--workdir`` keeps PNGs and caches (outside the repo) so that a rerun only evaluates.

Measured here (224 x 224, fc 50 epochs; balanced accuracy and its 95 % module-bootstrap interval in %):

    classifier    imagenet BA 95% CI      AUROC      none BA 95% CI      AUROC
    fc                   73.8 66.5-80.3   0.831         68.8 62.9-74.4   0.729
    svm                  72.2 65.5-78.3   0.788         61.7 56.7-66.2   0.667
    logreg               71.7 65.6-77.5   0.770         62.4 58.2-66.3   0.660
    knn                  65.0 57.2-72.0   0.703         62.8 56.5-68.9   0.699
    mahalanobis          64.0 55.8-71.3   0.761         51.6 50.5-53.1   0.659

ImageNet features win for every classifier, by 2 (knn) to 12 points (mahalanobis); the paper's fc head is best
(73.8), with svm and logreg within its interval; the one-class scores trail. Random convolutional features
still carry signal (fc 68.8), so ``--weights none`` is the baseline to beat, not chance.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
from joblib import Parallel, delayed

from precision import MODULES_CSV, load_elpv  # this folder: run as python benchmarks/elpv.py
from xfeat.learn.classifiers import CLASSIFIERS
from xfeat_cli.common import size_arg
from xfeat_cli.evaluate import classifier_params
from xfeat.learn.evaluation import Configuration, ConfigurationResult, configurations, evaluate_configuration
from xfeat.learn.operating import DEFAULT_RECALLS
from xfeat.features.extract import ExtractConfig, extract
from xfeat.report import write_results

BACKBONE, METHOD = "efficientnet_lite0", "m1"
WEIGHTS = ("imagenet", "none")
REPO = Path(__file__).resolve().parents[1]


def write_dataset(folder: Path, modules_csv: str) -> Path:
    """ELPV as an xfeat dataset: ``folder/images/cellNNNN.png`` and ``folder/manifest.csv`` (path, bundle, label)."""
    images, abnormal, modules = load_elpv(modules_csv)
    import elpv_dataset  # installed, or load_elpv has exited; its labels.csv names the images in that order
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    names = [Path(line.split()[0]).name for line in labels.read_text().splitlines() if line.strip()]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "bundle", "label"])
        for name, image, bad, module in zip(names, images, abnormal, modules):
            cv2.imwrite(str(folder / "images" / name), image)  # same bytes on every run: a kept cache stays valid
            out.writerow([f"images/{name}", module, "abnormal" if bad else "normal"])
    return manifest


def extract_features(manifest: Path, workdir: Path, size: tuple[int, int], flips: int,
                     weights_list: tuple[str, ...] = WEIGHTS, taps: tuple[str, ...] = ("pool",)) -> dict[str, Path]:
    """One cache per weights: a cache group is keyed by backbone, method and size, not by weights."""
    caches = {}
    for weights in weights_list:
        caches[weights] = workdir / f"elpv-{BACKBONE}-{weights}-{flips}flips.h5"
        config = ExtractConfig(backbones=(BACKBONE,), methods=(METHOD,), size=size, flips=flips, weights=weights,
                               taps=taps)
        summary = extract(manifest, caches[weights], config)
        print(f"extract --weights {weights}: {summary.computed} images computed, {summary.cached} cached, "
              f"{summary.seconds:.0f} s ({summary.images_per_second:.1f} images/s, {flips} flips each)", flush=True)
    return caches


def evaluate_all(caches: dict[str, Path], configs: list[Configuration], params: dict, jobs: int, *,
                 recalls: tuple[float, ...] = DEFAULT_RECALLS, inner_folds: int | None = None
                 ) -> dict[str, list[ConfigurationResult]]:
    """What ``xfeat.learn.evaluation.evaluate`` does, over both caches in one pool: the two fc runs, ~90 % of the
    work, go side by side instead of one after the other (longest first)."""
    tasks = sorted([(w, c) for c in configs for w in caches], key=lambda task: task[1].clf != "fc")
    results = Parallel(n_jobs=jobs)(delayed(evaluate_configuration)(caches[w], c, params.get(c.clf), recalls=recalls,
                                                                    inner_folds=inner_folds)
                                    for w, c in tasks)
    by_weights: dict[str, list[ConfigurationResult]] = {w: [] for w in caches}
    for (w, _), result in zip(tasks, results):
        by_weights[w].append(result)
    return by_weights


def _name(config: Configuration) -> str:
    return f"{config.clf} {config.layer}"


def table(by_weights: dict[str, list[ConfigurationResult]]) -> str:
    """Rows: classifiers and layers; per weights: pooled balanced accuracy, its 95 % module-bootstrap interval,
    AUROC."""
    lines = [f"{'classifier':24s}" + "".join(f"  {w + ' BA':>11s} {'95% CI':11s} {'AUROC':>5s}" for w in by_weights)]
    for row in zip(*by_weights.values()):
        cells = []
        for r in row:
            low, high = r.interval()
            cells.append(f"  {100 * r.overall.balanced_accuracy:11.1f} {f'{100 * low:.1f}-{100 * high:.1f}':11s} "
                         f"{r.overall_auroc:5.3f}")
        lines.append(f"{_name(row[0].config):24s}" + "".join(cells))
    return "\n".join(lines)


def held_out_table(by_weights: dict[str, list[ConfigurationResult]]) -> str:
    """Rows: classifiers; per weights and recall target: normal cleared and recall achieved on held-out modules
    (nested), each with its 95 % module-bootstrap interval, in %."""
    lines = []
    for weights, results in by_weights.items():
        targets = [p.target for p in results[0].operating]
        lines.append(f"--weights {weights}: " + "; ".join(f"target {100 * t:g}%: cleared (CI) / recall (CI)"
                                                           for t in targets))
        for r in results:
            cells = []
            for p in r.operating:
                (cl, ch), (rl, rh) = p.interval("tnr"), p.interval("tpr")
                cells.append(f"{100 * p.cleared:5.1f} ({100 * cl:4.1f}-{100 * ch:4.1f}) / "
                             f"{100 * p.recall:5.1f} ({100 * rl:4.1f}-{100 * rh:5.1f})")
            lines.append(f"  {_name(r.config):24s}" + "   ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=size_arg, default=(224, 224), metavar="HxW", help="network input size")
    parser.add_argument("--flips", type=int, choices=(1, 2, 4), default=4,
                        help="flip variants extracted (fc replays them)")
    parser.add_argument("--epochs", type=int, default=50, help="fc: training epochs")
    parser.add_argument("--class-weight", choices=("balanced", "none"), default="balanced",
                        help="for fc, svm and logreg, as xfeat evaluate --class-weight")
    parser.add_argument("--jobs", type=int, default=2, help="configurations evaluated side by side")
    parser.add_argument("--report", metavar="DIR", help="write xfeat's full report to DIR/imagenet and DIR/none")
    parser.add_argument("--workdir", metavar="DIR", help="keep PNGs, manifest and caches here (default: temporary)")
    parser.add_argument("--modules-csv", default=MODULES_CSV)
    parser.add_argument("--weights", choices=("both", *WEIGHTS), default="both", help="which features to evaluate")
    parser.add_argument("--clf", default=",".join(CLASSIFIERS), help="classifiers (default: all)")
    parser.add_argument("--taps", default="pool", help="taps to extract: pool, or pool,local (local features)")
    parser.add_argument("--patch-maps", action="store_true", help="also extract patch maps (for patchcore)")
    parser.add_argument("--patchcore-pool", type=int, default=1, metavar="K",
                        help="patchcore: average k x k cells of the patch maps first (k^2 fewer searches)")
    parser.add_argument("--layers", default=None,
                        help="layers to evaluate, e.g. pool,local,pool+local (default: each classifier's own)")
    parser.add_argument("--no-recall", dest="recall", action="store_false",
                        help="skip the nested operating points (patchcore on all of ELPV: hours)")
    parser.add_argument("--inner-folds", type=int, default=None, metavar="K",
                        help="nested thresholds on K groups of modules (default: leave-one-module-out inside, "
                             "946 inner fits per classifier for 44 modules; K groups need 44 (K-1) + K)")
    args = parser.parse_args()
    size = f"{args.size[0]}x{args.size[1]}"

    start = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xfeat-elpv-")).resolve()
    if workdir.is_relative_to(REPO):
        sys.exit(f"--workdir {workdir} is inside the repository; ELPV images must stay out of it")
    try:
        manifest = write_dataset(workdir, args.modules_csv)
        taps = tuple(args.taps.split(",")) + (("patches",) if args.patch_maps else ())
        caches = extract_features(manifest, workdir, args.size, args.flips,
                                  WEIGHTS if args.weights == "both" else (args.weights,), taps)
        extracted = time.perf_counter()
        classifiers = tuple(args.clf.split(","))
        configs = configurations((BACKBONE,), (METHOD,), classifiers, size=size,
                                 layer=args.layers.split(",") if args.layers else None)
        options = argparse.Namespace(class_weight=None if args.class_weight == "none" else args.class_weight,
                                     seed=0, epochs=args.epochs, precision=None)
        params = classifier_params(options, classifiers)
        if "patchcore" in classifiers:
            params["patchcore"] = {**params.get("patchcore", {}), "pool": args.patchcore_pool}
        by_weights = evaluate_all(caches, configs, params, args.jobs, inner_folds=args.inner_folds,
                                  recalls=DEFAULT_RECALLS if args.recall else ())
        if args.report:
            for weights, results in by_weights.items():
                write_results(results, Path(args.report) / weights)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir)
    first = next(iter(by_weights.values()))[0]
    print(f"\nELPV, {BACKBONE} {METHOD} {size}, {args.flips} flips, leave-one-module-out: {len(first.features.y)} "
          f"images ({int(first.features.y.sum())} abnormal), {len(first.bundles)} modules; fc {args.epochs} epochs; "
          f"class_weight {args.class_weight} for fc, svm, logreg; BA and CI in %")
    print(table(by_weights))
    if args.recall:
        inner = f"{args.inner_folds} groups of modules" if args.inner_folds else "leave-one-module-out"
        print(f"\nHeld-out operating points (nested: each module's threshold chosen on the other modules' own "
              f"out-of-fold scores, inner {inner}), in %:")
        print(held_out_table(by_weights))
    end = time.perf_counter()
    print(f"\n{end - start:.0f} s in all: {extracted - start:.0f} s writing and extracting, "
          f"{end - extracted:.0f} s evaluating")


if __name__ == "__main__":
    main()
