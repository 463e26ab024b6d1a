"""Leave-one-bundle-out evaluation of classifiers on cached features.

For every (backbone, method, classifier): train on all bundles but one, score the held-out bundle, for
every bundle. Everything that learns (scalers, thresholds included) lives inside the classifier, so it is
fitted on the training bundles only. The ``fc`` heads of all folds train together (``FCHead.fit_many``);
the results are the same as training them one by one, and do not depend on ``jobs``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from joblib import delayed
from sklearn.base import clone

from xfeat.learn.classifiers import CLASSIFIERS, FCHead, abnormal_score, make_classifier
from xfeat.errors import XfeatError
from xfeat.features.reading import FeatureSet, load_features
from xfeat.io.processes import tied_parallel, workers_ignore_ctrl_c
from xfeat.learn.metrics import Counts, auroc, bundle_bootstrap
from xfeat.learn.threads import one_thread

# The ResNet-50 paper's SVM used the fc1000 layer; the fc head starts from the pooled features.
DEFAULT_LAYER = {"svm": "fc1000"}
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

    @property
    def overall(self) -> Counts:
        return sum(self.counts.values(), Counts())

    @property
    def overall_auroc(self) -> float:
        return auroc(self.features.y, self.scores)

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
            rows.append({**common, "bundle": bundle, **_metrics(c), "auroc": self.aurocs[bundle],
                         "single_class": c.single_class, "ci_low": math.nan, "ci_high": math.nan})
        low, high = self.interval()
        rows.append({**common, "bundle": "overall", **_metrics(self.overall), "auroc": self.overall_auroc,
                     "single_class": "", "ci_low": low, "ci_high": high})
        return rows

    def predictions(self) -> list[dict]:
        cfg = self.config
        return [{"backbone": cfg.backbone, "method": cfg.method, "clf": cfg.clf, "layer": cfg.layer,
                 "path": p, "bundle": b, "label": int(y), "score": float(s), "decision": int(d)}
                for p, b, y, s, d in zip(self.features.paths, self.features.groups, self.features.y, self.scores,
                                         self.decisions)]


def _metrics(c: Counts) -> dict:
    return {"n": c.n, "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn, "tpr": c.tpr, "tnr": c.tnr,
            "balanced_accuracy": c.balanced_accuracy}


def leave_one_bundle_out(fs: FeatureSet, clf: str, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold abnormality scores and decisions for every image, one fold per bundle."""
    params = dict(params or {})
    bundles = sorted(set(fs.groups))
    if len(bundles) < 2:
        raise XfeatError(f"leave-one-bundle-out needs at least 2 bundles; the cache holds {len(bundles)}")
    test_masks = [fs.groups == b for b in bundles]
    for bundle, mask in zip(bundles, test_masks):
        if len(np.unique(fs.y[~mask])) < 2:
            raise XfeatError(f"holding out bundle {bundle} leaves only one class to train on; "
                             "leave-one-bundle-out needs abnormal images in at least two bundles")
    scores = np.zeros(len(fs.y))
    decisions = np.zeros(len(fs.y), dtype=np.int64)
    if clf == "fc":
        head = FCHead(fc_weight=fs.fc_weight, fc_bias=fs.fc_bias, **params)
        models = head.fit_many(fs.X, fs.y, [~m for m in test_masks])
    else:
        template = make_classifier(clf, **params)
        X = fs.X
        models = [clone(template).fit(X[~m], fs.y[~m]) for m in test_masks]
    for model, mask in zip(models, test_masks):
        scores[mask] = abnormal_score(model, fs.X[mask])
        decisions[mask] = model.predict(fs.X[mask])
    return scores, decisions


def evaluate_configuration(cache: str | os.PathLike[str], config: Configuration, params: dict | None = None, *,
                           exclude_bundles: Sequence[str] = ()) -> ConfigurationResult:
    """Load one configuration's features from the cache (without ``exclude_bundles``) and run
    leave-one-bundle-out on them."""
    flips = "all" if config.clf == "fc" else "none"
    fs = load_features(cache, config.backbone, config.method, layer=config.layer, size=config.size or None,
                       flips=flips)
    if exclude_bundles:
        unknown = sorted(set(exclude_bundles) - set(fs.groups.tolist()))
        if unknown:
            raise XfeatError(f"{cache}: no bundle(s) {', '.join(unknown)} to exclude; bundles: "
                             f"{', '.join(sorted(set(fs.groups.tolist())))}")
        fs = fs.select(~np.isin(fs.groups, list(exclude_bundles)))
    with one_thread():
        scores, decisions = leave_one_bundle_out(fs, config.clf, params)
    result = ConfigurationResult(config, fs, scores, decisions, bundles=sorted(set(fs.groups)))
    for bundle in result.bundles:
        mask = fs.groups == bundle
        result.counts[bundle] = Counts.of(fs.y[mask], decisions[mask])
        result.aurocs[bundle] = auroc(fs.y[mask], scores[mask])
    return result


def configurations(backbones: Sequence[str], methods: Sequence[str], classifiers: Sequence[str],
                   layer: str | None = None, size: str | None = None) -> list[Configuration]:
    for clf in classifiers:
        if clf not in CLASSIFIERS:
            raise XfeatError(f"unknown classifier {clf!r}; one of {', '.join(CLASSIFIERS)}")
    if layer == "fc1000" and "fc" in classifiers:
        raise XfeatError("the fc head starts from the pooled features (its first layer is the fc1000 layer); "
                         "use --layer pool, or leave --layer out")
    return [Configuration(b, m, c, layer or DEFAULT_LAYER.get(c, "pool"), size or "")
            for b in backbones for m in methods for c in classifiers]


def evaluate(cache: str | os.PathLike[str], configs: Sequence[Configuration], *, params: dict | None = None,
             jobs: int = 1, executor: Executor | None = None) -> list[ConfigurationResult]:
    """Run every configuration; ``params`` maps a classifier name to its keyword arguments.

    Configurations run in ``jobs`` local processes, or as tasks of ``executor`` (any
    ``concurrent.futures.Executor``, e.g. a Dask client's ``get_executor()``): each one single-threaded, so
    the results are the same bits either way. Executor workers read the cache from its absolute path.
    """
    params = params or {}
    if executor is not None:
        path = os.path.abspath(cache)
        futures = [executor.submit(evaluate_configuration, path, c, params.get(c.clf)) for c in configs]
        return [future.result() for future in futures]
    if jobs == 1:
        return [evaluate_configuration(cache, c, params.get(c.clf)) for c in configs]
    tasks = (delayed(evaluate_configuration)(cache, c, params.get(c.clf)) for c in configs)
    with workers_ignore_ctrl_c():  # the call starts the workers (Ctrl-C is for this process alone), then returns
        results = tied_parallel(n_jobs=jobs, return_as="generator")(tasks)
    return list(results)
