"""``xfeat extract``: compute trunk features once and cache them in HDF5."""

from __future__ import annotations

import argparse

from xfeat_cli.common import add_common, add_max_pixels, names_arg, non_negative_int, positive_int, progress_bar, say, size_arg
from xfeat.convert.methods import COLOUR_METHODS, METHODS
from xfeat.features.engines import ENGINES
from xfeat.convert.stats import WindowStats
from xfeat.io.images import megapixels
from xfeat.io.outputs import check_output, data_roots_of, manifest_input

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # as xfeat.features.inference; not imported so --help stays fast
MIN_SIDE = 16  # as ExtractConfig.validate: smaller inputs vanish in the backbone's downsampling


def input_size_arg(text: str) -> tuple[int, int]:
    """``--size HxW``, each side at least 16; its pixel count is checked against --max-pixels once both are
    parsed (a typo such as 40000x40000 must be a usage error, not a 27 GiB allocation)."""
    height, width = size_arg(text)
    if min(height, width) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"each side must be at least {MIN_SIDE} pixels, got {text!r}")
    return height, width


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract", help="compute frozen-trunk features once and cache them (HDF5)",
        description="Compute pooled trunk features per (image, method, backbone, flip) into CACHE. "
                    "Resumes after an interruption and computes only new or changed images.")
    p.add_argument("data", help="dataset folder ROOT/<bundle>/<label>/<image> or CSV manifest")
    p.add_argument("--cache", required=True, help="HDF5 feature cache to create or extend")
    p.add_argument("--backbone", type=names_arg, default=("resnet34",),
                   help="resnet34 (default), resnet50, efficientnet_lite0, any torchvision classifier, or "
                        "timm/NAME; comma-separated")
    p.add_argument("--methods", type=names_arg, default=("m1", "m2", "m3", "m4"),
                   help=f"comma-separated conversion methods from {', '.join(METHODS)} (default m1,m2,m3,m4)")
    p.add_argument("--size", type=input_size_arg, default=(2000, 1000), metavar="HxW",
                   help="network input (default 2000x1000, as the fuel-cell paper)")
    add_max_pixels(p)
    p.add_argument("--taps", type=names_arg, default=("pool",),
                   help="pool (default) or pool,local: + mean/max/GeM of the stride-8/16 stages (small defects)")
    p.add_argument("--patch-maps", action="store_true",
                   help="also store local maps (<= 1 MB/image) for --clf patchcore and anomaly maps")
    p.add_argument("--tiles", metavar="RxC", default=None,
                   help="run the backbone on R x C tiles of --size at native resolution (--tile-overlap "
                        "F, default 0.125 of a tile)")
    p.add_argument("--tile-overlap", type=float, default=0.125, metavar="F", help=argparse.SUPPRESS)
    p.add_argument("--tile-combine", choices=("mean", "max", "both"), default="mean", metavar="HOW",
                   help="pool over tiles: mean (default), max, both")
    p.add_argument("--flips", type=int, default=4, choices=(1, 2, 4),
                   help="flip variants: 1 none, 2 +h, 4 +v,hv (default 4)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (default), none (random, flagged downstream) or PATH to a state dict")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, metavar="P",
                   help="auto (fp16 on CUDA; on a CPU bf16 if it proves itself), fp32, bf16, fp16")
    p.add_argument("--engine", default="auto", choices=ENGINES, metavar="E",
                   help="auto (default: OpenVINO on a CPU), torch, openvino")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), metavar="T",
                   help="stored: float32 (default), float16 (half the disk)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="images per forward pass (default: auto)")
    p.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                   help="decoding processes (default 2; 0 or 1: in this one)")
    p.add_argument("--stats", metavar="FILE", help="window statistics (stats.json) instead of the data's")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed at the end)")
    add_common(p)
    p.set_defaults(run=run, usage_error=p.error)  # --size against --max-pixels: a usage error, after parsing


def run(args: argparse.Namespace) -> int:
    from xfeat.errors import XfeatError
    from xfeat.features.tiles import parse_tiles

    try:
        tiles = parse_tiles(args.tiles, args.size, args.tile_overlap, args.tile_combine) if args.tiles else None
    except XfeatError as e:
        args.usage_error(str(e))
    height, width = tiles.image_size if tiles else args.size
    if height * width > args.max_pixels:
        args.usage_error(f"argument --size: {height}x{width} is {megapixels(height * width)} MP, over the limit of "
                         f"{megapixels(args.max_pixels)} MP; raise it with --max-pixels")
    check_output(args.cache, option="--cache", data_roots=data_roots_of(args.data),
                 inputs=[manifest_input(args.data), (args.stats, "the statistics file this command reads (--stats)"),
                         (None if args.weights in ("imagenet", "none") else args.weights,
                          "the backbone weights file this command reads (--weights)")])
    from xfeat.scale.torchrun import extract_distributed, torchrun_world  # imports torch: only when extracting
    from xfeat.features.extract import ExtractConfig, extract

    config = ExtractConfig(backbones=args.backbone, methods=args.methods, size=args.size, flips=args.flips,
                           weights=args.weights, device=args.device, precision=args.precision, engine=args.engine,
                           batch_size=args.batch_size, workers=args.workers, jobs=args.jobs,
                           stats=WindowStats.load(args.stats) if args.stats else None, max_pixels=args.max_pixels,
                           taps=(*args.taps, *(("patches",) if args.patch_maps else ())), tiles=tiles,
                           storage=args.dtype)
    world = torchrun_world()  # under torchrun this process is one rank of a distributed run
    ranks, lead = (world.size, world.rank == 0) if world else (1, True)
    quiet = args.quiet or not lead  # rank 0 reports for the whole run
    with progress_bar(None, "extract" if ranks == 1 else f"extract (rank 0 of {ranks})", quiet) as bar:
        def on_plan(todo: int, cached: int) -> None:
            if cached and not quiet:
                bar.write(f"{cached} images already cached; computing {todo}" + (" on rank 0" if ranks > 1 else ""))
            bar.total = todo
            bar.refresh()

        if tiles and not quiet:
            bar.write(f"tiles: {tiles.describe()}; each image resized to {height}x{width}")
        run_extract = extract_distributed if world else extract
        summary = run_extract(args.data, args.cache, config, skip_bad=args.skip_bad, progress=bar.update,
                              on_plan=on_plan)
    if not lead:
        return 0
    for s in summary.skipped:
        say(f"xfeat: warning: skipped {s.path}: {s.problem}")
    gray = [m for m in config.methods if m not in COLOUR_METHODS]
    if summary.colour and gray:
        say(f"xfeat: note: {args.data} holds colour images: {', '.join(gray)} converted each one's luminance "
            "(0.299 R + 0.587 G + 0.114 B); --methods rgb takes the colour channels")
    if summary.precision_check is not None and not args.quiet:
        say(f"precision {summary.precision_check.precision} (auto): {summary.precision_check.reason}")
    if config.weights == "none":
        say("xfeat: warning: random weights (--weights none): these features carry no ImageNet knowledge")
    if args.quiet:
        return 0
    processes = f" x {ranks} processes" if ranks > 1 else ""
    say(f"extracted {summary.computed} images ({summary.cached} cached, {len(summary.skipped)} skipped) "
        f"in {summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s on {summary.device} "
        f"({summary.engine}, {summary.precision}){processes}; {args.cache}: {len(summary.groups)} groups, "
        f"{summary.cache_bytes / 1e6:.1f} MB")
    return 0
