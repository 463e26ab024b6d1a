"""Outputs never overwrite inputs: the one check every command runs on what it writes, before any work.

A command's output that is also one of its inputs (``xfeat train c.h5 --out c.h5``) would replace the input
with the output; one inside a dataset folder (``xfeat convert d --out d``, ``xfeat extract d --cache d/c.h5``)
would be read back as data by the next run (8-bit PNGs beside the 16-bit TIFFs; the cache's journal folder
``d/c.h5.journal/`` taken for a bundle). Paths are compared after following symbolic links (also for an
output that does not exist yet but whose folder is a link) and by file identity (hard links), so no spelling of
the same file gets through. Each refusal is one ``DataError`` naming the file and what to do instead.

The rules, for ``check_output(path, inputs=..., data_roots=..., kind=...)``:

- a file output is not an existing folder, is none of ``inputs``, lies in no data root, and its folder exists
  (or will be created, ``create_folders``) and is writable;
- a folder output is not an existing file, is none of ``inputs``, overlaps no data root (neither is one, nor
  lies inside one, nor holds one: a folder that holds a dataset mixes what it writes with the data), and no
  input sits where it writes its files (``writes``: the names it puts directly in the folder);
- nothing else: an output may overwrite a previous output (that is what reruns do), atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from xfeat.errors import DataError
from xfeat.io.manifest import manifest_path, read_manifest

Input = tuple["str | os.PathLike[str] | None", str]  # (path or None when the option was not given, what it is)


def check_output(path: str | os.PathLike[str], *, option: str = "--out", inputs: Iterable[Input] = (),
                 data_roots: Iterable[str | os.PathLike[str]] = (), kind: Literal["file", "folder"] = "file",
                 writes: Iterable[str] = (), create_folders: bool = False) -> Path:
    """Refuse, before any work, an output that would destroy one of the command's inputs or be read back as
    data; return it resolved.

    ``inputs`` are ``(path, what)`` pairs, ``what`` finishing the sentence "``option`` is ..." (e.g. "the
    feature cache this command reads"); a ``None`` path is skipped. ``data_roots`` are folders the command
    reads data from (see ``data_roots_of``). ``writes`` (folders only) are the names of the files written
    directly into the folder. ``create_folders``: the command creates a missing folder (always for folders).
    """
    given = Path(path)
    target = given.resolve()
    roots = [Path(r).resolve() for r in data_roots]
    inputs = list(inputs)  # read more than once
    if kind == "file":
        if target.is_dir():
            raise DataError(path, f"{option} is a folder; give a file name")
        for source, what in inputs:
            if source is not None and _same_file(target, source):
                raise DataError(path, f"{option} is {what}{_also_named(given, source)}; choose another file")
        for root in roots:
            if target.is_relative_to(root):
                raise DataError(path, f"{option} is inside the dataset folder {root}, where it and the files "
                                      f"written beside it would be read back as data; choose a file outside it")
        _check_writable(path, target.parent, create_folders)
    elif kind == "folder":
        if target.exists() and not target.is_dir():
            raise DataError(path, f"{option} is an existing file, not a folder; choose a folder")
        for source, what in inputs:
            if source is not None and _same_file(target, source):
                raise DataError(path, f"{option} is {what}{_also_named(given, source)}; choose another folder")
        for root in roots:
            if target == root:
                raise DataError(path, f"{option} is the dataset folder itself; choose a folder outside it")
            if target.is_relative_to(root):
                raise DataError(path, f"{option} is inside the dataset folder {root}, where what it writes would "
                                      f"be read back as data; choose a folder outside it")
            if root.is_relative_to(target):
                raise DataError(path, f"{option} holds the dataset folder {root}; what it writes would mix with "
                                      f"the data; choose a folder outside it")
        names = list(writes)
        for source, what in inputs:
            for name in names:
                if source is not None and _same_file(target / name, source):
                    raise DataError(given / name, f"{option} {path} would overwrite {what} with its {name}; "
                                                  f"choose another folder")
        _check_writable(path, target, True)
    else:
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    return target


def data_roots_of(data: str | os.PathLike[str]) -> list[Path]:
    """The folders a dataset's images are read from: DATA itself for a folder, the folders of the listed
    images for a CSV manifest (its own folder may hold outputs: only a folder layout is scanned). Nothing for
    a path that does not exist; reading the dataset reports that."""
    data = Path(data)
    if data.is_dir():
        return [data.resolve()]
    if data.is_file() and data.suffix.lower() == ".csv":
        rows = read_manifest(data, ("path",))
        # the listed image's folder (followed if it is a link), not the folder of the file a linked image names
        return sorted({manifest_path(data, str(Path(row.values["path"]).parent)) for row in rows
                       if row.values["path"]})
    return []


def manifest_input(data: str | os.PathLike[str] | None) -> Input:
    """``(data, what)`` for ``inputs`` when DATA is a CSV manifest; a folder is covered by ``data_roots``."""
    is_manifest = data is not None and Path(data).suffix.lower() == ".csv"
    return (data if is_manifest else None), "the dataset manifest this command reads"


def _same_file(target: Path, source: str | os.PathLike[str]) -> bool:
    source = Path(source)
    if target == source.resolve():
        return True
    try:  # a hard link is the same file under another name
        return os.path.samefile(target, source)
    except OSError:  # one of them does not exist: not the same file
        return False


def _also_named(given: Path, source: str | os.PathLike[str]) -> str:
    """Name the input when the user spelled it differently (a link, a relative path) so the refusal is clear."""
    return "" if os.path.abspath(given) == os.path.abspath(source) else f" ({source})"


def _check_writable(path: str | os.PathLike[str], folder: Path, create_folders: bool) -> None:
    """The folder that will receive the output must exist (or, when the command creates it, its nearest
    existing ancestor must) and be writable: find out now, not after the work."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != folder and not create_folders:
        raise DataError(path, f"cannot write here: folder {folder} does not exist")
    if not existing.is_dir():
        raise DataError(path, f"cannot write here: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(path, f"cannot write here: folder {existing} is not writable (Permission denied)")


__all__ = ["Input", "check_output", "data_roots_of", "manifest_input"]
