"""What the clean electrode and the anomaly painters share: the reference size, the geometry, smooth fields.

Lengths are given for a reference-size image and scaled to the one being drawn, so that small test images
still show every feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# The real images are W 1119-1219 x H 2053-2115 px (see xfeat.synth.plan); this is the reference size.
_REF_H, _REF_W = 2084, 1169


@dataclass(frozen=True)
class _Geometry:
    """What anomaly painters need to know about the background they draw on."""

    h: int
    w: int
    scale: float  # image size relative to the reference size
    x0: int  # first coated column
    x1: int  # one past the last coated column
    level: float  # this image's coating level
    margin_level: float  # this image's uncoated-substrate level
    noise: float  # pixel-level background std (detector noise and grain): the unit of anomaly contrast

    def contrast(self, severity: float) -> float:
        """Defect contrast in counts: from plainly visible at full resolution (severity 0: 4 x the pixel noise) to
        the contrast of the whole ink layer (severity 1: what a hole through it shows, the step to the bare
        margin). Every abnormal image was labelled by a person looking at it, so even the subtlest defect stands
        out from the noise there; what hides a small one is shrinking the image."""
        visible = 4.0 * self.noise
        return visible + severity * max(self.margin_level - self.level - visible, 0.0)


def _px(full: float, scale: float, minimum: float) -> float:
    """A reference-size length scaled to this image, but never below what stays visible."""
    return max(minimum, full * scale)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell_h: float, cell_w: float) -> np.ndarray:
    """Unit-variance-ish smooth random field: a small random grid upsampled with bicubic interpolation."""
    gh = max(2, math.ceil(h / max(cell_h, 2.0)) + 1)
    gw = max(2, math.ceil(w / max(cell_w, 2.0)) + 1)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
