"""Find the images of a dataset (folder layout or CSV manifest) with their bundle and label.

Two layouts are accepted:

* a folder ``ROOT/<bundle>/<label>/<image>`` (images may sit in sub-folders below the label folder);
  files directly in ``ROOT`` (a manifest, a README) and hidden files are ignored;
* a CSV manifest with at least the columns ``path,bundle,label``; relative paths are resolved
  against the CSV's folder, extra columns (e.g. ``anomaly``) are kept.

Labels are ``normal``/``abnormal``, ``good``/``defect`` or ``0``/``1``, case-insensitive; 1 means abnormal.

A file is one image however many names it has: two entries naming one file (a symbolic or hard link to an
image already in the dataset, a manifest row repeating another) would be one cache row for two records and
one image twice in the statistics, so the repeat is dropped with a warning naming both; the file's own name
wins over a link to it, then the first entry. One file with two labels stops the run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xfeat.errors import DataError, XfeatWarning
from xfeat.io.manifest import manifest_path, read_manifest

LABELS = {"normal": 0, "good": 0, "0": 0, "abnormal": 1, "defect": 1, "1": 1}
LABEL_NAMES = ("normal", "abnormal")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
MANIFEST_COLUMNS = ("path", "bundle", "label")
# Files that operating systems drop into folders; never images, never worth an error.
OS_CLUTTER = {"thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: where it is, its production bundle and its label (1 = abnormal)."""

    path: Path
    bundle: str
    label: int
    relpath: str  # relative to the dataset root, with forward slashes: names outputs that mirror the input
    extra: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Skipped:
    """A file left out of a run under ``skip_bad``, with the reason; runs list these in a report."""

    path: str
    problem: str


@dataclass(frozen=True)
class Dataset:
    """The images of a dataset in a stable order (sorted by bundle, then relative path)."""

    root: Path
    source: Path
    records: tuple[ImageRecord, ...]
    skipped: tuple[Skipped, ...] = ()

    def __post_init__(self) -> None:
        """One record per file: caches key rows by path, so a repeated path would break them (and the counts)."""
        seen: set[Path] = set()
        for record in self.records:
            if record.path in seen:
                raise DataError(record.path, "listed twice in one dataset; each file is one record")
            seen.add(record.path)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def bundles(self) -> list[str]:
        return sorted({r.bundle for r in self.records})


def parse_label(text: str, where: str) -> int:
    """Map a label name to 0 (normal) or 1 (abnormal); ``where`` names the file for the error."""
    try:
        return LABELS[text.strip().lower()]
    except KeyError:
        raise DataError(where, f"unknown label {text.strip()!r}; expected normal/abnormal, good/defect or 0/1") from None


def find_images(source: str | os.PathLike[str], *, skip_bad: bool = False) -> Dataset:
    """Find a dataset's images from a folder layout or a ``.csv`` manifest.

    With ``skip_bad`` a missing or non-image file is listed in ``Dataset.skipped`` instead of
    stopping the run; problems with the layout itself (unknown label, bad header) always stop it.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(source, "no such file or folder")
    if source.is_dir():
        records, skipped = _scan_folder(source, skip_bad)
        root = source
    elif source.suffix.lower() == ".csv":
        records, skipped = _read_manifest(source, skip_bad)
        root = source.parent
    else:
        raise DataError(source, "expected a dataset folder or a .csv manifest")
    records.sort(key=lambda r: (r.bundle, r.relpath))
    return Dataset(root=root.resolve(), source=source.resolve(), records=tuple(records), skipped=tuple(skipped))


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith(".") and p.name.lower() not in OS_CLUTTER)


def _scan_folder(root: Path, skip_bad: bool) -> tuple[list[ImageRecord], list[Skipped]]:
    entries: list[_Entry] = []
    skipped: list[Skipped] = []
    bundle_dirs = [p for p in _visible(root.iterdir()) if p.is_dir()]
    if not bundle_dirs:
        raise DataError(root, "no bundle folders; expected ROOT/<bundle>/<normal|abnormal>/<image>")
    for bundle_dir in bundle_dirs:
        found = 0
        for label_dir in _visible(bundle_dir.iterdir()):
            if not label_dir.is_dir():
                raise DataError(label_dir, "file outside a label folder; expected ROOT/<bundle>/<normal|abnormal>/<image>")
            if label_dir.name.lower() not in LABELS:
                raise DataError(label_dir, f"unknown label folder {label_dir.name!r}; expected normal/abnormal, "
                                           "good/defect or 0/1")
            label = LABELS[label_dir.name.lower()]
            for path in _visible(_files_below(label_dir)):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    problem = "not an image file (expected .tif, .tiff, .png, .jpg, .jpeg or .bmp)"
                    if not skip_bad:
                        raise DataError(path, problem)
                    skipped.append(Skipped(str(path), problem))
                    continue
                try:
                    identity = _file_identity(path)
                except OSError as e:  # e.g. a symbolic link to nothing
                    problem = f"cannot read file ({e.strerror or e})"
                    if not skip_bad:
                        raise DataError(path, problem) from None
                    skipped.append(Skipped(str(path), problem))
                    continue
                relpath = path.relative_to(root).as_posix()
                record = ImageRecord(path=path.resolve(), bundle=bundle_dir.name, label=label, relpath=relpath)
                entries.append(_Entry(record, path, identity, str(path), str(path)))
                found += 1
        if not found:
            raise DataError(bundle_dir, "bundle has no images")
    entries.sort(key=lambda e: (e.record.bundle, e.record.relpath))  # the dataset's order decides "first"
    return _one_per_file(entries), skipped


@dataclass(frozen=True)
class _Entry:
    """A record with the name that led to its file, to find and report two names of one file."""

    record: ImageRecord
    named: Path  # as the folder or manifest names it, symbolic links not resolved
    identity: object  # equal for two names of one file
    where: str  # how messages about this entry start
    ref: str  # how a message about another entry refers to this one


def _file_identity(path: Path) -> object:
    """One value per file whatever its name: device and inode (symbolic and hard links alike), or the resolved
    path on file systems that report no inodes."""
    stat = os.stat(path)
    return (stat.st_dev, stat.st_ino) if stat.st_ino else str(path.resolve())


def _one_per_file(entries: Sequence[_Entry]) -> list[ImageRecord]:
    """The records of ``entries`` (in their order) with every second name of a file dropped, with a warning
    naming both: the file's own name wins over a symbolic link to it, then the earlier entry. Two labels for
    one file contradict each other and stop the run (whichever xfeat kept, the other would be lost silently)."""
    kept: dict[object, _Entry] = {}
    for entry in sorted(entries, key=lambda e: e.named.is_symlink()):  # stable: otherwise in the given order
        first = kept.setdefault(entry.identity, entry)
        if first is entry:
            continue
        a, b = first.record, entry.record
        if a.label != b.label:
            raise DataError(entry.where, f"the same file as {first.ref}, labelled {LABEL_NAMES[a.label]} there and "
                                         f"{LABEL_NAMES[b.label]} here; give the file one label")
        leak = f" (bundles {a.bundle} and {b.bundle}: a leak between folds)" if a.bundle != b.bundle else ""
        where = f", in bundle {a.bundle}" if leak else ""
        warnings.warn(f"{entry.where}: the same file as {first.ref}{leak}; counted once{where}", XfeatWarning,
                      stacklevel=4)
    return [e.record for e in entries if kept[e.identity] is e]


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every visible image file below a folder (by suffix: .tif, .png, .jpg, .bmp, ...), sorted (no layout)."""
    return [p for p in _visible(_files_below(Path(folder))) if p.suffix.lower() in IMAGE_SUFFIXES]


