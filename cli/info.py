"""``xfeat info``: what a feature cache holds, how it was computed, and what is missing or stale."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import asdict

from xfeat_cli.common import add_common, say
from xfeat.io.dataset import find_images
from xfeat.io.jsonable import plain
from xfeat.features.cache import (FOLD_WINDOWS_UNAVAILABLE, REPAIR_HINT, CacheError, fold_windows_of_cache,
                                  open_cache, stored_window_stats)
from xfeat.features.reading import describe_cache
from xfeat.convert.folds import FoldWindows, window_like
from xfeat.convert.stats import WindowStats
from xfeat.convert.scan import Scan, scan_dataset


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show what a feature cache holds",
                              description="Groups, counts per bundle and label, settings, weights; the window "
                                          "each held-out bundle would get from the other bundles alone; with "
                                          "--data, the dataset images that are missing or stale in each group and "
                                          "the cached rows whose file is gone.")
    p.add_argument("cache", help="HDF5 feature cache")
    p.add_argument("--data", help="dataset folder or manifest to compare the cache with (for a cache without "
                                  "per-bundle histograms, also rescanned for the held-out bundles' windows)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--verify", action="store_true",
                   help="read every feature and check its checksum; exit 1 if any dataset is damaged")
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_cache(args.cache) as f:
        stats = stored_window_stats(f)
    folds, source, note = None, None, None
    if stats is not None:
        try:
            folds, source = fold_windows_of_cache(args.cache), "cache"
        except CacheError as e:
            note = f"conversion windows: {e}"
    hashes = None
    if args.data:
        # Decoding is only needed to rebuild the per-bundle histograms a cache does not hold.
        rescan = stats is not None and folds is None and note is None
        scan = scan_dataset(find_images(args.data), jobs=args.jobs, decode=rescan)
        hashes = {str(r.path): s.sha256 for r, s in zip(scan.records, scan.images)}
        if rescan:
            folds, source, note = _rescanned_folds(scan, stats, args.data)
    if stats is not None and folds is None and note is None:
        note = FOLD_WINDOWS_UNAVAILABLE
    info = describe_cache(args.cache, hashes, verify=args.verify)
    if args.json:
        # plain(): HDF5 gives numpy scalars (the g_min, g_max attributes), which json refuses
        print(json.dumps(plain({**_as_json(info), "fold_windows": folds.to_dict() if folds is not None else None,
                                "fold_windows_source": source if folds is not None else None,
                                "fold_windows_note": folds.describe("") if folds is not None else note}), indent=1))
    else:
        lines = _as_text(info, with_data=hashes is not None)
        lines[2:2] = _folds_text(folds, source, note)  # after the global window's line
        print("\n".join(lines))
    damaged = sum(len(g.damage) for g in info.groups)
    if damaged:
        raise CacheError(f"{args.cache}: {damaged} damaged dataset(s); {REPAIR_HINT}")
    if info.bad_batches:
        say(f"xfeat: warning: {len(info.bad_batches)} journal batch(es) unreadable or inconsistent: the next "
            "extract discards them and recomputes their images")
    if args.verify and not args.quiet:
        say(f"{args.cache}: verified, no damaged dataset")
    return 0


def _rescanned_folds(scan: Scan, stats: WindowStats, data: str) -> tuple[FoldWindows | None, str | None, str | None]:
    """Fold windows from a rescan of the dataset, if it still holds the images the cache's window was fitted on."""
    again = window_like(scan.histogram, stats, len(scan.records)) if scan.histogram.any() else None
    if again is None or (again.raw_low, again.raw_high, again.n_pixels) != (stats.raw_low, stats.raw_high,
                                                                            stats.n_pixels):
        now = f"{again.g_min}..{again.g_max} from {again.n_images} images" if again else "no pixels"
        return None, None, (f"conversion windows: unavailable: {data} now gives the window {now}, the cache's "
                            f"{stats.g_min}..{stats.g_max} came from {stats.n_images} images: not the images it was "
                            "fitted on; extract into a new cache to store per-bundle histograms")
    return scan.fold_windows(stats), "data", None


def _folds_text(folds: FoldWindows | None, source: str | None, note: str | None) -> list[str]:
    if folds is None:
        return [f"  {note}"] if note else []
    where = "" if source == "cache" else " (rescanned from --data)"
    lines = [f"  held-out bundle windows, fitted on the other bundles alone (shift from the global window, gray "
             f"levels){where}:"]
    lines.extend(f"    {fold.describe()}" for fold in folds)
    lines.append(f"  {folds.describe('')}")
    return lines


def _as_json(info) -> dict:
    return {"path": str(info.path), "size_bytes": info.size_bytes, "segments": info.segments, "attrs": info.attrs,
            "window_stats": info.window_stats.to_dict() if info.window_stats else None,
            "pending_batches": info.pending_batches, "bad_batches": info.bad_batches,
            "groups": [{**asdict(g.settings), "key": g.settings.key, "n_images": g.n_images,
                        "counts": [{"bundle": b, "label": lab, "n": n} for (b, lab), n in g.counts.items()],
                        "missing": g.missing, "stale": g.stale, "not_in_dataset": g.not_in_dataset,
                        "damage": g.damage}
                       for g in info.groups]}


def _as_text(info, with_data: bool) -> list[str]:
    layout = f" in {info.segments} segments ({info.path.name}.segments/)" if info.segments else ""
    lines = [f"{info.path}: {info.size_bytes / 1e6:.1f} MB{layout}, xfeat {info.attrs.get('xfeat_version')}, "
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
        if s.tap == "patches":
            rows, cols, dim = s.row_shape
            shape = f"a {rows}x{cols} map of {dim}-d cells (float16, unflipped)"
        else:
            shape = f"{s.n_flips} flips ({s.flips}) x {s.feature_dim}-d"
        tiles = f"; tiles {s.tiles} overlap {s.tile_overlap:g} combine {s.tile_combine}" if s.tiles else ""
        stored = "; stored float16" if s.storage == "float16" and s.tap != "patches" else ""
        engine = "; OpenVINO" if s.engine == "openvino" else ""
        lines.append(f"{s.key}: {g.n_images} images x {shape}; {weights}; {s.precision}{engine}{stored}{tiles}")
        if s.precision_check:
            check = json.loads(s.precision_check)
            lines.append(f"  precision {check['precision']} chosen by --precision auto: {check['reason']} "
                         f"(CPU flags: {check['isa']})")
        by_bundle: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (bundle, label), n in g.counts.items():
            by_bundle[bundle][label] += n
        lines.append("  " + ", ".join(f"{b} {n}/{a}" for b, (n, a) in sorted(by_bundle.items()))
                     + "  (bundle normal/abnormal)")
        lines.extend(f"  DAMAGED {d}" for d in g.damage)
        if with_data:
            lines.append(f"  vs dataset: {len(g.missing)} missing, {len(g.stale)} stale (file changed), "
                         f"{g.not_in_dataset} cached rows whose file is gone from the dataset")
            lines.extend(f"    missing {p}" for p in g.missing[:5])
            lines.extend(f"    stale {p}" for p in g.stale[:5])
    if not info.groups:
        lines.append("  no feature groups yet")
    return lines
