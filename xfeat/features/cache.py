"""The HDF5 feature cache: one self-describing file that plain h5py, MATLAB or R can read.

Layout (documented in docs/cache-format.md)::

    /                                   attrs: format, format_version, xfeat_version, created, updated,
                                               window_stats (JSON), g_min, g_max
    /window_histograms  int64 [B, 65536]   each bundle's pixel histogram from the scan that fitted window_stats
                                           attrs: bundles, n_images (absent in caches written before it)
    /features/<backbone>/<method>/<H>x<W>    attrs: the settings the features were computed with
        pool       float32 [N, F, D]   pooled trunk output for F flip variants (none, h, v, hv)
        fc_weight  float32 [1000, D]   the backbone's ImageNet fc layer: fc1000 = pool @ fc_weight.T + fc_bias
        fc_bias    float32 [1000]
        path, relpath, bundle: strings [N];  label int8 [N] (1 = abnormal);  sha256 [N];  height, width [N]

Integrity: every dataset carries HDF5's Fletcher32 checksum on each chunk (strings are fixed-width UTF-8 so
that they sit in checksummed chunks too: variable-length strings live in HDF5's global heap, which no filter
covers and whose damage can hang the HDF5 library). Readers check what they read; a damaged chunk is a
``CacheError`` naming the dataset and its rows, and ``extract`` recomputes the rows instead of calling them
cached. Caches written before gain the checksums at their next commit.

Crash safety: the cache file is never modified in place. A run appends each computed batch to a journal
folder beside it (``CACHE.journal/``, one file per batch, each written to a temporary name and renamed);
a commit copies the cache, merges the journal into the copy and renames the copy over the cache. A kill at
any moment leaves the last committed cache intact and every finished batch in the journal, which the next
run merges first; a batch that cannot be read or does not fit its group is discarded with a warning, never
blocking the others. A lock file (``CACHE.lock``) keeps a second writer out. A cache path that is a symlink
is resolved first, so the lock, the journal and the temporary sit beside the real file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from xfeat import __version__
from xfeat.errors import DataError, XfeatError, XfeatWarning
from xfeat.io.atomic import atomic_write, replacing
from xfeat.convert.folds import FoldWindows, fold_windows, window_like
from xfeat.convert.stats import N_LEVELS, WindowStats
from xfeat.features.segments import (RUNS, DatasetShape, GroupIndex, Index, ids_of, missing_segments, read_index,
                                     recorded_folder, row_ids, segment_file, segment_folder, segment_numbers,
                                     split_ids, write_index)

FORMAT = "xfeat.features"
FORMAT_VERSION = 3  # 2: local and patches taps, tiles; 3: the segment layout (docs/cache-format.md)
LAYOUT = "segments"  # the root attribute "layout" of a format-3 index
SEGMENT_FORMAT = "xfeat.segment"
FLIPS = ("none", "h", "v", "hv")
STR = h5py.string_dtype("utf-8")
SHA = "S64"
ROW_FIELDS = ("path", "relpath", "bundle", "label", "sha256", "height", "width")
ROW_DATASETS = ("pool", *ROW_FIELDS)  # "pool" here stands for the group's feature dataset, whatever its tap
FEATURE_DATASETS = ("pool", "local", "patches")  # one per group, named after its tap
TEXT_FIELDS = ("path", "relpath", "bundle")
POOL_CHUNK_ROWS = 16
META_CHUNK_ROWS = 256
MIN_TEXT_WIDTH = 64  # bytes; a wider value widens the dataset (to a power of two, always leaving one pad byte)
SLAB_BYTES = 64 << 20
CHUNK_CACHE_BYTES = 1 << 20  # per file HDF5 opens for a read, segments included  # checked reads go slab by slab: a large pool is verified without being held in memory
REPAIR_HINT = "run xfeat extract again to recompute, or xfeat info --verify"
_READ_ERRORS = (OSError, RuntimeError, ValueError)  # what h5py raises for a chunk or heap it cannot read


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
    tap: str = "pool"  # pool | local | patches (xfeat.features.local); caches before format 2: pool
    tap_params: str = ""  # JSON: the stages, statistics, projection and grid of a local or patches tap
    tiles: str = ""  # "RxC" when the backbone ran on tiles of input_height x input_width ("" : the whole image)
    tile_overlap: float = 0.0
    tile_combine: str = ""  # how the pooled tap joins the tiles' vectors: mean | max | both
    storage: str = "float32"  # the stored vectors' type (float16: xfeat extract --dtype float16; patch maps always)

    @property
    def size_token(self) -> str:
        """How a group's geometry is named: ``2000x1000``, or ``512x512_t4x2`` for 4 x 2 tiles of 512 x 512."""
        return f"{self.input_height}x{self.input_width}" + (f"_t{self.tiles}" if self.tiles else "")

    @property
    def key(self) -> str:
        tap = "" if self.tap == "pool" else f".{self.tap}"
        return f"features/{self.backbone}/{self.method}/{self.size_token}{tap}"

    @property
    def n_flips(self) -> int:
        return len(self.flips.split(","))

    @property
    def data_name(self) -> str:
        """The group's feature dataset: ``pool``, ``local`` or ``patches``."""
        return self.tap

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One row's shape: [F, D] for vectors, [grid rows, grid columns, D] for patch maps (of the unflipped
        image only: ``flips`` then records the run's flips, which set its forward batches)."""
        if self.tap == "patches":
            grid = json.loads(self.tap_params)["grid"]
            return (int(grid[0]), int(grid[1]), self.feature_dim)
        return (self.n_flips, self.feature_dim)

    @property
    def data_dtype(self) -> str:
        return "f2" if self.tap == "patches" or self.storage == "float16" else "f4"

    def attrs(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs: h5py.AttributeManager) -> "GroupSettings":
        values = {}
        for f in fields(cls):
            if f.name not in attrs and f.default is not MISSING:  # a setting added after the cache was written
                continue
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

    features: np.ndarray | None  # [k, F, D] float32 (patches: [k, rows, columns, D] float16); None: metadata only
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
        # A small chunk cache: HDF5 gives every file a virtual dataset opens (each segment) its own, 8 MiB by
        # default, which a read across a thousand segments would multiply into gigabytes.
        f = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        _check_format(f, path)
        if is_segmented(f):
            segments = len(_read_index_runs(f))
            if not _allow_open_files(segments + 64):
                raise CacheError(f"{path}: its {segments} segments are more files than this process may open; "
                                 "raise the limit (ulimit -n) or run xfeat compact on it")
    except CacheError:
        f.close()
        raise
    return f


def _read_index_runs(f: h5py.File) -> set[int]:
    """The segments an index's groups read (from their runs alone: cheap)."""
    used: set[int] = set()
    for group in _settings_groups(f):
        if RUNS in group:
            used.update(np.unique(group[RUNS][:, 0]).tolist())
    return used


def _allow_open_files(n: int) -> bool:
    """HDF5 keeps every segment a read touches open; past the process's limit of open files it would return
    fill values instead of failing. Raise the soft limit towards the hard one when a cache needs it; False
    when even the hard limit is too low."""
    try:
        import resource
    except ImportError:  # not POSIX
        return True
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= n:
        return True
    if hard != resource.RLIM_INFINITY and hard < n:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return True


def stored_window_stats(f: h5py.File) -> WindowStats | None:
    text = f.attrs.get("window_stats")
    return WindowStats.from_dict(json.loads(text)) if text else None


