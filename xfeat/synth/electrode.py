"""Drawing one electrode X-ray: the clean background (coating, margins, registration hole), then an anomaly.

Most pixels lie between 1700 and 2800 (the coated electrode); the registration hole, present in only some
bundles, adds a sparse bright tail up to ~28,000.  That tail is what makes the paper's global (m2) and
per-image (m3) windows give visibly different 8-bit images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from xfeat.errors import XfeatError
from xfeat.synth.anomalies import _PAINTERS, ANOMALY_TYPES
from xfeat.synth.drawing import _REF_H, _REF_W, _Geometry, _px, _smooth_field
from xfeat.synth.plan import BundleStyle


def _background(rng: np.random.Generator, h: int, w: int,
                style: BundleStyle) -> tuple[np.ndarray, np.ndarray, _Geometry]:
    """The normal electrode: mean signal (float32) and the noise field to add after the anomalies.

    All random numbers of the background are drawn here, before any anomaly, so that an image rendered with
    and without an anomaly shares the same background exactly.
    """
    scale = math.sqrt(h * w / (_REF_H * _REF_W))
    level = style.level * (1.0 + 0.012 * float(rng.standard_normal()))
    tex_amp = style.texture_amp * float(rng.uniform(0.85, 1.15))
    # Two octaves of smooth "clouds" (coating thickness), stretched along the coating direction.
    cell = _px(style.texture_cell, scale, 4.0)
    signal = _smooth_field(rng, h, w, cell * style.texture_aspect, cell)
    fine = _smooth_field(rng, h, w, cell * style.texture_aspect / 3.5, cell / 3.5)
    signal += fine * 0.6
    signal *= tex_amp * 0.85  # the two octaves together have a std of about 1.2
    signal += level
    # Heel effect: a slight ramp along the image height.
    grad = style.gradient * level * float(rng.uniform(0.7, 1.3))
    signal += np.linspace(-grad / 2, grad / 2, h, dtype=np.float32)[:, None]

    # Uncoated substrate strips on both sides, with a soft 1-2 px coating edge.
    margin = max(2, int(round(style.margin_frac * w * float(rng.uniform(0.85, 1.15)))))
    x0, x1 = margin, w - margin
    margin_level = level + style.margin_offset
    edge = min(margin, max(1, int(round(2 * scale))) + 1)
    for lo, hi, flip in ((0, x0 + edge, False), (x1 - edge, w, True)):
        cols = np.arange(lo, hi, dtype=np.float32) + 0.5
        dist = (x0 - cols) if not flip else (cols - x1)  # > 0 inside the margin
        alpha = np.clip(0.5 + dist / (2 * edge), 0.0, 1.0)[None, :]
        roi = signal[:, lo:hi]
        # The substrate keeps a little of the texture (it is a sheet too), scaled down.
        roi += alpha * (margin_level - level - 0.7 * (roi - level))

    if style.hole_level > 0:
        _draw_hole(rng, signal, style, scale, margin)

    # Detector noise plus the coating's fine grain (noise at half resolution, upsampled: ~2 px grains).
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= style.noise * float(rng.uniform(0.9, 1.1))
    grain = rng.standard_normal(((h + 1) // 2, (w + 1) // 2), dtype=np.float32)
    noise += cv2.resize(grain, (w, h), interpolation=cv2.INTER_LINEAR) * (style.grain * 1.5)
    total_noise = math.sqrt(style.noise ** 2 + style.grain ** 2)
    geom = _Geometry(h, w, scale, x0, x1, level, margin_level, total_noise)
    return signal, noise, geom


def _draw_hole(rng: np.random.Generator, signal: np.ndarray, style: BundleStyle, scale: float,
               margin: int) -> None:
    """A registration hole punched through the electrode: nearly free-beam intensity, the bright tail."""
    h, w = signal.shape
    r = _px(style.hole_radius, scale, 1.5)
    corner = style.hole_corner
    cx = margin / 2 + r * 0.5 + float(rng.uniform(-1, 1)) * scale * 3
    cy = 0.04 * h + float(rng.uniform(-1, 1)) * scale * 3
    cx = w - cx if corner in (1, 3) else cx
    cy = h - cy if corner in (2, 3) else cy
    plateau = style.hole_level * float(rng.uniform(0.97, 1.03))
    pad = int(math.ceil(r + 3))
    ys, xs = max(0, int(cy) - pad), max(0, int(cx) - pad)
    ye, xe = min(h, int(cy) + pad + 1), min(w, int(cx) + pad + 1)
    yy, xx = np.mgrid[ys:ye, xs:xe].astype(np.float32)
    dist = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)
    alpha = np.clip(r - dist + 0.5, 0.0, 1.0)  # anti-aliased disc edge
    roi = signal[ys:ye, xs:xe]
    roi += alpha * (plateau - roi)


def render_electrode(seed: int | Sequence[int], height: int, width: int, style: BundleStyle | None = None,
                     anomaly: str | None = None, severity: float | None = None) -> np.ndarray:
    """Draw one electrode X-ray as a 2-D uint16 array; a pure function of its arguments.

    ``seed`` seeds the background and the anomaly separately, so the same seed with ``anomaly=None``
    gives exactly the defect-free version of the same electrode (useful as ground truth).
    ``severity`` in [0, 1] sets the defect contrast from plainly visible at full resolution (0: 4 x the pixel
    noise) to that of the whole ink layer (1); ``None`` draws it at random, skewed towards subtle defects.
    """
    if anomaly is not None and anomaly not in _PAINTERS:
        raise XfeatError(f"unknown anomaly type {anomaly!r}; choose one of {', '.join(ANOMALY_TYPES)}")
    if height < 32 or width < 32:
        raise XfeatError(f"image size must be at least 32 x 32, got {height} x {width}")
    style = style or BundleStyle()
    bg_seq, anomaly_seq = np.random.SeedSequence(seed).spawn(2)
    signal, noise, geom = _background(np.random.default_rng(bg_seq), height, width, style)
    if anomaly:
        rng = np.random.default_rng(anomaly_seq)
        s = float(rng.random() ** 1.3) if severity is None else float(np.clip(severity, 0.0, 1.0))
        _PAINTERS[anomaly](rng, signal, geom, s)
    # Quantum noise grows with the square root of the transmitted intensity (e.g. in the hole).
    noise *= np.sqrt(np.maximum(signal, 1.0) * (1.0 / geom.level))
    signal += noise
    np.clip(signal, 0.0, 65535.0, out=signal)
    signal += 0.5  # round to nearest on the truncating cast
    return signal.astype(np.uint16)
