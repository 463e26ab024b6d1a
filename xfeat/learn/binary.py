"""What every xfeat classifier shares: binary labels with 1 (abnormal) as the positive class, the
abnormal score, higher = more abnormal, that thresholds, AUROC and screening are computed on, and the
row-by-row arithmetic that gives a row the same score whichever rows are scored with it."""

from __future__ import annotations

import inspect

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


def screening_score(estimator, X, scale: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """The score a recall target's threshold is chosen on: (raw - offset) / unit, ``scale`` = (offset, unit)
    from ``screening_scale``; raw is a one-class model's distance to the normal images (``anomaly_score``), else
    ``abnormal_score``.

    Thresholds chosen on some models' scores are applied to another model's (the inner folds' to the outer
    fold's, the fold models' to the shipped one), so every model's scores are put on one scale first. A one-class
    distance has one already (its ``decision_function`` subtracts a threshold fitted per model: it does not).
    """
    offset, unit = scale
    if hasattr(estimator, "anomaly_score"):
        raw = np.asarray(estimator.anomaly_score(X), dtype=np.float64).ravel()
    else:
        raw = abnormal_score(estimator, X)
    return (raw - offset) / unit


def screening_scale(estimator, X_train, y_train) -> tuple[float, float]:
    """(offset, unit) of a fitted model's screening scores: 0 at the median score of its own normal training
    images, 1 at that of its abnormal ones; (0, 1) for a one-class distance.

    A classifier's raw scale is its own: an fc head trained on more rows, or for more steps, gives larger logits,
    and a head that barely learned gives nearly one constant, different in each fold. Anchored on what each model
    makes of its own training images, thresholds carry from model to model. (The nested evaluation measures how
    well: it transfers thresholds exactly this way.)
    """
    if hasattr(estimator, "anomaly_score"):
        return 0.0, 1.0
    scores, y = abnormal_score(estimator, X_train), np.asarray(y_train)
    normal, abnormal = float(np.median(scores[y == 0])), float(np.median(scores[y == 1]))
    unit = abnormal - normal
    if not unit > 0:  # the model ranks its own training images the wrong way round, or not at all
        unit = float(np.std(scores)) or 1.0
    return normal, unit


def decision_threshold(estimator, cut: float, scale: tuple[float, float]) -> float:
    """The threshold on ``abnormal_score`` (the decision function a model file thresholds) equivalent to
    ``screening_score(estimator, X, scale) > cut``."""
    offset, unit = scale
    raw = offset + unit * cut
    return raw - estimator.threshold_ if hasattr(estimator, "anomaly_score") else raw


def fit_on(estimator, X, y, groups=None):
    """``estimator.fit(X, y)``, passing the rows' bundles (``groups``) to a ``fit`` that takes them."""
    if groups is not None and "groups" in inspect.signature(estimator.fit).parameters:
        return estimator.fit(X, y, groups=groups)
    return estimator.fit(X, y)


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


# A BLAS product (GEMV, GEMM, TRSM) sums each row's terms in an order set by its blocking, which depends on how
# many rows it is given: the same row scored alone and among others can differ in the last bits. Scores avoid
# that with sums along one row (``row_sums``) or products of one fixed shape (``by_row_blocks``).
# 256 rows: scoring 10,000 x 512 features on one thread costs +10 % for knn (whose bank is repacked per block),
# +0-5 % for mahalanobis and fc, +3-7 ms for svm / logreg; scoring one row costs a whole block (fc: ~20 ms).
ROW_BLOCK = 256


def row_sums(A) -> np.ndarray:
    """The sum of each row of A [N, D] in float64: numpy's pairwise summation along that row alone, so a row's
    sum does not depend on the other rows (a BLAS product's does)."""
    return np.add.reduce(np.ascontiguousarray(A, dtype=np.float64), axis=1)


def by_row_blocks(score, X, block: int = ROW_BLOCK) -> np.ndarray:
    """``score`` applied to X [N, ...] in blocks of exactly ``block`` rows (the last one padded with zero rows),
    the results concatenated: every product inside ``score`` has the same shape whatever N is.

    A row's result then depends on the row alone, provided the BLAS computes every row of a fixed-shape product
    alike wherever it sits in the block (it runs the same kernel, with the same order of sums, on each): true of
    the OpenBLAS xfeat was developed with, and checked for every classifier by tests/test_classify.py on the
    machine it runs on. Scores are computed on one thread (``xfeat.learn.threads.one_thread``) in evaluation and
    predict.
    """
    X = np.asarray(X)
    results = []
    for start in range(0, max(len(X), 1), block):
        rows = X[start:start + block]
        padded = np.zeros((block, *X.shape[1:]), X.dtype)  # a fresh C-contiguous block: the same layout each time
        padded[:len(rows)] = rows
        results.append(score(padded)[:len(rows)])
    return np.concatenate(results)


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
