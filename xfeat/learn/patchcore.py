"""PatchCore (Roth et al. 2022) as a one-class classifier on patch maps: an image is as abnormal as its least
normal patch, so a defect covering a few patches is not averaged away as in a global feature.

X holds per image a grid of local features, [N, gh, gw, d] (or [N, P, d]), float16 or float32 (kept as given:
converted image by image, never all at once).
"""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.utils.validation import check_array, check_consistent_length, check_is_fitted, column_or_1d

from xfeat.learn.binary import binary_labels
from xfeat.learn.classifiers import _fold_of_rows, _OneClass, balanced_threshold

PROJECTED_DIMS = 128  # the coreset's distances: enough to keep 20,000 patches' distances, cheap to compute
COMMIT_EVERY = 32  # centres applied to all candidates at once by one matrix product (k_center_greedy)


class PatchCore(_OneClass):
    """Largest distance from an image's patches to a memory bank of normal patches.

    The bank is a greedy k-center coreset of the normal training images' patches: ``max_candidates`` patches
    drawn uniformly at random (``random_state``), of which a ``coreset`` fraction, at most ``max_bank``, is kept,
    each the candidate farthest from those kept before. It covers the normal patches as a random subset of the
    same size would not (rare normal patterns keep a representative), at a fraction of searching all patches.

    The threshold is fitted as for every one-class score (``_OneClass``: ``cv`` folds of whole bundles with
    ``groups``, ``normal_quantile`` without abnormal training rows). Nothing depends on the order of the rows:
    candidates are drawn from the images sorted by a hash of their bytes.

    ``pool`` k > 1 averages the cells of a [N, gh, gw, d] map in k x k blocks first: k^2 times fewer searches, for
    large sets (leave-one-bundle-out scores every training image once per fold), coarser evidence.

    Fitted: ``bank_`` [n_bank, d] float32, ``n_features_in_`` (d), ``classes_``, ``threshold_`` (``fit`` only).
    """

    def __init__(self, coreset: float = 0.1, max_bank: int = 4000, max_candidates: int = 20000,
                 random_state: int = 0, cv: int = 5, normal_quantile: float = 0.95, pool: int = 1):
        self.pool = pool
        self.coreset = coreset
        self.max_bank = max_bank
        self.max_candidates = max_candidates
        self.random_state = random_state
        self.cv = cv
        self.normal_quantile = normal_quantile

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags

    def fit(self, X, y, groups=None) -> PatchCore:
        """Fit the bank on the normal rows and the threshold on all rows (``groups``: bundle per row, optional)."""
        maps, y = self._check_fit(X, y)
        if groups is not None:
            groups = np.asarray(groups)
            check_consistent_length(maps, groups)
        keys = _row_keys(maps)
        self._fit_bank(maps, y, keys)
        y01 = (y == self.classes_[1]).astype(int)
        scores = self._cross_fitted_scores(maps, y01, groups, keys)
        if not (y01 == 1).any():
            self.threshold_ = float(np.quantile(scores, self.normal_quantile))
        else:
            self.threshold_ = balanced_threshold(scores, y01)
        return self

    def fit_normal(self, X, y) -> PatchCore:
        """The bank only, no threshold: ``anomaly_score`` works, ``decision_function`` does not."""
        maps, y = self._check_fit(X, y)
        return self._fit_bank(maps, y, _row_keys(maps))

    def patch_scores(self, X) -> np.ndarray:
        """Each patch's Euclidean distance to its nearest bank vector: [N, gh, gw] (or [N, P]), float32."""
        check_is_fitted(self)
        maps = self._check_maps(X)
        return _nearest_distances(self.bank_, _as_patches(maps)).reshape(maps.shape[:-1])

    def anomaly_score(self, X) -> np.ndarray:
        """The image's score: its largest patch score (higher = more abnormal), float64."""
        check_is_fitted(self)
        return _image_scores(self.bank_, _as_patches(self._check_maps(X)))

    # --- fitting ------------------------------------------------------------------------------------------

    def _check_fit(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        if not 0 < self.coreset <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1]; got {self.coreset!r}")
        if self.max_bank < 1 or self.max_candidates < 1:
            raise ValueError(f"max_bank and max_candidates must be at least 1; got {self.max_bank!r}, "
                             f"{self.max_candidates!r}")
        maps = self._check_maps(X, reset=True)
        y = column_or_1d(y, warn=True)
        check_consistent_length(maps, y)
        return maps, y

    def _fit_bank(self, maps: np.ndarray, y: np.ndarray, keys: np.ndarray) -> PatchCore:
        self.classes_, y01 = binary_labels(self, y, allow_normal_only=True)
        normal = np.flatnonzero(y01 == 0)
        if len(normal) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 normal training images; got "
                             f"{len(normal)} sample(s), n_samples = {len(normal)}")
        self.bank_ = self._bank(_as_patches(maps), normal, keys)
        return self

    def _bank(self, patches: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The coreset of the patches of images ``rows`` of ``patches`` [N, P, d]: float32 [n_bank, d]."""
        sample_seed, projection_seed, start_seed = np.random.SeedSequence(self.random_state).spawn(3)
        rows = rows[np.argsort(keys[rows], kind="stable")]  # equal keys, equal images: their order cannot matter
        n_patches = len(rows) * patches.shape[1]
        if n_patches <= self.max_candidates:
            picks = np.arange(n_patches)
        else:
            picks = np.sort(np.random.default_rng(sample_seed).choice(n_patches, self.max_candidates, replace=False))
        image, patch = np.divmod(picks, patches.shape[1])
        candidates = patches[rows[image], patch].astype(np.float32)
        n_bank = min(self.max_bank, max(1, int(np.ceil(self.coreset * len(candidates)))))
        if n_bank >= len(candidates):
            return candidates
        d = candidates.shape[1]
        projected = candidates
        if d > PROJECTED_DIMS:
            projection = np.random.default_rng(projection_seed).normal(size=(d, PROJECTED_DIMS))
            projected = candidates @ (projection / np.sqrt(PROJECTED_DIMS)).astype(np.float32)
        start = int(np.random.default_rng(start_seed).integers(len(candidates)))
        return candidates[k_center_greedy(projected, n_bank, start)]

    def _cross_fitted_scores(self, maps, y01, groups, keys=None) -> np.ndarray:
        """As ``_OneClass``'s, folds from the rows' hashes (``keys``) or ``groups``, but the folds' models are
        fitted from row indices, not from copies of the rows (a copy of 4/5 of the patch maps is gigabytes)."""
        patches = _as_patches(maps)
        keys = _row_keys(maps) if keys is None else keys
        folds = _fold_of_rows(np.frombuffer(keys.tobytes(), np.uint8).reshape(len(keys), -1), groups, self.cv)
        scores = np.empty(len(maps))
        for fold in np.unique(folds):
            held_out = np.flatnonzero(folds == fold)
            fit_rows = np.flatnonzero((folds != fold) & (y01 == 0))
            bank = self._bank(patches, fit_rows, keys) if len(fit_rows) >= 2 else self.bank_
            scores[held_out] = _image_scores(bank, patches, held_out)
        return scores

    def _check_maps(self, X, reset: bool = False) -> np.ndarray:
        X = check_array(X, allow_nd=True, dtype=[np.float32, np.float16], input_name="X")
        if X.ndim not in (3, 4):
            raise ValueError(f"{type(self).__name__} needs patch maps, X of shape [N, gh, gw, d] or [N, P, d]; got "
                             f"a {X.ndim}-D array of shape {X.shape}")
        if X.ndim == 4 and self.pool > 1:
            X = _block_means(X, self.pool)
        if reset:
            self.n_features_in_ = X.shape[-1]
        elif X.shape[-1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[-1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        return X


def k_center_greedy(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Indices of ``n`` of ``points`` [M, d], from ``start``, each the point farthest from those chosen before.

    Exact (up to rounding), without a pass over all points per centre, which costs seconds for 20,000 x 2,000:
    new centres reach every point's distance ``COMMIT_EVERY`` at a time, by one matrix product; in between, the
    next centre is found among the points whose stale distance (an upper bound, distances only shrink) is the
    largest, updated with the uncommitted centres until one's true distance beats every other's bound.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    if not 1 <= n <= len(points):
        raise ValueError(f"cannot choose {n} of {len(points)} points")
    squares = np.einsum("ij,ij->i", points, points)

    def squared_distances(rows: np.ndarray | slice, centres: list[int]) -> np.ndarray:
        products = points[rows] @ (-2 * points[centres].T)
        products += squares[rows, None]
        products += squares[centres][None]
        return np.maximum(products.min(axis=1), 0)

    everything = slice(None)
    chosen = [start]
    bound = squared_distances(everything, chosen)
    bound[start] = -1  # chosen points are never chosen again, even when they are all that is left
    pending: list[int] = []
    while len(chosen) < n:
        if pending:
            chosen.append(_farthest(bound, pending, squared_distances))
        else:
            chosen.append(int(np.argmax(bound)))
        bound[chosen[-1]] = -1
        pending.append(chosen[-1])
        if len(pending) == COMMIT_EVERY:
            np.minimum(bound, squared_distances(everything, pending), out=bound)
            pending = []
    return np.array(chosen)


def _farthest(bound: np.ndarray, pending: list[int], squared_distances) -> int:
    """The point whose distance to the chosen points, ``bound`` lowered by the ``pending`` centres, is largest."""
    m = 32
    while True:
        if m >= len(bound):
            top, next_bound = np.arange(len(bound)), -np.inf
        else:
            part = np.argpartition(-bound, m)
            top, next_bound = part[:m], bound[part[m]]
        true = np.minimum(bound[top], squared_distances(top, pending))
        best = int(np.argmax(true))
        if true[best] >= next_bound:
            return int(top[best])
        m *= 4


def _block_means(maps: np.ndarray, k: int) -> np.ndarray:
    """[N, gh, gw, d] -> [N, ceil(gh / k), ceil(gw / k), d] float32: the mean of each k x k block of cells."""
    out = maps
    for axis in (1, 2):
        starts = np.arange(0, out.shape[axis], k)
        sizes = np.diff(np.append(starts, out.shape[axis])).reshape([-1 if a == axis else 1 for a in range(4)])
        out = np.add.reduceat(out.astype(np.float32, copy=False), starts, axis=axis) / sizes
    return out.astype(np.float32)


def _row_keys(maps: np.ndarray) -> np.ndarray:
    """A hash of each image's bytes (SHA-1: fast, and no collisions among millions of images): [N] of 'S20'."""
    return np.array([hashlib.sha1(np.ascontiguousarray(row)).digest() for row in maps], dtype="S20")


def _as_patches(maps: np.ndarray) -> np.ndarray:
    return maps.reshape(len(maps), -1, maps.shape[-1])


def _image_scores(bank: np.ndarray, patches: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    return _nearest_distances(bank, patches, rows).max(axis=1).astype(np.float64)


def _nearest_distances(bank: np.ndarray, patches: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The distance of each patch of images ``rows`` (default: all) of ``patches`` [N, P, d] to its nearest row
    of ``bank``: [len(rows), P] float32.

    Exact search with faiss (flat L2: ~2x scikit-learn's brute force). One image per search, on one thread:
    faiss's distances for large searches change in the last bits with the query's position and the thread
    count, and an image's score must not depend on the images scored with it. faiss is imported here: it loads
    its own OpenBLAS and OpenMP, which only processes that score patch maps need.
    """
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    rows = np.arange(len(patches)) if rows is None else rows
    squared = np.empty((len(rows), patches.shape[1]), np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # OpenMP's thread count is per calling thread: other threads keep theirs
    try:
        for i, row in enumerate(rows):
            squared[i] = index.search(np.ascontiguousarray(patches[row], dtype=np.float32), 1)[0][:, 0]
    finally:
        faiss.omp_set_num_threads(threads)
    return np.sqrt(np.maximum(squared, 0))


__all__ = ["PatchCore", "k_center_greedy"]
