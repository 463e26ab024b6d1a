"""Classifiers on cached features, all scikit-learn estimators, all binary with 1 (abnormal) as the positive class.

Every classifier has ``decision_function`` and/or ``predict_proba`` with higher = more abnormal;
``abnormal_score`` returns that score for any of them. ``make_classifier("fc" | "svm" | "logreg" | "knn" |
"mahalanobis", **params)`` builds one by name.

Labels: ``classes_`` is the sorted pair of labels and the second is the positive (abnormal) class, as in
scikit-learn; with xfeat's 0 / 1 labels, 1 = abnormal. Everything that learns, scalers and thresholds
included, is fitted inside ``fit`` on the training rows only.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import linalg
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from xfeat.errors import XfeatError
from xfeat.learn.binary import (abnormal_score, binary_labels, binary_tags, by_row_blocks, predict_from_decision,
                                row_sums)
from xfeat.learn.fc_head import FCHead


# --- linear baselines ---------------------------------------------------------------------------------------

class _ScaledLinear(ClassifierMixin, BaseEstimator):
    """StandardScaler + a linear model, fitted together on the training rows (``model_``).

    ``decision_function`` is the pipeline's, with the dot product of each scaled row with the coefficients
    summed along that row in float64 (``row_sums``) instead of by a BLAS product, whose rounding depends on the
    number of rows: a row gets the same bits alone or among others. The result keeps the product's dtype
    (float32 for a logistic regression fitted on float32 features).
    """

    def __sklearn_tags__(self):
        return binary_tags(super().__sklearn_tags__())

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        self.classes_, _ = binary_labels(self, y)
        self.model_ = make_pipeline(StandardScaler(), self._linear_model()).fit(X, y)
        self.n_iter_ = int(np.max(self.model_[-1].n_iter_))
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        scaled = self.model_[:-1].transform(validate_data(self, X, reset=False))  # elementwise: row by row
        linear = self.model_[-1]
        coef = np.asarray(linear.coef_, dtype=np.float64).ravel()
        dot = by_row_blocks(lambda rows: row_sums(rows * coef), scaled)  # float32 x float32 products are exact
        dtype = np.result_type(scaled.dtype, linear.coef_.dtype, linear.intercept_.dtype)
        return (dot + linear.intercept_).astype(dtype, copy=False)

    def predict(self, X) -> np.ndarray:
        return predict_from_decision(self, X)


class LinearSVM(_ScaledLinear):
    """The ResNet-50 paper's baseline: standardisation + a linear SVM trained by SGD (hinge loss), as there.

    ``alpha`` is SGD's regularisation strength (alpha = 1 / (C n) for an SVM's C); ``class_weight`` None,
    "balanced" or {label: weight}; ``seed`` fixes SGD's shuffling.
    """

    def __init__(self, alpha: float = 1e-4, class_weight=None, max_iter: int = 1000, tol: float = 1e-3,
                 seed: int = 0):
        self.alpha = alpha
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed

    def _linear_model(self):
        return SGDClassifier(loss="hinge", alpha=self.alpha, class_weight=self.class_weight,
                             max_iter=self.max_iter, tol=self.tol, random_state=self.seed)


class LogReg(_ScaledLinear):
    """Standardisation + logistic regression: the baseline with calibrated probabilities."""

    def __init__(self, C: float = 1.0, class_weight=None, max_iter: int = 1000):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def _linear_model(self):
        return LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)

    def predict_proba(self, X) -> np.ndarray:
        """scikit-learn's binary ``LogisticRegression.predict_proba`` on this ``decision_function``."""
        p = expit(self.decision_function(X))
        return np.stack([1 - p, p], axis=1)


# --- one-class scores ---------------------------------------------------------------------------------------

def balanced_threshold(scores: np.ndarray, y01: np.ndarray) -> float:
    """The cut c for "abnormal when score > c" maximising balanced accuracy on these scores.

    Candidates are the midpoints between consecutive distinct scores (and one below / above all); among
    equally good cuts the lowest wins: it catches more abnormal images, the cheaper mistake in QC.
    """
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1] + 1]])
    normal, abnormal = np.sort(scores[y01 == 0]), np.sort(scores[y01 == 1])
    tnr = np.searchsorted(normal, cuts, side="right") / len(normal)
    tpr = 1 - np.searchsorted(abnormal, cuts, side="right") / len(abnormal)
    return float(cuts[np.argmax(tnr + tpr)])