WINDOW_HISTOGRAMS = "window_histograms"
FOLD_WINDOWS_UNAVAILABLE = ("conversion windows: this cache holds no per-bundle histograms (written before they "
                            "were stored, or with --stats), so what each held-out bundle's window would be without "
                            "it is unknown; run xfeat info CACHE --data DATA to rescan, or extract into a new cache")


def _store_window_histograms(f: h5py.File, histograms: Mapping[str, np.ndarray], n_images: Mapping[str, int]) -> None:
    """Each bundle's histogram as one row of a compressed, checksummed int64 dataset; bundle names and image
    counts as its attributes (fixed-width UTF-8: nothing in HDF5's unchecked global heap)."""
    bundles = list(histograms)
    data = np.stack([np.asarray(histograms[b], dtype=np.int64) for b in bundles])
    ds = f.create_dataset(WINDOW_HISTOGRAMS, data=data, chunks=(1, N_LEVELS), compression="gzip",
                          compression_opts=4, shuffle=True, fletcher32=True)
    names = [b.encode("utf-8") for b in bundles]
    ds.attrs.create("bundles", np.array(names), dtype=h5py.string_dtype("utf-8", _text_width(max(map(len, names)))))
    ds.attrs["n_images"] = np.array([int(n_images.get(b, 0)) for b in bundles], dtype=np.int64)
    ds.attrs["description"] = ("row b: counts of the pixel values 0..65535 of the images of bundle b, from the scan "
                               "that fitted window_stats; the rows add up to that scan's histogram")


def stored_window_histograms(f: h5py.File) -> tuple[dict[str, np.ndarray], dict[str, int]] | None:
    """bundle -> histogram and bundle -> images, as stored with the window statistics; None in caches written
    before per-bundle histograms were stored. A damaged dataset is a ``CacheError``."""
    if WINDOW_HISTOGRAMS not in f:
        return None
    try:
        ds = f[WINDOW_HISTOGRAMS]
        data = ds[...]
        bundles = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in ds.attrs["bundles"].tolist()]
        counts = ds.attrs["n_images"].tolist()
    except (*_READ_ERRORS, KeyError) as e:
        raise CacheError(f"{f.filename}: {WINDOW_HISTOGRAMS}: unreadable ({_first_line(e)}) (damaged file)") from None
    if data.shape != (len(bundles), N_LEVELS) or len(counts) != len(bundles) or (data < 0).any():
        raise CacheError(f"{f.filename}: {WINDOW_HISTOGRAMS}: impossible shape or values (damaged file)")
    return dict(zip(bundles, data)), {b: int(n) for b, n in zip(bundles, counts)}


def fold_windows_of_cache(cache: str | os.PathLike[str], bundles: Sequence[str] | None = None) -> FoldWindows | None:
    """What each held-out bundle's window would be had the other bundles alone fitted it (``convert.folds``).

    ``bundles``: the held-out bundles to report (default: every bundle the window's scan saw); one the scan
    did not see (added to the cache later) gets the global window, which its pixels never entered. None when
    the cache holds no window statistics or no per-bundle histograms (say ``FOLD_WINDOWS_UNAVAILABLE``).
    Raises ``CacheError`` when the stored histograms are damaged or do not add up to the stored window.
    """
    with open_cache(cache) as f:
        stats = stored_window_stats(f)
        stored = stored_window_histograms(f) if stats is not None else None
    if stored is None:
        return None
    histograms, n_images = stored
    if not _adds_up(histograms, stats):
        raise CacheError(f"{cache}: {WINDOW_HISTOGRAMS} do not add up to the stored window_stats (damaged or "
                         "edited file)")
    return fold_windows(histograms, stats, n_images, bundles)


def _adds_up(histograms: Mapping[str, np.ndarray], stats: WindowStats) -> bool:
    """True when the histograms' sum gives ``stats``: they are what it was fitted on."""
    total = np.zeros(N_LEVELS, np.int64)
    for hist in histograms.values():
        total += hist
    if not total.any():
        return False
    again = window_like(total, stats, stats.n_images)
    return (again.g_min, again.g_max, again.raw_low, again.raw_high, again.n_pixels) == (
        stats.g_min, stats.g_max, stats.raw_low, stats.raw_high, stats.n_pixels)


def cache_path(path: str | os.PathLike[str]) -> Path:
    """The file a cache path names. A symlink is resolved: the lock, the journal and a commit's temporary must
    sit beside the real file, or two runs through two names would not exclude each other (and the commit's
    rename would replace the link by a copy)."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


# -- integrity ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Damage:
    """A dataset that failed a check: what failed and which rows it makes unusable."""

    dataset: str  # HDF5 name, e.g. features/resnet18/m2/64x32/pool
    problem: str
    rows: np.ndarray | None = None  # row indices; None for datasets that are not per image (fc_weight, fc_bias)

    def describe(self) -> str:
        return f"{self.dataset}{_rows_text(self.rows)}: {self.problem}"


def _rows_text(rows: np.ndarray | None) -> str:
    if rows is None or not len(rows):
        return ""
    rows = np.unique(rows)
    breaks = np.flatnonzero(np.diff(rows) != 1)
    spans = [f"{a}" if a == b else f"{a}-{b}"
             for a, b in zip(np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]])]
    more = f" and {len(spans) - 3} more ranges" if len(spans) > 3 else ""
    return f" rows {', '.join(spans[:3])}{more}"


def damage_error(cache: str | os.PathLike[str], damages: Sequence[Damage]) -> CacheError:
    """The one-line error a reader raises for damaged data."""
    more = f" (and {len(damages) - 1} more damaged datasets)" if len(damages) > 1 else ""
    return CacheError(f"{cache}: {damages[0].describe()}{more}; {REPAIR_HINT}")


def _slice(ds: h5py.Dataset, a: int, b: int, column: int | None) -> np.ndarray:
    return ds[a:b] if column is None else ds[a:b, column]


def _virtual_step(ds: h5py.Dataset) -> int:
    """Rows per read of a virtual dataset when a slab fails: its segments' chunk rows."""
    name = ds.name.rsplit("/", 1)[-1]
    return (1 if name == "patches" else POOL_CHUNK_ROWS) if name in FEATURE_DATASETS else META_CHUNK_ROWS


