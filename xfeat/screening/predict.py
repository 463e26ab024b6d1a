"""Screen new images with a model: conversion, backbone and classifier, exactly as ``xfeat extract`` + the cache.

Features are computed by extraction's own pipeline (``xfeat.features.decoding.image_batches`` and ``batch_taps``),
with the model's conversion statistics and a forward batch of the size extraction used, so an image scored
here gets the score it would get from its cached features, bitwise on the same machine. A cache given with
``cache=`` is read (never written) for the images it already holds with the same content and settings.

A file that cannot be scored gets a ``Prediction`` with its error; the others are still scored.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xfeat.features.cache import CacheError
from xfeat.io.dataset import ImageRecord, image_files, parse_label
from xfeat.io.atomic import atomic_write
from xfeat.io.manifest import manifest_path, read_manifest
from xfeat.errors import DataError, XfeatError, XfeatWarning
from xfeat.learn.threads import one_thread
from xfeat.features.decoding import Work, image_batches
from xfeat.features.extract import ExtractConfig, batch_taps, tap_runner
from xfeat.features.reading import fc1000, load_features, parse_layer
from xfeat.features.tiles import Tiling
from xfeat.io.hashing import file_sha256
from xfeat.io.images import MAX_PIXELS
from xfeat.features.engines import resolve_engine
from xfeat.features.inference import resolve_precision, select_device
from xfeat.screening.model import ScreeningModel, model_extractor

PREDICTION_COLUMNS = ("path", "score", "decision", "threshold", "error", "bundle", "label", "source", "map")


@dataclass(frozen=True)
class InputImage:
    """An image to score; bundle and label are known when it came from a manifest that has them."""

    path: Path
    bundle: str = ""
    label: int | None = None


@dataclass(frozen=True)
class Prediction:
    path: str
    score: float  # NaN when the file could not be scored
    decision: str  # "abnormal" (flagged for a look), "normal", or "" with an error
    threshold: float
    error: str = ""
    bundle: str = ""
    label: int | None = None
    source: str = ""  # "cache" or "computed"
    map: str = ""  # the anomaly map written for it (``maps=``)


def gather_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[InputImage]:
    """Files as given, every image below a folder (``image_files``), and the rows of ``.csv`` manifests
    (a ``path`` column; ``bundle`` and ``label`` kept when present). A path listed twice is scored once."""
    found: dict[Path, InputImage] = {}
    for source in map(Path, inputs):
        if source.is_dir():
            images = [InputImage(p.resolve()) for p in image_files(source)]
        elif source.suffix.lower() == ".csv" and source.is_file():
            images = read_prediction_manifest(source)
        else:  # a file, or a path that does not exist: its row will say so
            images = [InputImage(source.resolve())]
        for image in images:
            found.setdefault(image.path, image)
    return list(found.values())


def read_prediction_manifest(manifest: Path) -> list[InputImage]:
    """A CSV with a ``path`` column (relative paths from the CSV's folder), optional ``bundle`` and ``label``."""
    rows = read_manifest(manifest, ("path",))
    if not rows:
        raise DataError(manifest, "manifest lists no images; expected a header with a path column and rows")
    images = []
    for row in rows:
        values, where = row.values, f"{manifest}, line {row.line}"
        if not values["path"]:
            raise DataError(where, "empty path")
        label = values.get("label", "")
        images.append(InputImage(manifest_path(manifest, values["path"]), values.get("bundle", ""),
                                 parse_label(label, where) if label else None))
    return images


def predict(model: ScreeningModel, images: Sequence[InputImage], *, cache: str | os.PathLike[str] | None = None,
            weights: str | os.PathLike[str] | None = None, device: str = "auto", workers: int | None = None,
            progress: Callable[[int], None] | None = None, max_pixels: int = MAX_PIXELS,
            evidence: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> list[Prediction]:
    """Score ``images`` (see the module docstring); ``progress(n)`` after each batch of n images. An image
    declaring more than ``max_pixels`` pixels gets an error row, refused before it is decoded.

    ``evidence(i, pixels, grid)`` is called for each image ``images[i]`` scored, with its converted 8-bit pixels
    at the model's input size ([H, W] or [H, W, 3]) and where in them the score comes from ([rows, columns], on
    the scale of ``evidence_threshold``): what anomaly maps are drawn from. Only models with local evidence
    (``has_local_evidence``: PatchCore) have it; every image is then computed, since a map needs its pixels."""
    if evidence is not None and not has_local_evidence(model):
        raise XfeatError(f"a {model.classifier} model has no local evidence to draw; anomaly maps come from "
                         "patch scorers (xfeat train --clf patchcore)")
    features: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    hashes = {}
    for i, image in enumerate(images):
        try:
            hashes[i] = file_sha256(image.path)
        except FileNotFoundError:
            errors[i] = "no such file"
        except OSError as e:
            errors[i] = f"cannot read ({e.strerror or e})"
    if cache is not None and evidence is None:
        features.update(_cached(model, cache, hashes))
        if progress and features:
            progress(len(features))
    todo = [i for i in range(len(images)) if i not in features and i not in errors]
    if todo:
        computed, failed = _compute(model, [images[i] for i in todo], weights, device, workers, progress,
                                    max_pixels, evidence and (lambda j, pixels, grid: evidence(todo[j], pixels, grid)))
        features.update({todo[j]: f for j, f in computed.items()})
        errors.update({todo[j]: problem for j, problem in failed.items()})
    if progress and errors:
        progress(len(errors))
    scored = sorted(features)
    scores = {}
    if scored:
        with one_thread():  # the evaluation's arithmetic, so scores match it bitwise
            values = model.scores(np.stack([features[i] for i in scored]))
        scores = dict(zip(scored, values))
    predictions = []
    for i, image in enumerate(images):
        if i in scores:
            decision = "abnormal" if model.decide(scores[i]) else "normal"
            predictions.append(Prediction(str(image.path), float(scores[i]), decision, model.threshold, "",
                                          image.bundle, image.label, "cache" if i not in todo else "computed"))
        else:
            predictions.append(Prediction(str(image.path), math.nan, "", model.threshold,
                                          errors.get(i, "not scored"), image.bundle, image.label))
    return predictions


def has_local_evidence(model: ScreeningModel) -> bool:
    """True when the model can say where in an image its score comes from (``patch_scores``)."""
    return hasattr(model.estimator, "patch_scores")


def evidence_threshold(model: ScreeningModel) -> float:
    """The local evidence (a patch's distance to the nearest normal patch) at which the model flags an image:
    its score is that distance's maximum minus the estimator's own threshold, flagged above ``model.threshold``."""
    return float(model.threshold + model.estimator.threshold_)


def _layer_rows(layer: str, taps: dict[str, np.ndarray], fc_weight: np.ndarray, fc_bias: np.ndarray) -> np.ndarray:
    """The model's layer from the taps of the unflipped images, as ``load_features`` builds it from the cache."""
    parts = []
    for part in parse_layer(layer):
        if part == "patches":
            return taps["patches"]
        parts.append(fc1000(taps["pool"][:, 0], fc_weight, fc_bias) if part == "fc1000" else taps[part][:, 0])
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def _cached(model: ScreeningModel, cache, hashes: dict[int, str]) -> dict[int, np.ndarray]:
    """Features of these files (by content) that a cache holds with exactly the model's settings."""
    s = model.settings
    try:
        fs = load_features(cache, s.backbone, s.method, layer=model.layer, size=s.size_token)
    except CacheError as e:
        warnings.warn(f"not using the cache: {e}", XfeatWarning, stacklevel=3)
        return {}
    if fs.settings != s:
        warnings.warn(f"{cache}: its {s.backbone}/{s.method} features were made with other settings than the "
                      "model's; computing them", XfeatWarning, stacklevel=3)
        return {}
    row_of = {sha: r for r, sha in enumerate(fs.sha256)}
    return {i: fs.X[row_of[sha]] for i, sha in hashes.items() if sha in row_of}


def _compute(model: ScreeningModel, images: Sequence[InputImage], weights, device_name: str,
             workers: int | None, progress, max_pixels: int, evidence: Callable | None = None
             ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Features of the "none" flip variant, through extraction's pipeline with its forward-batch size."""
    s = model.settings
    size = (s.input_height, s.input_width)
    tiles = Tiling(*map(int, s.tiles.split("x")), size, s.tile_overlap, s.tile_combine) if s.tiles else None
    parts = parse_layer(model.layer)
    taps = tuple(t for t in ("pool", "local", "patches") if t == "pool" or t in parts)
    patches = json.loads(s.tap_params) if "patches" in parts else None
    device = select_device(device_name)
    try:
        precision = resolve_precision(s.precision, device)
    except XfeatError:
        warnings.warn(f"the model's features were computed in {s.precision}, which this device does not run; "
                      "using fp32 (scores will differ slightly)", XfeatWarning, stacklevel=3)
        precision = "fp32"
    try:
        engine = resolve_engine(s.engine, device)
    except XfeatError as e:
        warnings.warn(f"the model's features were computed by {s.engine}: {e}; using torch (scores will differ "
                      "slightly)", XfeatWarning, stacklevel=3)
        engine = "torch"
    extractor = model_extractor(model, weights)
    run = tap_runner(extractor, taps, device, precision, engine)
    config = ExtractConfig(size=size, flips=s.n_flips, tiles=tiles)
    forward_batch = config.forward_batch()
    work = [Work(ImageRecord(image.path, image.bundle, image.label or 0, image.path.name), (s.method,))
            for image in images]
    fc_weight, fc_bias = extractor.fc_weight.numpy(), extractor.fc_bias.numpy()
    features, failed = {}, {}
    per_batch = config.images_per_batch() * s.n_flips  # unflipped only: as many images as extraction's inputs
    for batch in image_batches(work, config.input_size, model.window_stats, per_batch, workers, max_pixels=max_pixels):
        good = [item for item in batch if not item["problem"]]
        failed.update({item["index"]: item["problem"] for item in batch if item["problem"]})
        if good:
            x = torch.from_numpy(np.stack([item["pixels"][s.method] for item in good]))
            X = _layer_rows(model.layer, batch_taps(run, x, ("none",), forward_batch, tiles, taps, patches),
                            fc_weight, fc_bias)
            features.update({item["index"]: row for item, row in zip(good, X)})
            if evidence is not None:
                grids = model.estimator.patch_scores(X)
                for item, grid in zip(good, grids):
                    pixels = item["pixels"][s.method]
                    evidence(item["index"], pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0), grid)
        if progress:
            progress(len(good))
    return features, failed


def write_predictions(predictions: Sequence[Prediction], path: str | os.PathLike[str]) -> None:
    """predictions.csv, written to a temporary name and renamed: never a half-written file."""
    try:
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(PREDICTION_COLUMNS)
            for p in predictions:
                writer.writerow([p.path, "" if math.isnan(p.score) else repr(p.score), p.decision,
                                 repr(p.threshold), p.error, p.bundle, "" if p.label is None else p.label, p.source,
                                 p.map])
    except OSError as e:
        raise DataError(path, f"cannot write predictions ({e.strerror or e})") from None


__all__ = ["InputImage", "Prediction", "gather_inputs", "read_prediction_manifest", "predict", "write_predictions"]
