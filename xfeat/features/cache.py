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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from xfeat import __version__
from xfeat.errors import XfeatError, XfeatWarning
from xfeat.io.atomic import atomic_write, replacing
from xfeat.convert.folds import FoldWindows, fold_windows, window_like
from xfeat.convert.stats import N_LEVELS, WindowStats

FORMAT = "xfeat.features"
FORMAT_VERSION = 2  # 2: local and patches taps, tiles (docs/cache-format.md)
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
SLAB_BYTES = 64 << 20  # checked reads go slab by slab: a large pool is verified without being held in memory
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
        return "f2" if self.tap == "patches" else "f4"

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


def _read_checked(ds: h5py.Dataset, column: int | None = None, keep: bool = True,
                  check: Callable[[np.ndarray], np.ndarray] | None = None, span: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Read a per-row dataset (``column``: one index of axis 1; ``span``: rows a..b, chunk-aligned) slab by
    slab, so that HDF5 verifies every chunk without the whole dataset in memory.

    Returns (data or None, unreadable, implausible) for the rows read: rows of a chunk HDF5 cannot read
    (Fletcher32 mismatch, or damage it notices) are flagged and read as zeros; ``check(block)`` flags rows
    whose values are impossible. A slab that fails is read again chunk by chunk to name the damaged rows."""
    first, end = span or (0, ds.shape[0])
    step = ds.chunks[0] if ds.chunks else max(end, 1)
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
    data = (np.concatenate(parts) if parts else _slice(ds, 0, 0, column)) if keep else None
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
            data, unreadable, implausible = _read_checked(ds, flip, keep=keep_pool,
                                                          check=None if ds.fletcher32 else nonfinite_rows)
        else:
            raw, unreadable, _ = _read_checked(ds)
            data, implausible = _CHECKS[name](raw)
        implausible &= ~unreadable
        if unreadable.any():
            problem = "checksum mismatch (damaged file)" if ds.fletcher32 else "unreadable (damaged file)"
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
        return [b for b in batches if _load_batch(f, b) is None]


def lacks_checksums(group: h5py.Group) -> bool:
    """True for a group written before checksums (no Fletcher32, variable-length strings)."""
    for name in (*FEATURE_DATASETS, *ROW_FIELDS, "fc_weight", "fc_bias"):
        if name in group:
            ds = group[name]
            if ds.dtype.kind == "O" or not ds.fletcher32:
                return True
    return False


class CacheWriter:
    """The single writer of a cache during one run: lock, journal, atomic commits.

    Use as a context manager; on entry it takes the lock and merges what an interrupted run left in the
    journal; on exit (also after Ctrl-C) it commits what was computed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = cache_path(path)
        self.journal = Path(f"{self.path}.journal")
        self._lock = FileLock(f"{self.path}.lock", timeout=0)
        self._next_batch = 0
        # group key -> rows found damaged: the next commit rewrites the group without them (and with checksums)
        self._damaged: dict[str, np.ndarray] = {}

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

    # -- reading what is there ------------------------------------------------------------------
    def window_stats(self) -> WindowStats | None:
        if not self.path.exists():
            return None
        with open_cache(self.path) as f:
            return stored_window_stats(f)

    def cached_images(self, key: str) -> dict[str, tuple[str, str, str, int]]:
        """path -> (sha256, relpath, bundle, label) of the rows a group holds (empty for a new group).

        Every row is checked (features included): a damaged row is not cached. Its images are left for the
        run to recompute, the next commit drops the damaged rows, and a warning names each damaged dataset.
        """
        if not self.path.exists():
            return {}
        with open_cache(self.path) as f:
            if key not in f:
                return {}
            try:
                c, bad, damages = scan_group(f[key])
                unsealed = lacks_checksums(f[key])
            except _READ_ERRORS as e:
                raise CacheError(f"{self.path}: {key}: unreadable HDF5 structure ({_first_line(e)}) (damaged file); "
                                 "restore a copy, or move it away and extract again") from None
        if damages or unsealed:
            self._damaged[key] = bad
            self._warn_damage(damages)
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

        def create(f: h5py.File) -> None:
            if stats is not None and stored_stats is None:
                f.attrs["window_stats"] = json.dumps(stats.to_dict())
                f.attrs["g_min"], f.attrs["g_max"] = stats.g_min, stats.g_max
                if bundle_histograms:
                    _store_window_histograms(f, bundle_histograms, bundle_images or {})
            for g in new:
                _create_group(f, g, *fc[g.backbone])
            for g in refresh:
                _write_fc(f[g.key], *fc[g.backbone])

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
        """Merge the journal into a copy of the cache and put the copy in its place atomically.

        A batch that cannot be read or does not fit its group is discarded with a warning (its images are
        recomputed by the next run) and never blocks the others; rows found damaged are dropped.
        """
        batches = self._journal_files()
        if not batches and not self._damaged:
            return
        discarded: list[Path] = []
        while True:
            good = [b for b in batches if b not in discarded]
            try:
                self._rewrite(lambda f: _merge_journal(f, good, discarded))
                break
            except _BadBatch as e:  # it failed half-way into the copy: start again from the committed cache
                discarded.append(e.batch)
                _warn_discarded(e.batch)
            except _DamagedGroup as e:  # a merge touched a damaged chunk: find the damage, drop it, start again
                self._locate_damage(e)
        for batch in batches:  # only after the new cache is in place: a kill here just merges them again
            batch.unlink(missing_ok=True)

    def _locate_damage(self, e: "_DamagedGroup") -> None:
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else OSError(str(e.__cause__))
        if e.key in self._damaged:
            raise CacheError(self._write_failure(cause)) from None
        with open_cache(self.path) as f:
            _, bad, damages = scan_group(f[e.key])
        if not damages:  # not damage: a write that failed (a full disk)
            raise CacheError(self._write_failure(cause)) from None
        self._damaged[e.key] = bad
        self._warn_damage(damages)

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
        """Groups the next commit rewrites, with the rows it keeps: groups with damaged rows (dropped), and
        groups written before checksums (checked for impossible values first, then sealed with checksums)."""
        if not self.path.exists():
            return {}
        plan = {}
        with open_cache(self.path) as f:
            for group in _settings_groups(f):
                key = group.name.lstrip("/")
                if key not in self._damaged and lacks_checksums(group):  # checked once, even if the commit retries
                    _, self._damaged[key], damages = scan_group(group)
                    self._warn_damage(damages)
                if key in self._damaged:
                    plan[key] = ~self._damaged[key]
        return plan

    def _rewrite(self, change: Callable[[h5py.File], object]) -> None:
        with replacing(self.path) as tmp:
            try:
                rebuild = self._rebuild_plan()
                if rebuild:
                    _copy_rebuilding(self.path, tmp, rebuild)
                elif self.path.exists():
                    shutil.copyfile(self.path, tmp)  # inside replacing: a failed copy leaves no temporary
                with h5py.File(tmp, "a") as f:
                    if not f.attrs.get("format"):
                        f.attrs["format"], f.attrs["format_version"] = FORMAT, 1  # raised by _format_version
                        f.attrs["created"] = _now()
                    change(f)
                    f.attrs["format_version"] = _format_version(f)
                    f.attrs["xfeat_version"], f.attrs["updated"] = __version__, _now()
            except OSError as e:
                raise CacheError(self._write_failure(e)) from None
        self._damaged.clear()


def _format_version(f: h5py.File) -> int:
    """1 while every group is a pooled, untiled one (what xfeat before taps reads); 2 once a local, patches or
    tiled group is in: an older xfeat then refuses the file instead of misreading it."""
    newer = any(data_name(g) != "pool" or g.attrs.get("tiles", "") for g in _settings_groups(f))
    return max(int(f.attrs.get("format_version", 1)), 2 if newer else 1)


def _create_group(f: h5py.File, g: GroupSettings, fc_weight: np.ndarray, fc_bias: np.ndarray) -> None:
    group = f.require_group(g.key)
    group.attrs.update(g.attrs())
    group.attrs["created"] = _now()
    group.attrs["random_weights"] = g.weights_kind == "none"
    group.attrs["flip_order"] = "none: as stored; h: left-right; v: up-down; hv: both"
    _row_dataset(group, g.data_name, g.data_dtype, g.row_shape)
    _write_fc(group, fc_weight, fc_bias)
    for name in ROW_FIELDS:
        _row_dataset(group, name, _row_dtype(name))


def _row_dtype(name: str, width: int = MIN_TEXT_WIDTH):
    return {"label": "i1", "sha256": SHA, "height": "i4", "width": "i4"}.get(name) or h5py.string_dtype("utf-8", width)


def _row_dataset(group: h5py.Group, name: str, dtype, trailing: tuple[int, ...] = (),
                 data: np.ndarray | None = None) -> h5py.Dataset:
    """A per-row dataset, growable along rows, chunked, each chunk with a Fletcher32 checksum."""
    # a patch map is one chunk (one image's map, one read); feature vectors come 16 rows to a chunk
    rows = (1 if name == "patches" else POOL_CHUNK_ROWS) if name in FEATURE_DATASETS else META_CHUNK_ROWS
    n = 0 if data is None else len(data)
    ds = group.create_dataset(name, shape=(n, *trailing), maxshape=(None, *trailing), dtype=dtype,
                              chunks=(rows, *trailing), fletcher32=True)
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


def _encode_text(group: h5py.Group, name: str, values: np.ndarray) -> np.ndarray:
    """UTF-8 bytes in the dataset's fixed width, widening the dataset when a value needs it."""
    ds = group[name]
    if ds.dtype.kind == "O":  # variable-length strings (a group not yet sealed with checksums)
        return values.astype(object)
    encoded = np.char.encode(values.astype(str), "utf-8")
    longest = max((len(v) for v in encoded.tolist()), default=0)
    if longest >= ds.dtype.itemsize:
        data = ds[...]
        del group[name]
        ds = _row_dataset(group, name, _row_dtype(name, _text_width(longest)))
        ds.resize(len(data), axis=0)
        if len(data):
            ds[:] = data.astype(ds.dtype)
    return encoded.astype(ds.dtype)


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
            raw = _read_checked(item)[0][rows]
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
                block = _read_checked(item, span=(a, b))[0]
                n = target.shape[0]
                target.resize(n + len(wanted), axis=0)
                target[n:] = block[wanted]


class _BadBatch(Exception):
    """A journal batch that failed while being merged."""

    def __init__(self, batch: Path) -> None:
        super().__init__(str(batch))
        self.batch = batch


class _DamagedGroup(Exception):
    """A merge that failed reading or writing a group's chunks: damage, or a write that failed."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _warn_discarded(batch: Path) -> None:
    warnings.warn(f"{batch}: unreadable or inconsistent batch discarded; its images will be recomputed",
                  XfeatWarning, stacklevel=4)


def _merge_journal(f: h5py.File, batches: Sequence[Path], discarded: list[Path]) -> None:
    shapes: dict[str, tuple[tuple[int, ...], np.dtype] | None] = {}
    for batch in batches:
        rows_by_key = _load_batch(f, batch, shapes)
        if rows_by_key is None:
            discarded.append(batch)
            _warn_discarded(batch)
            continue
        for key, rows in rows_by_key.items():
            try:
                _merge_rows(f[key], rows)
            except OSError as e:
                raise _DamagedGroup(key) from e
            except Exception as e:
                raise _BadBatch(batch) from e


def _load_batch(f: h5py.File, batch: Path, shapes: dict[str, tuple[tuple[int, ...], np.dtype] | None] | None = None
                ) -> dict[str, dict[str, np.ndarray]] | None:
    """A journal batch's rows per group, or None when it cannot be read or does not fit the cache: a zip it
    cannot read, a group the cache lacks, row counts that differ between features and metadata, features of
    another shape or type than the group's. ``shapes`` caches each group's feature shape and type (None: no such
    group)."""
    shapes = {} if shapes is None else shapes
    try:
        with open(batch, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            keys = data["keys"]
            if keys.ndim != 1 or keys.dtype.kind != "U":
                return None
            loaded = {}
            for i, key in enumerate(keys.tolist()):
                if key not in shapes:
                    group = f[key] if key in f else None
                    ds = group.get(data_name(group)) if group is not None else None
                    shapes[key] = (ds.shape[1:], ds.dtype) if ds is not None else None
                if key in loaded or shapes[key] is None:
                    return None
                rows = {n: data[f"{i}.{n}"] for n in ("features", *ROW_FIELDS) if f"{i}.{n}" in data.files}
                if not _batch_rows_fit(rows, shapes[key]):
                    return None
                loaded[key] = rows
            return loaded
    except Exception:  # a damaged zip raises BadZipFile, EOFError, ValueError, zlib.error, OSError, KeyError...
        return None


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


def _merge_rows(group: h5py.Group, rows: dict[str, np.ndarray]) -> None:
    """Replace the rows whose path is already there (content or labels changed), append the others.

    A batch without ``features`` only updates the metadata of rows already there.
    """
    index = {p: i for i, p in enumerate(group["path"].asstr()[:])}
    if "features" not in rows:  # metadata updates apply to rows already there, never create rows
        known = np.array([p in index for p in rows["path"]], dtype=bool)
        rows = {k: v[known] for k, v in rows.items()}
    _, last = np.unique(rows["path"][::-1], return_index=True)
    if len(last) < len(rows["path"]):  # one file twice in a batch (e.g. reached through a symlink): keep the last
        kept = np.sort(len(rows["path"]) - 1 - last)
        rows = {k: v[kept] for k, v in rows.items()}
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
    for name in TEXT_FIELDS:
        values[name] = _encode_text(group, name, values[name])
    if "features" in rows:
        values[data_name(group)] = rows["features"]
    appended = positions >= start  # new rows come in order, so they fill start..n in one slice
    for name, column in values.items():
        dataset = group[name]
        dataset.resize(n, axis=0)
        if appended.any():
            dataset[start:n] = column[appended]
        for i in np.flatnonzero(~appended):  # one-row slices keep the column's dtype (fixed-width UTF-8)
            dataset[positions[i]:positions[i] + 1] = column[i:i + 1]

