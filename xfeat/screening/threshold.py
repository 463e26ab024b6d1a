"""Screening: the threshold that flags a required share of abnormal electrodes, and what it saves.

On a QC line a person looks only at the electrodes the model flags (score above the threshold). The
threshold is set on leave-one-bundle-out scores, so that at least the target share of abnormal electrodes
would have been flagged; what it saves is the share of normal electrodes cleared without a look. Both are
given with a 95 % interval from resampling bundles, the independent units.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from xfeat.learn.metrics import Counts, bundle_bootstrap
from xfeat.learn.operating import recall_threshold


@dataclass(frozen=True)
class ScreeningOutcome:
    """What a threshold does on labelled scores: abnormal flagged (recall), normal cleared, and work left."""

    threshold: float
    target_recall: float | None
    n_abnormal: int
    n_normal: int
    recall: float
    recall_interval: tuple[float, float]
    cleared: float  # share of normal images not flagged: the looks a QC person saves
    cleared_interval: tuple[float, float]
    flagged: float  # share of all images flagged: what is still looked at
    score_threshold: float | None = None  # the same cut on the scores it was chosen on (predictions' screening_score)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def screening_outcome(scores: np.ndarray, y: np.ndarray, groups: np.ndarray, threshold: float,
                      target_recall: float | None = None, seed: int = 0) -> ScreeningOutcome:
    """Recall, cleared share and flagged share of ``score > threshold``, with bundle-bootstrap intervals."""
    scores, y, groups = np.asarray(scores, np.float64), np.asarray(y), np.asarray(groups)
    flagged = scores > threshold
    per_bundle = [Counts.of(y[groups == b], flagged[groups == b]) for b in sorted(set(groups.tolist()))]
    total = sum(per_bundle, Counts())
    return ScreeningOutcome(
        threshold=float(threshold), target_recall=target_recall, n_abnormal=total.tp + total.fn,
        n_normal=total.tn + total.fp, recall=total.tpr,
        recall_interval=bundle_bootstrap(per_bundle, statistic="tpr", seed=seed),
        cleared=total.tnr, cleared_interval=bundle_bootstrap(per_bundle, statistic="tnr", seed=seed),
        flagged=float(flagged.mean()) if len(flagged) else math.nan)


__all__ = ["recall_threshold", "ScreeningOutcome", "screening_outcome"]
