"""Atomic file writes: a reader, or the next run after a crash, sees the old file or the new one, never half.

Every file xfeat writes (cache, model, predictions, reports, statistics, converted and synthetic images) goes
through here: the bytes go to a hidden temporary name in the target's folder (same filesystem, so the rename
is atomic), are flushed to disk, and the temporary is renamed over the target. On any failure, including a
full disk or Ctrl-C, the temporary is removed and the target is left as it was. An ``OSError`` while writing
(no space left, a read-only folder) becomes one ``DataError``: ``<target>: cannot write (<reason>)``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from xfeat.errors import DataError


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally, the file written there is synced
    and renamed over ``path``. For writers that need a file name rather than a file object (h5py)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        # A full disk or a read-only folder: one line naming the file the user asked for, not the temporary.
        if e.filename is not None and os.fsdecode(e.filename) not in (str(tmp), str(path)):
            raise  # about another file (one the writer was reading): its own message names it
        raise DataError(path, f"cannot write ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    _sync_folder(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_args) -> Iterator[IO]:
    """``open(path, mode)`` whose content replaces ``path`` only when the block ends without an error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write writes a whole file: mode {mode!r} must start with 'w'")
    with replacing(path) as tmp, open(tmp, mode, **open_args) as f:
        yield f


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` as the whole content of ``path``, atomically."""
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) as the whole content of ``path``, atomically."""
    write_bytes(path, text.encode("utf-8"))


def _sync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows it (POSIX); elsewhere it is best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
