"""``xfeat evaluate``: leave-one-bundle-out comparison of classifiers on cached features."""

from __future__ import annotations

import argparse
import json
import os
import time

from xfeat_cli.common import (add_common, add_dataset_rows, dataset_files, names_arg, non_negative_int, positive_int,
                              recalls_arg, say)
from xfeat.errors import XfeatError
from xfeat.io.outputs import check_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="compare classifiers by leave-one-bundle-out on cached features",
        description="For each (backbone, method, classifier), train on all bundles but one and test on it, for "
                    "every bundle; print the paper's Table 1 per classifier and write results to --report DIR.")
    p.add_argument("cache", help="HDF5 feature cache written by xfeat extract")
    p.add_argument("--clf", type=names_arg, default=("fc", "svm"),
                   help="fc, svm, logreg, knn, mahalanobis, patchcore (default fc,svm)")
    p.add_argument("--methods", type=names_arg, default=None, help="default: every method in the cache")
    p.add_argument("--backbone", type=names_arg, default=None,
                   help="default: the cache's only one, or resnet34")
    p.add_argument("--layer", type=names_arg, default=None,
                   help="pool, fc1000, local, joins (pool+local), a list (pool,local); default fc1000 for svm, "
                        "patches for patchcore, else pool")
    p.add_argument("--recall", type=recalls_arg, default=None, metavar="R1,R2",
                   help="operating points, nested (default 0.95,0.99; none)")
    add_classifier_options(p)
    add_dataset_rows(p)
    p.add_argument("--paper", action="store_true",
                   help="the fuel-cell paper's protocol: resnet34, m1-m4, fc")
    p.add_argument("--report", metavar="DIR", help="write results, predictions, near-duplicates and report.html")
    p.add_argument("--json", action="store_true", help="print the overall records as JSON on stdout")
    p.add_argument("--allow-near-duplicates", action="store_true",
                   help="no warning for one part seen in two bundles")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on this Dask cluster (tcp://HOST:PORT or a scheduler file; workers read CACHE at the "
                        'same path); needs pip install "xfeat[dask]"')
    add_common(p)
    p.set_defaults(run=run)


def add_classifier_options(p: argparse.ArgumentParser) -> None:
    """How to train: shared by ``evaluate`` and ``train``, so a model is trained as it was evaluated."""
    p.add_argument("--size", default=None, metavar="HxW", help="input size group (default: the only one)")
    p.add_argument("--epochs", type=positive_int, default=None, help="fc: training epochs (default 50)")
    p.add_argument("--class-weight", choices=("balanced",), default=None,
                   help="inverse class frequency weights (fc, svm, logreg)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="fc: random seed")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fc training matmuls (default fp32; bf16 faster on AMX)")


def classifier_params(args: argparse.Namespace, classifiers, params: dict | None = None) -> dict:
    """Keyword arguments per classifier from the options of ``add_classifier_options``."""
    params = {k: dict(v) for k, v in (params or {}).items()}
    for clf in classifiers:
        params.setdefault(clf, {})
        if args.class_weight and clf in ("fc", "svm", "logreg"):
            params[clf]["class_weight"] = args.class_weight
    if "fc" in params:
        params["fc"]["seed"] = args.seed
        if args.epochs is not None:
            params["fc"]["epochs"] = args.epochs
        if args.precision is not None:
            params["fc"]["precision"] = args.precision
    return params


