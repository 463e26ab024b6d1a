"""The HDF5 feature cache: one self-describing file that plain h5py, MATLAB or R can read.

Layout (documented in docs/cache-format.md)::

    /                                   attrs: format, format_version, xfeat_version, created, updated,
                                               window_stats (JSON), g_min, g_max
    /features/<backbone>/<method>/<H>x<W>    attrs: the settings the features were computed with
        pool       float32 [N, F, D]   pooled trunk output for F flip variants (none, h, v, hv)
        fc_weight  float32 [1000, D]   the backbone's ImageNet fc layer: fc1000 = pool @ fc_weight.T + fc_bias
        fc_bias    float32 [1000]
        path, relpath, bundle: strings [N];  label int8 [N] (1 = abnormal);  sha256 [N];  height, width [N]

Crash safety: the cache file is never modified in place. A run appends each computed batch to a journal
folder beside it (``CACHE.journal/``, one file per batch, each written to a temporary name and renamed);
a commit copies the cache, merges the journal into the copy and renames the copy over the cache. A kill at
any moment leaves the last committed cache intact and every finished batch in the journal, which the next
run merges first. A lock file (``CACHE.lock``) keeps a second writer out.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from xfeat import __version__
from xfeat.errors import XfeatError
from xfeat.io.atomic import atomic_write, replacing
from xfeat.convert.stats import WindowStats

FORMAT = "xfeat.features"
FORMAT_VERSION = 1
FLIPS = ("none", "h", "v", "hv")
STR = h5py.string_dtype("utf-8")
SHA = "S64"
ROW_FIELDS = ("path", "relpath", "bundle", "label", "sha256", "height", "width")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class GroupSettings:
    """Everything that decides a group's features; a run whose settings differ never writes into it."""

    backbone: str
    method: str
    input_height: int
    input_width: int
    flips: str  # comma-separated, in FLIPS order
    feature_dim: int
    weights_kind: str  # imagenet | file | none
    weights_name: str
    weights_sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str
    precision: str
    g_min: int = -1  # the global window used (-1 when the method needs none)
    g_max: int = -1

    @property
    def key(self) -> str:
        return f"features/{self.backbone}/{self.method}/{self.input_height}x{self.input_width}"

    @property
    def n_flips(self) -> int:
        return len(self.flips.split(","))

    def attrs(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs: h5py.AttributeManager) -> "GroupSettings":
        values = {}
        for f in fields(cls):
            value = attrs[f.name]
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, np.ndarray):
                value = tuple(float(v) for v in value)
            elif isinstance(value, np.generic):
                value = value.item()
            values[f.name] = value
        return cls(**values)

    def differences(self, other: "GroupSettings") -> list[str]:
        return [f"{f.name} {getattr(other, f.name)!r} (this run: {getattr(self, f.name)!r})"
                for f in fields(self) if _norm(getattr(self, f.name)) != _norm(getattr(other, f.name))]


def _norm(value):
    return tuple(round(float(v), 6) for v in value) if isinstance(value, (tuple, list)) else value


@dataclass
class Rows:
    """Feature rows of one group with their per-image metadata, as computed by one batch."""

    features: np.ndarray | None  # [k, F, D] float32; None for a metadata-only update
    path: list[str]
    relpath: list[str]
    bundle: list[str]
    label: list[int]
    sha256: list[str] | None = None  # None (with features None): keep what the cache holds
    height: list[int] | None = None
    width: list[int] | None = None


class CacheError(XfeatError):
    """A cache that cannot be used as asked; the message names the file."""


