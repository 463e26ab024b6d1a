"""Nothing lost, nothing stuck, nothing silent: damaged caches, bad journal batches, symlinked cache paths, full
disks and read-only folders, on a real (tiny) extraction."""

from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from xfeat import load_features
from xfeat.errors import XfeatWarning
from xfeat.features.cache import CacheError, Rows
from xfeat.features.writer import CacheWriter, copy_cache
from xfeat_cli.main import main

KEY = "features/resnet18/m2/64x32"
ARGS = ("--backbone", "resnet18", "--weights", "none", "--size", "64x32", "--methods", "m2", "--workers", "0",
        "--flips", "1", "--batch-size", "8", "--jobs", "1")
FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0.zip"


@pytest.fixture(scope="module")
def clean(tmp_path_factory, one_torch_thread) -> tuple[Path, Path]:
    """(dataset, its cache extracted once without trouble): every test works on copies."""
    root = tmp_path_factory.mktemp("integrity")
    data = root / "d"
    assert main(["synth", str(data), "--images", "24", "--bundles", "3", "--size", "64x32", "--seed", "1",
                 "--jobs", "1", "--quiet"]) == 0  # the same files for any --jobs (test_synth), without spawning
    assert main(["extract", str(data), "--cache", str(root / "clean.h5"), *ARGS, "--quiet"]) == 0
    return data, root / "clean.h5"


def _copy(clean_cache: Path, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    return copy_cache(clean_cache, to)


def _by_path(cache: Path) -> dict[str, tuple]:
    fs = load_features(cache, "resnet18", "m2", flips="all")
    return {p: (x, y, g, s) for p, x, y, g, s in zip(fs.paths, fs.X, fs.y, fs.groups, fs.sha256)}


def _assert_same_cache(cache: Path, clean_cache: Path) -> None:
    got, expected = _by_path(cache), _by_path(clean_cache)
    assert got.keys() == expected.keys()
    for path, (x, y, g, s) in expected.items():
        np.testing.assert_array_equal(got[path][0], x)  # bitwise
        assert got[path][1:] == (y, g, s)


def _source(cache: Path, dataset: str) -> tuple[Path, str]:
    """The file and dataset holding a dataset's first rows: its first segment's, for a virtual dataset."""
    with h5py.File(cache, "r") as f:
        if not f[dataset].is_virtual:
            return cache, dataset
        first = f[dataset].virtual_sources()[0]
        return cache.parent / first.file_name, first.dset_name


def _flip_64_bytes(cache: Path, dataset: str) -> None:
    """Invert 64 bytes at the start of a dataset's first chunk (in the segment holding it), with plain file I/O."""
    file, dataset = _source(cache, dataset)
    with h5py.File(file, "r") as f:
        ds = f[dataset]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    with open(file, "r+b") as fh:
        fh.seek(offset)
        damaged = bytes(b ^ 0xFF for b in fh.read(64))
        fh.seek(offset)
        fh.write(damaged)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("xfeat: error:")]


def test_every_dataset_is_checksummed_and_plain_h5py_still_reads_it(clean):
    _, cache = clean
    with h5py.File(cache, "r") as f:
        group = f[KEY]
        per_image = [n for n in group if n != "index_runs"]
        assert all(group[n].is_virtual for n in per_image)  # the index reads the segments...
        for name in per_image:  # ...whose datasets carry Fletcher32, which every HDF5 reader checks
            file, source = _source(cache, f"{KEY}/{name}")
            with h5py.File(file, "r") as segment:
                assert segment[source].fletcher32, name
        assert group["bundle"].dtype.itemsize >= 64  # fixed-width UTF-8: inside the checksummed chunks
        assert sorted(set(group["bundle"].asstr()[:])) == ["B01", "B02", "B03"]
        assert group["path"].asstr()[0].endswith(".tif") and group["pool"].shape == (24, 1, 512)