def run(args: argparse.Namespace) -> int:
    from xfeat.learn.duplicates import near_duplicates_in_cache
    from xfeat.learn.evaluation import PAPER, configurations, evaluate
    from xfeat.learn.operating import DEFAULT_RECALLS
    from xfeat.scale.dask import dask_executor
    from xfeat.features.reading import list_groups
    from xfeat.report import format_tables, write_results
    from xfeat.report.files import REPORT_FILES

    start = time.perf_counter()
    if args.report:  # before the evaluation, not after it
        check_output(args.report, option="--report", kind="folder", writes=REPORT_FILES,
                     inputs=[(args.cache, "the feature cache this command reads")])
    groups = list_groups(args.cache)
    if not groups:
        raise XfeatError(f"{args.cache}: holds no features yet; run xfeat extract first")
    if args.paper:
        backbones, methods, classifiers = PAPER["backbones"], PAPER["methods"], PAPER["classifiers"]
        params = classifier_params(args, classifiers, PAPER["params"])
    else:
        backbones = args.backbone or default_backbone(groups, args.cache)
        methods = args.methods or tuple(dict.fromkeys(g.method for g in groups if g.backbone in backbones))
        classifiers, params = args.clf, classifier_params(args, args.clf)
    configs = configurations(backbones, methods, classifiers, layer=args.layer, size=args.size)
    if not configs:
        held = ", ".join(sorted({f"{g.backbone}/{g.method}" for g in groups}))
        raise XfeatError(f"{args.cache}: nothing to evaluate for backbone(s) {', '.join(backbones)} and classifiers "
                         f"{', '.join(classifiers) or '(none)'}; the cache holds {held}")
    current = dataset_files(args.data, args.jobs) if args.data else None
    recalls = DEFAULT_RECALLS if args.recall is None else args.recall
    options = {"params": params, "recalls": recalls, "inner_folds": args.inner_folds, "current": current}
    if args.scheduler:
        with dask_executor(args.scheduler) as executor:
            results = evaluate(args.cache, configs, executor=executor, **options)
    else:
        results = evaluate(args.cache, configs, jobs=min(args.jobs or os.cpu_count() or 1, len(configs)), **options)
    groups_checked = [(r.config.backbone, r.config.method, r.config.size, r.features.paths) for r in results]
    duplicates = near_duplicates_in_cache(args.cache, groups_checked)
    if args.json:  # stdout is for the script reading the JSON; the tables go to the person
        if not args.quiet:
            say(format_tables(results))
    else:
        print(format_tables(results))
    if args.report:
        written = write_results(results, args.report, near_duplicates=duplicate_rows(duplicates))
        if not args.quiet:
            say(f"wrote {', '.join(str(p) for p in written.values())}")
    if args.json:
        print(json.dumps([r for res in results for r in res.records() if r["bundle"] == "overall"], indent=1))
    if not args.quiet:
        where = f" on the Dask cluster at {args.scheduler}" if args.scheduler else ""
        say(f"evaluated {len(configs)} configurations x {len(results[0].bundles)} bundles in "
            f"{time.perf_counter() - start:.1f} s{where}")
    for note in filter(None, (r.constant_note() for r in results)):
        say(f"xfeat: warning: {note}")
    for note in row_notes(results, args.cache):
        say(f"xfeat: warning: {note}")
    if not args.allow_near_duplicates:
        for what, found in duplicates:
            if found.pairs:
                say(found.warning(what=what))
    window_note = fold_window_note(args.cache, results)
    if window_note:
        say(window_note)
    if any(r.features.random_weights for r in results):
        say("xfeat: warning: features from random weights (--weights none): not ImageNet features")
    return 0


def duplicate_rows(duplicates) -> list[dict]:
    """near_duplicates.csv: one row per pair, with the features it was found in."""
    return [{"features": what, **row} for what, found in duplicates for row in found.rows()]


def fold_window_note(cache, results) -> str:
    """Whether the held-out bundles helped fit the conversion window of a method that has one: "" when no
    evaluated method uses a window (or the quiet case: every fold would get the same rounded window)."""
    from xfeat.convert.methods import NEEDS_STATS
    from xfeat.features.cache import FOLD_WINDOWS_UNAVAILABLE, fold_windows_of_cache

    if not any(r.config.method in NEEDS_STATS for r in results):
        return ""
    folds = fold_windows_of_cache(cache, bundles=sorted({b for r in results for b in r.bundles}))
    if folds is None:
        return f"xfeat: note: {FOLD_WINDOWS_UNAVAILABLE}"
    return f"xfeat: warning: {folds.describe()}" if folds.differing else ""


def row_notes(results, cache) -> list[str]:
    """What ``--data`` left out of each cache group, once per group."""
    notes = {}
    for r in results:
        if r.rows is not None:
            c = r.config
            notes.setdefault((c.backbone, c.method, c.size), r.rows.note(f"{cache}: {c.backbone}/{c.method}"))
    return [n for n in notes.values() if n]


def default_backbone(groups, cache) -> tuple[str, ...]:
    backbones = list(dict.fromkeys(g.backbone for g in groups))
    if len(backbones) == 1:
        return (backbones[0],)
    if "resnet34" in backbones:
        return ("resnet34",)
    raise XfeatError(f"{cache}: holds several backbones ({', '.join(backbones)}); choose with --backbone")
