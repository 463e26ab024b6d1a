"""The fuel-cell paper's fully-connected head as a scikit-learn estimator; ``xfeat.learn.fc_training`` trains it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y, validate_data

from xfeat.learn.binary import binary_labels, binary_tags, is_variants, predict_from_decision
from xfeat.learn.fc_training import HeadConfig, TrainedHead, as_variants, forward, train_heads

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
    the unflipped variant. ``fit_many`` trains one head per fold in one batched run (``xfeat.learn.fc_training``).

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
        return binary_tags(super().__sklearn_tags__())

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
        return predict_from_decision(self, X)

    def _validate_fit(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        if is_variants(X):
            X, y = check_X_y(X, y, allow_nd=True, dtype=np.float32)
            self.n_features_in_ = X.shape[2]
        else:
            X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_, y01 = binary_labels(self, y)
        return as_variants(X), y01

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        if is_variants(X):
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
