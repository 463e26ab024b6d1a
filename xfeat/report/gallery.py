"""What a model catches, misses and flags wrongly, as thumbnails in report.html: per configuration, the abnormal
images it is surest of, the abnormal images it missed and the normal images it flagged.

Each image is read again from its file, converted as the features were, shrunk to a thumbnail and, when the
classifier has local evidence (PatchCore), overlaid with its out-of-fold anomaly map (``xfeat.report.maps``) on
the colour scale of the threshold of the fold model that scored it. Its gray levels are stretched for the eye
(``stretch``): a global window set by a few bright pixels (a registration hole) can leave the electrode a few gray
levels wide, black to a person. Thumbnails are small PNG files in ``thumbnails/`` beside report.html, named by a
hash of what they show, so an image shown by several configurations is written once. An image that cannot be shown (its file gone, unreadable, or changed since its
features were extracted) is listed with the reason instead; it never stops the report.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xfeat.convert.methods import convert
from xfeat.errors import DataError, XfeatError
from xfeat.io.images import load_native
from xfeat.report.maps import VMAX_FACTOR, legend, overlay, thumbnail, write_png

if TYPE_CHECKING:
    from xfeat.convert.stats import WindowStats
    from xfeat.learn.evaluation import Configuration, ConfigurationResult

THUMBNAILS = "thumbnails"  # the folder beside report.html
MAX_SIDE = 192  # pixels, the longer side of a thumbnail
STRETCH = (0.5, 99.5)  # percentiles of a converted image shown black and white
LEGEND = "legend.png"
# (kind, heading, how many at most): the order of the rows on the page
KINDS = (("caught", "Caught: the abnormal images it is surest of", 4),
         ("missed", "Missed: abnormal images it cleared, the most confidently cleared first", 6),
         ("false_alarms", "False alarms: normal images it flagged, the highest score first", 6))
STRETCH_NOTE = (f"Levels are stretched per image for the eye (its {STRETCH[0]:g}th to {STRETCH[1]:g}th "
                "percentile from black to white); the model saw the converted image as it is.")
_NAME = re.compile(r"[0-9a-f]{16}\.png")  # a thumbnail's file name: what a rerun may replace or remove

COLOURS = f"""<p class=note><b>How to read the maps.</b> Each fold's model scores every location of an image it
did not train on (PatchCore: how far the patch's features are from the nearest patch of the normal training
images); the image's score is the highest of these, and the image is flagged when it is above that model's
threshold. <b>No colour</b>: at or below the threshold, the X-ray itself; the model saw nothing there it would
flag. <b>Yellow</b>: just above the threshold, the reason the image was flagged, but only just;
<b>orange, then red</b>: further above, <b>red</b> at {VMAX_FACTOR:g} times the threshold or more. Every coloured
region is outlined in the colour of its strongest point, and a region too small to see in a thumbnail is circled.
The scale is set by the threshold, never stretched per image, so a colour means the same on every image. A missed
image shows no colour by definition: nothing in it reached the threshold.</p>"""


@dataclass(frozen=True)
class Shown:
    """One image of a gallery: its thumbnail (``src``, relative to the report folder) or why it has none."""

    path: str
    bundle: str
    score: float
    src: str = ""
    note: str = ""


@dataclass
class Gallery:
    """The thumbnails of every configuration: ``rows[config][kind]``, the images shown and how many there were."""

    rows: dict[Configuration, dict[str, tuple[list[Shown], int]]] = field(default_factory=dict)
    maps: set[Configuration] = field(default_factory=set)  # configurations whose thumbnails carry anomaly maps
    legend: str = ""  # the colour bar's src, when some configuration has maps
    note: str = ""  # why there are no thumbnails at all


def choose(result: ConfigurationResult, limits: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """Per kind (caught, missed, false_alarms): the rows to show, in order, and how many rows were of that kind.

    Caught: abnormal and flagged, highest score first; missed: abnormal and not flagged, lowest score first (the
    most confidently missed); false alarms: normal and flagged, highest score first. Ties go by path.
    """
    limits = limits or {kind: n for kind, _, n in KINDS}
    y, flagged, scores = result.features.y == 1, result.decisions == 1, np.asarray(result.scores, np.float64)
    paths = result.features.paths.astype(str)
    masks = {"caught": (y & flagged, -1), "missed": (y & ~flagged, 1), "false_alarms": (~y & flagged, -1)}
    chosen = {}
    for kind, (mask, sign) in masks.items():
        rows = np.flatnonzero(mask)
        order = np.lexsort((paths[rows], sign * scores[rows]))  # last key first: score, then path
        chosen[kind] = (rows[order][:limits[kind]], len(rows))
    return chosen


def write_gallery(results: Sequence[ConfigurationResult], out_dir: str | os.PathLike[str], *,
                  max_side: int = MAX_SIDE) -> Gallery:
    """Choose every configuration's images and write their thumbnails into ``out_dir/thumbnails``."""
    folder = Path(out_dir) / THUMBNAILS
    gallery = Gallery()
    # (file, method, window) -> [(config, kind, position, thumbnail name, evidence, threshold, sha256)]: one read
    # and conversion of each file, whichever configurations show it
    work: dict[tuple[str, str, WindowStats | None], list] = {}
    for r in results:
        fs, cfg = r.features, r.config
        if r.evidence is not None:
            gallery.maps.add(cfg)
        gallery.rows[cfg] = {}
        for kind, (rows, total) in choose(r).items():
            shown = []
            for i in rows:
                evidence, threshold = _evidence_of(r, i)
                shown.append(Shown(str(fs.paths[i]), str(fs.groups[i]), float(r.scores[i])))
                name = _name(str(fs.sha256[i]), cfg.method, fs.window_stats, evidence, threshold, max_side)
                work.setdefault((str(fs.paths[i]), cfg.method, fs.window_stats), []).append(
                    (cfg, kind, len(shown) - 1, name, evidence, threshold, str(fs.sha256[i])))
            gallery.rows[cfg][kind] = (shown, total)
    clash = _inside_image_folders(folder, [path for path, _, _ in work])
    if clash:
        gallery.note = (f"No thumbnails: {folder} would lie inside or around the image folder {clash}, where they "
                        "would be read back as data; write the report elsewhere to see them.")
        return gallery
    written = set()
    for (path, method, stats), wanted in sorted(work.items(), key=lambda item: item[0][:2]):
        notes = _write_thumbnails(folder, path, method, stats, wanted, max_side)
        for cfg, kind, k, name, *_ in wanted:
            shown, total = gallery.rows[cfg][kind]
            note = notes.get(name, "")
            shown[k] = replace(shown[k], src="" if note else f"{THUMBNAILS}/{name}", note=note)
            if not note:
                written.add(name)
    if gallery.maps:
        write_png(folder / LEGEND, legend(1.0, VMAX_FACTOR))
        gallery.legend = f"{THUMBNAILS}/{LEGEND}"
    _remove_stale(folder, written | ({LEGEND} if gallery.maps else set()))
    return gallery


