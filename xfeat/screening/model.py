"""A screening model: everything that scoring a raw 16-bit image needs, trained on a cache, kept in a safe file.

``train_model`` fits one (backbone, method, classifier) on every cached image of the chosen bundles, after
a leave-one-bundle-out run on the same images that gives the metrics it is chosen on and, with
``target_recall``, the decision threshold. ``save_model`` / ``load_model`` keep it in an xfeat model file
(``xfeat.screening.model_file``: a sealed zip of JSON and safetensors, never pickle; the classifier is stored by its
learned parameters, ``xfeat.screening.estimator_state``). Scoring images is ``xfeat.screening.predict``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator

from xfeat.features.extractor import FeatureExtractor, build_extractor, extractor_from_state
from xfeat.features.weights import WeightsInfo, read_state_dict, weights_file_for
from xfeat.io.hashing import file_sha256
from xfeat.features.cache import GroupSettings
from xfeat.learn.binary import decision_threshold, fit_on, screening_scale
from xfeat.learn.classifiers import FCHead, abnormal_score, make_classifier
from xfeat.learn.operating import OperatingPoint, recall_threshold
from xfeat.errors import DataError, XfeatError
from xfeat.screening.estimator_state import estimator_from_state, estimator_state
from xfeat.learn.evaluation import DEFAULT_LAYER, Configuration, ConfigurationResult, evaluate_configuration
from xfeat.learn.threads import one_thread
from xfeat.features.reading import FeatureSet
from xfeat.screening.model_file import read_model_file, write_model_file
from xfeat.io.jsonable import plain
from xfeat.screening.threshold import ScreeningOutcome, screening_outcome
from xfeat.convert.stats import WindowStats

MODEL_KIND = "xfeat screening model"
BUNDLED_WEIGHTS = "weights/backbone.safetensors"
RULE = "abnormal when score > threshold"


@dataclass
class ScreeningModel:
    """A fitted classifier with how its features are made (``settings``: backbone, weights identity, method,
    input size, flips, precision; ``window_stats``: the conversion's G_min/G_max and equalisation curve), its
    decision threshold on ``abnormal_score``, and what it was trained and validated on."""

    settings: GroupSettings
    layer: str
    classifier: str
    estimator: BaseEstimator
    threshold: float
    window_stats: WindowStats | None = None
    target_recall: float | None = None
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    weights_path: str = ""  # where the backbone weights were at training time: a reference, not a promise
    bundled_weights: bytes | None = None  # the backbone's state dict as safetensors, with --bundle-weights

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Abnormality scores of features [N, D] (the layer this model was trained on): higher = more abnormal."""
        return abnormal_score(self.estimator, X)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """True = abnormal (flag for a person to look at)."""
        return np.asarray(scores) > self.threshold


def cross_validate(cache: str | os.PathLike[str], backbone: str, method: str, classifier: str, *,
                   params: dict | None = None, size: str | None = None, layer: str | None = None,
                   exclude_bundles: Sequence[str] = (), target_recall: float | None = None,
                   inner_folds: int | None = None, current: Mapping[str, str] | None = None) -> ConfigurationResult:
    """Leave-one-bundle-out on the images a model would be trained on: its metrics and out-of-fold scores, and
    with ``target_recall`` the nested estimate of what that target achieves on a new bundle."""
    config = Configuration(backbone, method, classifier, layer or DEFAULT_LAYER.get(classifier, "pool"), size or "")
    recalls = () if target_recall is None else (target_recall,)
    return evaluate_configuration(cache, config, params, exclude_bundles=exclude_bundles, recalls=recalls,
                                  inner_folds=inner_folds, current=current)


def fit_model(validated: ConfigurationResult, params: dict | None = None, *, target_recall: float | None = None,
              exclude_bundles: Sequence[str] = (), cache: str | os.PathLike[str] = "") -> ScreeningModel:
    """Fit the validated configuration on all its images (``exclude_bundles`` only names what was left out).

    The threshold is 0 on the classifier's decision function (its own decision), or, with ``target_recall``,
    the highest one that flags at least that share of abnormal images in the out-of-fold screening scores
    (``xfeat.learn.binary.screening_score``: each fold model's scores on the scale anchored by its own training
    images), carried to the shipped model's decision function through its own anchors. The
    recall to expect on a new bundle is the nested estimate of ``validated`` (``expected``), which ran this very
    procedure with each bundle held out.
    """
    fs, config = validated.features, validated.config
    with one_thread():  # the same arithmetic as the evaluation's folds
        estimator = _fit(fs, config.clf, dict(params or {}))
    if target_recall is None:  # the fold models' own decisions
        threshold, expected = 0.0, None
        screening = screening_outcome(validated.scores, fs.y, fs.groups, threshold)
    else:
        cut = recall_threshold(validated.screening_scores, fs.y, target_recall)
        with one_thread():
            threshold = decision_threshold(estimator, cut, screening_scale(estimator, fs.X, fs.y))
        expected = validated.operating_point(target_recall)
        outcome = screening_outcome(validated.screening_scores, fs.y, fs.groups, cut, target_recall)
        screening = dataclasses.replace(outcome, threshold=threshold, score_threshold=cut)
    return ScreeningModel(
        settings=fs.settings, layer=config.layer, classifier=config.clf, estimator=estimator,
        threshold=threshold, window_stats=fs.window_stats, target_recall=target_recall,
        training=_training_summary(cache, fs, exclude_bundles), validation=_validation(validated, screening, expected))


def train_model(cache: str | os.PathLike[str], backbone: str, method: str, classifier: str, *,
                params: dict | None = None, size: str | None = None, layer: str | None = None,
                target_recall: float | None = None, exclude_bundles: Sequence[str] = (),
                inner_folds: int | None = None, current: Mapping[str, str] | None = None) -> ScreeningModel:
    """``cross_validate`` then ``fit_model``: a model trained on every cached image of the group but those of
    ``exclude_bundles`` (e.g. a bundle held back to try the model on)."""
    validated = cross_validate(cache, backbone, method, classifier, params=params, size=size, layer=layer,
                               exclude_bundles=exclude_bundles, target_recall=target_recall,
                               inner_folds=inner_folds, current=current)
    return fit_model(validated, params, target_recall=target_recall, exclude_bundles=exclude_bundles, cache=cache)


def screening_of(model: ScreeningModel) -> ScreeningOutcome:
    """The model's screening outcome on its out-of-fold scores, as stored in the model."""
    data = dict(model.validation["screening"])
    for key in ("recall_interval", "cleared_interval"):
        data[key] = tuple(math.nan if v is None else v for v in data[key])
    return ScreeningOutcome(**{k: math.nan if v is None and k in ("recall", "cleared", "flagged") else v
                               for k, v in data.items()})


def _fit(fs: FeatureSet, classifier: str, params: dict) -> BaseEstimator:
    if classifier == "fc":
        return FCHead(fc_weight=fs.fc_weight, fc_bias=fs.fc_bias, **params).fit(fs.X, fs.y)
    return fit_on(make_classifier(classifier, **params), fs.X, fs.y, fs.groups)


def _training_summary(cache, fs: FeatureSet, excluded: Sequence[str]) -> dict:
    bundles = {b: {"images": int(np.sum(fs.groups == b)), "abnormal": int(np.sum(fs.y[fs.groups == b]))}
               for b in sorted(set(fs.groups.tolist()))}
    return {"cache": str(Path(cache).resolve()) if cache else "", "images": int(len(fs.y)), "abnormal": int(fs.y.sum()),
            "bundles": bundles, "excluded_bundles": list(excluded),
            "trained": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _validation(result: ConfigurationResult, screening: ScreeningOutcome, expected: OperatingPoint | None) -> dict:
    """The leave-one-bundle-out metrics at the classifier's own threshold, the screening at the model's on the
    out-of-fold scores, and (with a recall target) the nested estimate of it on a new bundle."""
    overall = [r for r in result.records() if r["bundle"] == "overall"][0]
    keep = ("n", "tp", "fp", "tn", "fn", "tpr", "tnr", "balanced_accuracy", "auroc", "ci_low", "ci_high")
    per_bundle = [{k: r[k] for k in ("bundle", *keep, "single_class")} for r in result.records()
                  if r["bundle"] != "overall"]
    heldout = None if expected is None else {
        "protocol": "nested leave-one-bundle-out: each bundle held out, its threshold chosen on the other "
                    "bundles' own out-of-fold scores", "target_recall": expected.target,
        "recall": expected.recall, "recall_interval": list(expected.interval("tpr")),
        "cleared": expected.cleared, "cleared_interval": list(expected.interval("tnr")),
        "n_abnormal": expected.total.tp + expected.total.fn, "n_normal": expected.total.tn + expected.total.fp}
    return plain({"protocol": "leave-one-bundle-out", **{k: overall[k] for k in keep},
                  "per_bundle": per_bundle, "screening": screening.to_dict(), "heldout": heldout})


# --------------------------------------------------------------------------------------------- weights


def bundle_weights(model: ScreeningModel, weights: str | os.PathLike[str] | None = None) -> None:
    """Put the backbone's weights into the model (as safetensors), after checking they are the ones its
    features came from: ``weights`` (a file), or where they were at training time."""
    from safetensors.torch import save

    s = model.settings
    if s.weights_kind == "none":
        raise XfeatError("the features came from random weights (--weights none): there are no weights to bundle")
    path = weights_path_for(s, weights) or model.weights_path
    if not path or not Path(path).is_file():
        raise XfeatError(f"cannot bundle the backbone weights ({s.weights_name}): file {path or '(unknown)'} not "
                         "found; give it with --weights")
    if file_sha256(path) != s.weights_sha256:
        raise DataError(path, f"not the weights the features were computed with ({s.weights_name}, sha256 "
                              f"{s.weights_sha256[:12]}...)")
    model.bundled_weights = save({k: v.contiguous().clone() for k, v in read_state_dict(path).items()})
    model.weights_path = str(path)


def model_extractor(model: ScreeningModel, weights: str | os.PathLike[str] | None = None) -> FeatureExtractor:
    """The backbone the model's features came from: bundled weights, ``weights`` (a file), or the ImageNet
    weights / the file recorded at training time. Refused when its sha256 is not the one the model recorded."""
    s = model.settings
    if model.bundled_weights is not None and weights is None:
        from safetensors.torch import load

        state = load(model.bundled_weights)
        return extractor_from_state(s.backbone, state, WeightsInfo(s.weights_kind, s.weights_name,
                                                                     s.weights_sha256, "(bundled in the model)"))
    if s.weights_kind == "none":
        return build_extractor(s.backbone, "none")
    source = weights or ("imagenet" if s.weights_kind == "imagenet" else model.weights_path)
    if not source:
        raise XfeatError(f"the model's backbone weights ({s.weights_name}) are not bundled; give them with --weights")
    extractor = build_extractor(s.backbone, source)
    if extractor.weights.sha256 != s.weights_sha256:
        raise DataError(extractor.weights.path or source, f"sha256 {extractor.weights.sha256[:12]} is not that of "
                        f"the weights the model was trained on ({s.weights_name}, {s.weights_sha256[:12]})")
    return extractor


def weights_path_for(settings: GroupSettings, weights: str | os.PathLike[str] | None) -> str:
    """Where the weights of a cache group are: ``weights`` when given, else torch's cache for ImageNet ones."""
    if weights:
        return str(Path(weights).expanduser().resolve())
    if settings.weights_kind == "imagenet":
        return str(weights_file_for(settings.backbone))
    return ""


# ------------------------------------------------------------------------------------------ save / load


def save_model(model: ScreeningModel, path: str | os.PathLike[str]) -> None:
    """Write the model file (atomically; see ``xfeat.screening.model_file`` for the format)."""
    state, arrays = estimator_state(model.classifier, model.estimator)
    metadata = {
        "kind": MODEL_KIND,
        "features": {**model.settings.attrs(), "layer": model.layer},
        "conversion": {"method": model.settings.method,
                       "window_stats": model.window_stats.to_dict() if model.window_stats else None},
        "weights": {"kind": model.settings.weights_kind, "name": model.settings.weights_name,
                    "sha256": model.settings.weights_sha256, "path": model.weights_path,
                    "bundled": BUNDLED_WEIGHTS if model.bundled_weights is not None else ""},
        "classifier": {"name": model.classifier, "state": state},
        "threshold": {"value": model.threshold, "rule": RULE, "score": "decision_function",
                      "target_recall": model.target_recall},
        "training": model.training,
        "validation": model.validation,
    }
    files = {BUNDLED_WEIGHTS: model.bundled_weights} if model.bundled_weights is not None else {}
    write_model_file(path, plain(metadata), {f"classifier/{k}": v for k, v in arrays.items()}, files)


def load_model(path: str | os.PathLike[str]) -> ScreeningModel:
    """Read a model file; anything but an intact xfeat screening model is refused with a DataError."""
    content = read_model_file(path)
    meta = content.metadata
    try:
        if meta.get("kind") != MODEL_KIND:
            raise DataError(path, f"not a screening model (kind {meta.get('kind')!r})")
        features = dict(meta["features"])
        layer = features.pop("layer")
        settings = GroupSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in features.items()})
        prefix = "classifier/"
        arrays = {k[len(prefix):]: v for k, v in content.arrays.items() if k.startswith(prefix)}
        clf = meta["classifier"]
        estimator = estimator_from_state(clf["name"], clf["state"], arrays)
        stats = meta["conversion"]["window_stats"]
        bundled = meta["weights"]["bundled"]
        if bundled and bundled not in content.files:
            raise DataError(path, f"the bundled weights {bundled} are missing")
        return ScreeningModel(
            settings=settings, layer=layer, classifier=clf["name"], estimator=estimator,
            threshold=float(meta["threshold"]["value"]), target_recall=meta["threshold"]["target_recall"],
            window_stats=WindowStats.from_dict(stats) if stats else None, training=meta["training"],
            validation=meta["validation"], weights_path=meta["weights"]["path"],
            bundled_weights=content.files[bundled] if bundled else None)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(path, f"malformed model file ({type(e).__name__}: {e})") from None


__all__ = ["ScreeningModel", "cross_validate", "fit_model", "train_model", "screening_of", "save_model",
           "load_model", "bundle_weights", "model_extractor", "weights_path_for"]
