"""``xfeat compact``: fold a cache's segments into one self-contained file."""

from __future__ import annotations

import argparse

from xfeat_cli.common import add_common, say
from xfeat.features.writer import compact


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compact", help="fold a cache's segments into one file",
                              description="A cache grows by segments (CACHE.segments/), one per commit, so that a "
                                          "commit costs what it adds. compact writes the current rows into one "
                                          "self-contained HDF5 file in their place: to copy or archive the cache "
                                          "as one file, or to reclaim the space of superseded rows. The next "
                                          "extract into it starts segments again.")
    p.add_argument("cache", help="HDF5 feature cache")
    add_common(p, jobs=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    done = compact(args.cache)
    if not args.quiet:
        if done.segments:
            say(f"compacted {args.cache}: {done.segments} segments folded into one file, "
                f"{done.bytes_before / 1e6:.1f} MB -> {done.bytes_after / 1e6:.1f} MB")
        else:
            say(f"{args.cache}: already one file, nothing to do")
    return 0
