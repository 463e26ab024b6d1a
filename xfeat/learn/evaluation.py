"""Leave-one-bundle-out evaluation of classifiers on cached features.

For every (backbone, method, classifier): train on all bundles but one, score the held-out bundle, for
every bundle. Everything that learns (scalers, thresholds included) lives inside the classifier, so it is
fitted on the training bundles only. With recall targets, each configuration also fits the inner models of a
nested leave-one-bundle-out, whose thresholds give the operating points (``xfeat.learn.operating``). The ``fc``
heads of all folds train together (``FCHead.fit_many``); the results are the same as training them one by one,
and do not depend on ``jobs``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from joblib import delayed
from sklearn.base import clone

from xfeat.errors import XfeatError
from xfeat.features.reading import FeatureSet, RowCheck, load_features, only_current, parse_layer
from xfeat.io.processes import tied_parallel, workers_ignore_ctrl_c
from xfeat.learn.binary import fit_on, screening_scale, screening_score
from xfeat.learn.classifiers import CLASSIFIERS, FCHead, abnormal_score, make_classifier
from xfeat.learn.metrics import Counts, auroc, bundle_bootstrap
from xfeat.learn.operating import (DEFAULT_RECALLS, NestedPlan, OperatingPoint, nested_plan, nested_thresholds,
                                   operating_point, recall_key)
from xfeat.learn.threads import one_thread

# The ResNet-50 paper's SVM used the fc1000 layer; the fc head starts from the pooled features.
DEFAULT_LAYER = {"svm": "fc1000", "patchcore": "patches"}
ONE_CLASS = ("knn", "mahalanobis", "patchcore")  # learn from normal images only
PAPER = {"backbones": ("resnet34",), "methods": ("m1", "m2", "m3", "m4"), "classifiers": ("fc",),
         "params": {"fc": {"epochs": 50, "lr": 1e-3, "lr_step": 10}}}


@dataclass(frozen=True)
class Configuration:
    backbone: str
    method: str
    clf: str
    layer: str
    size: str


@dataclass
class ConfigurationResult:
    """Out-of-fold scores and decisions of one configuration, with its per-bundle and pooled metrics."""

    config: Configuration
    features: FeatureSet
    scores: np.ndarray
    decisions: np.ndarray
    bundles: list[str] = field(default_factory=list)
    counts: dict[str, Counts] = field(default_factory=dict)
    aurocs: dict[str, float] = field(default_factory=dict)
    screening_scores: np.ndarray | None = None  # what recall thresholds are chosen on (``screening_score``)
    operating: list[OperatingPoint] = field(default_factory=list)  # nested, one per recall target
    rows: RowCheck | None = None  # rows left out because the dataset changed (``--data``)
    evidence: np.ndarray | None = None  # patch scorers: out-of-fold patch scores [N, rows, columns] (anomaly maps)
    evidence_thresholds: np.ndarray | None = None  # per image: the patch score above which its fold model flags

    @property
    def overall(self) -> Counts:
        return sum(self.counts.values(), Counts())

    @property
    def overall_auroc(self) -> float:
        return auroc(self.features.y, self.scores)

    @property
    def mean_bundle_auroc(self) -> float:
        """The mean of the per-bundle AUROCs where a bundle holds both classes (NaN when none does): unlike the
        pooled AUROC, it never rewards offsets between folds' scores."""
        values = [a for a in self.aurocs.values() if not math.isnan(a)]
        return float(np.mean(values)) if values else math.nan

    def operating_point(self, target: float) -> OperatingPoint | None:
        return next((p for p in self.operating if p.target == target), None)

    def interval(self, seed: int = 0) -> tuple[float, float]:
        return bundle_bootstrap(list(self.counts.values()), seed=seed)

    @property
    def constant_bundles(self) -> list[str]:
        """Held-out bundles (of 2+ images) in which every image got the same score: the fold's classifier learned
        a constant. Their offsets, not any ranking, then drive the pooled AUROC, even below chance."""
        groups = self.features.groups
        return [b for b in self.bundles
                if np.sum(groups == b) > 1 and np.ptp(self.scores[groups == b]) == 0]

    def constant_note(self) -> str:
        """A warning in words when ``constant_bundles`` is not empty, else ""."""
        if not self.constant_bundles:
            return ""
        c = self.config
        return (f"{c.backbone} {c.method} {c.clf}: the classifier scored every image of {len(self.constant_bundles)} "
                f"of {len(self.bundles)} held-out bundles alike (it learned a constant); the pooled AUROC then "
                f"reflects per-fold offsets, not a ranking")

    def records(self) -> list[dict]:
        """One record per bundle and one with bundle ``overall``: what results.csv/json hold."""
        fs, cfg = self.features, self.config
        size = f"{fs.settings.input_height}x{fs.settings.input_width}"
        common = {"backbone": cfg.backbone, "method": cfg.method, "clf": cfg.clf, "layer": cfg.layer,
                  "size": size, "weights": fs.settings.weights_name, "random_weights": fs.random_weights}
        rows = []
        for bundle in self.bundles:
            c = self.counts[bundle]
            held_out = {k: v for p in self.operating for k, v in p.bundle_fields(bundle).items()}
            rows.append({**common, "bundle": bundle, **_metrics(c), "auroc": self.aurocs[bundle],
                         "mean_bundle_auroc": math.nan, "single_class": c.single_class, "ci_low": math.nan,
                         "ci_high": math.nan, **held_out})
        low, high = self.interval()
        held_out = {k: v for p in self.operating for k, v in p.fields().items()}
        rows.append({**common, "bundle": "overall", **_metrics(self.overall), "auroc": self.overall_auroc,
                     "mean_bundle_auroc": self.mean_bundle_auroc, "single_class": "", "ci_low": low,
                     "ci_high": high, **held_out})
        return rows

    def predictions(self) -> list[dict]:
        """One record per image: its out-of-fold score and decision, the screening score recall thresholds are
        chosen on and, per recall target, whether its bundle's nested threshold flagged it (``flagged_95``)."""
        cfg, fs = self.config, self.features
        screening = self.scores if self.screening_scores is None else self.screening_scores
        flagged = {f"flagged_{recall_key(p.target)}": _flags(p, fs.groups, screening) for p in self.operating}
        return [{"backbone": cfg.backbone, "method": cfg.method, "clf": cfg.clf, "layer": cfg.layer,
                 "path": fs.paths[i], "bundle": fs.groups[i], "label": int(fs.y[i]), "score": float(self.scores[i]),
                 "decision": int(self.decisions[i]), "screening_score": float(screening[i]),
                 **{k: v[i] for k, v in flagged.items()}}
                for i in range(len(fs.y))]


