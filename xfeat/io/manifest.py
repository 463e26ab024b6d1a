"""CSV manifests: the one reader behind dataset manifests (path,bundle,label) and predict's lists of images."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xfeat.errors import DataError


@dataclass(frozen=True)
class ManifestRow:
    """One data row: its line in the file (for messages) and its cells by lower-cased column name."""

    line: int
    values: dict[str, str]


def read_manifest(manifest: str | os.PathLike[str], required: Sequence[str]) -> list[ManifestRow]:
    """The data rows of a CSV manifest whose header names at least the ``required`` columns.

    Blank lines are skipped, cells and column names stripped (names lower-cased, a UTF-8 BOM ignored); a
    duplicated column, a repeated header or a row with another number of fields is a one-line DataError.
    """
    manifest = Path(manifest)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(manifest, f"cannot read manifest ({e})") from None
    rows_with_lines = [(n, row) for n, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]
    if not rows_with_lines:
        raise DataError(manifest, f"empty manifest; expected a header {','.join(required)}")
    columns = [c.strip().lower() for c in rows_with_lines[0][1]]
    for name in columns:
        if columns.count(name) > 1:
            raise DataError(manifest, f"duplicated column {name!r} in the header")
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(manifest, f"header lacks column(s) {', '.join(missing)}; expected {','.join(required)}")
    data = []
    for line, row in rows_with_lines[1:]:
        cells = [c.strip() for c in row]
        if [c.lower() for c in cells] == columns:
            raise DataError(f"{manifest}, line {line}",
                            "the header is repeated as a data row (were two manifests concatenated?)")
        if len(cells) != len(columns):
            raise DataError(f"{manifest}, line {line}", f"{len(cells)} fields where the header has {len(columns)}")
        data.append(ManifestRow(line, dict(zip(columns, cells))))
    return data


def manifest_path(manifest: str | os.PathLike[str], value: str) -> Path:
    """A path cell resolved: relative paths are relative to the manifest's folder."""
    path = Path(value)
    return (path if path.is_absolute() else Path(manifest).parent / path).resolve()
