"""A trained screening model as one file that loads without pickle and refuses any damage.

The file is a zip archive:

- ``model.json``: the metadata (JSON), always with ``format`` = ``"xfeat-model"``, ``format_version`` and the
  ``xfeat_version`` that wrote it;
- ``arrays.safetensors``: named numpy arrays (safetensors holds raw numbers only, so loading runs no code);
- optional extra members given by the caller, such as bundled backbone weights ``weights/<name>.safetensors``.

The zip comment is the SHA-256 hex digest (64 characters) of every byte of the file before the comment, so
one changed byte anywhere, or a truncation, is detected before anything is parsed. The digest guards against
accidents (a bad copy, an edited file), not against someone who rewrites the file on purpose: it is not a
signature. Files are written to a temporary name in the same folder and renamed, so a crash never leaves half
a model under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from xfeat import __version__
from xfeat.errors import DataError
from xfeat.io.atomic import write_bytes

FORMAT_NAME = "xfeat-model"
FORMAT_VERSION = 1  # raise when a reader of the previous version could misread the new files
METADATA_MEMBER = "model.json"
ARRAYS_MEMBER = "arrays.safetensors"
RESERVED_KEYS = ("format", "format_version", "xfeat_version")

_DIGEST_CHARS = 64
_PLACEHOLDER = b"0" * _DIGEST_CHARS
_END_RECORD = 22  # zip "end of central directory" record without its comment
_END_SIGNATURE = b"PK\x05\x06"
_ZIP_SIGNATURE = b"PK\x03\x04"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # same content, same bytes: a model file's hash identifies the model
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, ValueError, OSError, EOFError,
                   NotImplementedError, RuntimeError, zlib.error, SafetensorError)


@dataclass(frozen=True)
class ModelFile:
    """What a model file holds: its metadata (model.json), named arrays, and extra members by name."""

    metadata: dict
    arrays: dict[str, np.ndarray]
    files: dict[str, bytes] = field(default_factory=dict)


# --- writing --------------------------------------------------------------------------------------------------

def write_model_file(path: str | os.PathLike[str], metadata: dict, arrays: dict[str, np.ndarray],
                     files: dict[str, bytes] | None = None) -> None:
    """Write a model file atomically; ``format``, ``format_version`` and ``xfeat_version`` are added to metadata.

    Raises ValueError for content that cannot be stored (metadata that is not JSON, an array safetensors
    cannot hold, a bad member name) and DataError when the file cannot be written.
    """
    members = [(METADATA_MEMBER, _metadata_bytes(metadata)), (ARRAYS_MEMBER, _arrays_bytes(arrays))]
    members += [(name, bytes(data)) for name, data in _checked_files(files or {}).items()]
    try:
        write_bytes(path, _seal(_archive(members)))
    except OSError as e:
        raise DataError(path, f"cannot write model file ({e.strerror or e})") from None


def _metadata_bytes(metadata: dict) -> bytes:
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, not {type(metadata).__name__}")
    stamped = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "xfeat_version": __version__}
    clashes = [key for key in RESERVED_KEYS if key in metadata and metadata[key] != stamped[key]]
    if clashes:
        raise ValueError(f"metadata sets {', '.join(clashes)}; the writer sets these itself")
    try:
        text = json.dumps({**metadata, **stamped}, indent=1, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable ({e})") from None
    return text.encode("utf-8")


def _arrays_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """safetensors bytes; arrays are stored C-ordered (safetensors would write a Fortran array's raw memory)."""
    for key, value in arrays.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"array names must be non-empty strings; got {key!r}")
        if not isinstance(value, np.ndarray):
            raise ValueError(f"array {key!r} is a {type(value).__name__}, not a numpy array")
    try:
        return save_arrays({key: np.asarray(value, order="C") for key, value in arrays.items()})
    except (SafetensorError, TypeError, ValueError) as e:
        raise ValueError(f"cannot store the arrays in safetensors ({e})") from None


