"""Small datasets written on the fly: tests never depend on files committed to the repo."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
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


@pytest.fixture(scope="session", autouse=True)
def converted_models_in_the_sessions_folder(tmp_path_factory) -> Iterator[None]:
    """Extraction on a CPU converts models for OpenVINO (--engine auto) and keeps them per user: in the tests,
    one folder for the session (shared by its tests and their subprocesses), never the user's."""
    before = os.environ.get("XFEAT_CACHE_DIR")
    os.environ["XFEAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("xfeat-cache"))
    yield
    if before is None:
        os.environ.pop("XFEAT_CACHE_DIR", None)
    else:
        os.environ["XFEAT_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks: one thread is faster, and much faster when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", {"B1": {"normal": 3, "abnormal": 1}, "B2": {"normal": 2, "abnormal": 2}})


def write_feature_cache(path: Path, X: np.ndarray, y, bundles, *, backbone="toy", method="m2", fc=None,
                        weights_kind="none", order=None) -> Path:
    """A real cache holding given features ([N, F, D]), written through the same writer xfeat extract uses; row
    i is image img<i> with content hash i, the rows written in ``order`` (default: as given)."""
    from xfeat.features.cache import GroupSettings, Rows
    from xfeat.features.writer import CacheWriter

    n, flips, dim = X.shape
    settings = GroupSettings(backbone=backbone, method=method, input_height=8, input_width=8,
                             flips=",".join(("none", "h", "v", "hv")[:flips]), feature_dim=dim,
                             weights_kind=weights_kind, weights_name=weights_kind, weights_sha256="",
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="cv2.INTER_AREA", precision="fp32")
    rng = np.random.default_rng(0)
    fc_weight, fc_bias = fc if fc is not None else (rng.normal(0, 0.05, (1000, dim)), np.zeros(1000))
    with CacheWriter(path) as writer:
        writer.prepare([settings], {backbone: (fc_weight, fc_bias)}, None)
        rows = np.arange(n) if order is None else np.asarray(order)
        paths = [f"/data/{bundles[i]}/img{i}.tif" for i in rows]
        writer.add({settings.key: Rows(np.asarray(X, np.float32)[rows], paths, [p[6:] for p in paths],
                                       [bundles[i] for i in rows], [int(y[i]) for i in rows],
                                       [f"{i:064x}" for i in rows], [8] * n, [8] * n)})
    return path


@contextmanager
def stored(cache: Path, name: str) -> Iterator[h5py.Dataset]:
    """The dataset that stores ``name`` of a cache: the dataset itself in a single file, its first segment's for a
    virtual dataset of the segment layout (where chunking, compression and checksums are)."""
    with h5py.File(cache, "r") as f:
        ds = f[name]
        file, source = (cache, name) if not ds.is_virtual else (
            Path(cache).parent / ds.virtual_sources()[0].file_name, ds.virtual_sources()[0].dset_name)
    with h5py.File(file, "r") as f:
        yield f[source]
