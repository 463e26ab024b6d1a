"""``xfeat convert``: write a dataset's 8-bit conversions, or a preview of every method for one image."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from xfeat_cli.common import add_common, add_max_pixels, progress_bar, say
from xfeat.convert.methods import METHODS, NEEDS_STATS, check_method, gray_of
from xfeat.io.dataset import find_images
from xfeat.errors import XfeatError
from xfeat.convert.export import preview_panel, write_converted, write_png, write_skipped_report
from xfeat.io.images import load_native
from xfeat.io.outputs import check_output, data_roots_of, manifest_input
from xfeat.convert.scan import scan_dataset
from xfeat.convert.stats import WindowStats, pixel_histogram, window_stats

STATS_FILE = "stats.json"
SKIPPED_FILE = "skipped.csv"
STATS_INPUT = "the statistics file this command reads (--stats)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="write 8-bit conversions of a dataset, or a preview of every method",
        description="Convert 16-bit images to 8 bits as the network will see them: "
                    "xfeat convert DATA --method m2 --out DIR, or xfeat convert --preview IMAGE --out FILE.png. "
                    f"Methods: {', '.join(METHODS)}. The global statistics are saved to DIR/{STATS_FILE}.")
    p.add_argument("data", nargs="?", help="dataset folder ROOT/<bundle>/<label>/<image> or CSV manifest")
    p.add_argument("--method", default="m2", help=f"conversion method, one of {', '.join(METHODS)} (default m2)")
    p.add_argument("--out", required=True, help="output folder (or PNG file with --preview)")
    p.add_argument("--preview", metavar="IMAGE", help="write one panel with every method for IMAGE")
    p.add_argument("--stats", metavar="FILE", help="reuse saved statistics (stats.json) instead of computing them")
    p.add_argument("--no-round", action="store_true", help="keep G_min/G_max unrounded (the paper rounds to 100)")
    p.add_argument("--skip-bad", action="store_true",
                   help=f"skip unreadable files and list them in DIR/{SKIPPED_FILE} instead of stopping")
    add_max_pixels(p)
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.preview:
        if args.data:
            raise XfeatError("give either DATA or --preview IMAGE, not both")
        return _preview(args)
    if not args.data:
        raise XfeatError("convert needs DATA (a dataset folder or manifest) or --preview IMAGE")
    check_method(args.method)
    check_output(args.out, kind="folder", data_roots=data_roots_of(args.data), writes=(STATS_FILE, SKIPPED_FILE),
                 inputs=[manifest_input(args.data), (args.stats, STATS_INPUT)])
    start = time.perf_counter()
    out = Path(args.out)
    dataset = find_images(args.data, skip_bad=args.skip_bad)
    stats = WindowStats.load(args.stats) if args.stats else None
    if stats is None and args.method in NEEDS_STATS:
        with progress_bar(len(dataset), "statistics", args.quiet) as bar:
            scan = scan_dataset(dataset, jobs=args.jobs, skip_bad=args.skip_bad, max_pixels=args.max_pixels,
                                progress=bar.update)
        stats = scan.window_stats(round_to=None if args.no_round else 100)
        dataset = replace(dataset, records=scan.records, skipped=scan.skipped)
    out.mkdir(parents=True, exist_ok=True)
    if stats is not None:
        stats.save(out / STATS_FILE)
        if not args.quiet:
            say(stats.describe())
    with progress_bar(len(dataset), args.method, args.quiet) as bar:
        failed = write_converted(dataset, args.method, out, stats=stats, jobs=args.jobs, skip_bad=args.skip_bad,
                                 max_pixels=args.max_pixels, progress=bar.update)
    skipped = [*dataset.skipped, *failed]
    if skipped:
        write_skipped_report(out / SKIPPED_FILE, skipped)
        say(f"xfeat: warning: skipped {len(skipped)} bad file(s), listed in {out / SKIPPED_FILE}")
    if not args.quiet:
        say(f"converted {len(dataset) - len(failed)} images with {args.method} to {out} "
            f"in {time.perf_counter() - start:.1f} s")
    return 0


def _preview(args: argparse.Namespace) -> int:
    check_output(args.out, create_folders=True,
                 inputs=[(args.preview, "the image this command previews"), (args.stats, STATS_INPUT)])
    image = load_native(args.preview, max_pixels=args.max_pixels).pixels
    if args.stats:
        stats, source = WindowStats.load(args.stats), args.stats
    else:
        depth = image.dtype.itemsize * 8
        stats = window_stats(pixel_histogram(gray_of(image)), n_images=1, bit_depth=depth,
                             round_to=None if args.no_round else 100)
        source = "this image alone (give --stats for the dataset's)"
    write_png(args.out, preview_panel(image, stats))
    if not args.quiet:
        say(f"wrote {args.out}: {', '.join(METHODS)}; global window from {source}: G_min={stats.g_min} "
            f"G_max={stats.g_max}")
    return 0
