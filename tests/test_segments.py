"""The segment layout: commits that append, one current row per image for plain readers, missing segments,
compaction and conversion of single-file caches; real HDF5 files through the real writer."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import write_feature_cache
from xfeat import load_features
from xfeat.errors import XfeatWarning
from xfeat.features.cache import CacheError, Rows
from xfeat.features.writer import CacheWriter, compact, copy_cache
from xfeat.features.segments import ids_of, row_ids, runs_of, split_ids
from xfeat_cli.main import main

KEY = "features/toy/m2/8x8"
DIM = 6


def _rows(names: list[str], value: float, bundle: str = "B3", label: int = 0, sha: str | None = None) -> Rows:
    n = len(names)
    return Rows(np.full((n, 1, DIM), value, np.float32), [f"/data/{p}.tif" for p in names], [f"{p}.tif" for p in names],
                [bundle] * n, [label] * n, [sha or f"{abs(hash((p, value))):064x}"[-64:] for p in names], [8] * n,
                [8] * n)


def _cache(tmp_path: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    return write_feature_cache(tmp_path / "c.h5", rng.normal(size=(n, 1, DIM)), [i % 2 for i in range(n)],
                               ["B1"] * (n // 2) + ["B2"] * (n - n // 2))


def _plain(cache: Path, name: str) -> np.ndarray:
    with h5py.File(cache, "r") as f:
        ds = f[f"{KEY}/{name}"]
        return ds.asstr()[:] if ds.dtype.kind in "SO" else ds[:]


def test_runs_round_trip():
    ids = np.concatenate([row_ids(1, np.arange(5)), row_ids(3, [7, 8, 2]), row_ids(1, [5])])
    runs = runs_of(ids)
    assert runs.tolist() == [[1, 0, 5], [3, 7, 2], [3, 2, 1], [1, 5, 1]]
    np.testing.assert_array_equal(ids_of(runs), ids)
    assert [a.tolist() for a in split_ids(ids[5:7])] == [[3, 3], [7, 8]]
    assert ids_of(np.zeros((0, 3))).shape == (0,) and runs_of(np.zeros(0)).shape == (0, 3)


def test_each_commit_appends_one_segment_and_plain_readers_see_the_current_rows(tmp_path):
    cache = _cache(tmp_path)
    folder = Path(f"{cache}.segments")
    index_sizes = []
    for k in range(5):
        with CacheWriter(cache) as writer:
            writer.add({KEY: _rows([f"new{k}a", f"new{k}b"], float(k))})
        index_sizes.append(cache.stat().st_size)
    assert len(list(folder.glob("*.h5"))) == 2 + 5  # fc layer, the first rows, then one per commit
    sizes = [(folder / f"{s:06d}.h5").stat().st_size for s in range(2, 7)]
    assert max(sizes) - min(sizes) < 512  # each commit's segment holds its own two rows, whatever came before
    assert index_sizes[-1] - index_sizes[0] < 16 * 1024  # the index grows by runs, not by rows
    paths = _plain(cache, "path")
    assert len(paths) == 6 + 10 and len(set(paths)) == 16
    with h5py.File(cache, "r") as f:
        assert f[KEY]["index_runs"][:].tolist() == [[1, 0, 6]] + [[s, 0, 2] for s in range(2, 7)]
        assert f[KEY]["pool"].shape == (16, 1, DIM) and f[KEY]["fc_weight"].shape == (1000, DIM)

    # A changed file and a relabelled one: their older rows leave the index (they stay in their segment)
    with CacheWriter(cache) as writer:
        writer.add({KEY: _rows(["new0a"], 9.0)})
        writer.add({KEY: Rows(None, ["/data/new1b.tif"], ["new1b.tif"], ["B7"], [1])})
    paths, pool = _plain(cache, "path"), _plain(cache, "pool")
    assert len(paths) == 16 and sorted(paths) == sorted(set(paths))
    assert pool[list(paths).index("/data/new0a.tif"), 0, 0] == 9.0
    relabelled = list(paths).index("/data/new1b.tif")
    assert _plain(cache, "bundle")[relabelled] == "B7" and _plain(cache, "label")[relabelled] == 1
    assert pool[relabelled, 0, 0] == 1.0  # the features came along unchanged
    fs = load_features(cache, "toy", "m2")
    assert len(fs.paths) == 16


def test_a_file_moved_under_another_name_keeps_one_row(tmp_path):
    cache = _cache(tmp_path)
    with CacheWriter(cache) as writer:
        writer.add({KEY: _rows(["a"], 1.0, sha="ab" * 32)})
    with CacheWriter(cache) as writer:  # the same content under a new path (moved to another label folder)
        writer.add({KEY: _rows(["moved"], 1.0, label=1, sha="ab" * 32)})
    paths = list(_plain(cache, "path"))
    assert "/data/moved.tif" in paths and "/data/a.tif" not in paths and len(paths) == 7


def test_a_missing_segment_is_one_line_and_the_other_rows_stay(tmp_path, capsys):
    cache = _cache(tmp_path)
    for k in range(2):
        with CacheWriter(cache) as writer:
            writer.add({KEY: _rows([f"s{k}a", f"s{k}b"], float(k))})
    lost = Path(f"{cache}.segments") / "000002.h5"
    lost.unlink()
    with h5py.File(cache, "r") as f:  # a plain reader gets values that cannot be mistaken for features or labels
        assert np.isnan(f[KEY]["pool"][6:8]).all() and f[KEY]["label"][6:8].tolist() == [-1, -1]
        assert f[KEY]["path"].asstr()[6:8].tolist() == ["", ""] and not np.isnan(f[KEY]["pool"][:6]).any()

    with pytest.raises(CacheError, match=rf"segment {lost} is missing or not an HDF5 file: 2 row\(s\) of {KEY}"):
        load_features(cache, "toy", "m2")
    assert main(["info", str(cache)]) == 1
    out, err = capsys.readouterr()
    assert f"DAMAGED segment {lost}: missing" in out and err.count("xfeat: error:") == 1

    with pytest.warns(XfeatWarning, match=rf"segment {lost} is missing or not an HDF5 file: its 2 row\(s\) of {KEY} "
                                          "leave the cache"):
        with CacheWriter(cache) as writer:
            assert len(writer.cached_images(KEY)) == 10 - 2
            writer.add({KEY: _rows(["later"], 5.0)})
    fs = load_features(cache, "toy", "m2")  # readable again: the rows of the other segments, and the new one
    assert len(fs.paths) == 9 and "/data/s0a.tif" not in fs.paths and "/data/s1a.tif" in fs.paths


def test_a_segment_of_garbage_is_named_too(tmp_path):
    cache = _cache(tmp_path)
    bad = Path(f"{cache}.segments") / "000001.h5"
    bad.write_bytes(b"not an HDF5 file at all")
    with pytest.raises(CacheError, match=rf"segment {bad} is missing or not an HDF5 file"):
        load_features(cache, "toy", "m2")


def test_compact_folds_the_segments_into_one_file_and_the_next_write_converts_it_back_without_a_copy(tmp_path, capsys):
    cache = _cache(tmp_path)
    with CacheWriter(cache) as writer:
        writer.add({KEY: _rows(["x", "y"], 3.0)})
    before = load_features(cache, "toy", "m2", flips="all")

    assert main(["compact", str(cache)]) == 0
    assert "3 segments folded into one file" in capsys.readouterr().err
    assert not Path(f"{cache}.segments").exists()
    with h5py.File(cache, "r") as f:
        assert f.attrs["format_version"] == 1 and "layout" not in f.attrs and not f[KEY]["pool"].is_virtual
        assert all(ds.fletcher32 for ds in f[KEY].values())
    after = load_features(cache, "toy", "m2", flips="all")
    np.testing.assert_array_equal(after.X, before.X)  # bitwise
    assert after.paths.tolist() == before.paths.tolist() and compact(cache).segments == 0

    inode = os.stat(cache).st_ino
    with pytest.warns(XfeatWarning, match="converted to the segment layout"), CacheWriter(cache) as writer:
        writer.add({KEY: _rows(["z"], 4.0)})
    assert os.stat(Path(f"{cache}.segments") / "000000.h5").st_ino == inode  # the file itself, not a copy
    assert len(load_features(cache, "toy", "m2").paths) == 9


def test_a_cache_renamed_without_its_segments_is_one_line(tmp_path):
    cache = _cache(tmp_path)
    copy = tmp_path / "copy.h5"
    copy.write_bytes(cache.read_bytes())  # the index alone
    with pytest.raises(CacheError, match=r"copy.h5: its index reads the segments in .*c.h5.segments, not "
                                         r".*copy.h5.segments \(it was copied or renamed without them\)"):
        with CacheWriter(copy) as writer:
            writer.add({KEY: _rows(["x"], 1.0)})
    copied = copy_cache(cache, tmp_path / "good.h5")  # what to do instead
    with CacheWriter(copied) as writer:
        writer.add({KEY: _rows(["x"], 1.0)})
    assert len(load_features(copied, "toy", "m2").paths) == 7 and len(load_features(cache, "toy", "m2").paths) == 6


def test_stale_segments_of_an_interrupted_commit_are_removed(tmp_path):
    """A commit killed after writing its segment and before its index: the journal still holds the rows."""
    cache = _cache(tmp_path)
    folder = Path(f"{cache}.segments")
    (folder / "000005.h5").write_bytes((folder / "000001.h5").read_bytes())
    (folder / ".000006.h5.1a2b3c4d.tmp").write_bytes(b"half")
    with CacheWriter(cache):
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["000000.h5", "000001.h5"]


def test_a_subset_reads_as_the_whole_would_give_it(tmp_path):
    cache = _cache(tmp_path, n=40)
    with CacheWriter(cache) as writer:
        writer.add({KEY: _rows(["x", "y"], 3.0, bundle="B2")})
    whole = load_features(cache, "toy", "m2")
    b2 = whole.groups == "B2"
    part = load_features(cache, "toy", "m2", bundles=["B2"])
    np.testing.assert_array_equal(part.X, whole.X[b2])
    assert part.paths.tolist() == whole.paths[b2].tolist() and part.y.tolist() == whole.y[b2].tolist()
    for rows in ([5, 0, 17, 41], whole.y == 1, []):
        some = load_features(cache, "toy", "m2", rows=rows)
        np.testing.assert_array_equal(some.X, whole.select(rows).X)
        assert some.paths.tolist() == whole.select(rows).paths.tolist()
    np.testing.assert_array_equal(load_features(cache, "toy", "m2", bundles=["B2"], rows=[1]).X, part.X[[1]])


def _many_commits(cache: Path, commits: int) -> None:
    """``commits`` commits of one new image each, in one run (as an extraction commits every few minutes)."""
    with CacheWriter(cache) as writer:
        for k in range(commits):
            writer.add({KEY: _rows([f"img{k:03d}"], float(k))})
            writer.commit()


def test_index_blocks_keep_the_index_small_and_read_as_the_segments(tmp_path):
    cache = _cache(tmp_path)
    _many_commits(cache, 140)  # segments 1..140 after the converted one: blocks 0 and 1 are complete
    folder = Path(f"{cache}.segments")
    assert sorted(p.name for p in folder.glob("block-*.h5")) == ["block-000000.h5", "block-000001.h5"]
    with CacheWriter(cache) as writer:  # relabel an image inside block 0: its row leaves the block's run
        writer.add({KEY: Rows(None, ["/data/img010.tif"], ["img010.tif"], ["B9"], [1], None, None, None)})
    with h5py.File(cache, "r") as f:
        sources = {Path(s.file_name).name for s in f[f"{KEY}/pool"].virtual_sources()}
        assert f.attrs["index_blocks"].tolist() == [0, 1]
    assert {"block-000000.h5", "block-000001.h5"} <= sources and len(sources) < 20
    paths = _plain(cache, "path").tolist()
    assert len(paths) == len(set(paths)) == 6 + 140
    pool = _plain(cache, "pool")[:, 0, 0]
    for k in (0, 63, 64, 139):
        assert pool[paths.index(f"/data/img{k:03d}.tif")] == k
    assert _plain(cache, "bundle")[paths.index("/data/img010.tif")] == "B9"
    fs = load_features(cache, "toy", "m2")
    assert sorted(fs.paths.tolist()) == sorted(paths) and np.isfinite(fs.X).all()


def test_a_missing_block_is_named_and_the_next_write_rebuilds_it_without_losing_rows(tmp_path):
    cache = _cache(tmp_path)
    _many_commits(cache, 70)
    before = load_features(cache, "toy", "m2")
    block = Path(f"{cache}.segments/block-000000.h5")
    block.unlink()
    with pytest.raises(CacheError, match=r"block-000000\.h5 is missing or not an HDF5 file.*row\(s\)"):
        load_features(cache, "toy", "m2")
    with CacheWriter(cache):  # nothing to add: the index is written again, the block rebuilt from the segments
        pass
    assert block.exists()
    after = load_features(cache, "toy", "m2")
    np.testing.assert_array_equal(after.X, before.X)
    assert after.paths.tolist() == before.paths.tolist()


def test_a_block_of_an_index_that_never_got_in_place_is_removed(tmp_path):
    cache = _cache(tmp_path)
    _many_commits(cache, 3)
    stray = Path(f"{cache}.segments/block-000007.h5")
    stray.write_bytes(b"\x89HDF\r\n\x1a\n")
    with CacheWriter(cache):
        pass
    assert not stray.exists()
    assert len(load_features(cache, "toy", "m2").X) == 6 + 3


def test_compact_and_copy_keep_the_rows_read_through_blocks(tmp_path):
    cache = _cache(tmp_path)
    _many_commits(cache, 66)
    expected = load_features(cache, "toy", "m2")
    copy = copy_cache(cache, tmp_path / "copy.h5")
    assert Path(f"{copy}.segments/block-000000.h5").exists()
    np.testing.assert_array_equal(load_features(copy, "toy", "m2").X, expected.X)
    compact(cache)
    assert not Path(f"{cache}.segments").exists()
    np.testing.assert_array_equal(load_features(cache, "toy", "m2").X, expected.X)


def test_a_longer_path_in_the_commit_that_seals_a_block_reads_whole(tmp_path):
    cache = _cache(tmp_path)  # its file becomes segment 0; commits add 1..63, the last one seals block 0
    long = "a-much-longer-folder-name/" * 6
    with CacheWriter(cache) as writer:
        for k in range(63):
            writer.add({KEY: _rows([f"{long}img{k:03d}" if k == 62 else f"img{k:03d}"], float(k))})
            writer.commit()
    assert Path(f"{cache}.segments/block-000000.h5").exists()
    assert f"/data/{long}img062.tif" in _plain(cache, "path").tolist()
    assert f"/data/{long}img062.tif" in load_features(cache, "toy", "m2").paths.tolist()


def test_a_lost_block_is_rebuilt_only_once_no_index_on_disk_reads_it(tmp_path):
    cache = _cache(tmp_path)
    _many_commits(cache, 70)
    block = Path(f"{cache}.segments/block-000000.h5")
    block.unlink()
    with CacheWriter(cache) as writer:
        assert writer._listed_blocks == {0}
    with h5py.File(cache, "r") as f:
        assert f.attrs["index_blocks"].tolist() == [0] and block.exists()