def _check_format(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT:
        raise CacheError(f"{path}: not an xfeat feature cache")
    if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {f.attrs['format_version']} is newer than this xfeat reads")


def open_cache(path: str | os.PathLike[str]) -> h5py.File:
    """Open a cache read-only, checking that it is one; raises ``CacheError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no such cache file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        _check_format(f, path)
    except CacheError:
        f.close()
        raise
    return f


def stored_window_stats(f: h5py.File) -> WindowStats | None:
    text = f.attrs.get("window_stats")
    return WindowStats.from_dict(json.loads(text)) if text else None


class CacheWriter:
    """The single writer of a cache during one run: lock, journal, atomic commits.

    Use as a context manager; on entry it takes the lock and merges what an interrupted run left in the
    journal; on exit (also after Ctrl-C) it commits what was computed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.journal = Path(f"{self.path}.journal")
        self._lock = FileLock(f"{self.path}.lock", timeout=0)
        self._next_batch = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        if self.path.parent and not self.path.parent.exists():
            raise CacheError(f"{self.path}: folder {self.path.parent} does not exist")
        try:
            self._lock.acquire()
        except Timeout:
            raise CacheError(f"{self.path}: another xfeat process is writing this cache; "
                             "wait for it to finish (or remove the stale lock file if none is running)") from None
        try:
            if self.path.exists():
                with open_cache(self.path):
                    pass
            self.journal.mkdir(exist_ok=True)
            for stale in self.journal.glob("*.tmp"):
                stale.unlink()
            if not self.path.exists():  # batches of a cache that was deleted: nothing to merge them into
                for orphan in self._journal_files():
                    orphan.unlink()
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink()
            self._next_batch = max((int(p.stem) for p in self._journal_files()), default=-1) + 1
            self.commit()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.commit()
        finally:
            self._lock.release()

    # -- reading what is there ------------------------------------------------------------------
    def window_stats(self) -> WindowStats | None:
        if not self.path.exists():
            return None
        with open_cache(self.path) as f:
            return stored_window_stats(f)

    def cached_images(self, key: str) -> dict[str, tuple[str, str, str, int]]:
        """path -> (sha256, relpath, bundle, label) of the rows a group holds (empty for a new group)."""
        if not self.path.exists():
            return {}
        with open_cache(self.path) as f:
            if key not in f:
                return {}
            group = f[key]
            return {p: (s, r, b, int(lab)) for p, s, r, b, lab in zip(
                group["path"].asstr()[:], group["sha256"][:].astype(str), group["relpath"].asstr()[:],
                group["bundle"].asstr()[:], group["label"][:])}

    # -- writing ---------------------------------------------------------------------------------
    def prepare(self, groups: Sequence[GroupSettings], fc: dict[str, tuple[np.ndarray, np.ndarray]],
                stats: WindowStats | None) -> None:
        """Create missing groups (with their fc weights) and store the window statistics, refusing to mix
        settings: a group computed differently, or statistics other than the stored ones, stop the run."""
        existing = {}
        stored_stats = None
        if self.path.exists():
            with open_cache(self.path) as f:
                stored_stats = stored_window_stats(f)
                existing = {g.key: GroupSettings.from_attrs(f[g.key].attrs) for g in groups if g.key in f}
        for g in groups:
            if g.key in existing and existing[g.key] != g:
                diffs = g.differences(existing[g.key])
                if diffs:
                    raise CacheError(f"{self.path}: group {g.key} holds features computed with other settings: "
                                     f"{'; '.join(diffs[:3])}; use another cache file")
        if stats is not None and stored_stats is not None and (stats.g_min, stats.g_max) != (
                stored_stats.g_min, stored_stats.g_max):
            raise CacheError(f"{self.path}: holds features converted with the window {stored_stats.g_min}.."
                             f"{stored_stats.g_max}, not {stats.g_min}..{stats.g_max}; use another cache file")
        new = [g for g in groups if g.key not in existing]
        if not new and (stats is None or stored_stats is not None) and self.path.exists():
            return

        def create(f: h5py.File) -> None:
            if stats is not None and stored_stats is None:
                f.attrs["window_stats"] = json.dumps(stats.to_dict())
                f.attrs["g_min"], f.attrs["g_max"] = stats.g_min, stats.g_max
            for g in new:
                _create_group(f, g, *fc[g.backbone])

        self._rewrite(create)

    def add(self, rows_by_key: dict[str, Rows]) -> None:
        """Append one batch's rows to the journal (durable once this returns).

        Rows with ``features=None`` update the metadata (bundle, label, ...) of rows already cached.
        """
        arrays: dict[str, np.ndarray] = {"keys": np.array(list(rows_by_key), dtype=str)}
        for i, rows in enumerate(rows_by_key.values()):
            if rows.features is not None:
                arrays[f"{i}.features"] = rows.features
            for name in ROW_FIELDS:
                if getattr(rows, name) is not None:
                    arrays[f"{i}.{name}"] = np.asarray(getattr(rows, name))
        with atomic_write(self.journal / f"{self._next_batch:08d}.npz") as fh:
            np.savez(fh, **arrays)
        self._next_batch += 1

    def commit(self) -> None:
        """Merge the journal into a copy of the cache and put the copy in its place atomically."""
        batches = self._journal_files()
        if not batches:
            return
        self._rewrite(lambda f: [_merge_batch(f, batch) for batch in batches])
        for batch in batches:  # only after the new cache is in place: a kill here just merges them again
            batch.unlink()

    def _journal_files(self) -> list[Path]:
        return sorted(self.journal.glob("*.npz")) if self.journal.exists() else []

    def _rewrite(self, change) -> None:
        with replacing(self.path) as tmp:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") as f:
                if not f.attrs.get("format"):
                    f.attrs["format"], f.attrs["format_version"] = FORMAT, FORMAT_VERSION
                    f.attrs["created"] = _now()
                change(f)
                f.attrs["xfeat_version"], f.attrs["updated"] = __version__, _now()


def _create_group(f: h5py.File, g: GroupSettings, fc_weight: np.ndarray, fc_bias: np.ndarray) -> None:
    group = f.require_group(g.key)
    group.attrs.update(g.attrs())
    group.attrs["created"] = _now()
    group.attrs["random_weights"] = g.weights_kind == "none"
    group.attrs["flip_order"] = "none: as stored; h: left-right; v: up-down; hv: both"
    chunk = (16, g.n_flips, g.feature_dim)
    group.create_dataset("pool", shape=(0, g.n_flips, g.feature_dim), maxshape=(None, g.n_flips, g.feature_dim),
                         dtype="f4", chunks=chunk)
    group.create_dataset("fc_weight", data=np.asarray(fc_weight, dtype=np.float32))
    group.create_dataset("fc_bias", data=np.asarray(fc_bias, dtype=np.float32))
    for name, dtype in (("path", STR), ("relpath", STR), ("bundle", STR), ("label", "i1"), ("sha256", SHA),
                        ("height", "i4"), ("width", "i4")):
        group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))


