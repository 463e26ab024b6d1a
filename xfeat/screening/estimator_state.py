"""Fitted classifiers as JSON parameters plus named arrays, and back, without pickle.

``estimator_state(name, estimator)`` returns ``(params, arrays)``: ``params`` is JSON-able (the constructor
parameters from ``get_params``, the learned scalars such as ``threshold_`` and ``n_features_in_``, ``classes_``
as a list, and the same for every scikit-learn object inside ``model_``); ``arrays`` holds the learned arrays
under path-like names such as ``coefs_/0`` or ``model_/steps/0/1/mean_`` (prefix them, e.g. ``classifier/``,
when several states share one file). ``estimator_from_state`` rebuilds a fitted estimator that scores
bit-for-bit like the original.

Only the classes listed here are ever built (by class, never by an imported name), so a state cannot run code.
Values are encoded as JSON with tags: ``{"$array": name}`` (an array in ``arrays``), ``{"$values": [...],
"dtype": ...}`` (a small or text array kept in JSON), ``{"$scalar": value, "dtype": ...}`` (a numpy scalar),
``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` and ``{"$object": {...}}`` (a scikit-learn object).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sklearn
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler

from xfeat.learn.classifiers import CLASSIFIERS, make_classifier

STATE_VERSION = 1

# The scikit-learn objects xfeat's classifiers hold in ``model_``: the only classes a state may name.
PARTS: dict[str, type] = {cls.__name__: cls for cls in (Pipeline, StandardScaler, Normalizer, FunctionTransformer,
                                                       SGDClassifier, LogisticRegression, NearestNeighbors, PCA)}
# Attributes that are derived caches, rebuilt rather than stored: NearestNeighbors' search tree is refitted
# from the stored training rows; SGD's loss object only serves training.
_SKIPPED = {"NearestNeighbors": {"_tree"}, "SGDClassifier": {"_loss_function_"}}
_REFIT_FROM = {"NearestNeighbors": "_fit_X"}
_JSON_ARRAYS = {"classes_"}  # kept readable in model.json whatever their dtype
_TEXT_KINDS = "USO"


def estimator_state(name: str, estimator) -> tuple[dict, dict[str, np.ndarray]]:
    """The learned state of a fitted classifier from ``xfeat.learn.classifiers.CLASSIFIERS``: (JSON params, arrays)."""
    cls = _classifier_class(name)
    if type(estimator) is not cls:
        raise ValueError(f"classifier {name!r} is a {cls.__name__}; got a {type(estimator).__name__}")
    if not hasattr(estimator, "classes_"):
        raise ValueError(f"the {name!r} classifier is not fitted; fit it before saving its state")
    arrays: dict[str, np.ndarray] = {}
    params, fitted = _attributes(estimator, "", arrays)
    return {"classifier": name, "class": cls.__name__, "state_version": STATE_VERSION,
            "sklearn_version": sklearn.__version__, "params": params, "fitted": fitted}, arrays


def estimator_from_state(name: str, params: dict, arrays: dict[str, np.ndarray]):
    """The fitted classifier that ``estimator_state`` described; ValueError for an unknown name or missing array."""
    cls = _classifier_class(name)
    if not isinstance(params, dict) or params.get("classifier") != name or params.get("class") != cls.__name__:
        found = params.get("classifier") if isinstance(params, dict) else None
        raise ValueError(f"the stored state is not that of a {name!r} classifier (it names {found!r})")
    if params.get("state_version") != STATE_VERSION:
        raise ValueError(f"unsupported classifier state version {params.get('state_version')!r}; "
                         f"this xfeat reads version {STATE_VERSION}")
    decoder = _Decoder(arrays, name)
    try:
        estimator = make_classifier(name, **decoder.mapping(params["params"]))
        _restore(estimator, decoder.mapping(params["fitted"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed state for classifier {name!r} ({type(e).__name__}: {e})") from None
    return estimator


def _classifier_class(name: str) -> type:
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name]


# --- encoding -------------------------------------------------------------------------------------------------

def _attributes(obj: BaseEstimator, path: str, arrays: dict) -> tuple[dict, dict]:
    """Constructor parameters and learned attributes of one estimator, encoded."""
    init = obj.get_params(deep=False)
    skipped = _SKIPPED.get(type(obj).__name__, set())
    learned = {k: v for k, v in vars(obj).items() if k not in init and k not in skipped}
    return ({k: _encode(v, f"{path}{k}", arrays) for k, v in init.items()},
            {k: _encode(v, f"{path}{k}", arrays) for k, v in learned.items()})


def _encode(value, key: str, arrays: dict):
    """A JSON value for ``value``; arrays go to ``arrays[key]`` (items of containers under ``key/<i>``)."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":  # first: np.float64 is also a float
        return {"$scalar": value.item(), "dtype": value.dtype.str}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return _encode_array(value, key, arrays)
    if isinstance(value, (list, tuple)):
        items = [_encode(item, f"{key}/{i}", arrays) for i, item in enumerate(value)]
        return items if isinstance(value, list) else {"$tuple": items}
    if isinstance(value, dict):
        return {"$dict": [[_encode(k, f"{key}/key{i}", arrays), _encode(v, f"{key}/{i}", arrays)]
                          for i, (k, v) in enumerate(value.items())]}
    if type(value).__name__ in PARTS and type(value) is PARTS[type(value).__name__]:
        params, fitted = _attributes(value, f"{key}/", arrays)
        return {"$object": {"class": type(value).__name__, "params": params, "fitted": fitted}}
    raise ValueError(f"cannot store {key!r}: a {type(value).__module__}.{type(value).__name__} has no safe encoding")


