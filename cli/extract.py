"""``xfeat extract``: compute trunk features once and cache them in HDF5."""

from __future__ import annotations

import argparse

from xfeat.cli.common import add_common, names_arg, progress_bar, say, size_arg
from xfeat.convert import METHODS
from xfeat.stats import WindowStats

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # as xfeat.inference; not imported so --help stays fast


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract", help="compute frozen-trunk features once and cache them (HDF5)",
        description="Compute pooled trunk features per (image, method, backbone, flip) into CACHE. "
                    "Resumes after an interruption and computes only new or changed images.")
    p.add_argument("data", help="dataset folder ROOT/<bundle>/<label>/<image> or CSV manifest")
    p.add_argument("--cache", required=True, help="HDF5 feature cache to create or extend")
    p.add_argument("--backbone", type=names_arg, default=("resnet34",),
                   help="comma-separated backbones: resnet34, resnet50, efficientnet_lite0, or any torchvision "
                        "classification model (default resnet34)")
    p.add_argument("--methods", type=names_arg, default=("m1", "m2", "m3", "m4"),
                   help=f"comma-separated conversion methods from {', '.join(METHODS)} (default m1,m2,m3,m4)")
    p.add_argument("--size", type=size_arg, default=(2000, 1000), metavar="HxW",
                   help="network input size (default 2000x1000, the fuel-cell paper; 224x224 for the ResNet-50 one)")
    p.add_argument("--flips", type=int, default=4, choices=(1, 2, 4),
                   help="flip variants per image: 1 none, 2 +h, 4 +v,hv (default 4)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (default), none (random, flagged downstream) or PATH to a state dict")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp16 autocast on CUDA, fp32 elsewhere")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="images per forward pass (default: auto)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding processes overlapped with inference (default 2; 0 decodes in-process)")
    p.add_argument("--stats", metavar="FILE", help="window statistics to use (stats.json) instead of the dataset's")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed at the end)")
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from xfeat.extract import ExtractConfig, extract  # imports torch: only when extracting

    config = ExtractConfig(backbones=args.backbone, methods=args.methods, size=args.size, flips=args.flips,
                           weights=args.weights, device=args.device, precision=args.precision,
                           batch_size=args.batch_size, workers=args.workers, jobs=args.jobs,
                           stats=WindowStats.load(args.stats) if args.stats else None)
    with progress_bar(None, "extract", args.quiet) as bar:
        def on_plan(todo: int, cached: int) -> None:
            if cached and not args.quiet:
                bar.write(f"{cached} images already cached; computing {todo}")
            bar.total = todo
            bar.refresh()

        summary = extract(args.data, args.cache, config, skip_bad=args.skip_bad, progress=bar.update,
                          on_plan=on_plan)
    for s in summary.skipped:
        say(f"xfeat: warning: skipped {s.path}: {s.problem}")
    if config.weights == "none":
        say("xfeat: warning: random weights (--weights none): these features carry no ImageNet knowledge")
    if not args.quiet:
        say(f"extracted {summary.computed} images ({summary.cached} cached, {len(summary.skipped)} skipped) "
            f"in {summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s on {summary.device} "
            f"({summary.precision}); {args.cache}: {len(summary.groups)} groups, "
            f"{summary.cache_bytes / 1e6:.1f} MB")
    return 0