def stretch(image: np.ndarray, percentiles: tuple[float, float] = STRETCH) -> np.ndarray:
    """An 8-bit image with its gray levels between two percentiles spread linearly over 0-255 (all channels of a
    colour image alike); an image of one gray level stays as it is."""
    if image.dtype != np.uint8 or not image.size:
        return image
    counts = np.cumsum(np.bincount(image.ravel(), minlength=256))  # uint8: a histogram, not a sort, of megapixels
    low, high = (int(np.searchsorted(counts, q / 100 * counts[-1])) for q in percentiles)
    if high <= low:
        return image
    table = np.clip(np.rint((np.arange(256) - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    return table[image]


def _evidence_of(result: ConfigurationResult, i: int) -> tuple[np.ndarray | None, float]:
    if result.evidence is None or result.evidence_thresholds is None:
        return None, float("nan")
    return np.asarray(result.evidence[i], np.float32), float(result.evidence_thresholds[i])


def _name(sha256: str, method: str, stats: WindowStats | None, evidence: np.ndarray | None, threshold: float,
          max_side: int) -> str:
    """The thumbnail's file name: a hash of everything it shows, so equal thumbnails share a file."""
    h = hashlib.sha256(f"{sha256}|{method}|{stats!r}|{max_side}|{threshold!r}".encode())
    if stats is not None:
        h.update(repr(stats.equalize_thresholds).encode())
    if evidence is not None:
        h.update(np.ascontiguousarray(evidence).tobytes())
    return h.hexdigest()[:16] + ".png"


def _write_thumbnails(folder: Path, path: str, method: str, stats: WindowStats | None, wanted: list,
                      max_side: int) -> dict[str, str]:
    """Read, convert and draw one image once for every thumbnail of it; returns name -> why it was not written."""
    try:
        loaded = load_native(path)
        image = stretch(convert(loaded.pixels, method, stats))
    except XfeatError as e:
        problem = e.problem if isinstance(e, DataError) else str(e)
        return {name: f"not shown: {problem}" for _, _, _, name, *_ in wanted}
    notes = {}
    for _, _, _, name, evidence, threshold, sha256 in wanted:
        if loaded.sha256 != sha256:
            notes[name] = "not shown: the file changed since its features were extracted"
            continue
        try:
            if evidence is not None and np.isfinite(threshold) and threshold > 0:
                rgb = overlay(image, evidence, threshold=threshold)
            else:
                rgb = image
            write_png(folder / name, thumbnail(rgb, max_side))
        except XfeatError as e:
            notes[name] = f"not shown: {e}"
    return notes


def _inside_image_folders(folder: Path, paths: Sequence[str]) -> str:
    """The image folder that ``folder`` lies in or holds, if any ("" when none): thumbnails written there would
    be read back as images of the data set."""
    target = folder.resolve()
    for parent in sorted({Path(p).resolve().parent for p in paths}):
        if target.is_relative_to(parent) or parent.is_relative_to(target):
            return str(parent)
    return ""


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Remove thumbnails of an earlier run that this one does not show (only files named as this module names)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name not in keep and (_NAME.fullmatch(entry.name) or entry.name == LEGEND) and entry.is_file():
            try:
                entry.unlink()
            except OSError:
                pass  # a stale thumbnail costs space, not correctness


def gallery_section(group: Sequence[ConfigurationResult], gallery: Gallery | None) -> str:
    """The HTML of one table's configurations: per configuration, its rows of thumbnails; "" without a gallery."""
    if gallery is None or not any(r.config in gallery.rows for r in group):
        return ""
    e = html.escape
    parts = ["<h3>Images: what the model catches, misses and flags</h3>"]
    if gallery.note:
        return "\n".join([*parts, f"<p class=note>{e(gallery.note)}</p>"])
    with_maps = [r for r in group if r.config in gallery.maps]
    if with_maps:
        parts.append(COLOURS)
        if gallery.legend:
            parts.append(f'<figure class=legend><img src="{e(gallery.legend)}" alt="colour scale of the maps">'
                         "<figcaption>colour scale, in multiples of the threshold of the image's fold model: "
                         f"gray at or below 1, yellow just above, red at {VMAX_FACTOR:g} or more"
                         "</figcaption></figure>")
    if len(with_maps) < len(group):
        parts.append("<p class=note>Without maps: this classifier gives a score per image, not per location, so "
                     "its images are shown without a map.</p>")
    parts.append(f"<p class=note>{e(STRETCH_NOTE)} Hover over an image for its path.</p>")
    for r in group:
        rows = gallery.rows.get(r.config)
        if rows is None:
            continue
        parts.append(f"<h4>{e(r.config.method)}</h4>")
        every = [s for kind, _, _ in KINDS for s in rows[kind][0]]
        if every and not any(s.src for s in every):  # e.g. evaluated on another machine: one line, not 16 boxes
            parts.append(f"<p class=note>None of its {len(every)} images could be shown; the first, "
                         f"{e(every[0].path)}: {e(every[0].note)}.</p>")
            continue
        for kind, heading, _ in KINDS:
            shown, total = rows[kind]
            count = f"{len(shown)} of {total}" if total > len(shown) else f"all {total}"
            parts.append(f'<p class=kind>{e(heading)} ({count if total else "none"})</p>')
            if shown:
                parts.append("<div class=gallery>" + "".join(_figure(s) for s in shown) + "</div>")
    return "\n".join(parts)


def _figure(shown: Shown) -> str:
    e = html.escape
    name = Path(shown.path).name
    caption = f"{e(shown.bundle)} / {e(name)}<br>score {shown.score:.3g}"
    if not shown.src:
        return f'<figure class=missing title="{e(shown.path)}"><figcaption>{caption}<br>{e(shown.note)}' \
               "</figcaption></figure>"
    return (f'<figure title="{e(shown.path)}"><img src="{e(shown.src)}" alt="{e(name)}" loading="lazy">'
            f"<figcaption>{caption}</figcaption></figure>")


__all__ = ["KINDS", "MAX_SIDE", "THUMBNAILS", "Gallery", "Shown", "choose", "gallery_section", "stretch",
           "write_gallery"]
