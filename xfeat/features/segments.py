"""Append-only segments and the index over them: what makes a commit cost the rows it adds, not the cache's size.

A cache ``c.h5`` in the segment layout (format 3) is an *index*: the cache's attributes, each group's settings,
and for every dataset of the old single-file layout a virtual dataset (HDF5 VDS) of the same name and shape,
whose rows come from the *segments* ``c.h5.segments/NNNNNN.h5``. Plain h5py, MATLAB and R read a virtual dataset
like an ordinary one. Each commit writes the rows it adds into one new segment (aside, synced, renamed into
place) and then a new index (likewise), so its cost is the rows added plus the index, which is a few bytes per
*run* of rows (consecutive rows of one segment), not per row.

The index holds the *current* rows only, one per image: a row superseded (the file changed, moved, was
relabelled, or its row was found damaged) stays in its segment but leaves the index. Each group's runs are
stored as ``index_runs`` (int64 [K, 3]: segment, first row, rows), in the order of the virtual rows; xfeat
works from them, plain readers need only the virtual datasets. Source paths are relative
(``c.h5.segments/000001.h5``), which HDF5 resolves against the index file's folder: the pair moves together.
A missing source makes HDF5 return fill values, so xfeat checks that every segment a group uses exists before
reading it, and the virtual float datasets are filled with NaN (which xfeat's checks reject).

Index blocks keep the index small as segments accumulate: once segments ``64b .. 64b+63`` are all written, a
*block* ``c.h5.segments/block-NNNNNN.h5`` maps each group's rows of those segments, in order, as virtual
datasets of its own (sources relative to the block's folder). The index then maps a run of rows of those
segments to the block instead of to each segment: a few mappings per 64 segments, so writing the index costs
about the same at a million rows as at ten thousand. Blocks are derived: the index lists the ones it reads
(root attribute ``index_blocks``), and a missing one is rebuilt from the segments by the next write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

SEGMENTS_SUFFIX = ".segments"
RUNS = "index_runs"
FOLDER_ATTR = "segments"  # root attribute of an index: the name of the folder its virtual datasets read
BLOCKS_ATTR = "index_blocks"  # root attribute of an index: the blocks its virtual datasets read
BLOCK = 64  # segments per index block
_SHIFT = 32  # a row id: segment << 32 | row in the segment


def segment_folder(cache: str | os.PathLike[str]) -> Path:
    """The folder of a cache's segments: ``c.h5.segments`` beside ``c.h5``."""
    return Path(f"{cache}{SEGMENTS_SUFFIX}")


def segment_file(cache: str | os.PathLike[str], number: int) -> Path:
    return segment_folder(cache) / f"{number:06d}.h5"


def block_file(cache: str | os.PathLike[str], number: int) -> Path:
    """The index block over segments ``BLOCK * number`` to ``BLOCK * (number + 1) - 1``."""
    return segment_folder(cache) / _block_name(number)


def _block_name(number: int) -> str:
    return f"block-{number:06d}.h5"


def segment_numbers(cache: str | os.PathLike[str]) -> list[int]:
    """The numbers of the segment files present (referenced by the index or not)."""
    folder = segment_folder(cache)
    if not folder.is_dir():
        return []
    return sorted(int(p.stem) for p in folder.glob("*.h5") if p.stem.isdigit())