def read_checked(ds: h5py.Dataset, column: int | None = None, keep: bool = True,
                  check: Callable[[np.ndarray], np.ndarray] | None = None, span: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Read a per-row dataset (``column``: one index of axis 1; ``span``: rows a..b, chunk-aligned) slab by
    slab, so that HDF5 verifies every chunk without the whole dataset in memory.

    Returns (data or None, unreadable, implausible) for the rows read: rows of a chunk HDF5 cannot read
    (Fletcher32 mismatch, or damage it notices) are flagged and read as zeros; ``check(block)`` flags rows
    whose values are impossible. A slab that fails is read again chunk by chunk to name the damaged rows."""
    first, end = span or (0, ds.shape[0])
    step = ds.chunks[0] if ds.chunks else _virtual_step(ds) if ds.is_virtual else max(end, 1)
    row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
    slab = max(step, SLAB_BYTES // row_bytes // step * step)
    unreadable, implausible = np.zeros(end - first, bool), np.zeros(end - first, bool)
    parts = []
    for a in range(first, end, slab):
        b = min(end, a + slab)
        try:
            block = _slice(ds, a, b, column)
        except _READ_ERRORS:
            pieces = []
            for c in range(a, b, step):
                d = min(b, c + step)
                try:
                    pieces.append(_slice(ds, c, d, column))
                except _READ_ERRORS:
                    unreadable[c - first:d - first] = True
                    shape = (d - c, *(ds.shape[1:] if column is None else ds.shape[2:]))
                    pieces.append(np.full(shape, b"", object) if ds.dtype.kind == "O" else np.zeros(shape, ds.dtype))
            block = np.concatenate(pieces)
        if check is not None:
            implausible[a - first:b - first] = check(block) & ~unreadable[a - first:b - first]
        if keep:
            parts.append(block)
    data = (parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else _slice(ds, 0, 0, column)) \
        if keep else None
    return data, unreadable, implausible


def _text(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode UTF-8 values; flags values that are not UTF-8, and fixed-width values that fill their whole width
    (xfeat always leaves a pad byte: a full value was cut short by an older writer)."""
    bad = np.zeros(len(raw), bool)
    if raw.dtype.kind == "S" and len(raw):
        bad |= raw.view(np.uint8).reshape(len(raw), raw.dtype.itemsize)[:, -1] != 0
    values = []
    for i, v in enumerate(raw.tolist()):
        try:
            values.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
        except UnicodeDecodeError:
            bad[i] = True
            values.append("")
    return np.array(values, dtype=str) if values else np.array([], dtype=str), bad


def _sha(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SHA-256 hex digests; flags values that are not 64 lowercase hex digits."""
    if not len(raw):
        return raw.astype(str), np.zeros(0, bool)
    v = np.ascontiguousarray(raw, dtype="S64").view(np.uint8).reshape(len(raw), 64)
    bad = ~(((v >= 48) & (v <= 57)) | ((v >= 97) & (v <= 102))).all(axis=1)
    return np.where(bad, b"", raw).astype(str), bad


def _path(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, bad = _text(raw)
    return values, bad | (np.char.str_len(values) == 0)


_CHECKS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "path": _path,
    "relpath": _text,
    "bundle": _text,
    "label": lambda raw: (raw.astype(np.int64), ~np.isin(raw, (0, 1))),
    "sha256": _sha,
    "height": lambda raw: (raw, raw < 1),
    "width": lambda raw: (raw, raw < 1),
}


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Rows holding a NaN or an infinity."""
    return ~np.isfinite(block).all(axis=tuple(range(1, block.ndim)))


def data_name(group: h5py.Group) -> str:
    """The name of a group's feature dataset: its tap (``pool`` in caches written before taps)."""
    tap = group.attrs.get("tap", "pool")
    return tap.decode() if isinstance(tap, bytes) else str(tap)


def scan_group(group: h5py.Group, names: Sequence[str] = ROW_DATASETS, *, fc: bool = False,
               flip: int | None = None, keep_pool: bool = False
               ) -> tuple[dict[str, np.ndarray], np.ndarray, list[Damage]]:
    """Read and check the per-row datasets ``names`` of a group (and with ``fc`` its fc_weight, fc_bias).

    Returns the columns read (text decoded to str; ``pool``, the group's feature dataset whatever its tap calls
    it, only with ``keep_pool``, one flip variant with ``flip``), a mask of the rows any check rejected, and one
    ``Damage`` per failing check. A dataset without checksums (a cache written before them) is checked for
    impossible values only.
    """
    key = group.name.lstrip("/")
    features = data_name(group)

    def real(name: str) -> str:
        return features if name == "pool" else name

    damages: list[Damage] = []
    lengths: dict[str, int] = {}
    lost = []
    for name in dict.fromkeys(("path", *names)):
        try:
            lengths[name] = group[real(name)].shape[0]
        except (*_READ_ERRORS, KeyError):
            lost.append(name)
    n = lengths.get("path", max(lengths.values(), default=0))
    bad = np.full(n, bool(lost))
    damages.extend(Damage(f"{key}/{real(name)}", "missing or unreadable (damaged file)", np.arange(n)) for name in lost)
    columns: dict[str, np.ndarray] = {}
    for name in names:
        if name not in lengths:
            continue
        if lengths[name] != n:
            damages.append(Damage(f"{key}/{real(name)}", f"holds {lengths[name]} rows where path holds {n} (damaged file)",
                                  np.arange(n)))
            bad[:] = True
            continue
        ds = group[real(name)]
        if name == "pool":
            data, unreadable, implausible = read_checked(ds, flip, keep=keep_pool,
                                                          check=None if ds.fletcher32 or ds.is_virtual else nonfinite_rows)
        else:
            raw, unreadable, _ = read_checked(ds)
            data, implausible = _CHECKS[name](raw)
        implausible &= ~unreadable
        if unreadable.any():
            problem = ("checksum mismatch (damaged file)" if ds.fletcher32 or ds.is_virtual
                       else "unreadable (damaged file)")
            damages.append(Damage(f"{key}/{real(name)}", problem, np.flatnonzero(unreadable)))
        if implausible.any():
            problem = "non-finite values (damaged file)" if name == "pool" else "impossible values (damaged file)"
            damages.append(Damage(f"{key}/{real(name)}", problem, np.flatnonzero(implausible)))
        bad |= unreadable | implausible
        if data is not None:
            columns[name] = data
    for name in names:  # a dataset missing or of the wrong length: placeholders, its rows all flagged above
        if name not in columns and name != "pool":
            columns[name] = np.full(n, "") if name in (*TEXT_FIELDS, "sha256") else np.zeros(n, np.int64)
    if fc:
        for name in ("fc_weight", "fc_bias"):
            try:
                columns[name] = group[name][...]
                if not np.isfinite(columns[name]).all():  # a segment's fill: its segment is missing
                    damages.append(Damage(f"{key}/{name}", "non-finite values (damaged file or missing segment)"))
            except KeyError:
                damages.append(Damage(f"{key}/{name}", "missing (damaged file)"))
            except _READ_ERRORS:
                damages.append(Damage(f"{key}/{name}", "checksum mismatch (damaged file)"))
    return columns, bad, damages


def bad_journal_batches(path: str | os.PathLike[str]) -> list[Path]:
    """Journal batches beside a cache that the next commit would discard (unreadable, or not fitting)."""
    real = cache_path(path)
    journal = Path(f"{real}.journal")
    batches = sorted(p for p in journal.glob("*.npz") if p.stem.isdigit()) if journal.exists() else []
    if not batches:
        return []
    with open_cache(real) as f:
        shapes = _feature_shapes(f)
    return [b for b in batches if _load_batch(b, shapes) is None]


def lacks_checksums(group: h5py.Group) -> bool:
    """True for a group written before checksums (no Fletcher32, variable-length strings)."""
    for name in (*FEATURE_DATASETS, *ROW_FIELDS, "fc_weight", "fc_bias"):
        if name in group:
            ds = group[name]
            if ds.is_virtual:  # an index: xfeat writes its segments with checksums (and seals a cache it converts)
                continue
            if ds.dtype.kind == "O" or not ds.fletcher32:
                return True
    return False


class CacheWriter:
    """The single writer of a cache during one run: lock, journal, commits that append a segment.

    Use as a context manager; on entry it takes the lock and merges what an interrupted run left in the
    journal; on exit (also after Ctrl-C) it commits what was computed. A cache in the single-file layout of
    formats 1 and 2 is converted to the segment layout at its first write (its file becomes the first
    segment, without a copy).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = cache_path(path)
        self.journal = Path(f"{self.path}.journal")
        self.segments = segment_folder(self.path)
        self._lock = FileLock(f"{self.path}.lock", timeout=0)
        self._next_batch = 0
        # group key -> rows found damaged, which the next commit leaves out: in a single-file cache a mask over its
        # rows (the conversion to segments copies the others), in an index the rows' ids
        self._damaged: dict[str, np.ndarray] = {}
        self._damaged_ids: dict[str, np.ndarray] = {}
        self._index: Index | None = None  # loaded at the first write
        self._keys: dict[str, _GroupKeys] = {}  # per group: the current rows' ids by path and by content

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        if self.path.parent and not self.path.parent.exists():
            raise CacheError(f"{self.path}: folder {self.path.parent} does not exist")
        try:
            self._lock.acquire()
        except Timeout:
            raise CacheError(f"{self.path}: another xfeat process is writing this cache; "
                             "wait for it to finish (or remove the stale lock file if none is running)") from None
        except OSError as e:
            raise CacheError(f"{self.path}: cannot write in folder {self.path.parent} "
                             f"({e.strerror or e}): the lock file cannot be created") from None
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
            self._remove_stale_segments()
            self._next_batch = max((int(p.stem) for p in self._journal_files()), default=-1) + 1
            self.commit()
        except OSError as e:
            self._lock.release()
            raise CacheError(f"{self.path}: cannot write in folder {self.path.parent} ({e.strerror or e})") from None
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.commit()
        finally:
            self._lock.release()

    def _remove_stale_segments(self) -> None:
        """Segments no index reads: written by a commit killed before its index was in place (the journal still
        holds their rows), left entirely superseded, or orphaned by a deleted or compacted cache."""
        if not self.segments.exists():
            return
        used: set[int] = set()
        if self.path.exists():
            with open_cache(self.path) as f:
                if is_segmented(f):
                    used = _read_index(f).segments()
        for stale in self.segments.glob(".*.tmp"):
            stale.unlink()
        for number in segment_numbers(self.path):
            if number not in used:
                segment_file(self.path, number).unlink()
        if not used and not any(self.segments.iterdir()):
            self.segments.rmdir()

    # -- reading what is there ------------------------------------------------------------------
    def window_stats(self) -> WindowStats | None:
        if not self.path.exists():
            return None
        with open_cache(self.path) as f:
            return stored_window_stats(f)

    def cached_images(self, key: str) -> dict[str, tuple[str, str, str, int]]:
        """path -> (sha256, relpath, bundle, label) of the rows a group holds (empty for a new group).

        Every row is checked (features included): a damaged row is not cached. Its images are left for the
        run to recompute, the next commit drops the damaged rows, and a warning names each damaged dataset
        (and each missing or unreadable segment).
        """
        if not self.path.exists():
            return {}
        with open_cache(self.path) as f:
            if key not in f:
                return {}
            try:
                lost = missing_segments_of(f[key])
                runs = f[key][RUNS][...] if RUNS in f[key] else None
                c, bad, damages = scan_group(f[key])
                unsealed = lacks_checksums(f[key])
            except _READ_ERRORS as e:
                raise CacheError(f"{self.path}: {key}: unreadable HDF5 structure ({_first_line(e)}) (damaged file); "
                                 "restore a copy, or move it away and extract again") from None
        for segment, rows in lost:
            warnings.warn(f"{self.path}: {key}: segment {segment} is missing or unreadable; its {rows} row(s) are "
                          "dropped and their images recomputed", XfeatWarning, stacklevel=2)
        if damages or unsealed:
            if runs is None:
                self._damaged[key] = bad
            else:
                self._damaged_ids[key] = ids_of(runs)[:len(bad)][bad]
            self._warn_damage([d for d in damages if not lost])
        return {p: (s, r, b, int(lab)) for p, s, r, b, lab, broken in zip(
            c["path"], c["sha256"], c["relpath"], c["bundle"], c["label"], bad) if not broken}

    def _warn_damage(self, damages: Sequence[Damage]) -> None:
        for d in damages:
            name = d.dataset.rsplit("/", 1)[-1]
            if d.rows is None:
                consequence = "rewritten from the backbone's weights"
            elif name in FEATURE_DATASETS:
                consequence = "these rows are dropped and their images recomputed"
            else:
                consequence = ("the group cannot say which images these rows hold: they are dropped and their "
                               "images recomputed")
            warnings.warn(f"{self.path}: {d.describe()}; {consequence}", XfeatWarning, stacklevel=3)

    # -- writing ---------------------------------------------------------------------------------
    def prepare(self, groups: Sequence[GroupSettings], fc: dict[str, tuple[np.ndarray, np.ndarray]],
                stats: WindowStats | None, bundle_histograms: Mapping[str, np.ndarray] | None = None,
                bundle_images: Mapping[str, int] | None = None) -> None:
        """Create missing groups (with their fc weights) and store the window statistics, refusing to mix
        settings: a group computed differently, or statistics other than the stored ones, stop the run.

        ``bundle_histograms`` (bundle -> histogram, with ``bundle_images``: bundle -> images) are the scan's
        that fitted ``stats``: stored with them, and only with them (statistics stored before stay alone)."""
        existing = {}
        stored_stats = None
        fc_damage: dict[str, list[Damage]] = {}
        if self.path.exists():
            with open_cache(self.path) as f:
                stored_stats = stored_window_stats(f)
                existing = {g.key: GroupSettings.from_attrs(f[g.key].attrs) for g in groups if g.key in f}
                for key in existing:  # the fc layer is the backbone's: a damaged copy is rewritten from it
                    damages = scan_group(f[key], (), fc=True)[2]
                    if damages:
                        fc_damage[key] = damages
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
        refresh = [g for g in groups if g.key in fc_damage]
        if not new and not refresh and (stats is None or stored_stats is not None) and self.path.exists():
            return
        for g in refresh:
            self._warn_damage(fc_damage[g.key])
        with self._writing():
            index = self._writable_index()
            segment = _Segment()
            if stats is not None and stored_stats is None:
                index.attrs["window_stats"] = json.dumps(stats.to_dict())
                index.attrs["g_min"], index.attrs["g_max"] = stats.g_min, stats.g_max
                if bundle_histograms:
                    segment.histograms = (bundle_histograms, bundle_images or {})
            for g in new:
                attrs = {**g.attrs(), "created": _now(), "random_weights": g.weights_kind == "none",
                         "flip_order": "none: as stored; h: left-right; v: up-down; hv: both"}
                index.groups[g.key] = GroupIndex(attrs, np.zeros(0, np.int64), _row_shapes(g), {})
                self._keys[g.key] = _GroupKeys()
            for g in (*new, *refresh):
                segment.fc[g.key] = fc[g.backbone]
            self._append(index, segment, {})

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
        """Write the journal's rows into a new segment and put an index including them in place.

        What a commit costs is the rows it adds (and the index: a few bytes per run of rows), whatever the size
        of the cache. A batch that cannot be read or does not fit its group is discarded with a warning (its
        images are recomputed by the next run) and never blocks the others; rows found damaged leave the index.
        """
        batches = self._journal_files()
        if not batches and not self._damaged and not self._damaged_ids:
            return
        with self._writing():
            index = self._writable_index()
            shapes = {key: (g.datasets[_data_name(g)].trailing, g.datasets[_data_name(g)].dtype)
                      for key, g in index.groups.items()}
            for key, ids in self._damaged_ids.items():  # damaged rows are recomputed, never updated in place
                if key in index.groups:
                    self._group_keys(key).drop(ids.tolist())
            pending: dict[str, dict[str, dict]] = {}
            for batch in batches:
                rows_by_key = _load_batch(batch, shapes)
                if rows_by_key is None:
                    _warn_discarded(batch)
                    continue
                for key, rows in rows_by_key.items():
                    _stage_rows(pending.setdefault(key, {}), rows, self._group_keys(key))
            segment = _Segment()
            superseded: dict[str, np.ndarray] = {}
            for key, staged in pending.items():
                rows, gone = self._segment_rows(index.groups[key], key, staged)
                if rows is not None:
                    segment.rows[key] = rows
                superseded[key] = gone
            for key, ids in self._damaged_ids.items():
                if key in index.groups:
                    superseded[key] = np.union1d(superseded.get(key, np.zeros(0, np.int64)), ids)
            self._append(index, segment, superseded)
        for batch in batches:  # only after the new index is in place: a kill here just merges them again
            batch.unlink(missing_ok=True)

    # -- the segment layout ------------------------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write that fails (a full disk, a read-only folder) is one line; the last commit stays in place."""
        try:
            yield
        except (OSError, DataError) as e:
            cause = e.__cause__ if isinstance(e, DataError) and isinstance(e.__cause__, OSError) else e
            self._index = None  # reloaded from what is on disk
            self._keys.clear()
            raise CacheError(self._write_failure(cause if isinstance(cause, OSError) else OSError(str(e)))) from None

    def _writable_index(self) -> Index:
        """The index to change: loaded once per run; a single-file cache (formats 1, 2) becomes the first
        segment of a new index (renamed by a hard link, not copied; a group to seal or repair is copied)."""
        if self._index is not None:
            return self._index
        if not self.path.exists():
            self._index = Index({"format": FORMAT, "format_version": FORMAT_VERSION, "layout": LAYOUT,
                                 "created": _now()}, {})
            return self._index
        with open_cache(self.path) as f:
            if is_segmented(f):
                index, recorded = _read_index(f), recorded_folder(f)
            else:
                index = None
        if index is None:
            self._index = self._migrate()
            return self._index
        if recorded != self.segments and (recorded.exists() or not self.segments.exists()):
            raise CacheError(f"{self.path}: its index reads the segments in {recorded}, not {self.segments} (it was "
                             "copied or renamed without them); rename the folder with the file, or run xfeat compact "
                             "on the original to make one self-contained file to copy")
        lost = {int(p.stem) for p in missing_segments(self.segments, index.segments())}
        for key, g in index.groups.items():
            segments = split_ids(g.ids)[0]
            for s in sorted(lost & set(np.unique(segments).tolist())):
                warnings.warn(f"{self.path}: segment {segment_file(self.path, s)} is missing or not an HDF5 file: "
                              f"its {int((segments == s).sum())} row(s) of {key} leave the cache and their images "
                              "are recomputed", XfeatWarning, stacklevel=4)
            if lost:
                g.ids = g.ids[~np.isin(segments, list(lost))]
        self._index = index
        return index

    def _migrate(self) -> Index:
        number = max(segment_numbers(self.path), default=-1) + 1
        target = segment_file(self.path, number)
        self.segments.mkdir(exist_ok=True)
        rebuild = self._rebuild_plan()
        if rebuild:
            with replacing(target) as tmp:
                _copy_rebuilding(self.path, tmp, rebuild)
            self._damaged.clear()  # the damaged rows were left out of the copy
        else:
            try:
                os.link(self.path, target)
            except OSError:  # a filesystem without hard links
                with replacing(target) as tmp:
                    shutil.copyfile(self.path, tmp)
        with h5py.File(target, "r") as f:
            groups = {}
            for group in _settings_groups(f):
                key = group.name.lstrip("/")
                settings = GroupSettings.from_attrs(group.attrs)
                shapes = {n: DatasetShape(tuple(group[n].shape[1:]), group[n].dtype, {})
                          for n in (settings.data_name, *ROW_FIELDS) if n in group}
                n = group["path"].shape[0]
                fixed = {n_: (number, DatasetShape(tuple(group[n_].shape), group[n_].dtype, {}))
                         for n_ in ("fc_weight", "fc_bias") if n_ in group}
                groups[key] = GroupIndex(dict(group.attrs), row_ids(number, np.arange(n)), shapes, fixed)
            fixed_root = {}
            if WINDOW_HISTOGRAMS in f:
                ds = f[WINDOW_HISTOGRAMS]
                fixed_root[WINDOW_HISTOGRAMS] = (number, DatasetShape(tuple(ds.shape), ds.dtype, dict(ds.attrs)))
            attrs = {**dict(f.attrs), "format_version": FORMAT_VERSION, "layout": LAYOUT}
        warnings.warn(f"{self.path}: converted to the segment layout (cache format {FORMAT_VERSION}): commits now add "
                      f"segments in {self.segments.name}/ instead of rewriting the file; xfeat compact folds them "
                      "into one file again", XfeatWarning, stacklevel=4)
        return Index(attrs, groups, fixed_root)

    def _group_keys(self, key: str) -> "_GroupKeys":
        """The current rows' ids by path and by content (read from the segments once per run, then kept)."""
        if key not in self._keys:
            keys = self._keys[key] = _GroupKeys()
            g = self._index.groups.get(key) if self._index else None
            if g is not None and len(g.ids):
                held = self._read_rows(key, g.ids, ("path", "sha256"))
                keys.add(held["path"].tolist(), held["sha256"].tolist(), g.ids.tolist())
        return self._keys[key]

    def _segment_rows(self, group: GroupIndex, key: str, staged: dict[str, dict]
                      ) -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
        """The rows ``staged`` for a group as columns of the new segment, and the ids of the rows they supersede
        (the same file, or the same content under another path: one current row per image)."""
        keys = self._group_keys(key)
        updates = [p for p, r in staged.items() if r.get("features") is None]
        if updates:  # metadata changes: the row is written again whole, its features read from its segment
            held = self._read_rows(key, np.array([keys.by_path[p] for p in updates], np.int64),
                                   ("features", "sha256", "height", "width"))
            for i, p in enumerate(updates):
                staged[p] = {**staged[p], **{n: held[n][i] for n in ("features", "sha256", "height", "width")}}
        if not staged:
            return None, np.zeros(0, np.int64)
        last = {str(r["sha256"]): p for p, r in staged.items()}  # one row per content: a copy's later row wins
        paths = [p for p, r in staged.items() if last[str(r["sha256"])] == p]
        columns = {"features": np.stack([staged[p]["features"] for p in paths])}
        for name in ROW_FIELDS:
            columns[name] = np.array([staged[p][name] for p in paths])
        gone = {keys.by_path[p] for p in paths if p in keys.by_path}
        gone |= {keys.by_content[s] for s in columns["sha256"].tolist() if s in keys.by_content}
        return columns, np.array(sorted(gone), np.int64)

    def _read_rows(self, key: str, ids: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Columns of a group's rows by id, read from their segments (``features``: the feature dataset; text
        decoded)."""
        order = np.argsort(ids, kind="stable")
        segments, rows = split_ids(ids[order])
        out: dict[str, list] = {n: [] for n in names}
        real = {n: (_data_name(self._index.groups[key]) if n == "features" else n) for n in names}
        for s in np.unique(segments).tolist():
            wanted = rows[segments == s]
            with h5py.File(segment_file(self.path, s), "r") as f:
                for n in names:
                    ds = f[key][real[n]]
                    if n == "features":  # rows known to be sound (damaged ones left the keys): read just those
                        out[n].append(ds[wanted])
                    else:  # checked, so that a damaged chunk reads as empty values instead of failing
                        span = (int(wanted[0]), int(wanted[-1]) + 1)
                        out[n].append(_decoded(read_checked(ds, span=span)[0][wanted - span[0]]))
        inverse = np.argsort(order, kind="stable")
        return {n: np.concatenate(v)[inverse] for n, v in out.items()}

    def _append(self, index: Index, segment: "_Segment", superseded: dict[str, np.ndarray]) -> None:
        """Write ``segment`` (if it holds anything) and then the index with its rows and without ``superseded``."""
        for key in {*superseded, *segment.rows}:
            self._group_keys(key)  # read while the index still matches the segments
        number = max([*segment_numbers(self.path), *index.segments()], default=-1) + 1
        if segment:
            self.segments.mkdir(exist_ok=True)
            with replacing(segment_file(self.path, number)) as tmp:
                segment.write(tmp, index)
        for key, gone in superseded.items():
            if len(gone):
                g = index.groups[key]
                keep = ~np.isin(g.ids, gone)
                g.ids = g.ids[keep]
                self._group_keys(key).drop(gone.tolist())
        for key, columns in segment.rows.items():
            g = index.groups[key]
            new = row_ids(number, np.arange(len(columns["path"])))
            g.ids = np.concatenate([g.ids, new])
            self._group_keys(key).add(columns["path"].tolist(), columns["sha256"].tolist(), new.tolist())
            for name, width in segment.text_widths.get(key, {}).items():
                if width > g.datasets[name].dtype.itemsize:
                    g.datasets[name].dtype = np.dtype(_row_dtype(name, width))
        for key in segment.fc:
            g = index.groups[key]
            for name, value in zip(("fc_weight", "fc_bias"), segment.fc[key]):
                g.fixed[name] = (number, DatasetShape(tuple(np.shape(value)), np.dtype(np.float32), {}))
        if segment.histograms:
            ds_attrs = segment.histogram_attrs
            index.fixed[WINDOW_HISTOGRAMS] = (number, DatasetShape(segment.histogram_shape, np.dtype(np.int64),
                                                                   ds_attrs))
        index.attrs.update({"format_version": FORMAT_VERSION, "layout": LAYOUT, "xfeat_version": __version__,
                            "updated": _now()})
        with replacing(self.path) as tmp:
            with h5py.File(tmp, "w") as f:
                write_index(f, index, self.path.name)
        self._damaged.clear()
        self._damaged_ids.clear()

    def _journal_files(self) -> list[Path]:
        if not self.journal.exists():
            return []
        return sorted(p for p in self.journal.glob("*.npz") if p.stem.isdigit())

    def _write_failure(self, e: OSError) -> str:
        """One line for a commit that could not write: what failed, and that nothing was lost."""
        text = str(e)
        if e.errno == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
            reason = f"no space left on the device of {self.path.parent}"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or any(
                s in text for s in ("errno = 13", "errno = 30", "Permission denied", "Read-only")):
            reason = f"cannot write in folder {self.path.parent} ({e.strerror or 'permission denied'})"
        else:
            reason = e.strerror or _first_line(e)
        kept = (f"; the computed batches stay in {self.journal} and the next run merges them"
                if self._journal_files() else "")
        return f"{self.path}: commit failed: {reason}; the last committed cache is intact{kept}"

    def _rebuild_plan(self) -> dict[str, np.ndarray]:
        """Groups of a single-file cache to copy rather than link when it becomes a segment, with the rows kept:
        groups with damaged rows (dropped), and groups written before checksums (checked for impossible values
        first, then sealed with checksums)."""
        if not self.path.exists():
            return {}
        plan = {}
        with open_cache(self.path) as f:
            for group in _settings_groups(f):
                key = group.name.lstrip("/")
                if key not in self._damaged and lacks_checksums(group):
                    _, self._damaged[key], damages = scan_group(group)
                    self._warn_damage(damages)
                if key in self._damaged:
                    plan[key] = ~self._damaged[key]
        return plan


def _format_version(f: h5py.File) -> int:
    """1 while every group is a pooled, untiled one (what xfeat before taps reads); 2 once a local, patches or
    tiled group is in: an older xfeat then refuses the file instead of misreading it."""
    newer = any(data_name(g) != "pool" or g.attrs.get("tiles", "") for g in _settings_groups(f))
    return max(int(f.attrs.get("format_version", 1)), 2 if newer else 1)


def _row_dtype(name: str, width: int = MIN_TEXT_WIDTH):
    return {"label": "i1", "sha256": SHA, "height": "i4", "width": "i4"}.get(name) or h5py.string_dtype("utf-8", width)


def _row_dataset(group: h5py.Group, name: str, dtype, trailing: tuple[int, ...] = (),
                 data: np.ndarray | None = None) -> h5py.Dataset:
    """A per-row dataset, growable along rows, chunked, each chunk with a Fletcher32 checksum."""
    # a patch map is one chunk (one image's map, one read); feature vectors come 16 rows of one flip to a chunk,
    # so that reading one flip (what evaluation reads) reads that flip's chunks only
    rows = (1 if name == "patches" else POOL_CHUNK_ROWS) if name in FEATURE_DATASETS else META_CHUNK_ROWS
    chunk = (rows, 1, *trailing[1:]) if name in FEATURE_DATASETS and name != "patches" and trailing else (rows, *trailing)
    n = 0 if data is None else len(data)
    ds = group.create_dataset(name, shape=(n, *trailing), maxshape=(None, *trailing), dtype=dtype,
                              chunks=chunk, fletcher32=True)
    if n:
        ds[:] = data
    return ds


def _write_fc(group: h5py.Group, fc_weight: np.ndarray, fc_bias: np.ndarray) -> None:
    for name, value in (("fc_weight", fc_weight), ("fc_bias", fc_bias)):
        if name in group:
            del group[name]
        group.create_dataset(name, data=np.asarray(value, dtype=np.float32), fletcher32=True)


def _text_width(longest: int) -> int:
    """A power of two above the longest value: one pad byte at least, so a value filling its width is damage."""
    return max(MIN_TEXT_WIDTH, 1 << int(longest).bit_length())


def _settings_groups(f: h5py.File) -> list[h5py.Group]:
    """The groups under /features that carry settings (a timm backbone nests one level deeper)."""
    found: list[h5py.Group] = []
    if "features" in f:
        f["features"].visititems(
            lambda _, item: found.append(item) if isinstance(item, h5py.Group) and "backbone" in item.attrs else None)
    return found


def _copy_attrs(src, dst) -> None:
    for k, v in src.attrs.items():
        dst.attrs[k] = v


def _copy_rebuilding(src_path: Path, dst_path: Path, plan: dict[str, np.ndarray]) -> None:
    """Write ``dst_path`` as a copy of the cache in which the groups of ``plan`` are rewritten with only the rows
    kept and with checksums; the other groups are copied as stored (their chunks and checksums unchanged).

    A fresh file rather than a byte copy: datasets deleted inside an HDF5 file leave their space behind."""
    with h5py.File(src_path, "r") as src, h5py.File(dst_path, "w") as dst:
        def copy(source: h5py.Group, target: h5py.Group) -> None:
            _copy_attrs(source, target)
            for name, item in source.items():
                key = item.name.lstrip("/")
                if isinstance(item, h5py.Group) and key in plan:
                    _rebuild_group(item, target.create_group(name), plan[key])
                elif isinstance(item, h5py.Group) and "backbone" not in item.attrs:
                    copy(item, target.create_group(name))
                else:
                    source.copy(item, target, name)
        copy(src, dst)


def _rebuild_group(src: h5py.Group, dst: h5py.Group, keep: np.ndarray) -> None:
    """Copy a group's rows ``keep`` into ``dst`` with checksums on every dataset and fixed-width strings."""
    _copy_attrs(src, dst)
    rows = np.flatnonzero(keep)
    settings = GroupSettings.from_attrs(src.attrs)
    row_datasets = (settings.data_name, *ROW_FIELDS)
    for name in row_datasets:
        if name not in src:  # lost (so every row was flagged): it starts again empty, as in a new group
            if name == settings.data_name:
                _row_dataset(dst, name, settings.data_dtype, settings.row_shape)
            else:
                _row_dataset(dst, name, _row_dtype(name))
    for name, item in src.items():
        if name in ("fc_weight", "fc_bias") and not item.fletcher32:
            try:
                dst.create_dataset(name, data=item[...], fletcher32=True)
                continue
            except _READ_ERRORS:
                pass
        if name not in row_datasets:  # fc layers (a damaged one stays damaged: prepare rewrites it), unknown
            src.copy(item, dst, name)
            continue
        if name in TEXT_FIELDS:
            raw = read_checked(item)[0][rows]
            values = [v if isinstance(v, bytes) else str(v).encode() for v in raw.tolist()]
            dtype = _row_dtype(name, _text_width(max(map(len, values), default=0)))
            _row_dataset(dst, name, dtype, data=np.array(values, dtype=dtype) if values else None)
            continue
        target = _row_dataset(dst, name, _row_dtype(name) if name != settings.data_name else item.dtype,
                              item.shape[1:])
        step = POOL_CHUNK_ROWS * 256
        for a in range(0, item.shape[0], step):  # slab by slab: a large pool is never held whole
            b = min(item.shape[0], a + step)
            wanted = rows[(rows >= a) & (rows < b)] - a
            if len(wanted):
                block = read_checked(item, span=(a, b))[0]
                n = target.shape[0]
                target.resize(n + len(wanted), axis=0)
                target[n:] = block[wanted]


def _warn_discarded(batch: Path) -> None:
    warnings.warn(f"{batch}: unreadable or inconsistent batch discarded; its images will be recomputed",
                  XfeatWarning, stacklevel=4)


def _load_batch(batch: Path, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]
                ) -> dict[str, dict[str, np.ndarray]] | None:
    """A journal batch's rows per group, or None when it cannot be read or does not fit the cache: a zip it
    cannot read, a group the cache lacks, row counts that differ between features and metadata, features of
    another shape or type than the group's (``shapes``: each group's feature row shape and type)."""
    try:
        with open(batch, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            keys = data["keys"]
            if keys.ndim != 1 or keys.dtype.kind != "U":
                return None
            loaded = {}
            for i, key in enumerate(keys.tolist()):
                if key in loaded or key not in shapes:
                    return None
                rows = {n: data[f"{i}.{n}"] for n in ("features", *ROW_FIELDS) if f"{i}.{n}" in data.files}
                if not _batch_rows_fit(rows, shapes[key]):
                    return None
                loaded[key] = rows
            return loaded
    except Exception:  # a damaged zip raises BadZipFile, EOFError, ValueError, zlib.error, OSError, KeyError...
        return None


def _feature_shapes(f: h5py.File) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each group's feature row shape and type, as a batch's features must have them."""
    shapes = {}
    for group in _settings_groups(f):
        ds = group.get(data_name(group))
        if ds is not None:
            shapes[group.name.lstrip("/")] = (tuple(ds.shape[1:]), ds.dtype)
    return shapes


def _batch_rows_fit(rows: dict[str, np.ndarray], sample_shape: tuple[tuple[int, ...], np.dtype]) -> bool:
    if not all(n in rows for n in ("path", "relpath", "bundle", "label")):
        return False
    k = len(rows["path"])
    if any(v.ndim != 1 or len(v) != k for n, v in rows.items() if n != "features"):
        return False
    if any(rows[n].dtype.kind != "U" for n in TEXT_FIELDS) or rows["label"].dtype.kind not in "iub":
        return False
    if not np.isin(rows["label"], (0, 1)).all():
        return False
    if "features" in rows:
        features = rows["features"]
        shape, dtype = sample_shape
        if features.dtype != dtype or features.shape != (k, *shape):
            return False
        if not all(n in rows for n in ("sha256", "height", "width")) or rows["sha256"].dtype.kind != "U":
            return False
        return bool(len(rows["sha256"]) == 0 or set(np.char.str_len(rows["sha256"]).tolist()) == {64})
    return True


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


@dataclass
class _GroupKeys:
    """A group's current rows by path and by content (sha256): what a new row supersedes."""

    by_path: dict[str, int] = field(default_factory=dict)
    by_content: dict[str, int] = field(default_factory=dict)
    by_id: dict[int, tuple[str, str]] = field(default_factory=dict)

    def add(self, paths: Sequence[str], shas: Sequence[str], ids: Sequence[int]) -> None:
        for p, s, i in zip(paths, shas, ids):
            self.by_path[p], self.by_content[s], self.by_id[i] = i, i, (p, s)

    def drop(self, ids: Sequence[int]) -> None:
        for i in ids:
            p, s = self.by_id.pop(i, ("", ""))
            if self.by_path.get(p) == i:
                del self.by_path[p]
            if self.by_content.get(s) == i:
                del self.by_content[s]


def _stage_rows(staged: dict[str, dict], rows: dict[str, np.ndarray], keys: _GroupKeys) -> None:
    """Fold one batch's rows of a group into the rows the commit writes, in order: a later row of a file replaces
    an earlier one; a metadata-only row changes a staged row or a row already in the cache (never makes one)."""
    full = "features" in rows
    for i, path in enumerate(rows["path"].tolist()):
        values = {n: rows[n][i] for n in ROW_FIELDS if n in rows}
        if full:
            staged[path] = {**values, "features": rows["features"][i]}
        elif path in staged:
            staged[path].update({n: values[n] for n in ("relpath", "bundle", "label")})
        elif path in keys.by_path:
            staged[path] = {**{n: values[n] for n in ("path", "relpath", "bundle", "label")}, "features": None}


@dataclass
class _Segment:
    """What one commit adds: rows per group, fc layers of new groups, the window histograms."""

    rows: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    fc: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    histograms: tuple[Mapping[str, np.ndarray], Mapping[str, int]] | None = None
    text_widths: dict[str, dict[str, int]] = field(default_factory=dict)
    histogram_shape: tuple[int, ...] = ()
    histogram_attrs: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.rows or self.fc or self.histograms)

    def write(self, path: Path, index: Index) -> None:
        """An ordinary HDF5 file in the single-file layout (checksummed chunks, fixed-width UTF-8) holding only
        what this commit adds; its groups carry their settings, so a segment describes itself."""
        with h5py.File(path, "w") as f:
            f.attrs["format"], f.attrs["created"] = SEGMENT_FORMAT, _now()
            for key in {**self.rows, **self.fc}:
                group = f.require_group(key)
                group.attrs.update(index.groups[key].attrs)
            for key, columns in self.rows.items():
                group, widths = f[key], {}
                g = index.groups[key]
                name = _data_name(g)
                _row_dataset(group, name, g.datasets[name].dtype, g.datasets[name].trailing, columns["features"])
                for field_name in ROW_FIELDS:
                    values = columns[field_name]
                    if field_name in TEXT_FIELDS:
                        encoded = np.char.encode(values.astype(str), "utf-8")
                        width = _text_width(max((len(v) for v in encoded.tolist()), default=0))
                        widths[field_name] = width
                        dtype = _row_dtype(field_name, width)
                        values = encoded.astype(dtype)
                    else:
                        dtype = _row_dtype(field_name)
                        values = values.astype(SHA if field_name == "sha256" else dtype)
                    _row_dataset(group, field_name, dtype, (), values)
                self.text_widths[key] = widths
            for key, (weight, bias) in self.fc.items():
                _write_fc(f[key], weight, bias)
            if self.histograms:
                _store_window_histograms(f, *self.histograms)
                ds = f[WINDOW_HISTOGRAMS]
                self.histogram_shape, self.histogram_attrs = tuple(ds.shape), dict(ds.attrs)


def _row_shapes(g: GroupSettings) -> dict[str, DatasetShape]:
    """The per-row datasets of a new group: the feature dataset and the metadata."""
    shapes = {g.data_name: DatasetShape(g.row_shape, np.dtype(g.data_dtype))}
    for name in ROW_FIELDS:
        shapes[name] = DatasetShape((), np.dtype(_row_dtype(name)))
    return shapes


def _data_name(g: GroupIndex) -> str:
    tap = g.attrs.get("tap", "pool")
    return tap.decode() if isinstance(tap, bytes) else str(tap)


def is_segmented(f: h5py.File) -> bool:
    """True for a cache in the segment layout (format 3): an index over ``c.h5.segments/``."""
    layout = f.attrs.get("layout", "")
    return (layout.decode() if isinstance(layout, bytes) else str(layout)) == LAYOUT


def _read_index(f: h5py.File) -> Index:
    groups = _settings_groups(f)
    return read_index(f, groups, {g.name.lstrip("/"): (data_name(g), *ROW_FIELDS) for g in groups})


def missing_segments_of(group: h5py.Group) -> list[tuple[Path, int]]:
    """(segment, rows of the group there) for each segment a group of a segmented cache reads that is missing or
    not an HDF5 file; empty for a single-file cache."""
    if RUNS not in group:
        return []
    runs = group[RUNS][...]
    counts = {int(s): int(runs[runs[:, 0] == s, 2].sum()) for s in np.unique(runs[:, 0])}
    for name in ("fc_weight", "fc_bias"):
        if name in group and group[name].is_virtual:
            counts.setdefault(int(Path(group[name].virtual_sources()[0].file_name).stem), 0)
    return [(path, counts[int(path.stem)]) for path in missing_segments(recorded_folder(group.file), set(counts))]


def check_segments(cache: str | os.PathLike[str], group: h5py.Group) -> None:
    """A ``CacheError`` naming the first segment a group reads that is missing or unreadable."""
    lost = missing_segments_of(group)
    if lost:
        path, rows = lost[0]
        more = f" (and {len(lost) - 1} more segments)" if len(lost) > 1 else ""
        raise CacheError(f"{cache}: segment {path} is missing or not an HDF5 file{more}: {rows} row(s) of "
                         f"{group.name.lstrip('/')} cannot be read; {REPAIR_HINT}")


def _decoded(values: np.ndarray) -> np.ndarray:
    """Text columns as str (fixed-width UTF-8, or variable-length in caches written before checksums)."""
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8")
    if values.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.tolist()], dtype=str)
    return values