@pytest.mark.parametrize("name", ["pool", "label", "path", "bundle", "sha256"])
def test_flipped_bytes_are_found_reported_and_recomputed(tmp_path, clean, capsys, name):
    data, clean_cache = clean
    cache = _copy(clean_cache, tmp_path / "c.h5")
    _flip_64_bytes(cache, f"{KEY}/{name}")
    expected = rf"{KEY}/{name} rows 0-\d+: checksum mismatch \(damaged file\); run xfeat extract again"

    with pytest.raises(CacheError, match=expected):
        load_features(cache, "resnet18", "m2")
    with h5py.File(cache, "r") as f, pytest.raises(OSError):  # plain HDF5 readers refuse the chunk as well
        f[f"{KEY}/{name}"][:]

    assert main(["evaluate", str(cache), "--clf", "logreg", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and f"{KEY}/{name}" in err and "Traceback" not in err

    assert main(["info", str(cache), "--verify"]) == 1
    out, err = capsys.readouterr()
    assert f"DAMAGED {KEY}/{name} rows 0-" in out
    assert _error_lines(err) == [f"xfeat: error: {cache}: 1 damaged dataset(s); run xfeat extract again to "
                                 "recompute, or xfeat info --verify"]

    assert main(["extract", str(data), "--cache", str(cache), *ARGS]) == 0
    err = capsys.readouterr().err
    assert f"xfeat: warning: {cache}: {KEY}/{name} rows 0-" in err
    recomputed = 16 if name == "pool" else 24  # a pool chunk holds 16 rows; the metadata's one chunk all 24
    assert f"extracted {recomputed} images ({24 - recomputed} cached" in err
    _assert_same_cache(cache, clean_cache)
    assert main(["info", str(cache), "--verify", "--quiet"]) == 0


def _write_batch(path: Path, key: str, features: np.ndarray, paths: list[str], sha: str = "ab") -> None:
    """A journal batch in the format ``CacheWriter.add`` writes, here written by hand."""
    n = len(paths)
    np.savez(path, keys=np.array([key]), **{
        "0.features": features, "0.path": np.array(paths), "0.relpath": np.array([Path(p).name for p in paths]),
        "0.bundle": np.array(["B09"] * n), "0.label": np.zeros(n, np.int64),
        "0.sha256": np.array([f"{sha}{i:062x}" for i in range(n)]),
        "0.height": np.full(n, 64), "0.width": np.full(n, 32)})


def test_a_bad_journal_batch_is_discarded_and_never_blocks_the_good_ones(tmp_path, clean, capsys, monkeypatch):
    data, clean_cache = clean
    cache = _copy(clean_cache, tmp_path / "c.h5")
    journal = Path(f"{cache}.journal")
    journal.mkdir()
    ones = np.ones((7, 1, 512), np.float32)
    _write_batch(journal / "00000003.npz", KEY, ones, [f"/bad/{i}.tif" for i in range(6)])  # 7 rows, 6 paths
    (journal / "00000004.npz").write_bytes(b"PK\x03\x04 truncated")
    # The same file twice in one batch (an image reached through a symlink): the TypeError of the tester's report
    twice = [f"/good/{i}.tif" for i in range(6)] + ["/good/0.tif"]
    _write_batch(journal / "00000005.npz", KEY, ones, twice, sha="cd")

    with pytest.warns(XfeatWarning) as caught, CacheWriter(cache):
        pass
    notices = sorted(str(w.message) for w in caught)
    assert notices == [f"{journal}/0000000{i}.npz: unreadable or inconsistent batch discarded; its images will be "
                       "recomputed" for i in (3, 4)]
    assert not list(journal.iterdir())
    with h5py.File(cache, "r") as f:
        paths = list(f[f"{KEY}/path"].asstr()[:])
    assert paths.count("/good/0.tif") == 1 and "/good/5.tif" in paths and not any(p.startswith("/bad") for p in paths)

    # Through the command line: the notice, then a run that completes
    _write_batch(journal / "00000008.npz", KEY, ones, [f"/bad/{i}.tif" for i in range(6)])
    assert main(["extract", str(data), "--cache", str(cache), *ARGS]) == 0
    err = capsys.readouterr().err
    assert (f"xfeat: warning: {journal}/00000008.npz: unreadable or inconsistent batch discarded; its images will "
            "be recomputed") in err
    assert "extracted 0 images (24 cached" in err and not list(journal.iterdir())


def test_a_symlinked_cache_path_locks_and_commits_the_real_file(tmp_path, clean, capsys):
    data, clean_cache = clean
    real = _copy(clean_cache, tmp_path / "store" / "c.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    with CacheWriter(link) as writer:
        assert writer.path == real and writer.journal == Path(f"{real}.journal")
        assert Path(f"{real}.lock").exists() and not Path(f"{link}.lock").exists()
        with pytest.raises(CacheError, match="another xfeat process is writing this cache"):
            with CacheWriter(real):
                pass
        assert main(["extract", str(data), "--cache", str(real), *ARGS, "--quiet"]) == 1
        assert "another xfeat process is writing this cache" in capsys.readouterr().err
        writer.add({KEY: Rows(np.ones((1, 1, 512), np.float32), ["/new/x.tif"], ["x.tif"], ["B09"], [0],
                              ["0" * 64], [64], [32])})
    assert link.is_symlink() and link.resolve() == real  # the commit replaced the file, not the link
    assert "/new/x.tif" in load_features(link, "resnet18", "m2").paths
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.h5", "store"]
    with CacheWriter(real):  # and the other name sees the lock released
        pass


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_during_a_commit_is_one_line_and_loses_nothing(tmp_path, clean, capsys, monkeypatch):
    data, _ = clean
    half = data / "half.csv"  # the first 12 images, beside the dataset's own manifest
    half.write_text("\n".join((data / "manifest.csv").read_text().splitlines()[:13]) + "\n")
    cache = tmp_path / "c.h5"
    assert main(["extract", str(half), "--cache", str(cache), *ARGS, "--quiet"]) == 0
    before = cache.read_bytes()
    segments_before = _files(Path(f"{cache}.segments"))
    first_half = _by_path(cache)
    import xfeat.features.writer as cache_module

    def disk_full(self, path, index):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 4096)  # part of the segment made it before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module._Segment, "write", disk_full)
    assert main(["extract", str(data), "--cache", str(cache), *ARGS, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        f"xfeat: error: {cache}: commit failed: no space left on the device of {tmp_path}; the last committed "
        f"cache is intact; the computed batches stay in {cache}.journal and the next run merges them"]
    assert "Traceback" not in err
    assert cache.read_bytes() == before and _files(Path(f"{cache}.segments")) == segments_before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()

    assert main(["extract", str(data), "--cache", str(cache), *ARGS]) == 0
    assert "extracted 0 images (24 cached" in capsys.readouterr().err  # the journal held the computed batches
    after = _by_path(cache)
    assert len(after) == 24
    for path, (x, *_) in first_half.items():
        np.testing.assert_array_equal(after[path][0], x)


def test_a_failed_write_inside_hdf5_is_one_line_too(tmp_path, clean, monkeypatch):
    _, clean_cache = clean
    cache = _copy(clean_cache, tmp_path / "c.h5")
    before = cache.read_bytes()
    import xfeat.features.writer as cache_module

    def no_space(*args, **kwargs):
        raise OSError("Can't synchronously write data (file write failed: errno = 28, error message = 'No space "
                      "left on device')")

    monkeypatch.setattr(cache_module, "_row_dataset", no_space)
    with pytest.raises(CacheError, match=r"commit failed: no space left on the device .*; the last committed cache "
                                         r"is intact; the computed batches stay in"):
        with CacheWriter(cache) as writer:
            writer.add({KEY: Rows(np.ones((1, 1, 512), np.float32), ["/new/x.tif"], ["x.tif"], ["B09"], [0],
                                  ["0" * 64], [64], [32])})
    assert cache.read_bytes() == before and not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_commit_that_cannot_create_its_temporary_names_the_folder(tmp_path, clean, monkeypatch):
    _, clean_cache = clean
    cache = _copy(clean_cache, tmp_path / "c.h5")
    import xfeat.features.writer as cache_module

    def denied(self, path, index):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with pytest.raises(CacheError, match=rf"commit failed: cannot write in folder {tmp_path} \(Permission denied\)"):
        with CacheWriter(cache) as writer:
            monkeypatch.setattr(cache_module._Segment, "write", denied)
            writer.add({KEY: Rows(np.ones((1, 1, 512), np.float32), ["/new/x.tif"], ["x.tif"], ["B09"], [0],
                                  ["0" * 64], [64], [32])})


def test_a_read_only_cache_folder_is_one_line(tmp_path, clean, capsys):
    data, clean_cache = clean
    folder = tmp_path / "ro"
    cache = _copy(clean_cache, folder / "c.h5")
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        assert main(["extract", str(data), "--cache", str(cache), *ARGS, "--quiet"]) == 1
        err = capsys.readouterr().err
        assert len(_error_lines(err)) == 1 and f"folder {folder}" in err and "Traceback" not in err
        with pytest.raises(CacheError, match=rf"cannot write in folder {folder} \(Permission denied\)"):
            with CacheWriter(cache):  # the library alone (no command-line guard in front of it)
                pass
        assert sorted(p.name for p in folder.iterdir()) == ["c.h5", "c.h5.segments"]
    finally:
        folder.chmod(0o755)


def test_info_jobs_minus_one_is_a_usage_error(clean, capsys):
    _, cache = clean
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(cache), "--jobs", "-1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --jobs" in err and "Traceback" not in err


def test_a_cache_written_before_checksums_gains_them_at_its_next_commit(tmp_path):
    with zipfile.ZipFile(FIXTURE) as z:
        z.extractall(tmp_path)
    cache = tmp_path / "cache.h5"
    with h5py.File(cache, "r") as f:
        assert not f[KEY]["pool"].fletcher32 and f[KEY]["path"].dtype.kind == "O"
    before = load_features(cache, "resnet18", "m2", flips="all")
    with pytest.warns(XfeatWarning, match="converted to the segment layout"), CacheWriter(cache) as writer:
        writer.add({KEY: Rows(None, [before.paths[0]], ["moved.tif"], ["B09"], [0])})  # a relabelling
    with h5py.File(cache, "r") as f:
        assert f[KEY]["path"].dtype.kind == "S"
        for name in ("pool", "path", "label", "fc_weight"):  # the file became a segment, copied with checksums
            file, source = _source(cache, f"{KEY}/{name}")
            with h5py.File(file, "r") as segment:
                assert segment[source].fletcher32, name
    after = load_features(cache, "resnet18", "m2", flips="all")  # rows in bundle, then path order: match by path
    np.testing.assert_array_equal(after.X[np.argsort(after.paths)], before.X[np.argsort(before.paths)])
    moved = list(after.paths).index(before.paths[0])
    assert sorted(after.paths) == sorted(before.paths) and after.groups[moved] == "B09" and after.y[moved] == 0

    # An older xfeat writing into the new file would cut a long path to the width: seen, never silent
    with h5py.File(cache, "r+") as f:
        f[KEY]["path"][0:1] = np.array(["/" + "x" * 200], dtype=object)
    with pytest.raises(CacheError, match=rf"{KEY}/path rows 0: impossible values \(damaged file\)"):
        load_features(cache, "resnet18", "m2")


def test_an_image_read_again_reuses_its_hash_only_while_the_file_is_unchanged(tmp_path):
    """Extraction decodes what the scan hashed; it hashes again only a file written since (xfeat.io.hashing)."""
    import hashlib

    import tifffile

    from xfeat.io.images import load_native

    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.arange(64, dtype=np.uint16).reshape(8, 8))
    first = load_native(path)
    assert first.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and first.signature
    assert load_native(path, known=(first.signature, "from-the-scan")).sha256 == "from-the-scan"

    # rewritten in place, same size: a later modification time (set, so that a coarse clock cannot hide it)
    with open(path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\x01\x02")
    os.utime(path, ns=(first.signature[2], first.signature[2] + 1_000_000_000))
    rewritten = load_native(path, known=(first.signature, "from-the-scan"))
    assert rewritten.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != first.sha256

    # replaced by another file of the same size and times (an atomic save): another inode
    second = load_native(path)
    other = tmp_path / "b.tif"
    tifffile.imwrite(other, np.zeros((8, 8), dtype=np.uint16))
    os.utime(other, ns=(second.signature[2], second.signature[2]))
    os.replace(other, path)
    replaced = load_native(path, known=(second.signature, "from-the-scan"))
    assert replaced.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != second.sha256


def test_a_file_changed_between_the_scan_and_its_decoding_is_stored_with_its_new_hash(tmp_path, monkeypatch):
    """The rows' sha256 is the hash of the bytes whose features they hold, even when the file changes mid-run."""
    import hashlib

    import xfeat.features.extract as extract_module

    data = tmp_path / "d"
    assert main(["synth", str(data), "--images", "6", "--bundles", "2", "--size", "64x32", "--seed", "1",
                 "--jobs", "1", "--quiet"]) == 0
    victim = sorted(data.rglob("*.tif"))[0]
    planned = extract_module.plan_extraction

    def plan_then_rewrite(*args, **kwargs):
        plan = planned(*args, **kwargs)
        bytes_ = bytearray(victim.read_bytes())
        bytes_[-1] ^= 0xFF  # one pixel's high byte: a new content of the same size, after the scan hashed it
        victim.write_bytes(bytes(bytes_))
        stat = victim.stat()
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        return plan

    monkeypatch.setattr(extract_module, "plan_extraction", plan_then_rewrite)
    cache = tmp_path / "c.h5"
    assert main(["extract", str(data), "--cache", str(cache), *ARGS, "--quiet"]) == 0
    rows = load_features(cache, backbone="resnet18", method="m2")
    stored = dict(zip(map(str, rows.paths), rows.sha256))
    assert stored[str(victim)] == hashlib.sha256(victim.read_bytes()).hexdigest()
    others = [p for p in data.rglob("*.tif") if p != victim]
    assert all(stored[str(p)] == hashlib.sha256(p.read_bytes()).hexdigest() for p in others)


def test_extraction_hashes_each_unchanged_file_once(tmp_path, monkeypatch):
    """The scan hashes every file; decoding a file the scan saw unchanged reuses that hash (3 ms per X-ray)."""
    import hashlib
    from types import SimpleNamespace

    import tifffile

    import xfeat.io.images as images

    decoded_and_hashed = []

    def sha256(data=b""):
        decoded_and_hashed.append(len(data))
        return hashlib.sha256(data)

    monkeypatch.setattr(images, "hashlib", SimpleNamespace(sha256=sha256))
    data = tmp_path / "d"
    assert main(["synth", str(data), "--images", "6", "--bundles", "2", "--size", "64x32", "--seed", "1",
                 "--jobs", "1", "--quiet"]) == 0
    cache = tmp_path / "c.h5"
    assert main(["extract", str(data), "--cache", str(cache), *ARGS, "--quiet"]) == 0
    assert len(decoded_and_hashed) == 6  # the window's scan decodes and hashes; extraction reuses its hashes
    new = data / "B01" / "normal" / "new.tif"
    tifffile.imwrite(new, tifffile.imread(next(data.rglob("*.tif")))[::-1].copy())
    decoded_and_hashed.clear()
    assert main(["extract", str(data), "--cache", str(cache), *ARGS, "--quiet"]) == 0
    assert decoded_and_hashed == []  # the scan hashed the files without decoding; the new one is not hashed again
    rows = load_features(cache, backbone="resnet18", method="m2")
    assert dict(zip(map(str, rows.paths), rows.sha256))[str(new)] == hashlib.sha256(new.read_bytes()).hexdigest()
