"""Classifiers on cached features, all scikit-learn estimators, all binary with 1 (abnormal) as the positive class.

Every classifier has ``decision_function`` and/or ``predict_proba`` with higher = more abnormal;
``abnormal_score`` returns that score for any of them. ``make_classifier("fc" | "svm" | "logreg" | "knn" |
"mahalanobis", **params)`` builds one by name.

Labels: ``classes_`` is the sorted pair of labels and the second is the positive (abnormal) class, as in
scikit-learn; with xfeat's 0 / 1 labels, 1 = abnormal. Everything that learns, scalers and thresholds
included, is fitted inside ``fit`` on the training rows only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import linalg
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import KFold
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, check_X_y, check_array, validate_data

from xfeat.errors import XfeatError
from xfeat.heads import HeadConfig, TrainedHead, as_variants, forward, train_heads


def abnormal_score(estimator, X) -> np.ndarray:
    """The 1-D score, higher = more abnormal, of a fitted binary classifier.

    ``decision_function`` when there is one (it ranks like the probability but never saturates to ties at
    1.0, which would blunt AUROC), else ``predict_proba[:, 1]``.
    """
    if hasattr(estimator, "decision_function"):
        return np.asarray(estimator.decision_function(X), dtype=np.float64).ravel()
    return np.asarray(estimator.predict_proba(X), dtype=np.float64)[:, 1]


def _binary_labels(estimator, y, allow_normal_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
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


def _predict_from_decision(estimator, X) -> np.ndarray:
    abnormal = estimator.decision_function(X) > 0  # first: it checks the estimator is fitted
    return estimator.classes_[abnormal.astype(int)]


def _is_variants(X) -> bool:
    """True for [N, F, D] input (cached flip variants); never converts X (it may be a DataFrame)."""
    ndim = getattr(X, "ndim", None)
    if ndim is None and isinstance(X, (list, tuple)):
        ndim = np.asarray(X).ndim
    return ndim == 3


def _binary_tags(tags):
    tags.classifier_tags.multi_class = False
    return tags


# --- the fuel-cell paper's head -----------------------------------------------------------------------------

class FCHead(ClassifierMixin, BaseEstimator):
    """The fuel-cell paper's head on cached features: fc (D -> 1000) -> 512 -> 256 -> 2, trained with flips.

    The first layer starts from the backbone's ImageNet fc (``fc_weight`` [1000, D], ``fc_bias`` [1000]; random
    PyTorch initialisation when None), the rest from PyTorch's default initialisation drawn with ``seed``.
    Cross-entropy (class-weighted with ``class_weight``: None, "balanced" or {label: weight}), learning rate
    ``lr`` multiplied by ``lr_gamma`` every ``lr_step`` epochs, for ``epochs`` epochs.

    What the paper leaves open, chosen here: SGD with momentum 0.9 (PyTorch's transfer-learning recipe, whose
    step schedule the paper's resembles; ``optimizer="adam"`` for Adam), mini-batches of 32, decay factor 0.1,
    no weight decay.

    ``precision="bf16"`` lets the matmuls round their inputs to bf16 and accumulate in float32 (weights,
    optimiser state and loss stay float32, as in mixed-precision training): ~1.3x faster on CPUs with native
    bf16 (AVX512-BF16, AMX), the same as fp32 elsewhere, and not bitwise equal to fp32 training.

    X is [N, D], or [N, F, D] with the F = 4 cached flip variants (none, h, v, hv) or F = 2 (none, h). With
    flips, each epoch each sample takes a horizontal flip with p = 0.5 and, independently, a vertical one with
    p = 0.5 (variant h + 2 v), drawn from ``seed``: same seed, same result (bitwise on CPU). Prediction uses
    the unflipped variant. ``fit_many`` trains one head per fold in one batched run (``xfeat.heads``).

    Fitted: ``coefs_`` / ``intercepts_`` (per layer, weights [in, out] as in MLPClassifier), ``loss_curve_``
    (mean training loss per epoch), ``flip_counts_`` (how often each variant was drawn).
    """

    def __init__(self, epochs: int = 50, lr: float = 1e-3, lr_step: int = 10, lr_gamma: float = 0.1,
                 batch_size: int = 32, optimizer: str = "sgd", momentum: float = 0.9, class_weight=None,
                 flips: bool = True, precision: str = "fp32", seed: int = 0, fc_weight=None, fc_bias=None):
        self.epochs = epochs
        self.lr = lr
        self.lr_step = lr_step
        self.lr_gamma = lr_gamma
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.momentum = momentum
        self.class_weight = class_weight
        self.flips = flips
        self.precision = precision
        self.seed = seed
        self.fc_weight = fc_weight
        self.fc_bias = fc_bias

    def __sklearn_tags__(self):
        return _binary_tags(super().__sklearn_tags__())

    def fit(self, X, y) -> FCHead:
        X3, y01 = self._validate_fit(X, y)
        trained = train_heads(X3, y01, np.ones((1, len(y01)), bool), self._config(), self.seed,
                              *self._pretrained(X3.shape[2]))
        return self._set_trained(trained[0])

    def fit_many(self, X, y, train_masks, seeds: Sequence[int] | None = None) -> list[FCHead]:
        """One fitted copy of this head per row of ``train_masks`` ([K, N] booleans), trained together.

        Head k equals ``FCHead(seed=seeds[k], ...).fit(X[train_masks[k]], y[train_masks[k]])`` up to float
        rounding; ``seeds`` defaults to this head's seed for every fold. ``self`` is left unfitted.
        """
        masks = np.atleast_2d(np.asarray(train_masks, dtype=bool))
        seeds = [self.seed] * len(masks) if seeds is None else list(seeds)
        heads = [type(self)(**{**self.get_params(deep=False), "seed": s}) for s in seeds]  # shares fc arrays
        X3, y01 = heads[0]._validate_fit(X, y)
        for k, mask in enumerate(masks):
            if len(np.unique(y01[mask])) < 2:
                raise ValueError(f"train mask {k} selects one class only; each fold needs normal and abnormal rows")
        for head in heads[1:]:
            head.__dict__.update({k: v for k, v in vars(heads[0]).items() if k.endswith("_")})
        trained = train_heads(X3, y01, masks, heads[0]._config(), seeds, *self._pretrained(X3.shape[2]))
        return [head._set_trained(t) for head, t in zip(heads, trained)]

    def decision_function(self, X) -> np.ndarray:
        """Logit of abnormal minus logit of normal: > 0 means abnormal."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0]

    def predict_proba(self, X) -> np.ndarray:
        logits = self._logits(X)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return _predict_from_decision(self, X)

    def _validate_fit(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        if _is_variants(X):
            X, y = check_X_y(X, y, allow_nd=True, dtype=np.float32)
            self.n_features_in_ = X.shape[2]
        else:
            X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_, y01 = _binary_labels(self, y)
        return as_variants(X), y01

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        if _is_variants(X):
            X = check_array(X, allow_nd=True, dtype=np.float32)[:, 0]
            if X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                                 f"{self.n_features_in_} features as input.")
        else:
            X = validate_data(self, X, reset=False, dtype=np.float32)
        return forward(self.coefs_, self.intercepts_, X)

    def _config(self) -> HeadConfig:
        weights = self.class_weight
        if isinstance(weights, dict):  # {label: weight}, unlisted labels weigh 1, as in scikit-learn
            weights = tuple(float(weights.get(c, 1.0)) for c in self.classes_.tolist())
        return HeadConfig(epochs=self.epochs, lr=self.lr, lr_step=self.lr_step, lr_gamma=self.lr_gamma,
                          batch_size=self.batch_size, optimizer=self.optimizer, momentum=self.momentum,
                          class_weight=weights, flips=self.flips, precision=self.precision)

    def _pretrained(self, n_features: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        weight, bias = self.fc_weight, self.fc_bias
        if weight is not None and np.shape(weight) != (1000, n_features):
            raise ValueError(f"fc_weight has shape {np.shape(weight)}; expected (1000, {n_features}) for "
                             f"{n_features} features")
        if bias is not None and np.shape(bias) != (1000,):
            raise ValueError(f"fc_bias has shape {np.shape(bias)}; expected (1000,)")
        return weight, bias

    def _set_trained(self, trained: TrainedHead) -> FCHead:
        self.coefs_, self.intercepts_ = trained.weights, trained.biases
        self.loss_curve_, self.flip_counts_ = trained.loss_curve, trained.variant_counts
        return self


# --- linear baselines ---------------------------------------------------------------------------------------

class _ScaledLinear(ClassifierMixin, BaseEstimator):
    """StandardScaler + a linear model, fitted together on the training rows (``model_``)."""

    def __sklearn_tags__(self):
        return _binary_tags(super().__sklearn_tags__())

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        self.classes_, _ = _binary_labels(self, y)
        self.model_ = make_pipeline(StandardScaler(), self._linear_model()).fit(X, y)
        self.n_iter_ = int(np.max(self.model_[-1].n_iter_))
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.decision_function(validate_data(self, X, reset=False))

    def predict(self, X) -> np.ndarray:
        return _predict_from_decision(self, X)


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
        check_is_fitted(self)
        return self.model_.predict_proba(validate_data(self, X, reset=False))


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


class _OneClass(ClassifierMixin, BaseEstimator):
    """A score learnt from the normal training images only, and a threshold chosen on the training rows.

    ``anomaly_score`` (higher = more abnormal) depends on the normal rows alone. The threshold maximises
    balanced accuracy over the training rows, scoring each normal row with a model that did not see it
    (``cv`` contiguous folds of the normal rows) and each abnormal row with the full model; with no abnormal
    training rows it is the ``normal_quantile`` quantile of those normal scores. ``decision_function`` is
    score - threshold.
    """

    def __sklearn_tags__(self):
        return _binary_tags(super().__sklearn_tags__())

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)  # float64: covariances of 1000+ features
        self.classes_, y01 = _binary_labels(self, y, allow_normal_only=True)
        normal = X[y01 == 0]
        if len(normal) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 normal training images; got "
                             f"{len(normal)} sample(s), n_samples = {len(normal)}")
        self.model_ = self._fit_normal(normal)
        if not (y01 == 1).any():
            self.threshold_ = float(np.quantile(self._cross_fitted_scores(normal), self.normal_quantile))
            return self
        scores = np.empty(len(X))
        scores[y01 == 0] = self._cross_fitted_scores(normal)
        scores[y01 == 1] = self._score(self.model_, X[y01 == 1])
        self.threshold_ = balanced_threshold(scores, y01)
        return self

    def _cross_fitted_scores(self, normal: np.ndarray) -> np.ndarray:
        """Each normal row scored by a model fitted without it: in-sample scores would set the cut too low."""
        scores = np.empty(len(normal))
        for fit_rows, held_out in KFold(min(self.cv, len(normal))).split(normal):
            scores[held_out] = self._score(self._fit_normal(normal[fit_rows]), normal[held_out])
        return scores

    def anomaly_score(self, X) -> np.ndarray:
        """The one-class score (a distance to the normal training images): higher = more abnormal."""
        check_is_fitted(self)
        return self._score(self.model_, validate_data(self, X, reset=False, dtype=np.float64))

    def decision_function(self, X) -> np.ndarray:
        return self.anomaly_score(X) - self.threshold_

    def predict(self, X) -> np.ndarray:
        return _predict_from_decision(self, X)


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
        scaler, bank = model
        return bank.kneighbors(scaler.transform(X))[0].mean(axis=1)


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
        pca, mean, cholesky = model
        X = pca.transform(X) if pca is not None else X
        whitened = linalg.solve_triangular(cholesky, (X - mean).T, lower=True)
        return np.sqrt((whitened**2).sum(axis=0))


# --- registry -----------------------------------------------------------------------------------------------

CLASSIFIERS: dict[str, type] = {
    "fc": FCHead,
    "svm": LinearSVM,
    "logreg": LogReg,
    "knn": KNNNormal,
    "mahalanobis": Mahalanobis,
}


def make_classifier(name: str, **params) -> BaseEstimator:
    """A classifier by its registry name, with these parameters."""
    if name not in CLASSIFIERS:
        raise XfeatError(f"unknown classifier {name!r}; one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name](**params)


__all__ = ["CLASSIFIERS", "make_classifier", "abnormal_score", "balanced_threshold", "FCHead", "LinearSVM",
           "LogReg", "KNNNormal", "Mahalanobis"]