def copy_cache(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Copy a cache, with its segments, to a new name: the copy's index reads its own segment folder.

    (A single-file cache is one file to copy; a cache in the segment layout is the index file and
    ``<name>.segments/``, and its index names that folder.)"""
    source, target = cache_path(source), Path(target)
    with open_cache(source) as f:
        segmented = is_segmented(f)
        index = _read_index(f) if segmented else None
    if not segmented:
        with replacing(target) as tmp:
            shutil.copyfile(source, tmp)
        return target
    folder = segment_folder(target)
    if folder.exists():
        raise CacheError(f"{target}: its segment folder {folder} already exists; choose another name")
    shutil.copytree(segment_folder(source), folder)
    with replacing(target) as tmp, h5py.File(tmp, "w") as f:
        write_index(f, index, target.name)
    return target


@dataclass(frozen=True)
class Compaction:
    """What ``compact`` did: segments folded, and the cache's size before and after (bytes)."""

    segments: int
    bytes_before: int
    bytes_after: int


def segment_count(cache: str | os.PathLike[str]) -> int:
    """How many segments a cache's index reads (0 for a single-file cache)."""
    with open_cache(cache_path(cache)) as f:
        return len(_read_index(f).segments()) if is_segmented(f) else 0


def cache_bytes(cache: str | os.PathLike[str]) -> int:
    """The bytes a cache occupies: its file and, in the segment layout, its segments."""
    path = cache_path(cache)
    folder = segment_folder(path)
    segments = sum(p.stat().st_size for p in folder.glob("*.h5")) if folder.is_dir() else 0
    return path.stat().st_size + segments


def compact(cache: str | os.PathLike[str]) -> Compaction:
    """Fold a cache in the segment layout into one self-contained file of the single-file layout (format 1 or
    2, as before segments), holding the current rows only, in their order; then remove its segments.

    For copying a cache as one file, archiving it, or reclaiming the space of superseded rows. Costs one read
    and one write of the whole cache, under the writer's lock (a run extracting into it waits). A missing or
    damaged segment stops it with a one-line error, the cache left as it was.
    """
    with CacheWriter(cache) as writer:  # the lock; merges what an interrupted run left first
        path = writer.path
        with open_cache(path) as f:
            if not is_segmented(f):
                return Compaction(0, cache_bytes(path), cache_bytes(path))
            for group in _settings_groups(f):
                check_segments(path, group)
            segments = len(_read_index(f).segments())
        before = cache_bytes(path)
        with writer._writing(), replacing(path) as tmp:
            with open_cache(path) as src, h5py.File(tmp, "w") as dst:
                _write_compacted(path, src, dst)
        shutil.rmtree(segment_folder(path), ignore_errors=True)  # unread now; a kill here leaves them to the next run
    return Compaction(segments, before, cache_bytes(path))


def _write_compacted(cache: Path, src: h5py.File, dst: h5py.File) -> None:
    """Every current row of the index ``src``, read and checked, into ordinary datasets of ``dst``."""
    dst.attrs.update({k: v for k, v in src.attrs.items() if k not in ("layout", "segments")})
    dst.attrs["format_version"] = 1  # raised to 2 below if a group needs it
    if WINDOW_HISTOGRAMS in src:
        ds = src[WINDOW_HISTOGRAMS]
        copy = dst.create_dataset(WINDOW_HISTOGRAMS, data=ds[...], chunks=(1, N_LEVELS), compression="gzip",
                                  compression_opts=4, shuffle=True, fletcher32=True)
        copy.attrs.update(dict(ds.attrs))
    for group in _settings_groups(src):
        key = group.name.lstrip("/")
        target = dst.require_group(key)
        target.attrs.update(dict(group.attrs))
        columns, _, damages = scan_group(group, (), fc=True)
        if damages:
            raise damage_error(cache, damages)
        _write_fc(target, columns["fc_weight"], columns["fc_bias"])
        for name in (data_name(group), *ROW_FIELDS):
            ds = group[name]
            out = _row_dataset(target, name, ds.dtype, tuple(ds.shape[1:]))
            out.resize(ds.shape[0], axis=0)
            step = max(1, SLAB_BYTES // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))))
            for a in range(0, ds.shape[0], step):
                block, unreadable, _ = read_checked(ds, span=(a, min(ds.shape[0], a + step)))
                if unreadable.any():
                    raise damage_error(cache, [Damage(f"{key}/{name}", "checksum mismatch (damaged file)",
                                                      a + np.flatnonzero(unreadable))])
                out[a:a + len(block)] = block
    dst.attrs["format_version"] = _format_version(dst)
