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
cached. Caches written before gain the checksums when their first commit converts them to segments.

In the segment layout (format 3, ``xfeat.features.segments``) the file is an index whose datasets are virtual
ones over ``CACHE.segments/``; readers see the layout above either way. Writing (the journal, commits that add
segments, compaction) is ``xfeat.features.writer``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from xfeat.errors import XfeatError
from xfeat.convert.folds import FoldWindows, fold_windows, window_like
from xfeat.convert.stats import N_LEVELS, WindowStats
from xfeat.features.segments import (BLOCK, RUNS, Index, block_numbers, missing_blocks, missing_segments, read_index,
                                     recorded_folder, segment_folder)

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
SLAB_BYTES = 64 << 20  # checked reads go slab by slab: a large pool is verified without being held in memory
CHUNK_CACHE_BYTES = 0  # per file HDF5 opens for a read, segments included: reads go whole chunks, slab by slab
REPAIR_HINT = "run xfeat extract again to recompute, or xfeat info --verify"
_READ_ERRORS = (OSError, RuntimeError, ValueError)  # what h5py raises for a chunk or heap it cannot read


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def size_token(height: int, width: int, tiles: str = "") -> str:
    """How a group's geometry is named: ``2000x1000``, or ``512x512_t4x2`` for 4 x 2 tiles (``tiles``) of 512 x 512."""
    return f"{height}x{width}" + (f"_t{tiles}" if tiles else "")


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
    engine: str = "torch"  # what ran the network: torch | openvino (xfeat.features.engines)
    precision_check: str = field(default="", compare=False)  # JSON: how --precision auto chose (a record)

    @property
    def size_token(self) -> str:
        """How a group's geometry is named: ``2000x1000``, or ``512x512_t4x2`` for 4 x 2 tiles of 512 x 512."""
        return size_token(self.input_height, self.input_width, self.tiles)

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
                for f in fields(self) if f.compare and _norm(getattr(self, f.name)) != _norm(getattr(other, f.name))]


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
        # No chunk cache: HDF5 gives every file a virtual dataset opens (each segment) its own, 8 MiB by default,
        # which a read across a thousand segments would multiply into gigabytes; xfeat's reads take whole chunks
        # (measured at 200,000 rows: peak 1.37x the array with none, 1.49x with 1 MiB, and faster).
        f = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        _check_format(f, path)
        if is_segmented(f):
            segments = len(_read_index_runs(f)) + len(block_numbers(f))
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


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


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
    folder = recorded_folder(group.file)
    lost = [(path, counts[int(path.stem)]) for path in missing_segments(folder, set(counts))]
    for number, path in missing_blocks(folder, block_numbers(group.file)):
        rows = int(runs[runs[:, 0] // BLOCK == number, 2].sum())
        if rows:
            lost.append((path, rows))
    return lost


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