def _checked_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """Extra members: relative POSIX names that cannot clash with the archive's own members."""
    for name, data in files.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if (not parts or name.startswith("/") or "\\" in name or name.endswith("/") or ".." in parts
                or name in (METADATA_MEMBER, ARRAYS_MEMBER)):
            raise ValueError(f"bad member name {name!r}; expected a relative path such as weights/<name>.safetensors, "
                             f"other than {METADATA_MEMBER} and {ARRAYS_MEMBER}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"member {name!r} is a {type(data).__name__}, not bytes")
    return files


def _archive(members: list[tuple[str, bytes]]) -> bytes:
    """The zip archive with a placeholder comment where the digest goes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
        archive.comment = _PLACEHOLDER
    return buffer.getvalue()


def _seal(data: bytes) -> bytes:
    """Replace the placeholder comment by the digest of everything before it."""
    if not data.endswith(_PLACEHOLDER) or not _has_digest_slot(data):
        raise RuntimeError("zip writer did not end the archive with the digest placeholder")
    return data[:-_DIGEST_CHARS] + _digest(data).encode("ascii")


def _digest(data: bytes) -> str:
    return hashlib.sha256(memoryview(data)[:-_DIGEST_CHARS]).hexdigest()


# --- reading --------------------------------------------------------------------------------------------------

def read_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Read and check a model file: its digest, then format name and version, then its members.

    Every refusal is a DataError ``<path>: <problem>``; nothing in the file is unpickled or executed.
    """
    data = _read_bytes(path)
    _check_digest(path, data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if len(set(names)) != len(names):
                raise DataError(path, "not an xfeat model file (duplicate members in the archive)")
            metadata = _checked_metadata(path, archive, names)
            arrays = _read_arrays(path, archive)
            files = {name: archive.read(name) for name in names
                     if name not in (METADATA_MEMBER, ARRAYS_MEMBER) and not name.endswith("/")}
    except _ARCHIVE_ERRORS as e:
        raise DataError(path, f"damaged model file ({_short(e)})") from None
    return ModelFile(metadata, arrays, files)


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):  # a device or pipe could block forever
                raise DataError(path, "not a regular file, not an xfeat model file")
            return file.read()
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, "is a folder, not an xfeat model file") from None
    except OSError as e:
        if Path(path).is_dir():  # Windows reports a folder as permission denied
            raise DataError(path, "is a folder, not an xfeat model file") from None
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None


def _check_digest(path: str | os.PathLike[str], data: bytes) -> None:
    """Refuse a file whose bytes are not exactly those written: nothing is parsed before this passes."""
    if not data:
        raise DataError(path, "empty file, not an xfeat model file")
    if _has_digest_slot(data):
        if _digest(data).encode("ascii") != data[-_DIGEST_CHARS:]:
            raise DataError(path, "truncated or modified since it was written (checksum mismatch)")
        return
    if not _ZIP_SIGNATURE.startswith(data[:len(_ZIP_SIGNATURE)]):  # a cut after 1-3 bytes is still a cut zip
        raise DataError(path, "not an xfeat model file")
    if _is_complete_zip(data):
        raise DataError(path, "not an xfeat model file (a zip archive without an xfeat checksum)")
    raise DataError(path, "truncated or modified since it was written (checksum mismatch)")


def _has_digest_slot(data: bytes) -> bool:
    """True when the file ends with a zip end record whose comment is 64 bytes long: where the digest goes."""
    end = len(data) - _DIGEST_CHARS - _END_RECORD
    return (end >= 0 and data[end:end + 4] == _END_SIGNATURE
            and int.from_bytes(data[end + 20:end + 22], "little") == _DIGEST_CHARS)


def _is_complete_zip(data: bytes) -> bool:
    """A zip end record whose comment runs exactly to the end of the file: an intact archive, just not ours."""
    end = data.rfind(_END_SIGNATURE, max(0, len(data) - _END_RECORD - 0xFFFF))
    return end >= 0 and end + _END_RECORD + int.from_bytes(data[end + 20:end + 22], "little") == len(data)


def _checked_metadata(path: str | os.PathLike[str], archive: zipfile.ZipFile, names: list[str]) -> dict:
    if METADATA_MEMBER not in names:
        raise DataError(path, f"not an xfeat model file (no {METADATA_MEMBER})")
    try:
        metadata = json.loads(archive.read(METADATA_MEMBER).decode("utf-8"))
    except ValueError as e:
        raise DataError(path, f"not an xfeat model file ({METADATA_MEMBER} is not valid JSON: {_short(e)})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise DataError(path, f"not an xfeat model file ({METADATA_MEMBER} does not say format {FORMAT_NAME!r})")
    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(path, f"invalid format_version {version!r} in {METADATA_MEMBER}; expected a positive integer")
    if version > FORMAT_VERSION:
        raise DataError(path, f"written by a newer xfeat (model format {version} > {FORMAT_VERSION}, which this "
                              f"xfeat {__version__} reads); upgrade xfeat to load it")
    if not isinstance(metadata.get("xfeat_version"), str):
        raise DataError(path, f"missing xfeat_version in {METADATA_MEMBER}")
    if ARRAYS_MEMBER not in names:
        raise DataError(path, f"missing member {ARRAYS_MEMBER}")
    return metadata


def _read_arrays(path: str | os.PathLike[str], archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    try:
        arrays = load_arrays(archive.read(ARRAYS_MEMBER))
    except (SafetensorError, ValueError, TypeError) as e:
        raise DataError(path, f"damaged {ARRAYS_MEMBER} ({_short(e)})") from None
    return {key: value if value.flags.writeable else value.copy() for key, value in arrays.items()}


def _short(error: BaseException) -> str:
    """An exception as one short line, for messages that must stay on one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ModelFile", "read_model_file", "write_model_file"]