def _fold_of_rows(X: np.ndarray, groups: np.ndarray | None, cv: int) -> np.ndarray:
    """A fold number per row, independent of the rows' order: whole groups dealt in turn over ``cv`` folds in
    the order of their sorted names; without groups (or with one), a hash of each row's bytes."""
    if groups is not None and len(np.unique(groups)) > 1:
        names, index = np.unique(groups, return_inverse=True)
        return index % min(cv, len(names))
    rows = np.ascontiguousarray(X)
    return np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.int64) % max(min(cv, len(rows)), 1)


class _OneClass(ClassifierMixin, BaseEstimator):
    """A score learnt from the normal training images only, and a threshold chosen on the training rows.

    ``anomaly_score`` (higher = more abnormal) depends on the normal rows alone. The threshold maximises
    balanced accuracy over the training rows, each row (normal or abnormal) scored by a model fitted on the
    normal rows of the other folds: with ``groups`` (the rows' bundles) the folds are ``cv`` sets of whole
    bundles (bundles sorted by name, dealt in turn), so a bundle's images never judge a model that saw their
    siblings; without, each row's fold is fixed by a hash of its features. Either way the threshold does not
    depend on the order of the rows. With no abnormal training rows it is the ``normal_quantile`` quantile of
    the normal rows' cross-fitted scores. ``decision_function`` is score - threshold.
    """

    def __sklearn_tags__(self):
        return binary_tags(super().__sklearn_tags__())

    def fit(self, X, y, groups=None):
        """Fit on normal rows; ``groups`` (bundle per row, optional) sets the folds of the threshold."""
        X, y = validate_data(self, X, y, dtype=np.float64)  # float64: covariances of 1000+ features
        self.fit_normal(X, y)
        y01 = (y == self.classes_[1]).astype(int)
        scores = self._cross_fitted_scores(X, y01, None if groups is None else np.asarray(groups))
        if not (y01 == 1).any():
            self.threshold_ = float(np.quantile(scores, self.normal_quantile))
        else:
            self.threshold_ = balanced_threshold(scores, y01)
        return self

    def fit_normal(self, X, y) -> "_OneClass":
        """Fit the normal model only, no threshold: ``anomaly_score`` works, ``decision_function`` does not.

        What nested evaluation needs (its thresholds are chosen on anomaly scores), at a fraction of ``fit``'s cost.
        """
        X, y = validate_data(self, X, y, dtype=np.float64)
        self.classes_, y01 = binary_labels(self, y, allow_normal_only=True)
        normal = X[y01 == 0]
        if len(normal) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 normal training images; got "
                             f"{len(normal)} sample(s), n_samples = {len(normal)}")
        self.model_ = self._fit_normal(normal)
        return self

    def _cross_fitted_scores(self, X: np.ndarray, y01: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        """Every row scored by a model fitted on the normal rows of the other folds (in-sample scores would set
        the cut too low). A fold leaving fewer than 2 normal rows to fit on is scored by the full model."""
        folds = _fold_of_rows(X, groups, self.cv)
        scores = np.empty(len(X))
        for fold in np.unique(folds):
            held_out = folds == fold
            fit_rows = ~held_out & (y01 == 0)
            model = self._fit_normal(X[fit_rows]) if fit_rows.sum() >= 2 else self.model_
            scores[held_out] = self._score(model, X[held_out])
        return scores

    def anomaly_score(self, X) -> np.ndarray:
        """The one-class score (a distance to the normal training images): higher = more abnormal."""
        check_is_fitted(self)
        return self._score(self.model_, validate_data(self, X, reset=False, dtype=np.float64))

    def decision_function(self, X) -> np.ndarray:
        return self.anomaly_score(X) - self.threshold_

    def predict(self, X) -> np.ndarray:
        return predict_from_decision(self, X)


class KNNNormal(_OneClass):
    """Mean distance to the k nearest normal training images (the one-class score of Napoletano et al.).

    ``scaling`` before the distance: ``"standard"`` (default) standardises each feature with the mean and
    spread of the normal training images, so every feature counts in units of its normal variation
    instead of a few large-valued features deciding (a diagonal Mahalanobis distance); ``"l2"`` scales each
    image's features to unit length (cosine-like); ``"none"`` uses them raw.
    """

    def __init__(self, n_neighbors: int = 5, scaling: str = "standard", cv: int = 5, normal_quantile: float = 0.95):
        self.n_neighbors = n_neighbors
        self.scaling = scaling
        self.cv = cv
        self.normal_quantile = normal_quantile

    def _fit_normal(self, normal):
        scaler = self._scaler().fit(normal)
        bank = NearestNeighbors(n_neighbors=min(self.n_neighbors, len(normal)))
        return scaler, bank.fit(scaler.transform(normal))

    def _scaler(self):
        scalers = {"standard": StandardScaler, "l2": lambda: Normalizer("l2"),
                   "none": lambda: FunctionTransformer(None)}
        if self.scaling not in scalers:
            raise ValueError(f"unknown scaling {self.scaling!r}; one of {', '.join(scalers)}")
        return scalers[self.scaling]()

    def _score(self, model, X):
        """The mean distance to the k nearest rows of the bank, computed as scikit-learn's brute-force search does
        (|x|^2 - 2 x.b + |b|^2) but with products of one fixed shape (``by_row_blocks``) instead of its chunks
        sized by the number of rows, so a row's score does not depend on the rows scored with it."""
        scaler, bank = model
        fitted = np.asarray(bank._fit_X, dtype=np.float64)  # the normal rows, scaled
        k, bank_squares = bank.n_neighbors, row_sums(fitted * fitted)

        def mean_distance(rows):
            squares = -2 * (rows @ fitted.T) + bank_squares + row_sums(rows * rows)[:, None]
            nearest = np.sort(np.partition(squares, k - 1, axis=1)[:, :k], axis=1)
            return np.sqrt(np.maximum(nearest, 0)).mean(axis=1)

        return by_row_blocks(mean_distance, np.asarray(scaler.transform(X), dtype=np.float64))


class Mahalanobis(_OneClass):
    """Mahalanobis distance to a Gaussian of the normal training images (PaDiM-style, one Gaussian per image).

    The covariance is Ledoit-Wolf shrunk, which keeps it invertible with fewer images than features (as in
    Rippel et al.'s Gaussian on pretrained features), and used through its Cholesky factor (several times
    faster than the eigendecomposition sklearn's ``mahalanobis`` uses). ``n_components`` optionally projects
    on that many principal components of the normal images first (None: all features, which keeps the
    low-variance directions where anomalies often show).
    """

    def __init__(self, n_components: int | None = None, cv: int = 5, normal_quantile: float = 0.95):
        self.n_components = n_components
        self.cv = cv
        self.normal_quantile = normal_quantile

    def _fit_normal(self, normal):
        pca = None
        if self.n_components is not None:
            pca = PCA(min(self.n_components, *normal.shape), svd_solver="full").fit(normal)
            normal = pca.transform(normal)
        gaussian = LedoitWolf(store_precision=False).fit(normal)
        covariance = gaussian.covariance_
        ridge = 1e-9 * max(np.trace(covariance) / len(covariance), np.finfo(float).tiny)  # constant features
        cholesky = linalg.cholesky(covariance + ridge * np.eye(len(covariance)), lower=True)
        return pca, gaussian.location_, cholesky

    def _score(self, model, X):
        """|L^-1 (x - mean)| with L the Cholesky factor, solved for blocks of one fixed shape (``by_row_blocks``):
        a triangular solve's (and a PCA projection's) rounding depends on how many rows it is given."""
        pca, mean, cholesky = model

        def distance(rows):
            rows = pca.transform(rows) if pca is not None else rows
            whitened = linalg.solve_triangular(cholesky, (rows - mean).T, lower=True).T
            return np.sqrt(row_sums(whitened * whitened))

        return by_row_blocks(distance, X)


# --- registry -----------------------------------------------------------------------------------------------

from xfeat.learn.patchcore import PatchCore  # noqa: E402  here, not on top: it subclasses _OneClass, above

CLASSIFIERS: dict[str, type] = {
    "fc": FCHead,
    "svm": LinearSVM,
    "logreg": LogReg,
    "knn": KNNNormal,
    "mahalanobis": Mahalanobis,
    "patchcore": PatchCore,
}


def make_classifier(name: str, **params) -> BaseEstimator:
    """A classifier by its registry name, with these parameters."""
    if name not in CLASSIFIERS:
        raise XfeatError(f"unknown classifier {name!r}; one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name](**params)


__all__ = ["CLASSIFIERS", "make_classifier", "abnormal_score", "balanced_threshold", "FCHead", "LinearSVM",
           "LogReg", "KNNNormal", "Mahalanobis", "PatchCore"]