def _flags(point: OperatingPoint, groups: np.ndarray, scores: np.ndarray) -> list:
    """1 / 0 per image: above its bundle's nested threshold; None where the threshold is undefined."""
    thresholds = np.array([point.thresholds.get(str(g), math.nan) for g in groups])
    return [None if math.isnan(t) else int(s > t) for s, t in zip(scores, thresholds)]


def _metrics(c: Counts) -> dict:
    return {"n": c.n, "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn, "tpr": c.tpr, "tnr": c.tnr,
            "balanced_accuracy": c.balanced_accuracy}


def _train_masks(fs: FeatureSet, excluded: Sequence[frozenset[str]], *, normal_only: bool = False
                 ) -> list[np.ndarray | None]:
    """The training rows of a model fitted without each set of bundles; None where that model cannot be fitted:
    one class left (or, ``normal_only`` for a one-class score, fewer than 2 normal rows)."""
    masks = []
    for bundles in excluded:
        train = ~np.isin(fs.groups, list(bundles))
        labels = fs.y[train]
        feasible = np.sum(labels == 0) >= 2 if normal_only else len(np.unique(labels)) == 2
        masks.append(train if feasible else None)
    return masks


def _fit_models(fs: FeatureSet, clf: str, params: dict, masks: Sequence[np.ndarray], *,
                scores_only: bool = False) -> list:
    """One fitted classifier per training mask; ``fc`` heads train together (``FCHead.fit_many``). With
    ``scores_only`` a one-class model fits its normal model only (its screening score needs no threshold)."""
    if not masks:
        return []
    if clf == "fc":
        return FCHead(fc_weight=fs.fc_weight, fc_bias=fs.fc_bias, **params).fit_many(fs.X, fs.y, list(masks))
    template = make_classifier(clf, **params)
    if scores_only and clf in ONE_CLASS:
        return [clone(template).fit_normal(fs.X[m], fs.y[m]) for m in masks]
    return [fit_on(clone(template), fs.X[m], fs.y[m], fs.groups[m]) for m in masks]


