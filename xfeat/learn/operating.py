"""Operating points a QC line runs at, measured on bundles the model never saw (nested leave-one-bundle-out).

A screening line runs at a recall target: flag at least R of the abnormal electrodes, and clear the normal ones
below the threshold without a look. The honest figure is what that rule does on a *new* bundle, so it is
measured the way it would be used: for each held-out bundle b, the threshold is chosen on the training bundles'
own out-of-fold scores (each training bundle scored by a model that saw neither it nor b), exactly as
``xfeat train`` chooses it on all bundles, and then applied to b's scores from the model trained on every bundle
but b. Pooled over the held-out bundles: the recall achieved and the share of normal images cleared, with
intervals from resampling bundles.

The inner models are keyed by the bundles they leave out: with inner leave-one-bundle-out, the model without
{b, c} serves outer fold b (scoring c) and outer fold c (scoring b), so B bundles need B (B - 1) / 2 inner
models, not B (B - 1). With ``inner_folds=K`` the bundles are dealt once into K groups (sorted names, in turn);
outer fold b's inner folds are the other groups and b's own group without b, whose model (without that whole
group) all of the group's outer folds share: B (K - 1) + K inner models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from xfeat.learn.metrics import Counts, bundle_bootstrap

DEFAULT_RECALLS = (0.95, 0.99)


def recall_key(target: float) -> str:
    """The suffix of a recall target's fields: 0.95 -> "95", 0.995 -> "99_5"."""
    return f"{round(100 * target, 6):g}".replace(".", "_")


