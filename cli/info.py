"""``xfeat info``: what a feature cache holds, how it was computed, and what is missing or stale."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import asdict

from xfeat_cli.common import add_common, say
from xfeat.io.dataset import find_images
from xfeat.features.cache import REPAIR_HINT, CacheError
from xfeat.features.reading import describe_cache
from xfeat.convert.scan import scan_dataset


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show what a feature cache holds",
                              description="Groups, counts per bundle and label, settings, weights; with --data, "
                                          "the dataset images that are missing or stale in each group.")
    p.add_argument("cache", help="HDF5 feature cache")
    p.add_argument("--data", help="dataset folder or manifest to compare the cache with")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--verify", action="store_true",
                   help="read every feature and check its checksum; exit 1 if any dataset is damaged")
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    hashes = None
    if args.data:
        scan = scan_dataset(find_images(args.data), jobs=args.jobs)
        hashes = {str(r.path): s.sha256 for r, s in zip(scan.records, scan.images)}
    info = describe_cache(args.cache, hashes, verify=args.verify)
    if args.json:
        print(json.dumps(_as_json(info), indent=1))
    else:
        print("\n".join(_as_text(info, with_data=hashes is not None)))
    damaged = sum(len(g.damage) for g in info.groups)
    if damaged:
        raise CacheError(f"{args.cache}: {damaged} damaged dataset(s); {REPAIR_HINT}")
    if info.bad_batches:
        say(f"xfeat: warning: {len(info.bad_batches)} journal batch(es) unreadable or inconsistent: the next "
            "extract discards them and recomputes their images")
    if args.verify and not args.quiet:
        say(f"{args.cache}: verified, no damaged dataset")
    return 0


def _as_json(info) -> dict:
    return {"path": str(info.path), "size_bytes": info.size_bytes, "attrs": info.attrs,
            "window_stats": info.window_stats.to_dict() if info.window_stats else None,
            "pending_batches": info.pending_batches, "bad_batches": info.bad_batches,
            "groups": [{**asdict(g.settings), "key": g.settings.key, "n_images": g.n_images,
                        "counts": [{"bundle": b, "label": lab, "n": n} for (b, lab), n in g.counts.items()],
                        "missing": g.missing, "stale": g.stale, "not_in_dataset": g.not_in_dataset,
                        "damage": g.damage}
                       for g in info.groups]}


def _as_text(info, with_data: bool) -> list[str]:
    lines = [f"{info.path}: {info.size_bytes / 1e6:.1f} MB, xfeat {info.attrs.get('xfeat_version')}, "
             f"created {info.attrs.get('created')}, updated {info.attrs.get('updated')}"]
    if info.window_stats:
        lines.append(f"  {info.window_stats.describe()}")
    if info.pending_batches:
        lines.append(f"  {info.pending_batches} computed batch(es) not merged yet (an interrupted run); "
                     "the next extract merges them")
    for g in info.groups:
        s = g.settings
        weights = "RANDOM weights (--weights none)" if s.weights_kind == "none" else \
            f"weights {s.weights_name} (sha256 {s.weights_sha256[:12]})"
        lines.append(f"{s.key}: {g.n_images} images x {s.n_flips} flips ({s.flips}) x {s.feature_dim}-d; "
                     f"{weights}; {s.precision}")
        by_bundle: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (bundle, label), n in g.counts.items():
            by_bundle[bundle][label] += n
        lines.append("  " + ", ".join(f"{b} {n}/{a}" for b, (n, a) in sorted(by_bundle.items()))
                     + "  (bundle normal/abnormal)")
        lines.extend(f"  DAMAGED {d}" for d in g.damage)
        if with_data:
            lines.append(f"  vs dataset: {len(g.missing)} missing, {len(g.stale)} stale (file changed), "
                         f"{g.not_in_dataset} not in the dataset")
            lines.extend(f"    missing {p}" for p in g.missing[:5])
            lines.extend(f"    stale {p}" for p in g.stale[:5])
    if not info.groups:
        lines.append("  no feature groups yet")
    return lines