@dataclass
class CrossFit:
    """Out-of-fold scores of leave-one-bundle-out and, for nested operating points, each inner model's
    screening scores of the bundles it left out."""

    scores: np.ndarray  # abnormal_score of each image's fold model
    decisions: np.ndarray  # the fold model's own decision
    screening_scores: np.ndarray  # screening_score of each image's fold model: what thresholds are chosen on
    plan: NestedPlan | None = None
    excluded_scores: dict[frozenset[str], np.ndarray | None] = field(default_factory=dict)
    evidence: np.ndarray | None = None  # patch scorers: each image's patch scores [N, rows, columns], out of fold
    evidence_thresholds: np.ndarray | None = None  # the distance above which its fold model flags an image


def leave_one_bundle_out(fs: FeatureSet, clf: str, params: dict | None = None, *, nested: bool = False,
                         inner_folds: int | None = None) -> CrossFit:
    """Out-of-fold abnormality scores and decisions for every image, one fold per bundle; with ``nested``, also
    the inner models of ``xfeat.learn.operating`` (fitted after, and apart from, the outer ones, so these stay the
    same bits with or without them)."""
    params = dict(params or {})
    bundles = sorted(set(fs.groups))
    if len(bundles) < 2:
        raise XfeatError(f"leave-one-bundle-out needs at least 2 bundles; the cache holds {len(bundles)}")
    outer = _train_masks(fs, [frozenset((b,)) for b in bundles])
    for bundle, mask in zip(bundles, outer):
        if mask is None:
            raise XfeatError(f"holding out bundle {bundle} leaves only one class to train on; "
                             "leave-one-bundle-out needs abnormal images in at least two bundles")
    n = len(fs.y)
    fit = CrossFit(np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n))
    for model, mask in zip(_fit_models(fs, clf, params, outer), outer):
        test = ~mask
        if hasattr(model, "patch_scores"):  # one search of the patches gives the evidence and every score
            _score_patches(fit, model, fs.X[test], test)
            continue
        fit.scores[test] = abnormal_score(model, fs.X[test])
        fit.decisions[test] = model.predict(fs.X[test])
        scale = screening_scale(model, fs.X[mask], fs.y[mask])
        fit.screening_scores[test] = screening_score(model, fs.X[test], scale)
    if nested:
        fit.plan = nested_plan(bundles, inner_folds)
        excluded = fit.plan.excluded_sets
        masks = _train_masks(fs, excluded, normal_only=clf in ONE_CLASS)
        feasible = [m for m in masks if m is not None]
        models = iter(_fit_models(fs, clf, params, feasible, scores_only=True))
        for bundles_out, mask in zip(excluded, masks):
            if mask is None:
                fit.excluded_scores[bundles_out] = None
                continue
            model = next(models)
            scale = screening_scale(model, fs.X[mask], fs.y[mask])
            fit.excluded_scores[bundles_out] = screening_score(model, fs.X[~mask], scale)
    return fit


def _score_patches(fit: CrossFit, model, X: np.ndarray, rows: np.ndarray) -> None:
    """A patch scorer's scores of held-out rows from one nearest-neighbour search: its image score is the
    largest patch score, its decision function that minus its threshold, its screening score the distance."""
    evidence = model.patch_scores(X)
    if fit.evidence is None:
        fit.evidence = np.zeros((len(fit.scores), *evidence.shape[1:]), np.float32)
        fit.evidence_thresholds = np.zeros(len(fit.scores))
    fit.evidence[rows] = evidence
    fit.evidence_thresholds[rows] = model.threshold_
    distance = evidence.reshape(len(evidence), -1).max(axis=1).astype(np.float64)
    fit.screening_scores[rows] = distance
    fit.scores[rows] = distance - model.threshold_
    fit.decisions[rows] = model.classes_[(fit.scores[rows] > 0).astype(int)]