def _merge_batch(f: h5py.File, batch: Path) -> None:
    with np.load(batch, allow_pickle=False) as data:
        for i, key in enumerate(data["keys"]):
            names = [n for n in ("features", *ROW_FIELDS) if f"{i}.{n}" in data.files]
            _merge_rows(f[str(key)], {name: data[f"{i}.{name}"] for name in names})


def _merge_rows(group: h5py.Group, rows: dict[str, np.ndarray]) -> None:
    """Replace the rows whose path is already there (content or labels changed), append the others.

    A batch without ``features`` only updates the metadata of rows already there.
    """
    index = {p: i for i, p in enumerate(group["path"].asstr()[:])}
    if "features" not in rows:  # metadata updates apply to rows already there, never create rows
        known = np.array([p in index for p in rows["path"]], dtype=bool)
        rows = {k: v[known] for k, v in rows.items()}
    start = n = group["path"].shape[0]
    positions = []
    for p in rows["path"]:
        if p not in index:
            index[p] = n
            n += 1
        positions.append(index[p])
    positions = np.asarray(positions)
    values = {k: rows[k] for k in ROW_FIELDS if k in rows}
    if "sha256" in values:
        values["sha256"] = values["sha256"].astype(SHA)
    for name in ("path", "relpath", "bundle"):
        values[name] = values[name].astype(object)
    if "features" in rows:
        values["pool"] = rows["features"]
    appended = positions >= start  # new rows come in order, so they fill start..n in one slice
    for name, column in values.items():
        dataset = group[name]
        dataset.resize(n, axis=0)
        if appended.any():
            dataset[start:n] = column[appended]
        for position, value in zip(positions[~appended], column[~appended]):
            dataset[position] = value

