"""Read cached features for analysis: ``load_features`` gives arrays ready for scikit-learn."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
from threadpoolctl import threadpool_limits

from xfeat.features.cache import (FLIPS, SLAB_BYTES, CacheError, Damage, GroupSettings,
                                  cache_bytes, cache_path, check_segments, damage_error, missing_segments_of,
                                  nonfinite_rows, open_cache, read_checked, scan_group, segment_count,
                                  stored_window_stats)
from xfeat.errors import XfeatWarning
from xfeat.features.writer import bad_journal_batches
from xfeat.convert.stats import WindowStats

LAYERS = ("pool", "fc1000", "local", "patches")


@dataclass(frozen=True)
class FeatureSet:
    """Features of one (backbone, method, input size) group, row-aligned with their images.

    ``X`` is [N, D] for one flip variant, [N, F, D] with ``flips="all"``; ``y`` is 1 for abnormal;
    ``groups`` holds the bundles (the groups of leave-one-bundle-out). Rows are sorted by bundle, then path:
    the order in which images happened to be extracted never reaches a result.
    """

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    paths: np.ndarray
    sha256: np.ndarray
    layer: str
    flips: tuple[str, ...]
    settings: GroupSettings
    fc_weight: np.ndarray
    fc_bias: np.ndarray
    window_stats: WindowStats | None = None

    @property
    def random_weights(self) -> bool:
        """True when the backbone had random weights (``--weights none``): results mean little."""
        return self.settings.weights_kind == "none"

    def select(self, rows: np.ndarray) -> FeatureSet:
        """The same features for some rows only (a boolean mask or indices)."""
        return replace(self, X=self.X[rows], y=self.y[rows], groups=self.groups[rows], paths=self.paths[rows],
                       sha256=self.sha256[rows])

    def to_frame(self):
        """A pandas DataFrame: path, bundle, label and one column per feature (first flip variant)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("FeatureSet.to_frame needs pandas: pip install pandas") from None
        X = self.X if self.X.ndim == 2 else self.X[:, 0]
        frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
        frame.insert(0, "label", self.y)
        frame.insert(0, "bundle", self.groups)
        frame.insert(0, "path", self.paths)
        return frame


def fc1000(pool: np.ndarray, fc_weight: np.ndarray, fc_bias: np.ndarray) -> np.ndarray:
    """The ImageNet logits layer from pooled features: what the ResNet-50 paper used as features.

    On one BLAS thread: OpenBLAS's float32 product rounds differently on 2 threads than on 1, and these features
    must be the same bits in the main process and in joblib or Dask workers (which start with one thread).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return (pool @ fc_weight.T + fc_bias).astype(np.float32)


def list_groups(cache: str | os.PathLike[str]) -> list[GroupSettings]:
    """The settings of every feature group a cache holds."""
    with open_cache(cache) as f:
        return [GroupSettings.from_attrs(g.attrs) for g in _groups(f)]


def _groups(f: h5py.File) -> list[h5py.Group]:
    """Every group under /features that carries settings: features/<backbone>/<method>/<H>x<W>, where a timm
    backbone's name (timm/NAME) nests one level deeper."""
    found: list[h5py.Group] = []
    if "features" in f:
        f["features"].visititems(
            lambda _, item: found.append(item) if isinstance(item, h5py.Group) and "backbone" in item.attrs else None)
    return found


