"""Near-duplicates across bundles: the same part imaged twice, found from its cached features.

Leave-one-bundle-out counts on bundles being independent. A file copied into two bundles is caught by its
content hash (``xfeat.io.dataset``), but not the same electrode X-rayed twice or re-exported (another exposure,
a pixel changed): if the two images sit in different bundles, the classifier is tested on a part it was
trained on, and every figure comes out too good.

The rule, as a QC engineer can check it by hand:

1. Images are compared by the direction of their feature vectors (each is scaled to length 1): the distance
   is the cosine distance ``sqrt(2 - 2 cos)``, 0 for identical features, at most 2.
2. For every image, find the closest image in *another* bundle. The median of those distances is the
   **typical distance**: how close an image usually gets to the most similar part made elsewhere.
3. Two images in different bundles are a **near-duplicate** pair when both hold:
   - they are closer than ``RATIO`` = 0.1 of the typical distance (ten times closer than usual), and
   - they are closer than ``LOCAL`` = 0.5 of the distance from either of them to the nearest other image of
     its own bundle: a part imaged twice is far closer to its twin than to its bundle-mates, while lookalike
     parts (a bundle whose images all look the same) are as close to their mates as to each other.
   Identical features (distance 0) are always reported. Pairs inside one bundle never are: they stay in one
   fold. A bundle of a single image has no bundle-mates: its pairs need only the first condition.

Why these constants (efficientnet_lite0 features; synthetic electrodes: 6 bundles, 60 images of 256 x 128 or
512 x 256 px, methods m1 / m2 / m3, input 224 x 112; ELPV solar cells: 44 modules, 2,624 real images, input
224 x 224; copies planted in other bundles), in fractions of the typical distance, ImageNet weights:

- two *different* parts in different bundles: ELPV 0.44 and up; synthetic m2 / m3 0.29 and up; synthetic m1,
  where the images are nearly black, down to 0.02 between a planted copy and the lookalike parts of its
  source's bundle, but those are as close to their own mates (1.0-1.7 times the pair's distance): the second
  condition. Of all pairs of different parts, one had both ratios under 0.3 and 0.5 (0.22 and 0.08);
- the same file with one pixel changed: 0.000-0.001; with another exposure (gain 0.5-4 %, offset): 0.03-0.08
  under m3 (each image's own window undoes the exposure) and on ELPV (gain 2 %), at 0.05-0.28 of their
  distance to their bundle-mates. 0.1 is the round fraction between the two groups.

With random weights (``--weights none``) the typical distance is tiny (0.001-0.075: the feature vectors are
nearly parallel) and different parts come as close as 0.125, a thin margin (all but one such pair, at 0.15
and 0.14, also fail the second condition). One-pixel copies are still found, m3 exposure changes sometimes
(0.07-0.35), ELPV's 2 % gain not (0.51).

What it does not catch: pooled (globally averaged) features describe an image's overall look, not where each
detail of the part lies. A true re-shoot with fresh detector noise, added noise, a shift of a few pixels, or
an exposure change under m1 / m2 (fixed windows) moves an image as far from its twin as a different part is
(0.15-5 of the typical distance), and so does a gain of 10 % on ELPV (0.28). A part imaged twice in one
bundle and once in another is missed too (its twin is its nearest bundle-mate). So a clean check proves
little about re-shoots, while a warning is strong evidence; exposure changes show best on m3 features.

Cost: a float64 matrix product screens blocks of ``BLOCK`` rows against all rows (never an N x N matrix:
20,000 images go through [256, 20,000] blocks; ~1e12 operations at 1,280 features, 2.5 minutes on this
project's busy 2-core machine), and every distance that decides anything (each nearest distance, each
pair) is recomputed in float64 from the two rows alone: the same bits whatever the row order, the BLAS and
its number of threads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from xfeat.errors import XfeatError
from xfeat.features.reading import load_features
from xfeat.learn.binary import row_sums

RATIO = 0.1  # of the typical distance; the module docstring gives the measurements behind both constants
LOCAL = 0.5  # of the distance from either image to the nearest other image of its own bundle
BLOCK = 256  # rows screened at a time: two [BLOCK, N] float64 blocks (41 MB each at N = 20,000)
KEEP = 8  # closest other-bundle rows remembered per row; a row with more candidates is screened again
CSV_FILE = "near_duplicates.csv"
CSV_COLUMNS = ("path_a", "bundle_a", "path_b", "bundle_b", "distance", "ratio")
_EXACT_CHUNK = 2048  # pairs recomputed at a time: bounded memory even when many rows tie


@dataclass(frozen=True)
class NearDuplicatePair:
    """Two images in different bundles that look like the same part; a is the one whose path sorts first."""

    path_a: str
    bundle_a: str
    path_b: str
    bundle_b: str
    distance: float  # cosine feature distance, 0..2
    ratio: float  # distance / the typical distance


@dataclass(frozen=True)
class NearDuplicates:
    """The near-duplicate pairs of one feature group, closest first, and what they were measured against."""

    pairs: list[NearDuplicatePair]
    typical_distance: float  # median over images of the distance to the nearest image in another bundle
    ratio: float  # pairs closer than ratio x typical_distance ...
    local: float  # ... and than local x the distance from either image to its nearest own-bundle mate
    nearest_distance: np.ndarray  # per image (input order): distance to its nearest image in another bundle
    own_distance: np.ndarray  # per image: distance to its nearest other image in its own bundle (inf: none)
    n_bundles: int

    @property
    def rule(self) -> str:
        return (f"images in different bundles closer than {self.ratio:g} x the typical distance to another "
                f"bundle ({self.typical_distance:.4g}, cosine distance of the features) and than {self.local:g} x "
                "the distance from either to its nearest own-bundle image, or with identical features")

    def __len__(self) -> int:
        return len(self.pairs)

    def warning(self, csv: str = CSV_FILE, what: str = "") -> str:
        """The console line for a run that found pairs ("" when none); ``what`` names the features checked."""
        if not self.pairs:
            return ""
        first = self.pairs[0]
        what = f"{what}: " if what else ""
        return (f"xfeat: warning: {what}{len(self.pairs)} near-duplicate pair(s) across bundles (closest: "
                f"{first.path_a} "
                f"in {first.bundle_a} and {first.path_b} in {first.bundle_b}, {first.ratio:.2f} of the typical "
                f"distance): the same part in two bundles inflates every figure; see {csv}; "
                "--allow-near-duplicates to silence")

    def rows(self) -> list[dict]:
        """One dict per pair with the columns of ``CSV_COLUMNS``, ready for ``csv.DictWriter``."""
        return [asdict(p) for p in self.pairs]


def near_duplicates(X: np.ndarray, groups: np.ndarray, paths: np.ndarray, *, ratio: float = RATIO,
                    local: float = LOCAL, block: int = BLOCK) -> NearDuplicates:
    """Pairs of images in different bundles far closer than images usually are to another bundle.

    ``X`` [N, D]: pooled features of one (backbone, method) group, one flip variant (``load_features(...,
    flips="none")``); ``groups`` [N]: bundles; ``paths`` [N]: what names each image in the report. The rule
    and its constants are in the module docstring.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise XfeatError(f"near-duplicate check needs features [N, D] of one flip variant, got shape {X.shape}")
    groups, paths = np.asarray(groups).astype(str), np.asarray(paths).astype(str)
    if len(groups) != len(X) or len(paths) != len(X):
        raise XfeatError(f"near-duplicate check: {len(X)} feature rows but {len(groups)} bundles and "
                         f"{len(paths)} paths")
    if not np.isfinite(X).all():
        raise XfeatError("near-duplicate check: features hold NaN or inf")
    if not (0 < ratio < 1 and 0 < local <= 1):
        raise XfeatError(f"near-duplicate ratio must be in (0, 1) and local in (0, 1], not {ratio} and {local}")
    if block < 1:
        raise XfeatError(f"near-duplicate block must be at least 1 row, not {block}")
    names, bundle = np.unique(groups, return_inverse=True)
    n = len(X)
    if len(names) < 2:
        return NearDuplicates([], float("nan"), ratio, local, np.full(n, np.nan), np.full(n, np.nan), len(names))

    unit = _unit_rows(X)
    # A bound on |screened - recomputed| squared distance for unit rows, whatever the order of either sum: about
    # 2 D u from the product, 4 D u from the recomputation, 2 D u from row norms not exactly 1 (u the unit
    # roundoff), doubled. float64: features from random weights are nearly parallel (typical distance ~0.001,
    # squared 1e-6), below what a float32 product resolves.
    margin = 16.0 * (X.shape[1] + 4) * 2.0 ** -53
    nearest, own = np.empty(n), np.empty(n)
    keep = min(KEEP, n)
    kept_rows = np.empty((n, keep), dtype=np.int64)
    kept_d2 = np.empty((n, keep))
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        other, same = _screened(unit, rows, bundle)
        nearest[rows] = _nearest(unit, rows, other, margin)
        own[rows] = _nearest(unit, rows, same, margin)
        part = np.argpartition(other, keep - 1, axis=1)[:, :keep]
        kept_rows[rows] = part
        kept_d2[rows] = np.take_along_axis(other, part, axis=1)

    typical = float(np.median(nearest))
    limit = ratio * typical
    bound = limit * limit + margin  # a pair closer than limit screens below this
    i, k = np.nonzero(kept_d2 <= bound)
    j = kept_rows[i, k]
    full = np.flatnonzero(kept_d2.max(axis=1) <= bound)  # rows that may hold more candidates than were kept
    for start in range(0, len(full), block):
        rows = full[start:start + block]
        fi, fj = np.nonzero(_screened(unit, rows, bundle)[0] <= bound)
        i, j = np.concatenate([i, rows[fi]]), np.concatenate([j, fj])
    pairs = np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1).reshape(-1, 2), axis=0)
    distance = _exact(unit, pairs[:, 0], pairs[:, 1])
    apart = np.minimum(own[pairs[:, 0]], own[pairs[:, 1]])  # inf when both bundles hold one image
    found = ((distance < limit) & (distance < local * apart)) | (distance == 0)
    return NearDuplicates(_records(pairs[found], distance[found], typical, groups, paths), typical, ratio, local,
                          nearest, own, len(names))


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 in float64 (an all-zero row stays zero), computed from that row alone."""
    unit = np.array(X, dtype=np.float64)
    norms = np.sqrt(row_sums(unit * unit))
    nonzero = norms > 0
    unit[nonzero] /= norms[nonzero, None]
    return unit


def _screened(unit: np.ndarray, rows: np.ndarray, bundle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances [len(rows), N] from a matrix product (rounding set by the BLAS): to the other bundles'
    rows (inf within the bundle), and to the other rows of the same bundle (inf elsewhere and on the row)."""
    other = unit[rows] @ unit.T
    other *= -2
    other += 2
    within = bundle[rows][:, None] == bundle[None, :]
    same = np.where(within, other, np.inf)
    same[np.arange(len(rows)), rows] = np.inf
    other[within] = np.inf
    return other, same


