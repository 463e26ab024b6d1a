"""Synthetic colour photos of products on an inspection line, shaped like the ResNet-50 + linear-SVM paper's data.

That paper photographs bottles, cartons and spoons at 224 x 224 x 3; its data are not public. Here each image
is a bottle on a conveyor, photographed from the side: a tinted glass body with a cap and a printed label, a
background and lighting that change from production bundle to bundle (glass tint, label colour, lamp), and
a little jitter of position, size and exposure from image to image. Abnormal bottles carry one defect a person
would reject: a stain or a scratch on the body, a chip out of the rim, a missing cap, a skewed label.

Files are 8-bit colour JPEGs (quality 92): ``OUT/<bundle>/<normal|abnormal>/<bundle>_<NNNN>.jpg`` and
``OUT/manifest.csv`` as for the electrodes. Every image is drawn from ``SeedSequence([seed, index])`` and the
plan from ``default_rng(seed)``, so the same arguments give the same files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from xfeat.errors import XfeatError
from xfeat.io.atomic import write_bytes
from xfeat.synth.plan import ImagePlan, _abnormal_counts, _largest_remainder, _validate
from xfeat.synth.writer import SynthSummary, _check_output_folder, _write_manifest

PRODUCT_ANOMALIES = ("stain", "scratch", "chip", "no_cap", "skewed_label")
PRODUCT_SIZE = (224, 224)
JPEG_QUALITY = 92


@dataclass(frozen=True)
class ProductStyle:
    """How one bundle's photos look: the glass, the label, the lamp and the background (RGB, 0..255)."""

    glass: tuple[float, float, float]
    label: tuple[float, float, float]
    background: tuple[float, float, float]
    light: float  # exposure factor
    light_slope: float  # left-to-right lighting change, as a fraction


def _styles(rng: np.random.Generator, n: int) -> list[ProductStyle]:
    glasses = [(60, 120, 60), (120, 80, 40), (170, 190, 190), (50, 80, 130)]
    labels = [(200, 40, 40), (230, 200, 60), (240, 240, 235), (40, 90, 170), (30, 150, 90)]
    return [ProductStyle(glass=tuple(float(c) + rng.uniform(-12, 12) for c in glasses[b % len(glasses)]),
                         label=tuple(float(c) + rng.uniform(-10, 10) for c in labels[int(rng.integers(len(labels)))]),
                         background=tuple(float(v) for v in rng.uniform(150, 215) + rng.uniform(-15, 15, 3)),
                         light=float(rng.uniform(0.85, 1.1)), light_slope=float(rng.uniform(-0.15, 0.15)))
            for b in range(n)]


def plan_products(*, bundles: int = 6, images: int = 120, abnormal_fraction: float = 0.25,
                  size: tuple[int, int] = PRODUCT_SIZE, seed: int = 0
                  ) -> tuple[list[ImagePlan], dict[str, ProductStyle]]:
    """Every photo's bundle, label, defect and file, decided before drawing (uneven bundles, defects
    concentrated in some of them, as for the electrodes)."""
    _validate(bundles, images, abnormal_fraction, size, seed, None)
    rng = np.random.default_rng(seed)
    names = [f"B{b + 1:02d}" for b in range(bundles)]
    styles = dict(zip(names, _styles(rng, bundles)))
    sizes = 1 + _largest_remainder(images - bundles, rng.uniform(0.6, 1.4, bundles))
    n_abnormal = _abnormal_counts(rng, sizes, int(round(images * abnormal_fraction)))
    digits = max(4, len(str(images - 1)))
    plans, index = [], 0
    for name, count, bad in zip(names, sizes.tolist(), n_abnormal.tolist()):
        labels = ["abnormal"] * bad + ["normal"] * (count - bad)
        for label in rng.permutation(labels).tolist():
            anomaly = str(rng.choice(PRODUCT_ANOMALIES)) if label == "abnormal" else ""
            plans.append(ImagePlan(index, name, label, anomaly, size[0], size[1],
                                   f"{name}/{label}/{name}_{index:0{digits}d}.jpg"))
            index += 1
    return sorted(plans, key=lambda p: p.path), styles


