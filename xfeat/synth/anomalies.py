"""The paper's eleven anomaly types, each a painter that draws one defect onto a clean electrode.

X-ray physics: the image is a transmission image, so *less* material (missing ink, a scratch, a void) is
*brighter* and *more* material (an agglomerate, a thick edge bead) is *darker*.  Severity runs from plainly
visible at full resolution (4 x the pixel noise) to the contrast of the whole ink layer (``_Geometry.contrast``).
Pores, clumps and scratches are a few pixels across (``SMALL_ANOMALIES``): clear to an inspector at full
resolution, averaged away when the image is shrunk to a network's 224 x 224 input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from xfeat.synth.drawing import _Geometry, _px, _smooth_field

ANOMALY_TYPES: tuple[str, ...] = (
    "scratch",
    "line",
    "edge_cut",
    "edge_tension",
    "smudge",
    "edge_ink_flow",
    "bubble",
    "missing_ink",
    "agglomerate",
    "ink_fluctuation",
    "ink_entry_exit",
)
"""The anomaly types :func:`render_electrode` can draw: the paper's eleven."""

SMALL_ANOMALIES: tuple[str, ...] = ("scratch", "bubble", "agglomerate")
"""The types a few pixels across at full resolution (scratches are long, but 1-3 px wide): what shrinking the
image to a network's input averages away and local features at full size keep."""


def _add_patch(img: np.ndarray, patch: np.ndarray, y0: int, x0: int) -> None:
    """``img[y0:, x0:] += patch``, clipped to the image (patches may hang over the border)."""
    h, w = img.shape
    ph, pw = patch.shape
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + ph), min(w, x0 + pw)
    if ye > ys and xe > xs:
        img[ys:ye, xs:xe] += patch[ys - y0:ye - y0, xs - x0:xe - x0]


def _blend_patch(img: np.ndarray, alpha: np.ndarray, target: float, y0: int, x0: int) -> None:
    """Pull ``img`` towards ``target`` with weight ``alpha`` (0..1), e.g. ink replaced by bare substrate."""
    h, w = img.shape
    ph, pw = alpha.shape
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + ph), min(w, x0 + pw)
    if ye > ys and xe > xs:
        roi = img[ys:ye, xs:xe]
        roi += alpha[ys - y0:ye - y0, xs - x0:xe - x0] * (target - roi)