def recall_threshold(scores: np.ndarray, y: np.ndarray, target_recall: float) -> float:
    """The highest threshold t such that flagging ``score > t`` flags at least ``target_recall`` of the
    abnormal images (y == 1): just below the k-th highest abnormal score, k = ceil(target x abnormal)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], not {target_recall}")
    abnormal = np.sort(np.asarray(scores, np.float64)[np.asarray(y) == 1])[::-1]
    if len(abnormal) == 0:
        raise ValueError("no abnormal images: a recall target needs some")
    k = max(1, math.ceil(round(target_recall * len(abnormal), 9)))
    return float(np.nextafter(abnormal[k - 1], -np.inf))


@dataclass(frozen=True)
class NestedPlan:
    """For each outer (held-out) bundle its inner folds, and the inner models they need."""

    bundles: tuple[str, ...]
    inner: dict[str, tuple[tuple[str, ...], ...]]  # outer bundle -> its inner folds, each a tuple of bundles

    @property
    def excluded_sets(self) -> list[frozenset[str]]:
        """The bundles each inner model leaves out ({outer} + an inner fold), each once, in a fixed order."""
        sets = dict.fromkeys(frozenset((b, *fold)) for b in self.bundles for fold in self.inner[b])
        return sorted(sets, key=lambda s: sorted(s))


def nested_plan(bundles: Sequence[str], inner_folds: int | None = None) -> NestedPlan:
    """Inner leave-one-bundle-out (``inner_folds`` None, or at least the number of training bundles), or
    ``inner_folds`` groups of bundles dealt in turn from the sorted names."""
    names = tuple(sorted({str(b) for b in bundles}))
    if inner_folds is not None and inner_folds < 2:
        raise ValueError(f"inner folds must be 2 or more, not {inner_folds}")
    if inner_folds is None or inner_folds >= len(names) - 1:
        return NestedPlan(names, {b: tuple((c,) for c in names if c != b) for b in names})
    groups = [names[k::inner_folds] for k in range(inner_folds)]
    inner = {b: tuple(folded for g in groups if (folded := tuple(c for c in g if c != b))) for b in names}
    return NestedPlan(names, inner)


def nested_thresholds(plan: NestedPlan, excluded_scores: Mapping[frozenset[str], np.ndarray | None], y: np.ndarray,
                      groups: np.ndarray, target: float) -> dict[str, float]:
    """Each outer bundle's threshold for ``target``, chosen on its training bundles' inner out-of-fold scores.

    ``excluded_scores[E]`` holds the screening scores of the rows of bundles E from the model fitted without E
    (None when no such model could be fitted); NaN where a threshold is undefined (an inner model missing, or
    no abnormal image in the training bundles).
    """
    thresholds = {}
    for b in plan.bundles:
        scores, labels = [], []
        for fold in plan.inner[b]:
            excluded = frozenset((b, *fold))
            fitted = excluded_scores.get(excluded)
            if fitted is None:
                break
            in_excluded = np.isin(groups, list(excluded))
            in_fold = np.isin(groups[in_excluded], list(fold))
            scores.append(fitted[in_fold])
            labels.append(y[in_excluded][in_fold])
        else:
            labels_all = np.concatenate(labels) if labels else np.zeros(0)
            if labels_all.any():
                thresholds[b] = recall_threshold(np.concatenate(scores), labels_all, target)
                continue
        thresholds[b] = math.nan
    return thresholds


@dataclass(frozen=True)
class OperatingPoint:
    """What a recall target does on held-out bundles: each bundle flagged at its own nested threshold."""

    target: float
    thresholds: dict[str, float]
    counts: dict[str, Counts] = field(default_factory=dict)  # per held-out bundle, at its threshold
    seed: int = 0

    @property
    def defined(self) -> bool:
        """False when some held-out bundle has no threshold (its pooled figures would be biased): all null."""
        return bool(self.thresholds) and not any(math.isnan(t) for t in self.thresholds.values())

    @property
    def total(self) -> Counts:
        return sum(self.counts.values(), Counts())

    @property
    def recall(self) -> float:
        """Abnormal images of held-out bundles flagged, pooled."""
        return self.total.tpr if self.defined else math.nan

    @property
    def cleared(self) -> float:
        """Normal images of held-out bundles cleared without a look, pooled: the work saved."""
        return self.total.tnr if self.defined else math.nan

    def interval(self, statistic: str) -> tuple[float, float]:
        """95 % bundle-bootstrap interval of ``tpr`` (recall) or ``tnr`` (cleared)."""
        if not self.defined:
            return math.nan, math.nan
        return bundle_bootstrap(list(self.counts.values()), statistic=statistic, seed=self.seed)

    def fields(self) -> dict[str, float]:
        """``heldout_recall_95``, ``heldout_cleared_95`` and their ``_ci_low`` / ``_ci_high``: results.csv/json."""
        key = recall_key(self.target)
        out = {}
        for name, value, statistic in (("recall", self.recall, "tpr"), ("cleared", self.cleared, "tnr")):
            low, high = self.interval(statistic)
            out |= {f"heldout_{name}_{key}": value, f"heldout_{name}_{key}_ci_low": low,
                    f"heldout_{name}_{key}_ci_high": high}
        return out

    def bundle_fields(self, bundle: str) -> dict[str, float]:
        """The same fields for one held-out bundle (no interval)."""
        key, c = recall_key(self.target), self.counts.get(bundle, Counts())
        ok = self.defined
        return {f"heldout_recall_{key}": c.tpr if ok else math.nan, f"heldout_cleared_{key}": c.tnr if ok else math.nan}


def operating_point(scores: np.ndarray, y: np.ndarray, groups: np.ndarray, thresholds: Mapping[str, float],
                    target: float) -> OperatingPoint:
    """Flag each held-out bundle's out-of-fold ``scores`` above its own threshold, and count."""
    counts = {}
    for b, t in thresholds.items():
        mask = groups == b
        counts[b] = Counts.of(y[mask], scores[mask] > t)
    return OperatingPoint(target, dict(thresholds), counts)


__all__ = ["DEFAULT_RECALLS", "NestedPlan", "OperatingPoint", "nested_plan", "nested_thresholds",
           "operating_point", "recall_key", "recall_threshold"]