def row_ids(segment: int | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row ids (segment and row in it, one int64) of rows of a segment."""
    return (np.asarray(segment, np.int64) << _SHIFT) | np.asarray(rows, np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row ids -> (segment, row in the segment)."""
    ids = np.asarray(ids, np.int64)
    return ids >> _SHIFT, ids & ((1 << _SHIFT) - 1)


def runs_of(ids: np.ndarray) -> np.ndarray:
    """int64 [K, 3] (segment, first row, rows): the ids as runs of consecutive rows of one segment."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        return np.zeros((0, 3), np.int64)
    starts = np.flatnonzero(np.r_[True, np.diff(ids) != 1])
    counts = np.diff(np.r_[starts, len(ids)])
    segment, first = split_ids(ids[starts])
    return np.stack([segment, first, counts], axis=1)


def ids_of(runs: np.ndarray) -> np.ndarray:
    """The inverse of ``runs_of``."""
    runs = np.asarray(runs, np.int64).reshape(-1, 3)
    if not len(runs):
        return np.zeros(0, np.int64)
    starts = row_ids(runs[:, 0], runs[:, 1])
    offsets = np.arange(int(runs[:, 2].sum())) - np.repeat(np.cumsum(runs[:, 2]) - runs[:, 2], runs[:, 2])
    return np.repeat(starts, runs[:, 2]) + offsets


@dataclass
class DatasetShape:
    """What a virtual dataset needs to know of its sources: the row's shape and the dtype readers get."""

    trailing: tuple[int, ...]
    dtype: np.dtype
    attrs: dict = field(default_factory=dict)


@dataclass
class GroupIndex:
    """One group of the index: its settings (attributes), its current rows and where its fixed datasets live."""

    attrs: dict
    ids: np.ndarray  # int64 [N]: the current rows, in the order readers see them
    datasets: dict[str, DatasetShape]  # per-row datasets (features and metadata)
    fixed: dict[str, tuple[int, DatasetShape]]  # fc_weight, fc_bias: (segment, shape) of whole datasets


@dataclass
class Index:
    """The whole index: root attributes, the window histograms' segment, the groups."""

    attrs: dict
    groups: dict[str, GroupIndex]
    fixed: dict[str, tuple[int, DatasetShape]] = field(default_factory=dict)  # root datasets (window_histograms)
    blocks: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # block -> group -> [K, 2] (segment, rows)

    def segments(self) -> set[int]:
        """Every segment the index reads from."""
        used = {s for s, _ in self.fixed.values()}
        for g in self.groups.values():
            used.update(np.unique(runs_of(g.ids)[:, 0]).tolist())  # runs first: linear, then a few values
            used.update(s for s, _ in g.fixed.values())
        return used


def _source_name(cache_name: str, segment: int) -> str:
    return f"{cache_name}{SEGMENTS_SUFFIX}/{segment:06d}.h5"


def _fill(dtype: np.dtype):
    """What a plain reader gets from a missing segment: NaN, or -1 for the integers (labels, sizes), values
    xfeat's checks reject; strings read empty (an empty path is rejected too)."""
    return np.nan if dtype.kind == "f" else -1 if dtype.kind == "i" else None


Spaces = list[tuple[h5py.h5s.SpaceID, str, h5py.h5s.SpaceID]]  # (virtual selection, source file, source selection)


def _create_virtual(parent: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype, spaces: Spaces,
                    source_dataset: str, attrs: dict) -> None:
    """A virtual dataset mapping each virtual selection to the selection of ``source_dataset`` in its file,
    through h5py's low-level API (its high-level ``VirtualLayout`` costs ~10x more per mapping)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    fill = _fill(dtype)
    if fill is not None:
        dcpl.set_fill_value(np.array([fill], dtype=dtype))
    dataset = source_dataset.encode()
    for selected, file_name, source in spaces:
        dcpl.set_virtual(selected, file_name.encode(), dataset, source)
    space = h5py.h5s.create_simple(shape, shape)
    h5py.h5d.create(parent.id, name.encode(), h5py.h5t.py_create(dtype, logical=True), space, dcpl=dcpl)
    parent[name].attrs.update(attrs)


def _run_spaces(mapped: list[list], n: int, trailing: tuple[int, ...]) -> Spaces:
    """The dataspace selections of every mapped run (source file, first row, rows), for rows of shape
    ``trailing``: built once per row shape and shared by the datasets of a group (the metadata columns all have
    the same)."""
    zeros = (0,) * len(trailing)
    space = h5py.h5s.create_simple((n, *trailing), (n, *trailing))
    spaces, at = [], 0
    for file_name, first, count in mapped:
        selected = space.copy()
        selected.select_hyperslab((at, *zeros), (count, *trailing))
        source = h5py.h5s.create_simple((first + count, *trailing), (first + count, *trailing))
        source.select_hyperslab((first, *zeros), (count, *trailing))
        spaces.append((selected, file_name, source))
        at += count
    return spaces


def _mapped_runs(key: str, runs: np.ndarray, blocks: dict[int, dict[str, np.ndarray]], folder: str
                 ) -> list[list]:
    """A group's runs (segment, first row, rows) as [source file, first row, rows]: rows of a segment in a block
    read from the block, and runs that follow each other in one source merged into one."""
    in_block: dict[int, tuple[str, int]] = {}  # segment -> (block file, its first row of the group there)
    for number, layout in blocks.items():
        rows = layout.get(key)
        if rows is not None and len(rows):
            offsets = np.cumsum(rows[:, 1]) - rows[:, 1]
            for segment, offset in zip(rows[:, 0].tolist(), offsets.tolist()):
                in_block[segment] = (f"{folder}/{_block_name(number)}", offset)
    mapped: list[list] = []
    for segment, first, count in runs.tolist():
        if segment in in_block:
            source, offset = in_block[segment]
            first += offset
        else:
            source = f"{folder}/{segment:06d}.h5"
        if mapped and mapped[-1][0] == source and mapped[-1][1] + mapped[-1][2] == first:
            mapped[-1][2] += count
        else:
            mapped.append([source, first, count])
    return mapped


def _virtual_whole(parent: h5py.Group, name: str, cache_name: str, source_key: str, segment: int,
                   shape: DatasetShape) -> None:
    """A virtual dataset that is one whole dataset of one segment (fc_weight, window_histograms)."""
    full = tuple(shape.trailing)
    spaces = [(h5py.h5s.create_simple(full, full), _source_name(cache_name, segment), h5py.h5s.create_simple(full, full))]
    _create_virtual(parent, name, full, shape.dtype, spaces, source_key, shape.attrs)


def write_index(f: h5py.File, index: Index, cache_name: str) -> None:
    """Write ``index`` into the new, empty file ``f`` (the caller writes it aside and renames it into place);
    ``cache_name``: the index file's name, which names the segment folder its sources are in."""
    f.attrs.update(index.attrs)
    folder = f"{cache_name}{SEGMENTS_SUFFIX}"
    f.attrs[FOLDER_ATTR] = folder
    f.attrs[BLOCKS_ATTR] = np.array(sorted(index.blocks), np.int64)
    for name, (segment, shape) in index.fixed.items():
        _virtual_whole(f, name, cache_name, name, segment, shape)
    for key, g in index.groups.items():
        group = f.require_group(key)
        group.attrs.update(g.attrs)
        runs = runs_of(g.ids)
        ds = group.create_dataset(RUNS, data=runs, dtype=np.int64)
        ds.attrs["description"] = (f"the current rows: row i of every per-image dataset here is a row of a segment "
                                   f"{cache_name}{SEGMENTS_SUFFIX}/NNNNNN.h5; each line (segment, first row, rows) "
                                   "gives the next rows in order")
        mapped = _mapped_runs(key, runs, index.blocks, folder)
        spaces: dict[tuple[int, ...], Spaces] = {}
        for name, shape in g.datasets.items():
            trailing = tuple(shape.trailing)
            if trailing not in spaces:
                spaces[trailing] = _run_spaces(mapped, len(g.ids), trailing)
            _create_virtual(group, name, (len(g.ids), *trailing), shape.dtype, spaces[trailing], f"{key}/{name}",
                            shape.attrs)
        for name, (segment, shape) in g.fixed.items():
            _virtual_whole(group, name, cache_name, f"{key}/{name}", segment, shape)


def write_block(f: h5py.File, number: int, layout: dict[str, np.ndarray], index: Index) -> None:
    """Write block ``number`` into the new, empty file ``f``: per group of ``layout`` (segment, rows) pairs, the
    group's rows of those segments one after the other, as virtual datasets (sources beside the block)."""
    f.attrs["format"] = "xfeat index block"
    f.attrs["first_segment"], f.attrs["segments"] = number * BLOCK, BLOCK
    for key, rows in layout.items():
        group = f.require_group(key)
        group.attrs["segment_rows"] = rows
        mapped = [[f"{segment:06d}.h5", 0, count] for segment, count in rows.tolist()]
        total = int(rows[:, 1].sum())
        spaces: dict[tuple[int, ...], Spaces] = {}
        for name, shape in index.groups[key].datasets.items():
            trailing = tuple(shape.trailing)
            if trailing not in spaces:
                spaces[trailing] = _run_spaces(mapped, total, trailing)
            _create_virtual(group, name, (total, *trailing), shape.dtype, spaces[trailing], f"{key}/{name}", {})


def read_blocks(folder: Path, numbers) -> dict[int, dict[str, np.ndarray]]:
    """The layouts of the blocks ``numbers`` of ``folder`` that can be read (a missing or damaged block is left
    out: the index it belongs to is rewritten without it)."""
    blocks = {}
    for number in np.asarray(numbers if numbers is not None else [], np.int64).tolist():
        try:
            with h5py.File(folder / _block_name(number), "r") as f:
                blocks[number] = {g.name.lstrip("/"): np.asarray(g.attrs["segment_rows"], np.int64).reshape(-1, 2)
                                  for g in _groups_with(f, "segment_rows")}
        except (OSError, KeyError, ValueError, RuntimeError):
            continue
    return blocks


def _groups_with(f: h5py.File, attr: str) -> list[h5py.Group]:
    found: list[h5py.Group] = []
    f.visititems(lambda _, item: found.append(item) if isinstance(item, h5py.Group) and attr in item.attrs else None)
    return found


def _shape_of(ds: h5py.Dataset, per_row: bool) -> DatasetShape:
    return DatasetShape(tuple(ds.shape[1:] if per_row else ds.shape), ds.dtype, dict(ds.attrs))


def block_numbers(f: h5py.File) -> list[int]:
    """The blocks an index's virtual datasets read."""
    return np.asarray(f.attrs.get(BLOCKS_ATTR, []), np.int64).tolist()


def read_index(f: h5py.File, groups: list[h5py.Group], row_names: dict[str, tuple[str, ...]]) -> Index:
    """The index of a cache in the segment layout (``groups``: its settings groups; ``row_names``: per group key,
    the per-row datasets)."""
    fixed = {}
    for name, item in f.items():
        if isinstance(item, h5py.Dataset) and item.is_virtual:
            fixed[name] = (_whole_segment(item), _shape_of(item, False))
    index = Index(dict(f.attrs), {}, fixed)
    for group in groups:
        key = group.name.lstrip("/")
        datasets = {n: _shape_of(group[n], True) for n in row_names[key] if n in group}
        whole = {n: (_whole_segment(group[n]), _shape_of(group[n], False))
                 for n in ("fc_weight", "fc_bias") if n in group}
        index.groups[key] = GroupIndex(dict(group.attrs), ids_of(group[RUNS][...]), datasets, whole)
    index.blocks = read_blocks(recorded_folder(f), f.attrs.get(BLOCKS_ATTR))
    return index


def _whole_segment(ds: h5py.Dataset) -> int:
    sources = ds.virtual_sources()
    return int(Path(sources[0].file_name).stem)


def recorded_folder(f: h5py.File) -> Path:
    """The segment folder an index's virtual datasets read (named after the file when it was written)."""
    name = f.attrs.get(FOLDER_ATTR, "")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return Path(f.filename).resolve().parent / name  # beside the real file: HDF5 follows a symlinked index too


def missing_segments(folder: Path, segments: set[int]) -> list[Path]:
    """Segment files of ``folder`` that are missing or not HDF5 files (checked by their signature)."""
    return [folder / f"{s:06d}.h5" for s in sorted(segments) if not _is_hdf5(folder / f"{s:06d}.h5")]


def missing_blocks(folder: Path, numbers: list[int]) -> list[tuple[int, Path]]:
    """(number, file) of the index blocks of ``folder`` that are missing or not HDF5 files."""
    return [(n, folder / _block_name(n)) for n in numbers if not _is_hdf5(folder / _block_name(n))]


def _is_hdf5(path: Path) -> bool:
    """True for a file that starts with HDF5's signature."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False