def load_features(cache: str | os.PathLike[str], backbone: str = "resnet34", method: str = "m2", *,
                  layer: str = "pool", size: str | tuple[int, int] | None = None,
                  flips: str = "none", bundles: Sequence[str] | None = None,
                  rows: Sequence[int] | np.ndarray | None = None) -> FeatureSet:
    """Load one group's features.

    ``size`` ("2000x1000", (2000, 1000), or a tiled geometry such as "512x512_t4x2") may be left out when the
    cache holds one for this backbone and method. ``flips`` is a flip variant (none, h, v, hv) giving X [N, D],
    or ``"all"`` giving X [N, F, D]. ``layer`` is ``pool`` (the pooled trunk output), ``fc1000`` (the ImageNet
    logits), ``local`` (statistics of the mid-level stages, ``xfeat extract --taps pool,local``), several of
    these joined side by side (``pool+local``), or ``patches`` (X [N, rows, columns, D] float16 patch maps,
    ``--patch-maps``, unflipped only). ``bundles`` keeps the images of those bundles only; ``rows`` (indices,
    or a boolean mask) then keeps those rows of what would be returned without it, so ``load_features(c,
    rows=r)`` equals ``load_features(c).select(r)``.

    Reads are bounded by what is asked: the per-image metadata of the group, then the features of the rows
    kept, slab by slab into the array returned (for one flip, only that flip's values are copied out). Memory:
    the array returned plus about 0.7 KB per cached image for the metadata (paths, bundles, content hashes)
    plus one 64 MB slab: a measured peak of 6.9 GB (1.34x) for the pooled lite0 vectors (1280-d) of a million images.
    """
    parts = parse_layer(layer)
    if parts == ("patches",) and flips != "none":
        raise CacheError(f"{cache}: patch maps are stored for unflipped images only; ask for flips='none'")
    with open_cache(cache) as f, _structure_errors(cache):
        base = f"features/{backbone}/{method}"
        if base not in f:
            have = sorted({f"{g.attrs['backbone']}/{g.attrs['method']}" for g in _groups(f)})
            raise CacheError(f"{cache}: no features for {backbone}/{method}; the cache holds "
                             f"{', '.join(have) or 'nothing yet'}")
        sizes = sorted(name for name in f[base] if "." not in name)  # size.local, size.patches: taps of a size
        if size is None:
            if len(sizes) > 1:
                raise CacheError(f"{cache}: {backbone}/{method} has several input sizes ({', '.join(sizes)}); "
                                 "choose one with size=")
            size = sizes[0]
        elif not isinstance(size, str):
            size = f"{size[0]}x{size[1]}"
        if size not in sizes:
            raise CacheError(f"{cache}: no {backbone}/{method} features at {size}; sizes: {', '.join(sizes)}")
        read = [_read_layer(f, cache, f"{base}/{size}", part, flips, bundles, rows) for part in parts]
        first = read[0]
        for other, part in zip(read[1:], parts[1:]):
            if not (np.array_equal(other.paths, first.paths) and np.array_equal(other.sha256, first.sha256)):
                raise CacheError(f"{cache}: {base}/{size}: the {parts[0]} and {part} taps hold different images; "
                                 f"run xfeat extract --taps {','.join(sorted(set(parts) - {'fc1000'} | {'pool'}))} "
                                 "again to complete them")
        X = read[0].X if len(read) == 1 else np.concatenate([r.X for r in read], axis=-1)
        return replace(first, X=X, layer=layer, window_stats=stored_window_stats(f))


def parse_layer(layer: str) -> tuple[str, ...]:
    """``pool``, ``fc1000``, ``local``, ``patches`` or vector layers joined by ``+`` -> the parts; else an error."""
    parts = tuple(layer.split("+"))
    if any(p not in LAYERS for p in parts) or len(set(parts)) < len(parts) or ("patches" in parts and len(parts) > 1):
        raise CacheError(f"unknown layer {layer!r}; one of {', '.join(LAYERS)}, or vector layers joined by + "
                         "(pool+local)")
    return parts


def _read_layer(f: h5py.File, cache, key: str, layer: str, flips: str, bundles: Sequence[str] | None = None,
                rows: Sequence[int] | np.ndarray | None = None) -> FeatureSet:
    """One layer of one geometry: its tap's group read and checked, rows one per file content, sorted, then the
    subset asked for; features read only for the rows kept."""
    key = key + {"local": ".local", "patches": ".patches"}.get(layer, "")
    if key not in f:
        option = "--patch-maps" if layer == "patches" else f"--taps pool,{layer}"
        raise CacheError(f"{cache}: no {layer} features in {key.rsplit('.', 1)[0]}; run xfeat extract with {option}")
    group = f[key]
    check_segments(cache, group)
    settings = GroupSettings.from_attrs(group.attrs)
    stored_flips = tuple(settings.flips.split(","))
    if flips != "all" and flips not in stored_flips:
        raise CacheError(f"{cache}: flip {flips!r} not stored; this group holds {', '.join(stored_flips)} "
                         "(or ask for flips='all')")
    # Every value read is checked (checksums, impossible values): damage is an error, never a result.
    flip = None if flips == "all" or layer == "patches" else stored_flips.index(flips)
    c, _, damages = scan_group(group, ("path", "bundle", "label", "sha256"), fc=True)
    if damages:
        raise damage_error(cache, damages)
    fc_weight, fc_bias = c["fc_weight"], c["fc_bias"]
    sha256 = c["sha256"]
    order = _latest_per_content(sha256, cache, key)
    order = order[np.lexsort((c["path"][order], c["bundle"][order]))]  # bundle, then path: not extraction order
    if bundles is not None:
        order = order[np.isin(c["bundle"][order], list(bundles))]
    if rows is not None:
        rows = np.asarray(rows)
        order = order[rows if rows.dtype == bool else rows.astype(np.intp)]
    pool, broken = _read_rows(cache, group[settings.data_name], order, flip)
    if broken:  # they passed the checksum: computed so (the weights, or fp16 overflowing)
        raise CacheError(f"{cache}: {key}/{settings.data_name}: non-finite features (NaN or inf) in "
                         f"{broken} row(s), as computed; check the weights, or extract with --precision fp32")
    if layer == "fc1000":
        if pool.shape[-1] != fc_weight.shape[1]:
            raise CacheError(f"{cache}: {key}: the pooled tap joins tiles ({settings.tile_combine}), which the "
                             "ImageNet fc layer does not take; use layer pool")
        X = fc1000(pool, fc_weight, fc_bias)
    else:
        X = pool
    return FeatureSet(
        X=X, y=c["label"][order], groups=c["bundle"][order], paths=c["path"][order], sha256=sha256[order],
        layer=layer, flips=stored_flips if flips == "all" else (flips,), settings=settings, fc_weight=fc_weight,
        fc_bias=fc_bias)


