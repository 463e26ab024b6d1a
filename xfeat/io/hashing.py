"""Content identity: the SHA-256 of a file's bytes, for images (leaks, resuming) and weights files alike."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path


FileSignature = tuple[int, int, int, int]


def file_signature(stat: os.stat_result) -> FileSignature:
    """What changes whenever a file's bytes change: inode, size, modification and status-change times (ns).

    Equal signatures taken before one read and after another mean no write came between: the second read may
    reuse the first one's hash. (A write landing in the same clock tick as the first ``stat`` is the one miss; a
    row hashed so is found changed and recomputed by the next run.)"""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, read in blocks; remembered per (path, size, mtime) in this process,
    so a weights file hashed for every model built is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return hash_file(path)[0]


def hash_file(path: str | os.PathLike[str]) -> tuple[str, FileSignature]:
    """SHA-256 hex digest of a file's bytes, and the file's signature taken before reading them; never
    remembered: a scan must see a file rewritten with its old size and times (``cp -p``, ``rsync -t``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # hashlib.file_digest would do this, but only from Python 3.11
        signature = file_signature(os.fstat(f.fileno()))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), signature
