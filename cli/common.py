"""What every subcommand shares: argument types, progress bars, and one-line messages on stderr."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from collections.abc import Iterator

from tqdm import tqdm

from xfeat.io.images import MAX_PIXELS, megapixels


def size_arg(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``2000x1000``) into ``(height, width)``."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 2000x1000, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"height and width must be positive, got {text!r}")
    return height, width


def names_arg(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list such as ``m1,m2,m3``."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def recalls_arg(text: str) -> tuple[float, ...]:
    """Recall targets such as ``0.95,0.99`` (each in (0, 1]); ``none`` for no operating points."""
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(part) for part in names_arg(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected recalls such as 0.95,0.99, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"each recall must be in (0, 1], got {text!r}")
    return tuple(dict.fromkeys(values))


def add_dataset_rows(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--inner-folds``: which cached rows count, and how the nested thresholds are chosen."""
    parser.add_argument("--data", metavar="DATA",
                        help="only rows of this dataset's images as they are now")
    parser.add_argument("--inner-folds", type=_inner_folds, default=None, metavar="K",
                        help="nested thresholds on K groups of bundles")


def _inner_folds(text: str) -> int:
    return _int_at_least(2, text)


def dataset_files(data: str, jobs: int | None = None) -> dict[str, str]:
    """path -> SHA-256 of every image a dataset lists now (hashed and header-checked, not decoded; unreadable
    files are left out, so their cached rows are too)."""
    from xfeat.convert.scan import scan_dataset
    from xfeat.io.dataset import find_images

    scan = scan_dataset(find_images(data), jobs=jobs, decode=False, skip_bad=True)
    return {str(r.path): s.sha256 for r, s in zip(scan.records, scan.images)}


def _int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count that must be 1 or more (--epochs, --batch-size, --jobs, --bundles): 0 or -3 is a usage error
    (exit 2) at once, not a traceback or a silent default after minutes of work."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """A count where 0 means something (--workers 0: decode in this process; --seed 0)."""
    return _int_at_least(0, text)


def say(message: str) -> None:
    """Progress and summaries go to stderr; stdout is kept for results a script may read."""
    print(message, file=sys.stderr)


def add_common(parser: argparse.ArgumentParser, *, jobs: bool = True) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    if jobs:
        parser.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                            help="worker processes (default: one per CPU core)")


@contextmanager
def progress_bar(total: int | None, description: str, quiet: bool) -> Iterator[tqdm]:
    """A progress bar with images/s and time left on stderr; silent with ``--quiet`` or when not a terminal."""
    with tqdm(total=total, desc=description, unit="img", disable=quiet or None, file=sys.stderr,
              dynamic_ncols=True, leave=False) as bar:
        yield bar


def add_max_pixels(parser: argparse.ArgumentParser) -> None:
    """The one definition of --max-pixels, shared by extract, convert and predict."""
    parser.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS, metavar="N",
                        help=f"refuse images (and input sizes) over N pixels, read from the header (default "
                             f"{megapixels(MAX_PIXELS)} MP)")
