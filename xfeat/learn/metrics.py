"""Metrics of the fuel-cell paper: confusion counts, balanced accuracy, and honest uncertainty.

Positive class = abnormal. The overall balanced accuracy is computed from the TP/FP/TN/FN summed over
all folds (the paper's definition), not averaged over folds. A fold (bundle) holding one class has one
defined rate: it is reported as that rate, and marked, never as a silent 50 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score


@dataclass(frozen=True)
class Counts:
    """Confusion counts with abnormal as the positive class."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @classmethod
    def of(cls, y_true: np.ndarray, y_pred: np.ndarray) -> "Counts":
        y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
        return cls(tp=int(np.sum(y_true & y_pred)), fp=int(np.sum(~y_true & y_pred)),
                   tn=int(np.sum(~y_true & ~y_pred)), fn=int(np.sum(y_true & ~y_pred)))

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def tpr(self) -> float:
        """Recall of abnormal images (NaN when there are none)."""
        positives = self.tp + self.fn
        return self.tp / positives if positives else math.nan

    @property
    def tnr(self) -> float:
        """Share of normal images cleared (NaN when there are none)."""
        negatives = self.tn + self.fp
        return self.tn / negatives if negatives else math.nan

    @property
    def single_class(self) -> str:
        """"" when both classes are present, else "normal only" / "abnormal only"."""
        if self.tp + self.fn == 0:
            return "normal only"
        if self.tn + self.fp == 0:
            return "abnormal only"
        return ""

    @property
    def balanced_accuracy(self) -> float:
        """(TPR + TNR) / 2; with one class present, the one defined rate (see ``single_class``)."""
        rates = [r for r in (self.tpr, self.tnr) if not math.isnan(r)]
        return sum(rates) / len(rates) if rates else math.nan


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of abnormal-vs-normal scores; NaN when one class is missing."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return math.nan
    return float(roc_auc_score(y_true, scores))


def bundle_bootstrap(counts: Sequence[Counts], *, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95, statistic: str = "balanced_accuracy") -> tuple[float, float]:
    """Percentile interval of a pooled rate when whole bundles are resampled.

    Bundles, not images, are the independent units (a new bundle is a new coating mixture), so the
    interval says how much the score could change with other bundles. ``statistic`` is
    ``balanced_accuracy``, ``tpr`` (recall of abnormal images) or ``tnr`` (share of normal images cleared).
    """
    if statistic not in ("balanced_accuracy", "tpr", "tnr"):
        raise ValueError(f"unknown statistic {statistic!r}; balanced_accuracy, tpr or tnr")
    table = np.array([[c.tp, c.fp, c.tn, c.fn] for c in counts], dtype=np.int64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(table), size=(n_resamples, len(table)))
    tp, fp, tn, fn = table[picks].sum(axis=1).T
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        tnr = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    values = {"tpr": tpr, "tnr": tnr}.get(statistic)
    if values is None:
        values = np.nanmean(np.stack([tpr, tnr]), axis=0)
    alpha = (1 - level) / 2
    return float(np.nanquantile(values, alpha)), float(np.nanquantile(values, 1 - alpha))
