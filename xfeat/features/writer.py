"""The cache's single writer: lock, journal, and commits that each add one segment and a new index.

Crash safety: nothing is modified in place. A run appends each computed batch to a journal folder beside the
cache (``CACHE.journal/``, one file per batch, each written to a temporary name and renamed); a commit writes
the journal's rows into a new segment (``CACHE.segments/NNNNNN.h5``) and then a new index over the segments
(``CACHE``), each written aside, synced and renamed into place, and only then empties the journal. A kill at
any moment leaves the last committed index with its segments intact and every finished batch in the journal,
which the next run merges first; a batch that cannot be read or does not fit its group is discarded with a
warning, never blocking the others. A lock file (``CACHE.lock``) keeps a second writer out. A cache path that
is a symlink is resolved first, so the lock, the journal and the segments sit beside the real file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from xfeat import __version__
from xfeat.convert.stats import N_LEVELS, WindowStats
from xfeat.errors import DataError, XfeatWarning
from xfeat.features.cache import (FEATURE_DATASETS, FORMAT, FORMAT_VERSION, LAYOUT, ROW_FIELDS, RUNS, SEGMENT_FORMAT,
                                  POOL_CHUNK_ROWS, SHA, SLAB_BYTES, TEXT_FIELDS, WINDOW_HISTOGRAMS, _READ_ERRORS, CacheError, Damage,
                                  GroupSettings, Rows, _first_line, _now, _read_index, _row_dataset, _row_dtype,
                                  _settings_groups, _store_window_histograms, _text_width, _write_fc, cache_bytes,
                                  cache_path, check_segments, damage_error, data_name, is_segmented,
                                  lacks_checksums, missing_segments_of, open_cache, read_checked, scan_group,
                                  stored_window_stats, _decoded)
from xfeat.features.segments import (BLOCK, DatasetShape, GroupIndex, Index, block_file, block_numbers, ids_of,
                                     missing_segments, recorded_folder, row_ids, segment_file, segment_folder,
                                     segment_numbers, split_ids, write_block, write_index)
from xfeat.io.atomic import atomic_write, replacing


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
        self._next_segment: int | None = None
        self._rewrite_index = False  # an index block it reads is missing or damaged: write the index again
        self._listed_blocks: set[int] = set()  # the blocks the index on disk reads

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
        blocks: list[int] = []
        if self.path.exists():
            with open_cache(self.path) as f:
                if is_segmented(f):
                    index = _read_index(f)
                    used, blocks = index.segments(), block_numbers(f)
                    self._rewrite_index = set(blocks) != set(index.blocks)
                    self._listed_blocks = set(blocks)
        for stale in self.segments.glob(".*.tmp"):
            stale.unlink()
        for number in segment_numbers(self.path):
            if number not in used:
                segment_file(self.path, number).unlink()
        for stale in self.segments.glob("block-*.h5"):  # blocks of an index that never got in place
            if not stale.stem[6:].isdigit() or int(stale.stem[6:]) not in blocks:
                stale.unlink()
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
        if not batches and not self._damaged and not self._damaged_ids and not self._rewrite_index:
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
            self._next_segment = None
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
        if self._next_segment is None:  # once per run: this writer alone adds segments while it holds the lock
            sealed = BLOCK * (max(index.blocks) + 1) - 1 if index.blocks else -1  # never reuse a number a block maps
            self._next_segment = max([*segment_numbers(self.path), *index.segments(), sealed], default=-1) + 1
        number = self._next_segment
        if segment:
            self.segments.mkdir(exist_ok=True)
            with replacing(segment_file(self.path, number)) as tmp:
                segment.write(tmp, index)
            self._next_segment += 1
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
        deferred = self._seal_blocks(index)  # after the widths: a block's text is as wide as its widest value
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
        self._rewrite_index = False
        self._listed_blocks = set(index.blocks)
        if deferred:  # now that no index reads the lost blocks, write them anew
            self._append(index, _Segment(), {})

    def _seal_blocks(self, index: Index) -> bool:
        """Write an index block for every run of ``BLOCK`` segments that all exist and has none yet: from now on
        the index maps their rows through it (a block is written before the index that reads it, so a kill
        between the two leaves a block that the next run removes). A lost block that the index on disk still
        names is left for the next index write (its new layout may differ: that index must not read it);
        returns whether one was."""
        deferred = False
        for number in range(self._next_segment // BLOCK):
            if number in index.blocks:
                continue
            if number in self._listed_blocks:
                deferred = True
                continue
            layout = self._block_layout(number, index)
            if layout:
                with replacing(block_file(self.path, number)) as tmp, h5py.File(tmp, "w") as f:
                    write_block(f, number, layout, index)
                index.blocks[number] = layout
        return deferred

    def _block_layout(self, number: int, index: Index) -> dict[str, np.ndarray]:
        """Per group, (segment, rows) of the segments of block ``number`` that hold rows of it."""
        layout: dict[str, list[tuple[int, int]]] = {}
        for segment in range(number * BLOCK, (number + 1) * BLOCK):
            path = segment_file(self.path, segment)
            if not path.exists():  # left entirely superseded: none of its rows is current
                continue
            with h5py.File(path, "r") as f:
                for key in index.groups:
                    if key in f and "path" in f[key]:
                        layout.setdefault(key, []).append((segment, f[key]["path"].shape[0]))
        return {key: np.array(rows, np.int64) for key, rows in layout.items()}

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
