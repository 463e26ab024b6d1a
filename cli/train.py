"""``xfeat train``: fit a screening model on a cache and save it in a safe model file."""

from __future__ import annotations

import argparse
import time

from xfeat_cli.common import add_common, add_dataset_rows, dataset_files, names_arg, say
from xfeat_cli.evaluate import add_classifier_options, classifier_params, default_backbone, row_notes
from xfeat.errors import XfeatError
from xfeat.io.outputs import check_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="fit a screening model on every cached image and save it",
        description="Validate one (backbone, method, classifier) by leave-one-bundle-out, then fit it on every "
                    "cached image and save all that scoring a raw image needs in MODEL (no pickle).")
    p.add_argument("cache", help="HDF5 feature cache written by xfeat extract")
    p.add_argument("--out", required=True, metavar="MODEL", help="model file to write (e.g. screen.xfeat)")
    p.add_argument("--backbone", default=None, help="backbone (default: the cache's only one, or resnet34)")
    p.add_argument("--method", default="m2", help="conversion method (default m2)")
    p.add_argument("--clf", default="fc", help="fc, svm, logreg, knn, mahalanobis, patchcore (default fc)")
    p.add_argument("--layer", default=None,
                   help="pool, fc1000, local or a join (pool+local); default fc1000 for svm, patches for "
                        "patchcore, else pool")
    add_classifier_options(p)
    add_dataset_rows(p)
    p.add_argument("--target-recall", type=float, default=None, metavar="R",
                   help="flag at least this share of abnormal electrodes (e.g. 0.99), with the nested estimate "
                        "for a new bundle; default: the classifier's own decision")
    p.add_argument("--exclude-bundles", type=names_arg, default=(), metavar="B1,B2",
                   help="leave these bundles out of training and validation (e.g. to try the model on them)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="the backbone weights file, when the cache's features came from --weights PATH "
                        "(recorded as a reference, or bundled with --bundle-weights)")
    p.add_argument("--bundle-weights", action="store_true",
                   help="store the backbone weights in the model file (a self-contained model)")
    p.add_argument("--report", metavar="DIR", help="write the validation report (results, predictions, "
                   "screening.json, report.html)")
    add_common(p, jobs=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from xfeat.learn.evaluation import configurations
    from xfeat.features.reading import list_groups
    from xfeat.screening.model import bundle_weights, cross_validate, fit_model, save_model, screening_of, weights_path_for
    from xfeat.report import format_tables, screening_text, write_results
    from xfeat.report.files import REPORT_FILES

    start = time.perf_counter()
    inputs = [(args.cache, "the feature cache this command reads"),
              (args.weights, "the backbone weights file this command reads (--weights)")]
    check_output(args.out, inputs=inputs)
    if args.report:
        check_output(args.report, option="--report", kind="folder", writes=REPORT_FILES,
                     inputs=[*inputs, (args.out, "the model file this command writes (--out)")])
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise XfeatError(f"--target-recall must be in (0, 1], not {args.target_recall}")
    groups = list_groups(args.cache)
    if not groups:
        raise XfeatError(f"{args.cache}: holds no features yet; run xfeat extract first")
    backbone = args.backbone or default_backbone(groups, args.cache)[0]
    params = classifier_params(args, (args.clf,)).get(args.clf, {})
    configurations((backbone,), (args.method,), (args.clf,), layer=args.layer)  # checks the names
    current = dataset_files(args.data) if args.data else None
    validated = cross_validate(args.cache, backbone, args.method, args.clf, params=params, size=args.size,
                               layer=args.layer, exclude_bundles=args.exclude_bundles,
                               target_recall=args.target_recall, inner_folds=args.inner_folds, current=current)
    model = fit_model(validated, params, target_recall=args.target_recall, exclude_bundles=args.exclude_bundles,
                      cache=args.cache)
    model.weights_path = weights_path_for(model.settings, args.weights)
    if args.bundle_weights:
        bundle_weights(model, args.weights)
    save_model(model, args.out)
    screening = screening_of(model)  # what the model file records is what the person is told
    if not args.quiet:
        say(format_tables([validated]))
    if args.report:
        written = write_results([validated], args.report, screening=screening,
                                heldout=model.validation.get("heldout"))
        if not args.quiet:
            say(f"wrote {', '.join(str(p) for p in written.values())}")
    training = model.training
    say(f"screening: {screening_text(screening, model.validation.get('heldout'))}")
    for note in row_notes([validated], args.cache):
        say(f"xfeat: warning: {note}")
    if not args.quiet:
        say(f"trained {args.clf} on {training['images']} images ({training['abnormal']} abnormal) in "
            f"{len(training['bundles'])} bundles; wrote {args.out} in {time.perf_counter() - start:.1f} s")
    if model.settings.weights_kind == "none":
        say("xfeat: warning: features from random weights (--weights none): not ImageNet features")
    return 0
