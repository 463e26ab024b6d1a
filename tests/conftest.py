"""Small datasets written on the fly: tests never depend on files committed to the repo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile


def random_image(seed: int, shape=(40, 24), dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    image = rng.normal(2200, 250, size=shape).clip(0, 65535).astype(np.uint16)
    image.flat[rng.integers(0, image.size, 3)] = rng.integers(20000, 30000, 3)
    return image


def write_dataset(root: Path, layout: dict[str, dict[str, int]], shape=(40, 24)) -> Path:
    """Write ``root/<bundle>/<label>/img<k>.tif`` with distinct random 16-bit images: {bundle: {label: n}}."""
    seed = 0
    for bundle, labels in layout.items():
        for label, count in labels.items():
            folder = root / bundle / label
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                seed += 1
                tifffile.imwrite(folder / f"img{k}.tif", random_image(seed, shape))
    return root


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", {"B1": {"normal": 3, "abnormal": 1}, "B2": {"normal": 2, "abnormal": 2}})
