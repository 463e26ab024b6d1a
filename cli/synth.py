"""``xfeat synth``: write a synthetic dataset of 16-bit electrode X-rays, or of colour product photos."""

from __future__ import annotations

import argparse
import time

from xfeat_cli.common import add_common, non_negative_int, positive_int, progress_bar, say, size_arg
from xfeat.io.outputs import check_output
from xfeat.synth import make_dataset, make_product_dataset


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth", help="write a synthetic dataset of 16-bit electrode X-rays (or colour product photos)",
        description="Write OUT/<bundle>/<normal|abnormal>/*.tif and OUT/manifest.csv (with anomaly types). "
                    "Defaults follow the fuel-cell paper: 12 bundles, 714 images, 152 abnormal, ~2070x1145 px. "
                    "With --colour: 224x224 colour JPEG photos of bottles (6 bundles, 120 images, 25%% abnormal), "
                    "as in the ResNet-50 + linear SVM paper.")
    p.add_argument("out", help="new or empty output folder")
    p.add_argument("--colour", action="store_true",
                   help="colour photos of products (JPEG, RGB) instead of 16-bit X-rays; extract them with --methods rgb")
    p.add_argument("--bundles", type=positive_int, default=None, help="number of bundles (default 12; 6 with --colour)")
    p.add_argument("--images", type=positive_int, default=None, help="number of images (default 714; 120 with --colour)")
    p.add_argument("--abnormal-fraction", type=float, default=None,
                   help="share of abnormal images (default 0.2129, as in the paper; 0.25 with --colour)")
    p.add_argument("--size", type=size_arg, default=None, metavar="HxW",
                   help="fixed image size, e.g. 256x128 for tests (default: 2053-2115 x 1119-1219, as in the paper)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="random seed; the same seed writes byte-identical files")
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, option="OUT", kind="folder")
    start = time.perf_counter()
    given = {k: v for k, v in (("bundles", args.bundles), ("images", args.images),
                                ("abnormal_fraction", args.abnormal_fraction)) if v is not None}
    images = args.images or (120 if args.colour else 714)
    with progress_bar(images, "synth", args.quiet) as bar:
        if args.colour:
            summary = make_product_dataset(args.out, **given, size=args.size, seed=args.seed, progress=bar.update)
        else:
            summary = make_dataset(args.out, **given, size=args.size, seed=args.seed, jobs=args.jobs,
                                   progress=bar.update)
    if not args.quiet:
        say(f"wrote {summary.n_images} images ({summary.n_abnormal} abnormal) in {len(summary.bundles)} bundles "
            f"to {summary.root} in {time.perf_counter() - start:.1f} s; manifest {summary.manifest}")
    return 0