def evaluate_configuration(cache: str | os.PathLike[str], config: Configuration, params: dict | None = None, *,
                           exclude_bundles: Sequence[str] = (), recalls: Sequence[float] = DEFAULT_RECALLS,
                           inner_folds: int | None = None,
                           current: Mapping[str, str] | None = None) -> ConfigurationResult:
    """Load one configuration's features from the cache (without ``exclude_bundles``; with ``current``, a
    dataset's path -> sha256, only the rows of those files as they are now) and run leave-one-bundle-out on
    them, nested for the operating points at ``recalls``."""
    flips = "all" if config.clf == "fc" else "none"
    fs = load_features(cache, config.backbone, config.method, layer=config.layer, size=config.size or None,
                       flips=flips)
    rows = RowCheck()
    if current is not None:
        fs, rows = only_current(fs, current)
    if exclude_bundles:
        unknown = sorted(set(exclude_bundles) - set(fs.groups.tolist()))
        if unknown:
            raise XfeatError(f"{cache}: no bundle(s) {', '.join(unknown)} to exclude; bundles: "
                             f"{', '.join(sorted(set(fs.groups.tolist())))}")
        fs = fs.select(~np.isin(fs.groups, list(exclude_bundles)))
    with one_thread():
        fit = leave_one_bundle_out(fs, config.clf, params, nested=bool(recalls), inner_folds=inner_folds)
    result = ConfigurationResult(config, fs, fit.scores, fit.decisions, bundles=sorted(set(fs.groups)),
                                 screening_scores=fit.screening_scores, rows=rows, evidence=fit.evidence,
                                 evidence_thresholds=fit.evidence_thresholds)
    for bundle in result.bundles:
        mask = fs.groups == bundle
        result.counts[bundle] = Counts.of(fs.y[mask], fit.decisions[mask])
        result.aurocs[bundle] = auroc(fs.y[mask], fit.scores[mask])
    for target in recalls:
        thresholds = nested_thresholds(fit.plan, fit.excluded_scores, fs.y, fs.groups, target)
        result.operating.append(operating_point(fit.screening_scores, fs.y, fs.groups, thresholds, target))
    return result


def configurations(backbones: Sequence[str], methods: Sequence[str], classifiers: Sequence[str],
                   layer: str | Sequence[str] | None = None, size: str | None = None) -> list[Configuration]:
    """Every (backbone, method, classifier, layer) to run. ``layer``: one layer or several; each classifier takes
    those it can: ``patchcore`` the patch maps (always), ``fc`` the pooled layer (its first layer is the
    fc1000 layer), the others every vector layer given (pool, fc1000, local, joins such as pool+local)."""
    for clf in classifiers:
        if clf not in CLASSIFIERS:
            raise XfeatError(f"unknown classifier {clf!r}; one of {', '.join(CLASSIFIERS)}")
    layers = (layer,) if isinstance(layer, str) else tuple(layer or ())
    for name in layers:
        parse_layer(name)
    return [Configuration(b, m, c, name, size or "")
            for b in backbones for m in methods for c in classifiers for name in _layers_of(c, layers)]


def _layers_of(clf: str, layers: Sequence[str]) -> tuple[str, ...]:
    if clf == "patchcore":
        return ("patches",)
    if not layers:
        return (DEFAULT_LAYER.get(clf, "pool"),)
    vectors = tuple(name for name in layers if name != "patches")
    if not vectors:
        raise XfeatError(f"--layer patches is the patch scorer's (--clf patchcore); {clf} takes pool, fc1000, "
                         "local or a join such as pool+local")
    if clf == "fc":
        if "pool" not in vectors:
            raise XfeatError("the fc head starts from the pooled features (its first layer is the fc1000 layer); "
                             "add pool to --layer, or leave --layer out")
        return ("pool",)
    return vectors


def evaluate(cache: str | os.PathLike[str], configs: Sequence[Configuration], *, params: dict | None = None,
             jobs: int = 1, executor: Executor | None = None, recalls: Sequence[float] = DEFAULT_RECALLS,
             inner_folds: int | None = None, current: Mapping[str, str] | None = None
             ) -> list[ConfigurationResult]:
    """Run every configuration; ``params`` maps a classifier name to its keyword arguments; ``recalls``,
    ``inner_folds`` and ``current`` as in ``evaluate_configuration``.

    Configurations run in ``jobs`` local processes, or as tasks of ``executor`` (any
    ``concurrent.futures.Executor``, e.g. a Dask client's ``get_executor()``): each one single-threaded, so
    the results are the same bits either way. Executor workers read the cache from its absolute path.
    """
    params = params or {}
    options = {"recalls": tuple(recalls), "inner_folds": inner_folds, "current": current}
    if executor is not None:
        path = os.path.abspath(cache)
        futures = [executor.submit(evaluate_configuration, path, c, params.get(c.clf), **options) for c in configs]
        return [future.result() for future in futures]
    if jobs == 1:
        return [evaluate_configuration(cache, c, params.get(c.clf), **options) for c in configs]
    tasks = (delayed(evaluate_configuration)(cache, c, params.get(c.clf), **options) for c in configs)
    with workers_ignore_ctrl_c():  # the call starts the workers (Ctrl-C is for this process alone), then returns
        results = tied_parallel(n_jobs=jobs, return_as="generator")(tasks)
    return list(results)