def _files_below(folder: Path) -> Iterator[Path]:
    """Files below ``folder``, through linked folders too (their images would otherwise be lost silently);
    a folder already walked is not entered again, so a link to an ancestor cannot loop."""
    walked: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in walked]
        for name in filenames:
            yield Path(dirpath, name)


def _read_manifest(manifest: Path, skip_bad: bool) -> tuple[list[ImageRecord], list[Skipped]]:
    rows = read_manifest(manifest, MANIFEST_COLUMNS)
    root = manifest.parent
    entries: list[_Entry] = []
    skipped: list[Skipped] = []
    for row in rows:
        line, values = row.line, row.values
        where = f"{manifest}, line {line}"
        if not values["path"] or not values["bundle"]:
            raise DataError(where, "empty path or bundle")
        label = parse_label(values["label"], where)
        path = manifest_path(manifest, values["path"])
        named = Path(values["path"]) if Path(values["path"]).is_absolute() else root / values["path"]
        if not path.is_file():
            problem = f"image not found (listed in {manifest}, line {line})"
            if not skip_bad:
                raise DataError(path, problem)
            skipped.append(Skipped(str(path), problem))
            continue
        relpath = path.relative_to(root.resolve()).as_posix() if path.is_relative_to(root.resolve()) \
            else f"{values['bundle']}/{LABEL_NAMES[label]}/{path.name}"
        extra = {k: v for k, v in values.items() if k not in MANIFEST_COLUMNS}
        record = ImageRecord(path=path, bundle=values["bundle"], label=label, relpath=relpath, extra=extra)
        entries.append(_Entry(record, named, _file_identity(path), f"{where} ({values['path']})",
                              f"line {line} ({values['path']})"))
    if not entries and not skipped:
        raise DataError(manifest, "manifest lists no images")
    return _one_per_file(entries), skipped


def warn_leaks(records: Iterable[ImageRecord], hashes: Iterable[str]) -> list[tuple[ImageRecord, ImageRecord]]:
    """Warn about identical image files in two bundles (they leak between leave-one-bundle-out folds) or with
    two labels (a labelling conflict). Copies are separate files, so both stay in the dataset.

    Returns the pairs found in two bundles (first occurrence, repeat), so callers can report them too.
    """
    first: dict[str, ImageRecord] = {}
    leaks = []
    for record, digest in zip(records, hashes):
        seen = first.setdefault(digest, record)
        if seen is record or (seen.bundle == record.bundle and seen.label == record.label):
            continue
        message = f"{record.path}: same image content as {seen.path}"
        if seen.bundle != record.bundle:
            leaks.append((seen, record))
            message += f" (bundles {seen.bundle} and {record.bundle}): a leak between folds"
        if seen.label != record.label:
            message += (f"{';' if seen.bundle != record.bundle else ','} labelled {LABEL_NAMES[seen.label]} there "
                        f"and {LABEL_NAMES[record.label]} here: a labelling conflict")
        warnings.warn(message, XfeatWarning, stacklevel=2)
    return leaks
