"""Anomaly maps for inspectors: where in an X-ray the model saw something it does not know.

**What the colours mean.** The *evidence* is the model's own score for each location of the image, on the same
scale as its image score: for PatchCore, the distance of a patch's features to the nearest patch of the normal
training images, and the image score is the largest of these. The *threshold* is the model's decision threshold
on that scale (an image is flagged abnormal when its score is above it), so a location is coloured exactly when
its evidence alone is above the threshold, i.e. would have been enough to flag the image:

- **gray (no colour)**: the evidence is at or below the threshold; the model saw nothing there that it would flag.
  These pixels are the X-ray exactly as converted, untouched, except where an outline or circle (below) passes.
- **yellow**: just above the threshold. The region is why the image was flagged, but only just.
- **orange, then red**: further above; **red** means the evidence is ``vmax`` or more, by default twice the
  threshold (twice as far from anything normal as the threshold allows). The colour moves from yellow through
  orange (halfway) to red linearly with the evidence between the threshold and ``vmax``, and stays red beyond.
- **outline**: a line with a dark edge around every coloured region, in the colour of the strongest evidence
  inside it (a yellow ring: only just above the threshold anywhere; a red ring: ``vmax`` or more somewhere
  inside). A region too small to see in a thumbnail gets a circle around it instead. Both are thick enough to
  stay visible in a 256-pixel thumbnail, so a defect of a few pixels is still found, and its strength still
  read, when the image is shown small.

The colour is blended with the X-ray (``alpha``, default 0.45) so the structure under it stays visible; the
outline is drawn in the full colour of the legend. The scale is the same for every image (it depends on the
threshold, not on the image), so a colour means the same evidence on every image of a report and one legend
serves them all; colours are never stretched to make a weak image look hot. The evidence grid is upsampled
bilinearly to the image, and the pixel at the centre of each grid cell keeps that cell's own value, so a single
cell above the threshold is never smoothed away: when the image score is the largest evidence (PatchCore), an
image is flagged exactly when its map shows colour somewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from xfeat.errors import DataError, XfeatError
from xfeat.io.atomic import write_bytes

VMAX_FACTOR = 2.0  # default vmax = VMAX_FACTOR * threshold: red = twice as far from normal as the threshold allows
YELLOW = np.array([255, 230, 0], np.float64)  # just above the threshold
RED = np.array([215, 0, 0], np.float64)  # vmax or more
ORANGE = np.array([255, 120, 0], np.float64)  # halfway, so the ramp passes through a clear orange, not brown
OUTLINE_EDGE = (0, 0, 0)
SMALL_RING = 4  # a region narrower than 2 * SMALL_RING outline widths is circled, radius SMALL_RING widths


def overlay(image: np.ndarray, evidence: np.ndarray, *, threshold: float, vmax: float | None = None,
            alpha: float = 0.45) -> np.ndarray:
    """The X-ray in RGB with the locations above ``threshold`` coloured and outlined (see the module's text).

    ``image`` is the converted 8-bit image, gray [H, W] or RGB [H, W, 3]; ``evidence`` is the model's score per
    location on a coarse grid [gh, gw] covering the whole image. ``vmax`` (default ``2 * threshold``) is where
    the colour reaches red; keep it the same for every image of a report so colours compare.
    """
    rgb = _as_rgb(image)
    vmax = _check_scale(threshold, vmax)
    if not 0.0 <= alpha <= 1.0:
        raise XfeatError(f"alpha must be between 0 and 1, not {alpha}")
    up = upsample(evidence, rgb.shape[:2])
    hot = up > threshold  # the model's rule: abnormal when score > threshold
    if not hot.any():
        return rgb
    blended = (1.0 - alpha) * rgb[hot] + alpha * _ramp(up[hot], threshold, vmax)  # only the hot pixels: X-rays are big
    rgb[hot] = np.rint(blended).astype(np.uint8)
    _draw_outline(rgb, hot, up, threshold, vmax)
    return rgb


def upsample(evidence: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``evidence`` [gh, gw] resized bilinearly to ``shape`` (H, W), each cell's own value kept at its centre.

    Bilinear sampling rarely lands on a cell's centre, so alone it would lower every peak: an image flagged by one
    cell could show no colour. Keeping the centre pixel at the cell's value makes the map's maximum the grid's.
    """
    evidence = np.asarray(evidence)
    if evidence.ndim != 2 or evidence.size == 0:
        raise XfeatError(f"the evidence must be a 2-D grid of scores, not an array of shape {evidence.shape}")
    if not np.issubdtype(evidence.dtype, np.number) or np.iscomplexobj(evidence):
        raise XfeatError(f"the evidence must hold real numbers, not {evidence.dtype}")
    evidence = evidence.astype(np.float64)
    if not np.isfinite(evidence).all():
        bad = int((~np.isfinite(evidence)).sum())
        raise XfeatError(f"the evidence holds {bad} NaN or infinite value(s) of {evidence.size}: no map can show them")
    h, w = shape
    gh, gw = evidence.shape
    up = cv2.resize(evidence, (w, h), interpolation=cv2.INTER_LINEAR)
    ys = np.minimum(((np.arange(gh) + 0.5) * h / gh).astype(np.intp), h - 1)
    xs = np.minimum(((np.arange(gw) + 0.5) * w / gw).astype(np.intp), w - 1)
    np.maximum.at(up, (ys[:, None], xs[None, :]), evidence)  # .at: with a grid finer than the image, cells share
    return up


def outline_width(shape: tuple[int, ...]) -> int:
    """The outline's width in pixels: about 1.5 px once the image is shrunk to a 256-pixel thumbnail."""
    return max(1, round(1.5 * max(shape[:2]) / 256))


def thumbnail(rgb: np.ndarray, max_side: int = 256) -> np.ndarray:
    """``rgb`` shrunk (area averaging, aspect kept) so its longer side is at most ``max_side``; never enlarged."""
    if max_side < 1:
        raise XfeatError(f"a thumbnail needs max_side >= 1, not {max_side}")
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb.copy()
    scale = max_side / max(h, w)
    size = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an RGB (or gray) ``uint8`` image as PNG, atomically; a failure is one ``DataError`` naming ``path``."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise DataError(path, f"cannot write a {rgb.dtype} array of shape {rgb.shape} as PNG (need uint8 gray or RGB)")
    bgr = rgb[:, :, ::-1] if rgb.ndim == 3 else rgb  # OpenCV stores colour as BGR
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise DataError(path, "PNG encoding failed")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(path, f"cannot write ({e.strerror or e})") from e
    write_bytes(path, encoded.tobytes())


def legend(threshold: float, vmax: float | None = None, width: int = 256) -> np.ndarray:
    """A colour bar (RGB ``uint8``) for the page beside the maps: a gray swatch for "at or below the threshold",
    then the ramp from yellow at ``threshold`` to red at ``vmax`` (the same default as ``overlay``), with both
    numbers under it."""
    vmax = _check_scale(threshold, vmax)
    if width < 64:
        raise XfeatError(f"a legend needs width >= 64 pixels, not {width}")
    bar_h, text_h = 14, 18
    swatch = max(12, width // 8)
    gap = 3
    out = np.full((bar_h + text_h, width, 3), 255, np.uint8)
    out[:bar_h, :swatch] = 128
    ramp_x0 = swatch + gap
    values = np.linspace(threshold, vmax, width - ramp_x0)
    out[:bar_h, ramp_x0:] = np.rint(_ramp(values, threshold, vmax)).astype(np.uint8)[None]
    cv2.rectangle(out, (0, 0), (swatch - 1, bar_h - 1), (90, 90, 90), 1)
    font, scale, ink = cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0)
    base = bar_h + text_h - 4
    cv2.putText(out, f"{threshold:.3g}", (ramp_x0, base), font, scale, ink, 1, cv2.LINE_AA)
    right = f">={vmax:.3g}"
    (tw, _), _ = cv2.getTextSize(right, font, scale, 1)
    cv2.putText(out, right, (width - tw - 1, base), font, scale, ink, 1, cv2.LINE_AA)
    return out


def _ramp(values: np.ndarray, threshold: float, vmax: float) -> np.ndarray:
    """Colours [..., 3] (float RGB) for evidence values: yellow at the threshold, orange halfway, red from vmax."""
    t = np.clip((np.asarray(values, np.float64) - threshold) / (vmax - threshold), 0.0, 1.0)[..., None]
    low = YELLOW + (ORANGE - YELLOW) * np.minimum(t * 2, 1.0)
    return np.where(t < 0.5, low, ORANGE + (RED - ORANGE) * (t * 2 - 1.0))


def _draw_outline(out: np.ndarray, hot: np.ndarray, up: np.ndarray, threshold: float, vmax: float) -> None:
    """Outline every coloured region in place, in the colour of its strongest evidence: in a thumbnail the outline
    is what remains, so it must tell a weak region from a strong one. A dark edge keeps it readable on light
    parts; a region too small to see in a thumbnail is circled instead, so it stays findable."""
    width = outline_width(out.shape)
    ring = SMALL_RING * width  # radius of the circle around a small region
    n, labels, stats, _ = cv2.connectedComponentsWithStats(hot.astype(np.uint8), connectivity=8)
    regions = []
    for k in range(1, n):
        x, y, w, h = (int(v) for v in stats[k, :4])
        inside = labels[y:y + h, x:x + w] == k
        peak = float(up[y:y + h, x:x + w][inside].max())
        if max(w, h) < 2 * ring:
            regions.append((peak, None, ((2 * x + w) // 2, (2 * y + h) // 2)))
        else:
            contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE,
                                           offset=(x, y))
            regions.append((peak, contours, None))
    regions.sort(key=lambda r: r[0])  # the strongest drawn last, on top
    # Every dark edge first, so no edge covers a neighbour's line. Plain lines: antialiased ones draw 6x slower
    # and the difference is lost in a thumbnail.
    for edge in (True, False):
        for peak, contours, centre in regions:
            colour = OUTLINE_EDGE if edge else tuple(int(c) for c in np.rint(_ramp(np.array(peak), threshold, vmax)))
            thickness = width + 2 if edge else width
            if contours is None:
                cv2.circle(out, centre, ring, colour, thickness, cv2.LINE_8)
            else:
                cv2.drawContours(out, contours, -1, colour, thickness, cv2.LINE_8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise XfeatError(f"the image must be the converted 8-bit image (uint8), not {image.dtype}")
    if image.ndim == 2 and image.size:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3 and image.size:
        return image.copy()
    raise XfeatError(f"the image must be gray [H, W] or RGB [H, W, 3], not of shape {image.shape}")


def _check_scale(threshold: float, vmax: float | None) -> float:
    """The colour scale's top; by default twice a positive threshold (a distance), else it must be given."""
    if not np.isfinite(threshold):
        raise XfeatError(f"the threshold must be a finite number, not {threshold}")
    if vmax is None:
        if threshold <= 0:
            raise XfeatError(f"with a threshold of {threshold:g} (not positive) give vmax, where the colour is red")
        vmax = VMAX_FACTOR * threshold
    if not (np.isfinite(vmax) and vmax > threshold):
        raise XfeatError(f"vmax ({vmax}) must be a finite number above the threshold ({threshold})")
    return float(vmax)


class MapFolder:
    """Anomaly maps written into one folder, a PNG per image named after it (``NAME-2.png`` when two inputs share
    a name), all on one colour scale (``threshold``, ``vmax``) so that colours compare across images."""

    def __init__(self, folder: str | os.PathLike[str], threshold: float, vmax: float | None = None) -> None:
        self.folder = Path(folder)
        self.threshold = threshold
        self.vmax = vmax  # None: twice the threshold (a distance), or per image for a signed scale
        self.written: dict[int, Path] = {}  # input index -> its map

    def write(self, index: int, source: str | os.PathLike[str], image: np.ndarray, evidence: np.ndarray) -> Path:
        """Draw and write the map of input ``index`` (whose file is ``source``); returns its path."""
        vmax = self.vmax
        if vmax is None and self.threshold <= 0:  # a signed scale has no "twice the threshold"
            vmax = max(float(np.max(evidence)), self.threshold + 1.0)
        stem, n = Path(source).stem, 1
        taken = {p.name for p in self.written.values()}
        name = f"{stem}.png"
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        target = self.folder / name
        write_png(target, overlay(image, evidence, threshold=self.threshold, vmax=vmax))
        self.written[index] = target
        return target
