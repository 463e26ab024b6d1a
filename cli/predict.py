"""``xfeat predict``: screen new images with a model; one CSV row per image."""

from __future__ import annotations

import argparse
from pathlib import Path
from collections import Counter

from xfeat_cli.common import add_common, add_max_pixels, non_negative_int, progress_bar, say


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="score new images with a model and flag the abnormal ones",
        description="Convert, run the backbone and the classifier on each image, as the model was trained. "
                    "A file that cannot be scored gets a row with its error; the exit status is then 1.")
    p.add_argument("model", help="model file written by xfeat train")
    p.add_argument("inputs", nargs="+", help="image files, folders (every TIFF, PNG, JPEG and BMP below) or CSV "
                                             "manifests (a path column; bundle and label kept when present)")
    p.add_argument("--out", required=True, metavar="CSV", help="predictions to write (path, score, decision, "
                                                               "threshold, error, ...)")
    p.add_argument("--cache", default=None, help="reuse features of this cache for the images it holds")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="backbone weights file, when the model does not bundle them and they moved")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                   help="decoding processes overlapped with inference (default 2; 0 or 1 decode in-process)")
    p.add_argument("--maps", metavar="DIR", default=None,
                   help="write each image's anomaly map (PNG) into DIR: patch-scorer models (--clf patchcore)")
    add_max_pixels(p)
    add_common(p, jobs=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from xfeat.errors import XfeatError
    from xfeat.io.outputs import check_output
    from xfeat.screening.model import load_model
    from xfeat.screening.predict import (evidence_threshold, gather_inputs, has_local_evidence, predict,
                                         write_predictions)

    images = gather_inputs(args.inputs)
    check_output(args.out, inputs=[
        (args.model, "the model file this command reads"), (args.cache, "the feature cache this command reads"),
        (args.weights, "the backbone weights file this command reads (--weights)"),
        *((source, "a manifest this command reads" if source.lower().endswith(".csv") else
           "an image this command scores") for source in args.inputs),
        *((image.path, "an image this command scores") for image in images)],
        data_roots=[source for source in args.inputs if Path(source).is_dir()])
    if args.maps:
        check_output(args.maps, option="--maps", kind="folder",
                     data_roots=[source for source in args.inputs if Path(source).is_dir()])
    model = load_model(args.model)
    if not images:
        raise XfeatError(f"no images found in {', '.join(args.inputs)} (.tif, .tiff, .png, .jpg, .jpeg or .bmp)")
    maps = None
    if args.maps:
        if not has_local_evidence(model):
            raise XfeatError(f"{args.model}: a {model.classifier} model has no local evidence to draw; anomaly maps "
                             "come from patch scorers (xfeat train --clf patchcore)")
        from xfeat.report.maps import MapFolder

        maps = MapFolder(args.maps, evidence_threshold(model))
    with progress_bar(len(images), "predict", args.quiet) as bar:
        predictions = predict(model, images, cache=args.cache, weights=args.weights, device=args.device,
                              workers=args.workers, progress=bar.update, max_pixels=args.max_pixels,
                              evidence=(lambda i, pixels, grid: maps.write(i, images[i].path, pixels, grid))
                              if maps else None)
    if maps:
        from dataclasses import replace

        predictions = [replace(p, map=str(maps.written.get(i, ""))) for i, p in enumerate(predictions)]
    write_predictions(predictions, args.out)
    failed = [p for p in predictions if p.error]
    for p in failed:
        say(f"xfeat: error: {p.path}: {p.error}")
    decisions = Counter(p.decision for p in predictions if not p.error)
    if not args.quiet:
        say(f"scored {len(predictions) - len(failed)} of {len(predictions)} images: {decisions['abnormal']} flagged "
            f"abnormal, {decisions['normal']} cleared (threshold {model.threshold:.6g}); wrote {args.out}"
            + (f" and {len(maps.written)} anomaly maps in {args.maps}" if maps else ""))
    return 1 if failed else 0