def _encode_array(value: np.ndarray, key: str, arrays: dict):
    if value.dtype.kind in _TEXT_KINDS or key.rsplit("/", 1)[-1] in _JSON_ARRAYS:
        if value.ndim != 1 or not all(isinstance(v, (str, int, float, bool, np.generic)) for v in value.tolist()):
            raise ValueError(f"cannot store {key!r}: only 1-D arrays of numbers or text can be kept in JSON")
        return {"$values": value.tolist(), "dtype": value.dtype.str}
    if value.dtype.kind not in "biuf":
        raise ValueError(f"cannot store {key!r}: arrays of dtype {value.dtype} are not supported")
    arrays[key] = value
    fortran = value.ndim > 1 and value.flags.f_contiguous and not value.flags.c_contiguous
    return {"$array": key, "order": "F" if fortran else "C"}  # the order can change BLAS rounding: keep it


# --- decoding -------------------------------------------------------------------------------------------------

class _Decoder:
    """Turns encoded values back into Python, numpy and scikit-learn objects, reading arrays by name."""

    def __init__(self, arrays: dict[str, np.ndarray], name: str) -> None:
        self.arrays = arrays
        self.name = name

    def mapping(self, encoded: dict) -> dict:
        if not isinstance(encoded, dict) or not all(_settable(k) for k in encoded):
            raise TypeError(f"expected a mapping of attribute names, got {encoded!r:.80}")
        return {k: self.value(v) for k, v in encoded.items()}

    def value(self, encoded):
        if encoded is None or isinstance(encoded, (bool, int, float, str)):
            return encoded
        if isinstance(encoded, list):
            return [self.value(item) for item in encoded]
        tags = [k for k in encoded if k in self._TAGS] if isinstance(encoded, dict) else []
        if len(tags) != 1:
            raise TypeError(f"unexpected encoded value {encoded!r:.80}")
        return self._TAGS[tags[0]](self, encoded)

    def _array(self, encoded: dict) -> np.ndarray:
        key = encoded["$array"]
        if key not in self.arrays:
            raise ValueError(f"classifier {self.name!r}: missing array {key!r} in the stored state")
        return np.asarray(self.arrays[key], order="F" if encoded.get("order") == "F" else "C")

    def _values(self, encoded: dict) -> np.ndarray:
        dtype = np.dtype(encoded["dtype"])
        if dtype.kind == "O":
            array = np.empty(len(encoded["$values"]), dtype=object)
            array[:] = encoded["$values"]
            return array
        return np.asarray(encoded["$values"], dtype=dtype)

    def _scalar(self, encoded: dict) -> np.generic:
        return np.dtype(encoded["dtype"]).type(encoded["$scalar"])

    def _tuple(self, encoded: dict) -> tuple:
        return tuple(self.value(item) for item in encoded["$tuple"])

    def _dict(self, encoded: dict) -> dict:
        return {self.value(k): self.value(v) for k, v in encoded["$dict"]}

    def _object(self, encoded: dict) -> BaseEstimator:
        state = encoded["$object"]
        cls = PARTS[state["class"]]
        obj = cls(**self.mapping(state["params"]))
        _restore(obj, self.mapping(state["fitted"]))
        return obj

    _TAGS: dict[str, Callable] = {"$array": _array, "$values": _values, "$scalar": _scalar, "$tuple": _tuple,
                                  "$dict": _dict, "$object": _object}


def _settable(attribute) -> bool:
    """Plain attribute names only: a state must not reach dunder attributes such as ``__class__``."""
    return isinstance(attribute, str) and attribute.isidentifier() and not attribute.startswith("__")


def _restore(obj: BaseEstimator, fitted: dict) -> None:
    """Set the learned attributes, after refitting the parts whose caches are rebuilt from stored rows."""
    refit_from = _REFIT_FROM.get(type(obj).__name__)
    if refit_from is not None:
        obj.fit(fitted[refit_from])
    for attribute, value in fitted.items():
        setattr(obj, attribute, value)


__all__ = ["PARTS", "STATE_VERSION", "estimator_state", "estimator_from_state"]