def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 drawing -> float32 0..1 with soft edges; X-ray defects never have pixel-sharp borders."""
    out = mask.astype(np.float32) * (1.0 / 255.0)
    if sigma >= 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """``rng.uniform`` that tolerates an empty range (a feature as big as a tiny image): the middle."""
    return float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2


def _random_point(rng: np.random.Generator, g: _Geometry, border: float = 0.0) -> tuple[float, float]:
    """A point (y, x) in the coated area, at least ``border`` px from its edges when it fits."""
    bx = min(border, (g.x1 - g.x0) / 2 - 1)
    by = min(border, g.h / 2 - 1)
    return _uniform(rng, by, g.h - by), _uniform(rng, g.x0 + bx, g.x1 - bx)


def _scratch(rng, img, g, severity):
    """Thin short bright lines at random angles: a tool scraped ink off."""
    contrast = g.contrast(severity)
    for _ in range(int(rng.integers(1, 4))):
        length = _px(rng.uniform(60, 400), g.scale, 10)
        thick = max(1, int(round(rng.uniform(1, 3.5) * g.scale)))
        cy, cx = _random_point(rng, g, length / 2)
        ang = rng.uniform(0, math.pi)
        dy, dx = math.sin(ang) * length / 2, math.cos(ang) * length / 2
        pad = int(length / 2 + thick + 4)
        mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        p1 = (int(round(pad - dx)), int(round(pad - dy)))
        p2 = (int(round(pad + dx)), int(round(pad + dy)))
        cv2.line(mask, p1, p2, 255, thick, cv2.LINE_AA)
        _add_patch(img, _blur(mask, 0.4 * thick) * (contrast * rng.uniform(0.7, 1.3)),
                   int(cy) - pad, int(cx) - pad)


def _line(rng, img, g, severity):
    """A long straight streak along the coating direction (a nick in the coating blade)."""
    contrast = g.contrast(severity)
    width = _px(rng.uniform(2, 9), g.scale, 1)
    length = g.h * rng.uniform(0.35, 1.0)
    y_start = _uniform(rng, 0, g.h - length)
    x = _uniform(rng, g.x0 + 2 * width, g.x1 - 2 * width)
    drift = rng.uniform(-4, 4) * g.scale  # the blade is not perfectly aligned
    pad = int(2 * width + abs(drift) + 4)
    mask = np.zeros((int(length) + 2 * pad, 2 * pad + 1), np.uint8)
    cv2.line(mask, (pad, pad), (int(round(pad + drift)), pad + int(length)), 255,
             max(1, int(round(width))), cv2.LINE_AA)
    sign = 1.0 if rng.random() < 0.75 else -1.0  # mostly less ink (bright), sometimes a ridge (dark)
    _add_patch(img, _blur(mask, width / 3) * (sign * 0.8 * contrast), int(y_start) - pad, int(x) - pad)


def _edge_cut(rng, img, g, severity):
    """A notch cut into the coated edge: the ink is gone there, showing bare substrate.

    Severity sets how deep the notch is and how much ink is gone: a shallow nick up to a clean cut.
    """
    depth = _px(rng.uniform(15, 90) * (0.3 + 0.7 * severity), g.scale, 3)
    along = _px(rng.uniform(20, 160), g.scale, 4)
    cy = _uniform(rng, along, g.h - along)
    left = rng.random() < 0.5
    pad = int(along + depth + 4)
    mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
    tip = rng.uniform(-0.3, 0.3) * along
    inward = depth if left else -depth
    back = -3 if left else 3  # start just outside the edge so the notch opens cleanly into the margin
    pts = np.array([[pad + back, pad - along / 2], [pad + inward, pad + tip],
                    [pad + back, pad + along / 2]])
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
    alpha = _blur(mask, 0.7 * max(g.scale, 0.5)) * (0.25 + 0.75 * severity)
    edge_x = g.x0 if left else g.x1
    _blend_patch(img, alpha, g.margin_level, int(cy) - pad, edge_x - pad)


def _edge_tension(rng, img, g, severity):
    """Surface tension piled the ink up along an edge: a dark, wavy bead inside the coating edge."""
    contrast = g.contrast(severity)
    length = g.h * rng.uniform(0.2, 0.8)
    width = _px(rng.uniform(12, 45), g.scale, 2)
    y0 = int(_uniform(rng, 0, g.h - length))
    n = int(length)
    ys = np.arange(n, dtype=np.float32)
    phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * g.h
    wave = width * (1.0 + 0.4 * np.sin(2 * math.pi * ys / period + phase))
    cols = np.arange(int(2.5 * width) + 2, dtype=np.float32)[None, :]
    # Thickest at the edge, fading inward; the bead also fades in and out along its length.
    profile = np.exp(-cols / wave[:, None]) * np.sin(np.pi * (ys[:, None] + 0.5) / n)
    left = rng.random() < 0.5
    patch = (-contrast * rng.uniform(0.8, 1.5)) * profile
    if left:
        _add_patch(img, patch.astype(np.float32), y0, g.x0)
    else:
        _add_patch(img, patch[:, ::-1].astype(np.float32), y0, g.x1 - patch.shape[1])


def _smudge(rng, img, g, severity):
    """Soft low-contrast blobs: something touched the wet coating."""
    contrast = g.contrast(severity)
    for _ in range(int(rng.integers(1, 3))):
        ax = (_px(rng.uniform(30, 220), g.scale, 3), _px(rng.uniform(30, 220), g.scale, 3))
        cy, cx = _random_point(rng, g, max(ax))
        sigma = 0.35 * min(ax)
        pad = int(max(ax) + 3 * sigma + 2)
        mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        cv2.ellipse(mask, (pad, pad), (int(ax[0]), int(ax[1])), rng.uniform(0, 180), 0, 360, 255, -1)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        _add_patch(img, _blur(mask, sigma) * (sign * 0.7 * contrast), int(cy) - pad, int(cx) - pad)


def _edge_ink_flow(rng, img, g, severity):
    """Ink ran over the coating edge: darker lobes that reach into the bare margin."""
    contrast = g.contrast(severity)
    left = rng.random() < 0.5
    edge_x = g.x0 if left else g.x1
    margin = g.x0 if left else g.w - g.x1
    cy = rng.uniform(0.1, 0.9) * g.h
    span = _px(rng.uniform(60, 400), g.scale, 6)
    reach = max(margin * rng.uniform(0.6, 1.2) * (0.4 + 0.6 * severity), 2.0)
    pad = int(span + reach + 6)
    mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        y = pad + rng.uniform(-span / 2, span / 2)
        ax_x = max(1, int(reach * rng.uniform(0.5, 1.0)))
        ax_y = max(1, int(_px(rng.uniform(10, 60), g.scale, 2)))
        cv2.ellipse(mask, (pad, int(y)), (ax_x, ax_y), 0, 0, 360, 255, -1)
    alpha = _blur(mask, max(0.6, 0.8 * g.scale))
    target = g.level - 0.6 * contrast  # the run-off is a little thicker than the coating
    _blend_patch(img, alpha * (0.4 + 0.6 * severity), target, int(cy) - pad, edge_x - pad)


def _bubble(rng, img, g, severity):
    """Small rings: a gas bubble left a void (bright) with a thicker rim (dark)."""
    contrast = g.contrast(severity)
    cy, cx = _random_point(rng, g, 0)
    cluster = _px(80, g.scale, 6)
    for _ in range(int(rng.integers(1, 7))):
        r = _px(rng.uniform(3, 10), g.scale, 2.5)  # 6-20 px across: 1-4 pixels of a 224 x 224 input
        y = cy + rng.uniform(-cluster, cluster)
        x = float(np.clip(cx + rng.uniform(-cluster, cluster), g.x0 + r, g.x1 - r))
        pad = int(r + 4)
        inner = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        rim = np.zeros_like(inner)
        cv2.circle(inner, (pad, pad), max(1, int(round(r * 0.8))), 255, -1, cv2.LINE_AA)
        cv2.circle(rim, (pad, pad), int(round(r)), 255, max(1, int(round(r / 4))), cv2.LINE_AA)
        patch = _blur(inner, 0.15 * r) * contrast - _blur(rim, 0.1 * r) * (0.7 * contrast)
        _add_patch(img, patch, int(y) - pad, int(x) - pad)


def _missing_ink(rng, img, g, severity):
    """A patch with little or no ink: bright, towards the bare-substrate level."""
    contrast = g.contrast(severity)
    radius = _px(rng.uniform(20, 140), g.scale, 3)
    cy, cx = _random_point(rng, g, radius)
    # An irregular outline: a polygon with random radii around the centre.
    n = int(rng.integers(10, 19))
    ang = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = radius * rng.uniform(0.45, 1.0, n)
    pad = int(radius + 4)
    pts = np.stack([pad + rad * np.cos(ang), pad + rad * np.sin(ang)], axis=1)
    mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
    # Severity-driven depth: barely thinner up to fully bare.
    depth = min(1.0, contrast / max(g.margin_level - g.level, 1.0))
    _blend_patch(img, _blur(mask, max(0.5, 0.08 * radius)) * depth, g.margin_level,
                 int(cy) - pad, int(cx) - pad)


def _agglomerate(rng, img, g, severity):
    """Small dense spots of clumped material: dark."""
    contrast = g.contrast(severity)
    cy, cx = _random_point(rng, g, 0)
    cluster = _px(150, g.scale, 6)
    for _ in range(int(rng.integers(1, 6))):
        r = _px(rng.uniform(1.5, 5), g.scale, 1.5)  # 3-10 px across: at most 2 pixels of a 224 x 224 input
        y = cy + rng.uniform(-cluster, cluster)
        x = float(np.clip(cx + rng.uniform(-cluster, cluster), g.x0 + r, g.x1 - r))
        pad = int(2 * r + 4)
        mask = np.zeros((2 * pad + 1, 2 * pad + 1), np.uint8)
        cv2.circle(mask, (pad, pad), max(1, int(round(r))), 255, -1, cv2.LINE_AA)
        patch = _blur(mask, 0.4 * r) * (-contrast * rng.uniform(1.0, 2.0))
        _add_patch(img, patch, int(y) - pad, int(x) - pad)


def _ink_fluctuation(rng, img, g, severity):
    """A broad band across the coating where the film got thicker or thinner (pump pulsation)."""
    contrast = g.contrast(severity)
    half = _px(rng.uniform(40, 300), g.scale, 4)
    cy = _uniform(rng, half, g.h - half)
    ys = np.arange(int(cy - 2 * half), int(cy + 2 * half) + 1)
    ys = ys[(ys >= 0) & (ys < g.h)]
    profile = np.exp(-0.5 * ((ys + 0.5 - cy) / (half / 1.5)) ** 2).astype(np.float32)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    # The band is not perfectly uniform across the width.
    across = 1.0 + 0.3 * _smooth_field(rng, 1, g.x1 - g.x0, 1, (g.x1 - g.x0) / 3)
    band = (sign * 0.6 * contrast) * profile[:, None] * across
    img[ys[0]:ys[-1] + 1, g.x0:g.x1] += band


def _ink_entry_exit(rng, img, g, severity):
    """Where the coater started or stopped: a film-thickness change decaying from the top or bottom."""
    contrast = g.contrast(severity)
    depth = _px(rng.uniform(50, 300), g.scale, 5)
    n = min(g.h, int(4 * depth))
    ys = np.arange(n, dtype=np.float32)
    profile = np.exp(-ys / depth)
    across = 1.0 + 0.4 * _smooth_field(rng, 1, g.x1 - g.x0, 1, (g.x1 - g.x0) / 4)
    sign = -1.0 if rng.random() < 0.6 else 1.0  # usually excess ink at the start (dark)
    band = (sign * contrast * rng.uniform(0.8, 1.4)) * profile[:, None] * across
    if rng.random() < 0.5:
        img[:n, g.x0:g.x1] += band
    else:
        img[g.h - n:, g.x0:g.x1] += band[::-1]


_PAINTERS: dict[str, Callable[..., None]] = {
    "scratch": _scratch,
    "line": _line,
    "edge_cut": _edge_cut,
    "edge_tension": _edge_tension,
    "smudge": _smudge,
    "edge_ink_flow": _edge_ink_flow,
    "bubble": _bubble,
    "missing_ink": _missing_ink,
    "agglomerate": _agglomerate,
    "ink_fluctuation": _ink_fluctuation,
    "ink_entry_exit": _ink_entry_exit,
}
assert tuple(_PAINTERS) == ANOMALY_TYPES