def _nearest(unit: np.ndarray, rows: np.ndarray, d2: np.ndarray, margin: float) -> np.ndarray:
    """The exact distance from each row to its nearest column of screened squared distances d2 (inf: none).

    Every column that could be the nearest once computed exactly (screened within 2 margins of the smallest)
    is recomputed, so the answer does not depend on the screen's rounding."""
    low = d2.min(axis=1)
    out = np.full(len(rows), np.inf)
    i, j = np.nonzero((d2 <= (low + 2 * margin)[:, None]) & (d2 < np.inf))  # none where all are inf
    np.minimum.at(out, i, _exact(unit, rows[i], j))
    return out


def _exact(unit: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distance of each pair (a[k], b[k]) in float64 from the two rows alone: the same bits whichever
    order the rows came in and whichever pass found the pair."""
    out = np.empty(len(a))
    for s in range(0, len(a), _EXACT_CHUNK):
        diff = unit[a[s:s + _EXACT_CHUNK]] - unit[b[s:s + _EXACT_CHUNK]]
        out[s:s + _EXACT_CHUNK] = np.sqrt(row_sums(diff * diff))
    return out


def _records(pairs: np.ndarray, distance: np.ndarray, typical: float, groups: np.ndarray,
             paths: np.ndarray) -> list[NearDuplicatePair]:
    found = []
    for (i, j), d in zip(pairs, distance):
        if (paths[j], groups[j]) < (paths[i], groups[i]):
            i, j = j, i
        found.append(NearDuplicatePair(str(paths[i]), str(groups[i]), str(paths[j]), str(groups[j]), float(d),
                                       float(d / typical) if typical > 0 else 0.0))
    found.sort(key=lambda p: (p.distance, p.path_a, p.path_b, p.bundle_a, p.bundle_b))
    return found


def near_duplicates_in_cache(cache, groups) -> list[tuple[str, NearDuplicates]]:
    """``near_duplicates`` of each (backbone, method, size, paths) in ``groups``: the pooled, unflipped features
    of those rows (the rows an evaluation used), labelled "backbone/method"; each group checked once."""
    found = {}
    for backbone, method, size, paths in groups:
        key = f"{backbone}/{method}" + (f" {size}" if size else "")
        if key in found:
            continue
        fs = load_features(cache, backbone, method, layer="pool", size=size or None, flips="none")
        rows = np.isin(fs.paths, np.asarray(paths))
        found[key] = near_duplicates(fs.X[rows], fs.groups[rows], fs.paths[rows])
    return list(found.items())