def render_product(key: tuple[int, int], height: int, width: int, style: ProductStyle,
                   anomaly: str | None = None) -> np.ndarray:
    """One H x W x 3 uint8 RGB photo of a bottle (``key``: (seed, image index))."""
    rng = np.random.default_rng(np.random.SeedSequence(list(key)))
    s = min(height, width) / 224  # drawn on a 224-px design, scaled
    cx = width / 2 + rng.uniform(-6, 6) * s
    base = height * 0.93 + rng.uniform(-4, 4) * s
    scale = s * rng.uniform(0.95, 1.05)
    body_w, body_h, neck_w, neck_h = 38 * scale, 110 * scale, 14 * scale, 34 * scale
    image = np.empty((height, width, 3), np.float32)
    image[:] = style.background
    glass = np.array(style.glass, np.float32)
    top = base - body_h
    x0, x1 = int(round(cx - body_w)), int(round(cx + body_w))
    cv2.rectangle(image, (x0, int(round(top))), (x1, int(round(base))), glass.tolist(), -1)
    cv2.ellipse(image, (int(round(cx)), int(round(top))), (int(round(body_w)), int(round(18 * scale))), 0, 180, 360,
                glass.tolist(), -1)
    neck_top = top - 18 * scale - neck_h
    cv2.rectangle(image, (int(round(cx - neck_w)), int(round(neck_top))), (int(round(cx + neck_w)), int(round(top))),
                  glass.tolist(), -1)
    rim = int(round(neck_top))
    if anomaly != "no_cap":
        cap = (0.35 * glass + 40).tolist()
        cv2.rectangle(image, (int(round(cx - neck_w - 2 * scale)), int(round(neck_top - 12 * scale))),
                      (int(round(cx + neck_w + 2 * scale)), rim), cap, -1)
    if anomaly == "chip":  # a notch out of the shoulder, where the glass meets the air
        side = rng.choice([-1, 1])
        x, y = cx + side * neck_w, top - 10 * scale
        r = rng.uniform(5, 8) * scale
        pts = np.array([[x, y - r], [x - side * r, y], [x, y + r]], np.int32)
        cv2.fillConvexPoly(image, pts, style.background)
    label_top = base - body_h * rng.uniform(0.62, 0.66)
    label_h = body_h * 0.34
    corners = np.array([[x0, label_top], [x1, label_top], [x1, label_top + label_h], [x0, label_top + label_h]],
                       np.float32)
    if anomaly == "skewed_label":
        angle = np.deg2rad(rng.uniform(7, 12) * rng.choice([-1, 1]))
        centre = corners.mean(axis=0)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
        corners = (corners - centre) @ rot.T + centre
    cv2.fillConvexPoly(image, np.round(corners).astype(np.int32), style.label)
    stripe = label_top + label_h * 0.45
    cv2.line(image, (x0 + 6, int(stripe)), (x1 - 6, int(stripe)), (0.4 * np.array(style.label)).tolist(),
             max(1, int(round(3 * scale))))
    if anomaly == "stain":
        y = rng.uniform(top + 10 * scale, base - 10 * scale)
        x = cx + rng.uniform(-0.7, 0.7) * body_w
        axes = (int(round(rng.uniform(4, 7) * scale)), int(round(rng.uniform(3, 6) * scale)))
        cv2.ellipse(image, (int(x), int(y)), axes, rng.uniform(0, 180), 0, 360, (70, 45, 20), -1)
    if anomaly == "scratch":
        y = rng.uniform(top + 5 * scale, base - 20 * scale)
        length = rng.uniform(25, 40) * scale
        angle = rng.uniform(-0.6, 0.6)
        xa = cx + rng.uniform(-0.5, 0.1) * body_w
        cv2.line(image, (int(xa), int(y)), (int(xa + length * np.cos(angle)), int(y + length * np.sin(angle))),
                 (235, 235, 235), max(1, int(round(1.2 * scale))))
    # a highlight down the glass, the lamp, and the camera's noise
    hx = int(round(cx - body_w * 0.55))
    highlight = np.zeros((height, width), np.float32)
    cv2.rectangle(highlight, (hx, int(top)), (hx + max(1, int(5 * scale)), int(base - 4 * scale)), 1.0, -1)
    highlight = cv2.GaussianBlur(highlight, (0, 0), 2 * scale)
    image += 60 * highlight[:, :, None]
    lamp = style.light * rng.uniform(0.96, 1.04) * (1 + style.light_slope * np.linspace(-1, 1, width, dtype=np.float32))
    image *= lamp[None, :, None]
    image += rng.normal(0, 3, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image (OpenCV writes BGR)."""
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise XfeatError("JPEG encoding failed")
    return encoded.tobytes()


def make_product_dataset(out: str | os.PathLike, *, bundles: int = 6, images: int = 120,
                         abnormal_fraction: float = 0.25, size: tuple[int, int] | None = None, seed: int = 0,
                         progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Write a synthetic set of colour product photos (JPEG) in the usual layout, with ``manifest.csv``."""
    size = size or PRODUCT_SIZE
    root = Path(out)
    _check_output_folder(root)
    plans, styles = plan_products(bundles=bundles, images=images, abnormal_fraction=abnormal_fraction, size=size,
                                  seed=seed)
    for plan in plans:
        path = root / plan.path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, encode_jpeg(render_product((seed, plan.index), plan.height, plan.width,
                                                     styles[plan.bundle], plan.anomaly or None)))
        if progress:
            progress(1)
    manifest = _write_manifest(root, plans)
    return SynthSummary(root=root, n_images=len(plans), n_abnormal=sum(p.label == "abnormal" for p in plans),
                        bundles=tuple(styles), manifest=manifest)
