"""What every xfeat classifier shares: binary labels with 1 (abnormal) as the positive class, and the
abnormal score, higher = more abnormal, that thresholds, AUROC and screening are computed on."""

from __future__ import annotations

import numpy as np
from sklearn.utils.multiclass import check_classification_targets, type_of_target


def abnormal_score(estimator, X) -> np.ndarray:
    """The 1-D score, higher = more abnormal, of a fitted binary classifier.

    ``decision_function`` when there is one (it ranks like the probability but never saturates to ties at
    1.0, which would blunt AUROC), else ``predict_proba[:, 1]``.
    """
    if hasattr(estimator, "decision_function"):
        return np.asarray(estimator.decision_function(X), dtype=np.float64).ravel()
    return np.asarray(estimator.predict_proba(X), dtype=np.float64)[:, 1]


def binary_labels(estimator, y, allow_normal_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``classes_`` and y encoded as 0 / 1; refuses multi-class and (usually) single-class targets."""
    check_classification_targets(y)
    y_type = type_of_target(y, input_name="y")
    if y_type != "binary":
        raise ValueError(f"Only binary classification is supported. The type of the target is {y_type}.")
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) == 1 and allow_normal_only and classes[0] == 0:
        classes = np.array([0, 1], dtype=classes.dtype)  # normal images only: still a normal / abnormal model
    elif len(classes) == 1:
        raise ValueError(f"{type(estimator).__name__} needs normal and abnormal training images; y holds one class "
                         f"({classes[0]!r})")
    return classes, encoded


def predict_from_decision(estimator, X) -> np.ndarray:
    abnormal = estimator.decision_function(X) > 0  # first: it checks the estimator is fitted
    return estimator.classes_[abnormal.astype(int)]


def is_variants(X) -> bool:
    """True for [N, F, D] input (cached flip variants); never converts X (it may be a DataFrame)."""
    ndim = getattr(X, "ndim", None)
    if ndim is None and isinstance(X, (list, tuple)):
        ndim = np.asarray(X).ndim
    return ndim == 3


def binary_tags(tags):
    tags.classifier_tags.multi_class = False
    return tags