def _read_rows(cache, ds: h5py.Dataset, order: np.ndarray, flip: int | None) -> tuple[np.ndarray, int]:
    """``ds[order]`` (one flip's column with ``flip``), read slab by slab straight into the array returned,
    every chunk checked, and the number of rows holding a NaN or an infinity (checked slab by slab too: a
    whole-array check would take a quarter of the array's memory again); slabs holding none of the rows are
    not read."""
    shape = ds.shape[1:] if flip is None else ds.shape[2:]
    vectors = ds.name.rsplit("/", 1)[-1] != "patches"  # float16-stored vectors are returned as float32, as always
    out = np.empty((len(order), *shape), dtype=np.float32 if vectors else ds.dtype)
    broken = 0
    if not len(order):
        return out, broken
    row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
    step = ds.chunks[0] if ds.chunks else 16
    slab = max(step, SLAB_BYTES // row_bytes // step * step)
    where = np.argsort(order, kind="stable")
    wanted = order[where]
    i = 0
    while i < len(wanted):
        a = int(wanted[i]) // slab * slab
        b = min(ds.shape[0], a + slab)
        j = int(np.searchsorted(wanted, b))
        block, unreadable, _ = read_checked(ds, flip, span=(a, b))
        if unreadable.any():
            raise damage_error(cache, [Damage(ds.name.lstrip("/"), "checksum mismatch (damaged file)",
                                              a + np.flatnonzero(unreadable))])
        picked = wanted[i:j] - a
        whole = len(picked) == len(block) and bool((picked == np.arange(len(block))).all())
        rows = block if whole else block[picked]  # all of a slab: no gather
        broken += int(nonfinite_rows(rows).sum())
        out[where[i:j]] = rows
        i = j
    return out, broken


@dataclass(frozen=True)
class RowCheck:
    """Cached rows left out because the dataset changed since extraction (``only_current``)."""

    gone: int = 0  # rows whose file is no longer in the dataset
    changed: int = 0  # rows whose file's content changed (extract again to refresh them)
    missing: int = 0  # dataset images with no row here (extract them)

    def note(self, what: str) -> str:
        """A warning in words about ``what`` (e.g. the cache group), or "" when the cache matches the dataset."""
        parts = []
        if self.gone:
            parts.append(f"left out {self.gone} cached row(s) whose file is gone from the dataset")
        if self.changed:
            parts.append(f"left out {self.changed} row(s) of an older content of a file")
        if self.missing:
            parts.append(f"{self.missing} dataset image(s) have no features of their current content (run xfeat "
                         "extract)")
        return f"{what}: {'; '.join(parts)}" if parts else ""


def only_current(fs: FeatureSet, current: Mapping[str, str]) -> tuple[FeatureSet, RowCheck]:
    """The rows of ``fs`` whose file is in ``current`` (path -> sha256 of a dataset now) with that content."""
    keep = np.array([current.get(p) == h for p, h in zip(fs.paths, fs.sha256)], dtype=bool)
    gone = int(sum(p not in current for p in fs.paths))
    held, contents = set(fs.paths[keep].tolist()), set(fs.sha256[keep].tolist())
    check = RowCheck(gone=gone, changed=int(len(keep) - keep.sum() - gone),  # a copy of a held content is not missing
                     missing=sum(p not in held and h not in contents for p, h in current.items()))
    return fs.select(keep), check


@contextmanager
def _structure_errors(cache) -> Iterator[None]:
    """Damage to HDF5's own structures (object headers, chunk indexes) is one line too, not a traceback."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CacheError(f"{cache}: unreadable HDF5 structure ({first}) (damaged file); restore a copy, or move it "
                         "away and extract again") from None


def _latest_per_content(sha256: np.ndarray, cache, key: str) -> np.ndarray:
    """Row indices keeping one row per file content: the latest written.

    A file moved to another label folder or bundle gets a new row under its new path; keeping both would
    count the image twice, with two labels or in two folds.
    """
    _, last_from_end = np.unique(sha256[::-1], return_index=True)
    rows = np.sort(len(sha256) - 1 - last_from_end)
    if len(rows) < len(sha256):
        warnings.warn(f"{cache}: {key} holds {len(sha256) - len(rows)} older row(s) of files that moved or are "
                      "duplicated; using the latest row of each file content", XfeatWarning, stacklevel=3)
    return rows


@dataclass
class GroupInfo:
    """What ``xfeat info`` shows of one group."""

    settings: GroupSettings
    n_images: int
    counts: dict[tuple[str, int], int]  # (bundle, label) -> images
    missing: list[str] = field(default_factory=list)  # dataset images with no features here
    stale: list[str] = field(default_factory=list)  # images whose file changed since extraction
    not_in_dataset: int = 0
    damage: list[str] = field(default_factory=list)  # "dataset rows: problem" per damaged dataset (rows left out)


@dataclass
class CacheInfo:
    path: Path
    size_bytes: int
    attrs: dict
    window_stats: WindowStats | None
    groups: list[GroupInfo]
    pending_batches: int  # journal files an interrupted run left; the next extract merges them
    bad_batches: list[str] = field(default_factory=list)  # with verify: journal files the next extract discards
    segments: int = 0  # segment files the index reads (0: a single-file cache)

    @property
    def damaged(self) -> bool:
        return any(g.damage for g in self.groups)


def describe_cache(cache: str | os.PathLike[str], dataset_hashes: dict[str, str] | None = None, *,
                   verify: bool = False) -> CacheInfo:
    """Summarise a cache; with ``dataset_hashes`` (path -> sha256 of a dataset) also what is missing or stale.

    The per-image datasets read are checked, and damaged rows left out of the counts; ``verify`` also reads
    and checks every feature (and the journal's batches): what ``xfeat info --verify`` reports.
    """
    path = Path(cache)
    infos = []
    with open_cache(path) as f, _structure_errors(cache):
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items() if k != "window_stats"}
        stats = stored_window_stats(f)
        for group in _groups(f):
            names = ("path", "relpath", "bundle", "label", "sha256", "height", "width") + (("pool",) if verify else ())
            lost = [f"segment {p}: missing or not an HDF5 file ({n} rows)" for p, n in missing_segments_of(group)]
            c, bad, damages = scan_group(group, names, fc=verify)
            ok = ~bad
            paths, hashes = c["path"][ok], c["sha256"][ok]
            counts = Counter(zip(c["bundle"][ok].tolist(), c["label"][ok].tolist()))
            info = GroupInfo(GroupSettings.from_attrs(group.attrs), len(paths), dict(sorted(counts.items())),
                             damage=lost + [d.describe() for d in damages if not lost])
            if dataset_hashes is not None:
                held = dict(zip(paths, hashes))
                info.missing = [p for p in dataset_hashes if p not in held]
                info.stale = [p for p, h in dataset_hashes.items() if p in held and held[p] != h]
                info.not_in_dataset = sum(p not in dataset_hashes for p in held)
            infos.append(info)
    journal = Path(f"{cache_path(path)}.journal")
    pending = len(list(journal.glob("*.npz"))) if journal.exists() else 0
    bad = [str(b) for b in bad_journal_batches(path)] if verify and pending else []
    return CacheInfo(path, cache_bytes(path), attrs, stats, infos, pending, bad, segment_count(path))


__all__ = ["FeatureSet", "RowCheck", "load_features", "only_current", "list_groups", "describe_cache", "fc1000", "FLIPS"]
